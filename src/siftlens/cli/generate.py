"""The command line generated from config dataclasses: one typer option per config field (its help and default
from the field, :mod:`siftlens.options`), plus the job arguments that are not config fields."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import MISSING
from typing import Annotated

import typer

from ..options import build, flat_options


# -- commands generated from config dataclasses ------------------------------------------------------------
def config_parameters(cls: type, defaults: dict[str, object] | None = None) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of config ``cls`` (its groups flattened, see
    :func:`siftlens.options.flat_options`), with the field's help text and default; ``defaults`` overrides
    a default for this command only (by option name; ``dataclasses.MISSING`` makes the option required)."""
    defaults = defaults or {}
    params = []
    for o in flat_options(cls):
        default = defaults.get(o.name, o.default)
        annotation = Annotated[o.cli_type or o.type, typer.Option(help=o.help)]
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=inspect.Parameter.empty if default is MISSING else default))
    return params


def config_command(app: typer.Typer, cls: type, run: Callable[..., None], *, name: str, doc: str,
                   before: Sequence[inspect.Parameter] = (), after: Sequence[inspect.Parameter] = (),
                   defaults: dict[str, object] | None = None) -> None:
    """Register the command ``name`` on ``app``: its options are ``before``, the fields of ``cls`` and ``after``;
    it calls ``run(config, **the before and after values)`` with the config built from the fields' values."""
    own = [p.name for p in (*before, *after)]

    def command(**values):
        extra = {k: values.pop(k) for k in own}
        run(build(cls, values), **extra)

    command.__signature__ = inspect.Signature([*before, *config_parameters(cls, defaults), *after])
    command.__doc__ = doc
    command.__name__ = name.replace("-", "_")
    app.command(name)(command)


def param(name: str, annotation: type, help: str, default=inspect.Parameter.empty) -> inspect.Parameter:
    """A command option that is not a config field (the model, the images, the output folder ...)."""
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, typer.Option(help=help)])
