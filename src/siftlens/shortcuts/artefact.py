"""A repaired model is one artefact: the inference-time drop its network was fitted for lives in the model folder.

A repaired model folder holds, beside the network's ``config.json`` and ``model.safetensors``:

- ``shortcut_drop.json`` (:data:`SIDECAR`): the flag options (``top_words``, ``score_ratio``, ``flagged_only``,
  ``extent``, ``dilate``), the SIFT options, the drop mode, the flagged word ids they give, and the name of
- ``shortcut_discovery.json`` (:data:`DISCOVERY`): a copy of the discovery output whose vocabulary flags the patches,
  so the folder is self-contained and can be moved.

:func:`save_drop` writes both (before the network, so an interrupted save leaves no folder that loads without its
drop); :func:`read_drop` reads them back as a :class:`~siftlens.shortcuts.dropping.DropRule`; :func:`wrap` is what
:func:`siftlens.models.load_backend` calls for a folder holding :data:`SIDECAR` (models/ names this module in its
table of sidecars and imports it only then, so models/ stays below shortcuts/).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import ConfigError, ModelLoadError
from ..io import atomic_path, read_json, write_json
from ..keypoints import SiftOptions
from ..models.backend import Backend
from .discovery.vocabulary import discovery_path, load_vocabulary
from .dropping import DroppedBackend, DropRule
from .flags import FlagOptions

SIDECAR = "shortcut_drop.json"
DISCOVERY = "shortcut_discovery.json"
KIND = "siftlens-shortcut-drop"


def save_drop(folder: str | Path, candidates: str | Path, flags: FlagOptions, sift: SiftOptions,
              mode: str = "group") -> Path:
    """Write :data:`DISCOVERY` (a copy of ``candidates``, a discovery.json or its folder) and :data:`SIDECAR` into
    ``folder``; returns the sidecar's path."""
    folder, src = Path(folder), discovery_path(candidates)
    rule = DropRule(load_vocabulary(src), flags, sift, mode)
    with atomic_path(folder / DISCOVERY) as tmp:
        shutil.copyfile(src, tmp)
    return write_json(folder / SIDECAR, {
        "kind": KIND, "discovery": DISCOVERY, "discovery_source": str(src.resolve()), **rule.describe(),
        "about": "load_backend(<this folder>) drops these patches in the model's forward (docs/spurious.md)"})


def read_drop(folder: str | Path) -> DropRule:
    """The drop rule of a repaired model folder; raises ModelLoadError with a one-line reason."""
    p = Path(folder) / SIDECAR
    raw = read_json(p, "shortcut drop of a repaired model", error=ModelLoadError)
    if not isinstance(raw, dict) or raw.get("kind") != KIND:
        raise ModelLoadError(f"{p} is not the shortcut drop of a repaired model (kind {KIND!r})")
    try:
        flags, sift = FlagOptions(**raw["flags"]), SiftOptions(**raw["sift"])
        rule = DropRule(load_vocabulary(Path(folder) / raw["discovery"]), flags, sift, raw["drop_mode"])
        words = {int(w) for w in raw["words"]}
    except (KeyError, TypeError, ValueError, ConfigError) as e:
        raise ModelLoadError(f"{p} is malformed: {e}") from e
    if rule.words != words:
        raise ModelLoadError(f"{p} records flagged words {sorted(words)} but its discovery output gives "
                             f"{sorted(rule.words)}: the folder was altered; repair again")
    return rule


def wrap(backend: Backend, folder: str | Path) -> DroppedBackend:
    """``backend`` (the network of a repaired model folder) with the folder's drop."""
    return DroppedBackend(backend, read_drop(folder))

