"""The typer application every command registers on, and the options of the root command."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
    help="Explain what Vision Transformer self-attention does, in terms of SIFT keypoints.",
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"siftlens {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print siftlens's version and exit.")] = False):
    _state["debug"] = debug
