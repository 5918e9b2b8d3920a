"""The models siftlens runs, and :func:`load_backend`, the one resolver of a ``--model`` argument.

Layout (imports point up this list, never down):

- ``layers.py``  layer selection (:func:`~siftlens.models.layers.resolve_layers`), the one copy
- ``vit.py``, ``mae.py``  the project's own ViT and masked autoencoder
- ``backend.py``  the :class:`~siftlens.models.backend.Backend` interface and its template methods
  (preprocessing, geometry, interventions) with the helpers the backends share
- ``hub.py``  hub ids, revisions, the local cache and the one-line offline error
- ``native.py``, ``hf.py`` (with ``hf_families.py``, ``hf_preprocess.py``), ``timm.py``  only what differs
  per library

``Backend`` is re-exported here. The backends are imported inside :func:`load_backend`, so transformers
and timm are imported only when such a model is asked for.

A model folder may hold a *sidecar* that changes how its model runs, written by a later step of the flow:
:data:`SIDECARS` maps its file name to the module that handles it, and :func:`load_backend` imports that module
(by name, only when a folder holds the file) and returns ``module.wrap(backend, folder)``. models/ thus imports
nothing above it. One sidecar today: ``shortcut_drop.json``, the inference-time drop of a repaired model
(:mod:`siftlens.shortcuts.artefact`), so a repaired folder is one model for every command.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .backend import Backend

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN", "SIDECARS", "Backend", "builtin_dir", "load_backend"]

BUILTIN = {"default": "default"}

# sidecar file of a model folder -> module (a later step of the flow) whose wrap(backend, folder) applies it
SIDECARS = {"shortcut_drop.json": "siftlens.shortcuts.artefact"}


def builtin_dir(name: str) -> Path:
    """Folder of a model that ships inside the package."""
    from importlib.resources import files

    return Path(str(files("siftlens") / "assets" / "models" / BUILTIN[name]))


def load_backend(
    spec,
    device: str | torch.device = "cpu",
    weights: str | None = None,
    revision: str | None = None,
    processor=None,
) -> Backend:
    """Resolve a model into a :class:`Backend`. ``spec`` is one of:

    - a built-in name (``default``) or a local model folder (siftlens, or Hugging Face ``save_pretrained``); a
      folder with a sidecar of :data:`SIDECARS` (a repaired model's ``shortcut_drop.json``) gives its model with
      that sidecar applied (for a repaired model: its forward drops the flagged tokens);
    - a Hugging Face hub id ``org/name`` (or ``org/name@revision``; or pass ``revision``), loaded by
      transformers' ``from_pretrained`` from the cache in ``HF_HOME``, downloaded when online and not cached;
    - ``timm:<name>``: with ``weights`` (a local .safetensors/.pth) loaded from that file, without it timm's
      pretrained weights (fetched through the hub the same way);
    - a model object: a transformers ``PreTrainedModel`` (with ``processor``, an image processor, when its
      preprocessing cannot be found where it was loaded from; or the pair ``(model, processor)``), a timm
      ``VisionTransformer`` (preprocessing from its ``pretrained_cfg``), a siftlens ``ViT``, or a Backend.
    """
    from ..devices import resolve_device
    from ..errors import ModelLoadError

    device = resolve_device(device)  # before any model is read: a bad --device fails fast, in one line
    if not isinstance(spec, (str, os.PathLike)):
        return _from_object(spec, device, processor)
    spec = str(spec)
    if spec in BUILTIN:
        _no_revision(spec, revision)
        d = builtin_dir(spec)
        if not (d / "model.safetensors").exists():
            raise ModelLoadError(f"built-in model '{spec}' is missing from this installation ({d})")
        return _native(d, device, source=f"builtin:{spec}")
    if spec.startswith("timm:"):
        from .timm import TimmBackend

        return TimmBackend.load(spec[len("timm:") :], device=device, weights=weights, pretrained=weights is None,
                                revision=revision)
    p = Path(spec).expanduser()
    if p.is_dir():
        return _load_folder(str(p), device, revision)
    if p.exists():
        raise ModelLoadError(f"{spec} is a file; --model takes a model folder, a built-in name or timm:<name>")
    from .hub import is_hub_id, split_revision

    if is_hub_id(split_revision(spec, revision)[0]):
        from .hf import HFBackend

        return HFBackend.load(spec, device=device, revision=revision)
    names = ", ".join(sorted(BUILTIN))
    raise ModelLoadError(
        f"model '{spec}' not found: give a local model folder, a hub id org/name, timm:<name>, or one of: {names}"
    )


ACCEPTED_OBJECTS = ("a transformers PreTrainedModel (ViT, DeiT, DINOv2, ViT-MAE, CLIP, SigLIP, SigLIP2, BEiT, "
                    "Data2Vec-vision), a timm VisionTransformer, a siftlens ViT or a siftlens Backend")


def _from_object(obj, device: torch.device, processor) -> Backend:
    """A model object, detected by its library the way a folder is by its config."""
    from ..errors import ModelLoadError

    if isinstance(obj, tuple) and len(obj) == 2 and processor is None:
        obj, processor = obj
    if isinstance(obj, Backend):
        return obj
    from torch import nn

    from .vit import ViT

    lib = type(obj).__module__.split(".")[0]
    if isinstance(obj, ViT):
        from .native import NativeBackend

        return NativeBackend(obj, device, source="object:ViT")
    if lib == "transformers" and hasattr(obj, "config"):
        from transformers import PreTrainedModel

        if isinstance(obj, PreTrainedModel):
            from .hf import HFBackend

            return HFBackend.from_model(obj, device, processor=processor)
    if lib == "timm" and isinstance(obj, nn.Module):
        from .timm import TimmBackend

        return TimmBackend.from_model(obj, device)
    raise ModelLoadError(
        f"cannot analyse a {type(obj).__module__}.{type(obj).__name__}; pass a model folder, a hub id org/name, "
        f"timm:<name>, a built-in name, or {ACCEPTED_OBJECTS}"
    )


def _no_revision(spec: str, revision: str | None) -> None:
    if revision is not None:
        from ..errors import ModelLoadError

        raise ModelLoadError(f"--revision applies to hub ids and timm names; '{spec}' is neither")


def _load_folder(spec: str, device: torch.device, revision: str | None = None) -> Backend:
    """A siftlens ViT folder (config.json with ``"siftlens_model": "vit"``) or a Hugging Face one."""
    from ..errors import ModelLoadError
    from ..io import read_json

    p = Path(spec)
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{spec} has no config.json; is it a siftlens or Hugging Face model folder?")
    raw = read_json(cfg_file, "model config", error=ModelLoadError)
    if raw.get("siftlens_model") == "vit":
        _no_revision(spec, revision)
        return _with_sidecars(_native(p, device, source=str(p)), p)
    from .hf import HFBackend

    return _with_sidecars(HFBackend.load(str(p), device=device, revision=revision), p)


def _with_sidecars(backend: Backend, folder: Path) -> Backend:
    """``backend`` with every sidecar of :data:`SIDECARS` that ``folder`` holds applied, by its module's ``wrap``."""
    import importlib

    for name, module in SIDECARS.items():
        if (folder / name).is_file():
            backend = importlib.import_module(module).wrap(backend, folder)
    return backend


def _native(folder: Path, device: torch.device, source: str) -> Backend:
    from .native import NativeBackend
    from .vit import load_vit

    return NativeBackend(load_vit(folder), device, source=source)
