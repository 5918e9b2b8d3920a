"""The models siftlens runs, and :func:`load_backend`, the one resolver of a ``--model`` argument.

Layout (imports point up this list, never down):

- ``layers.py``  layer selection (:func:`~siftlens.models.layers.resolve_layers`), the one copy
- ``vit.py``, ``mae.py``  the project's own ViT and masked autoencoder
- ``backend.py``  the :class:`~siftlens.models.backend.Backend` interface and its template methods
  (preprocessing, geometry, interventions) with the helpers the backends share
- ``native.py``, ``hf.py``, ``timm.py``  only what differs per library

``Backend`` is re-exported here. The backends are imported inside :func:`load_backend`, so transformers
and timm are imported only when such a model is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .backend import Backend

if TYPE_CHECKING:
    import torch

__all__ = ["BUILTIN", "Backend", "builtin_dir", "load_backend"]

BUILTIN = {"default": "default"}


def builtin_dir(name: str) -> Path:
    """Folder of a model that ships inside the package."""
    from importlib.resources import files

    return Path(str(files("siftlens") / "assets" / "models" / BUILTIN[name]))


def load_backend(spec: str, device: str | torch.device = "cpu", weights: str | None = None) -> Backend:
    """Resolve ``--model``: a built-in name, a local model folder (siftlens or Hugging Face), or
    ``timm:<name>`` (with ``weights``: a local .safetensors/.pth file; without, random init)."""
    from ..devices import resolve_device
    from ..errors import ModelLoadError
    from .backend import check_not_hub_name

    device = resolve_device(device)  # before any model is read: a bad --device fails fast, in one line
    if spec in BUILTIN:
        d = builtin_dir(spec)
        if not (d / "model.safetensors").exists():
            raise ModelLoadError(f"built-in model '{spec}' is missing from this installation ({d})")
        return _native(d, device, source=f"builtin:{spec}")
    if spec.startswith("timm:"):
        from .timm import TimmBackend

        return TimmBackend.load(spec[len("timm:") :], device=device, weights=weights)
    p = Path(spec)
    if p.is_dir():
        return _load_folder(spec, device)
    if p.exists():
        raise ModelLoadError(f"{spec} is a file; --model takes a model folder, a built-in name or timm:<name>")
    check_not_hub_name(spec)
    names = ", ".join(sorted(BUILTIN))
    raise ModelLoadError(f"model '{spec}' not found: give a local model folder, timm:<name>, or one of: {names}")


def _load_folder(spec: str, device: torch.device) -> Backend:
    """A siftlens ViT folder (config.json with ``"siftlens_model": "vit"``) or a Hugging Face one."""
    from ..errors import ModelLoadError
    from ..io import read_json

    p = Path(spec)
    cfg_file = p / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{spec} has no config.json; is it a siftlens or Hugging Face model folder?")
    raw = read_json(cfg_file, "model config", error=ModelLoadError)
    if raw.get("siftlens_model") == "vit":
        return _native(p, device, source=str(p))
    from .hf import HFBackend

    return HFBackend.load(str(p), device=device)


def _native(folder: Path, device: torch.device, source: str) -> Backend:
    from .native import NativeBackend
    from .vit import load_vit

    return NativeBackend(load_vit(folder), device, source=source)
