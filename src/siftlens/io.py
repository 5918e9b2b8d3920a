"""Atomic, durable output writing: write to a temporary name in the same folder, fsync it, rename it into
place, then fsync the folder (what databases do).

An interrupted run therefore never leaves a half-written file that looks complete, and after a power loss a
file is either absent (or its previous version) or whole: never an empty or partial file under its name.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it, rename it to ``target`` and fsync the
    folder; on failure delete it."""
    target = Path(target)
    make_dirs(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        fsync_file(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def make_dirs(folder: Path) -> None:
    """``mkdir -p folder``, with each new folder's entry fsynced into its parent."""
    new = []
    p = folder
    while not p.exists() and p != p.parent:
        new.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    for d in reversed(new):
        fsync_dir(d.parent)


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: str | os.PathLike) -> None:
    """Flush a folder's entries (the names created or renamed in it) to the disk; a no-op where a folder
    cannot be opened or fsynced (Windows, some network file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(target: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    return Path(target)


def write_text(target: str | os.PathLike, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def _json_default(o):
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | os.PathLike, what: str = "file", error: type[Exception] | None = None):
    """Parse the JSON file ``path``; a missing or malformed file raises ``error`` (a SiftlensError subclass,
    ConfigError by default) with a one-line message naming ``what`` it should have been."""
    from .errors import ConfigError

    err = error or ConfigError
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise err(f"{what} not found: {path}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise err(f"{what} {path} is not valid JSON ({str(e).splitlines()[0]})") from e
