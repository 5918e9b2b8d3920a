"""The ``siftlens`` command line. Thin: each command parses its options, calls a job of :mod:`siftlens.jobs`,
and prints. The commands live by family (:mod:`.analysis`, :mod:`.training`, :mod:`.shortcuts`), all on
the one typer application of :mod:`._app`."""

from __future__ import annotations

import sys

import typer

from ..errors import SiftlensError, one_line_warnings
from . import analysis, shortcuts, training  # noqa: F401 - importing a family registers its commands
from ._app import _state, app

__all__ = ["app", "main"]


def main() -> None:
    one_line_warnings()
    try:
        app()
    except SiftlensError as e:
        if _state["debug"]:
            raise
        typer.secho(f"error: {e}", fg="red", err=True)
        sys.exit(2)
