"""Hub ids the libraries' way: names, revisions, the local cache, and what goes wrong offline.

siftlens downloads nothing itself. A hub id (``org/name``, optionally ``org/name@revision``) is handed to
transformers' ``from_pretrained`` (or timm's pretrained loading), which reads the user's cache
(``HF_HOME``, by default ``~/.cache/huggingface``) and downloads missing files from the Hugging Face hub
when the network is there. ``HF_HUB_OFFLINE=1`` makes the libraries use the cache only. This module turns
their errors into one line, and finds the commit a revision resolved to, which the run manifest records.

huggingface_hub is imported inside the functions: siftlens works without it for local models.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelLoadError, ModelNotCachedError
from .backend import first_line

# org/name: the hub's repo id rules (letters, digits, '-', '_', '.'; one slash)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]$")
_SHA = re.compile(r"^[0-9a-f]{40}$")


def split_revision(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``org/name@rev`` -> (``org/name``, ``rev``); a ``revision`` given apart must agree with it."""
    name, sep, rev = spec.partition("@")
    if not sep:
        return spec, revision
    if not rev:
        raise ModelLoadError(f"'{spec}' ends with '@': give a revision after it (a branch, tag or commit)")
    if revision is not None and revision != rev:
        raise ModelLoadError(f"'{spec}' names revision {rev} but --revision is {revision}; give one of them")
    return name, rev


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` (without ``@revision``) has the form of a hub repo id ``org/name``."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec


def cache_description() -> str:
    """``HF_HOME=<folder>`` (and the hub cache when ``HF_HUB_CACHE`` moves it), as the libraries see them."""
    from huggingface_hub import constants

    text = f"HF_HOME={constants.HF_HOME}"
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        text += f", HF_HUB_CACHE={constants.HF_HUB_CACHE}"
    return text


def offline() -> bool:
    """Whether the libraries are told to stay offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def not_cached(name: str, revision: str | None) -> ModelNotCachedError:
    """The one-line error for a hub model that is not cached and cannot be fetched now."""
    what = f"'{name}'" + (f" (revision {revision})" if revision else "")
    where = cache_description()
    if offline():
        return ModelNotCachedError(
            f"model {what} is not in the local cache ({where}) and HF_HUB_OFFLINE=1 forbids downloading it: "
            "run once with network access and HF_HUB_OFFLINE unset, or point HF_HOME at a cache that holds it"
        )
    return ModelNotCachedError(
        f"model {what} is not in the local cache ({where}) and the hub cannot be reached: connect to the "
        "network, or point HF_HOME at a cache that holds it (HF_HUB_OFFLINE=1 uses the cache only)"
    )


def _is_cache_miss(e: BaseException) -> bool:
    """Whether an exception chain says "not in the cache, and no network" (offline mode or no connection)."""
    names = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "ConnectError", "ConnectionError", "ConnectTimeout")
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(type(x).__name__ in names for x in type(e).__mro__):
            return True
        text = str(e)
        if "couldn't connect" in text or "offline mode" in text or "cannot find the requested files" in text:
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def load_error(e: BaseException, name: str, revision: str | None, what: str = "model") -> ModelLoadError:
    """A library's loading error for hub id ``name`` as one line: not cached, or the library's first line."""
    if _is_cache_miss(e):
        return not_cached(name, revision)
    at = f" at revision {revision}" if revision else ""
    return ModelLoadError(f"could not load {what} '{name}'{at} from the Hugging Face hub: {first_line(e)}")


def commit_of(repo_id: str, filename: str, revision: str | None) -> str | None:
    """The commit sha that ``revision`` (None: main) of ``repo_id`` resolves to in the local cache, read from
    the snapshot folder that holds ``filename`` (the libraries have just fetched it there)."""
    from huggingface_hub import try_to_load_from_cache

    if revision and _SHA.match(revision):
        return revision
    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    return snapshot_commit(path) if isinstance(path, str) else None


def snapshot_commit(path: str | Path | None) -> str | None:
    """``.../snapshots/<sha>/<file>`` -> ``<sha>``; None for a path outside a hub cache."""
    if path is None:
        return None
    p = Path(path)
    for parent in p.parents:
        if parent.parent.name == "snapshots" and _SHA.match(parent.name):
            return parent.name
    return None


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (keys a vision tower leaves out, e.g. CLIP's text model) and progress
    bars while a model loads; siftlens checks the keys itself. The previous settings come back after."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def with_revision(spec: str, revision: str | None) -> str:
    """``--model`` and ``--revision`` as one model string, ``org/name@rev`` (``timm:name@rev``), which
    :func:`~siftlens.models.load_backend` reads back and a run's manifest keeps."""
    if revision is None:
        return spec
    if "@" in spec:
        split_revision(spec, revision)  # one line when the two disagree
        return spec
    return f"{spec}@{revision}"
