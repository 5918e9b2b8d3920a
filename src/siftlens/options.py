"""Options declared once: a config dataclass field carries its default and its help text.

Every job's parameters are a dataclass. A field made with :func:`option` carries the help text a user
reads in ``siftlens <command> --help``; a field made with :func:`group` holds a nested config (a shared
group such as the SIFT parameters or the run options). The command line is generated from these fields
(:mod:`siftlens.cli.generate`), so an option is written in one place only::

    @dataclass
    class RunOptions:
        device: str = option("cpu", "cpu, cuda, cuda:1, mps ...")
        batch_size: int = option(32, "Images per forward pass.")

    @dataclass
    class AnalysisConfig:
        n_levels: int = option(3, "Semantic levels L (level 0 = no keypoints).", flag="levels")
        run: RunOptions = group(RunOptions)

:func:`flat_options` lists the fields of a config and of its groups, flattened (a group's fields appear
under their own names, so ``--batch-size`` stays ``--batch-size``), and :func:`build` makes the nested
config back from such a flat mapping. Nothing here imports typer.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field

from .errors import ConfigError

_HELP, _FLAG, _CLI, _PARSE, _CLI_TYPE, _GROUP, _HELPS = "help", "flag", "cli", "parse", "cli_type", "group", "helps"


def option(default=MISSING, help: str = "", *, flag: str | None = None, cli: bool = True,
           parse: Callable[[str], object] | None = None, cli_type: type | None = None,
           default_factory=MISSING):
    """A config field with its help text.

    flag: the command-line name without dashes when it differs from the field's (``levels`` for
    ``n_levels``); cli: False keeps the field out of the command line (set from Python only);
    parse and cli_type: the command line takes a ``cli_type`` (str by default) that ``parse`` turns into
    the field's value (``"0,3,-1"`` -> ``[0, 3, -1]``).
    """
    meta = {_HELP: help, _FLAG: flag, _CLI: cli, _PARSE: parse, _CLI_TYPE: cli_type or (str if parse else None)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def group(cls: type, help: str = "", *, helps: Mapping[str, str] | None = None, **defaults) -> dataclasses.Field:
    """A nested config of type ``cls`` whose fields are options of the same command; its default is
    ``cls(**defaults)``, so one job can give a shared group its own defaults (``batch_size=256``), and
    ``helps`` its own help text for some of the group's fields (``{"batch_size": "Global batch size ..."}``)."""
    return field(default_factory=functools.partial(cls, **defaults),
                 metadata={_GROUP: True, _HELP: help, _HELPS: dict(helps or {})})


@dataclass(frozen=True)
class FlatOption:
    """One command-line option of a config: ``path`` leads from the config through its groups to the field."""

    path: tuple[str, ...]
    flag: str  # without the leading dashes, words joined by '-'
    type: object  # the field's resolved type annotation
    default: object
    help: str
    parse: Callable[[str], object] | None
    cli_type: type | None

    @property
    def name(self) -> str:
        """The Python identifier of the option (the flag with '-' as '_')."""
        return self.flag.replace("-", "_")


def is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get(_GROUP))


def flat_options(cls: type, *, cli_only: bool = True) -> list[FlatOption]:
    """The options of config class ``cls`` and of its groups, in declaration order, each once.

    Raises ConfigError when two fields would take the same flag (a group's field shadowing another).
    """
    out: list[FlatOption] = []
    _collect(cls, (), out, cli_only)
    seen: dict[str, tuple[str, ...]] = {}
    for o in out:
        if o.flag in seen:
            raise ConfigError(f"{cls.__name__}: --{o.flag} is declared twice ({'.'.join(seen[o.flag])} and "
                              f"{'.'.join(o.path)})")
        seen[o.flag] = o.path
    return out


def _collect(cls: type, prefix: tuple[str, ...], out: list[FlatOption], cli_only: bool,
             instance: object | None = None, helps: Mapping[str, str] | None = None) -> None:
    """Append the options of ``cls`` to ``out``; ``instance`` (a group's default) supplies the defaults and
    ``helps`` the help texts that the enclosing config gives the group's fields."""
    hints = typing.get_type_hints(cls)
    helps = helps or {}
    for f in dataclasses.fields(cls):
        if is_group(f):
            _collect(hints[f.name], prefix + (f.name,), out, cli_only, f.default_factory(), f.metadata.get(_HELPS))
            continue
        if cli_only and not f.metadata.get(_CLI, True):
            continue
        if instance is not None:
            default = getattr(instance, f.name)
        else:
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else MISSING)
        help_text = helps.get(f.name, f.metadata.get(_HELP, ""))
        out.append(FlatOption(prefix + (f.name,), (f.metadata.get(_FLAG) or f.name).replace("_", "-"),
                              hints[f.name], default, help_text, f.metadata.get(_PARSE), f.metadata.get(_CLI_TYPE)))


def build(cls: type, values: Mapping[str, object]):
    """The config ``cls`` from a flat mapping of option names (:attr:`FlatOption.name`) to values; options
    that are absent keep their defaults, and an option's ``parse`` turns the command line's text into the
    field's value."""
    by_path = {o.path: o for o in flat_options(cls, cli_only=False)}
    unknown = set(values) - {o.name for o in by_path.values()}
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} option(s): {', '.join(sorted(unknown))}")
    return _build(cls, (), values, by_path)


def _build(cls: type, prefix: tuple[str, ...], values: Mapping[str, object], by_path: dict,
           base: object | None = None):
    """``cls`` from ``values``; fields without a value keep ``base``'s (a group's default), else the field's."""
    hints = typing.get_type_hints(cls)
    kwargs = {} if base is None else {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}
    for f in dataclasses.fields(cls):
        path = prefix + (f.name,)
        if is_group(f):
            kwargs[f.name] = _build(hints[f.name], path, values, by_path, f.default_factory())
            continue
        o = by_path[path]
        if o.name in values:
            v = values[o.name]
            kwargs[f.name] = o.parse(v) if o.parse is not None and isinstance(v, str) else v
    return cls(**kwargs)


@dataclass
class RunOptions:
    """How a job runs over its images, shared by every job (a nested config group; a job may give it its own
    defaults with ``group(RunOptions, batch_size=256)``)."""

    device: str = option("cpu", "cpu, cuda, cuda:1, mps ...")
    batch_size: int = option(32, "Images per batch.")
    workers: int = option(0, "Data-loading worker processes (decode and SIFT in parallel).")
    seed: int = option(0, "Seed of every random draw of the job.")
    limit: int | None = option(None, "Use at most this many images (spread over classes).")
