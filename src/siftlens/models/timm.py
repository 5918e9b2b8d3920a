"""timm Vision Transformers (``VisionTransformer`` and relatives with ``blocks[i].attn``).

timm is imported lazily, inside :meth:`TimmBackend.load`, so siftlens works without it. ``timm:<name>`` with
a local ``.safetensors`` or ``.pth`` file builds the architecture and loads that file; without one,
:func:`~siftlens.models.load_backend` asks timm for its pretrained weights, which timm reads from the Hugging
Face cache (``HF_HOME``) or downloads there from the hub (repo ``timm/<arch>.<tag>``). A timm model object
is taken as it is (:meth:`TimmBackend.from_model`).

Attention: in timm's non-fused path each ``Attention`` computes ``attn = softmax(q k^T * scale)`` and passes
it through ``attn_drop`` (an ``nn.Dropout``, the identity in eval mode); the input of ``attn_drop`` is
``attn: (B, h, S, S)``. The fused path (``F.scaled_dot_product_attention``) never materialises it, so
:meth:`TimmBackend.eager` sets ``fused_attn = False`` on every module that has the flag and restores the
previous values after.

Geometry is read from the model: ``patch_embed.patch_size``, ``patch_embed.img_size`` and ``grid_size``,
``num_prefix_tokens`` (CLS, distillation, registers); preprocessing from ``model.pretrained_cfg`` (mean,
std, interpolation, crop_pct, crop_mode) applied at the model's own input size.

Interventions (:meth:`~siftlens.models.backend.Backend.forward_intervened`): tokens are dropped from the
output of ``norm_pre`` (applied right after the position embeddings and ``patch_drop``, per token, so
gathering after it equals gathering before); the bias is passed to each chosen block's ``attn`` as its
``attn_mask`` (added to the logits in both the fused and the eager path; timm >= 1.0 takes it).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import GeometryError, ModelLoadError
from .backend import IMAGENET_MEAN, IMAGENET_STD, Backend, first_line, pair, resize_center_crop, shortest_edge_size
from .hub import commit_of, load_error, split_revision

DEFAULT_CROP_PCT = 0.875  # timm.data.DEFAULT_CROP_PCT
_CHECKPOINT_KEYS = ("model", "state_dict")


def _attn_drop_input(module, args, kwargs, output) -> torch.Tensor | None:
    """attn_drop(attn): its input is the post-softmax attention (B, h, S, S)."""
    if args:
        return args[0]
    return kwargs.get("input")


class TimmBackend(Backend):
    """A timm ViT-family model; ``source`` is ``timm:<name>`` (plus the weights file, if any)."""

    kind = "timm"
    bias_arg = "attn_mask"
    bias_arg_needs = "a newer timm (pip install -U timm)"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu", source: str = ""):
        super().__init__(model, device)
        self.source = source
        self.hub: dict | None = None  # {"repo", "revision", "commit"} of timm's pretrained weights
        name = source or type(model).__name__
        blocks = getattr(model, "blocks", None)
        pe = getattr(model, "patch_embed", None)
        if blocks is None or pe is None or len(blocks) == 0:
            raise ModelLoadError(
                f"timm model {name} has no patch_embed/blocks; siftlens supports ViT-family timm models"
            )
        for i, blk in enumerate(blocks):
            attn = getattr(blk, "attn", None)
            if not isinstance(getattr(attn, "attn_drop", None), nn.Module) or not hasattr(attn, "fused_attn"):
                raise ModelLoadError(
                    f"block {i} of timm model {name} has no attn.attn_drop/attn.fused_attn; siftlens "
                    "supports timm models whose blocks use timm's standard Attention"
                )
        ph, pw = pair(pe.patch_size, "patch_embed.patch_size")
        if ph != pw:
            raise GeometryError(f"non-square patches {ph}x{pw} are not supported")
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        img_size = getattr(pe, "img_size", None)
        if img_size is None:
            img_size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
        self.patch_size = ph
        self.input_size = pair(img_size, "patch_embed.img_size")
        grid = getattr(pe, "grid_size", None)
        H, W = self.input_size
        self.grid_size = pair(grid, "patch_embed.grid_size") if grid is not None else (H // ph, W // ph)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.num_layers = len(blocks)
        self.num_heads = int(blocks[0].attn.num_heads)
        self.mean = tuple(float(m) for m in cfg.get("mean") or IMAGENET_MEAN)
        self.std = tuple(float(s) for s in cfg.get("std") or IMAGENET_STD)
        self.crop_pct = float(cfg.get("crop_pct") or DEFAULT_CROP_PCT)
        self.crop_mode = str(cfg.get("crop_mode") or "center")
        self.interpolation = str(cfg.get("interpolation") or "bicubic")
        if self.crop_mode not in ("center", "squash"):
            raise ModelLoadError(
                f"timm crop_mode '{self.crop_mode}' is not supported; set pretrained_cfg crop_mode to "
                "'center' or 'squash'"
            )
        labels = cfg.get("label_names")
        num_classes = int(getattr(model, "num_classes", 0) or 0)
        self.class_names = [str(x) for x in labels] if labels and len(labels) == num_classes else None
        self.check_geometry()

    # loading -------------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        name: str,
        device: str | torch.device = "cpu",
        weights: str | None = None,
        pretrained: bool = False,
        revision: str | None = None,
        **model_kwargs,
    ) -> TimmBackend:
        """``timm.create_model(name, pretrained=pretrained, **model_kwargs)``; then ``weights`` (a local
        .safetensors / .pth / .pt file, optionally wrapped as {"model": sd} or {"state_dict": sd}).

        ``pretrained``: timm's own weights for ``name`` (``arch.tag``), which timm fetches from the Hugging Face
        hub (repo ``timm/<arch>.<tag>``) into the cache in ``HF_HOME``, or reads from there; ``revision`` pins
        the hub revision. ``load_backend`` asks for them when no weights file is given."""
        try:
            import timm
        except ImportError as e:
            raise ModelLoadError(
                "timm backend needs `pip install timm` (or `pip install siftlens[timm]`); timm needs a "
                "torchvision that matches your torch"
            ) from e
        if weights is not None and not Path(weights).expanduser().is_file():
            raise ModelLoadError(f"weights file {weights} not found; pass a local .safetensors or .pth file")
        name, revision = split_revision(name, revision)
        if revision is not None and not pretrained:
            raise ModelLoadError("--revision applies to timm's pretrained weights, not to a --weights file")
        hub_id = _hub_id(timm, name) if pretrained else None
        if pretrained and hub_id is None:
            raise ModelLoadError(
                f"timm has no pretrained weights on the Hugging Face hub for '{name}'; pass --weights FILE"
            )
        if hub_id is not None and revision is not None:
            model_kwargs["pretrained_cfg_overlay"] = {"hf_hub_id": f"{hub_id}@{revision}"}
        try:
            model = timm.create_model(name, pretrained=pretrained, **model_kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ModelLoadError(
                    f"timm has no model '{name}'; list candidates with timm.list_models('*vit*')"
                ) from e
            raise _pretrained_error(e, hub_id, revision, name) from e
        except (TypeError, ValueError, AssertionError, OSError) as e:
            raise _pretrained_error(e, hub_id, revision, name) from e
        source = f"timm:{name}"
        if weights is not None:
            _load_weights(model, Path(weights).expanduser(), name)
            source += f" ({weights})"
        hub = None
        if hub_id is not None:
            source += "" if revision is None else f"@{revision}"
            filename = model.pretrained_cfg.get("hf_hub_filename") or "model.safetensors"
            hub = {"repo": hub_id, "revision": revision or "main", "commit": commit_of(hub_id, filename, revision)}
        backend = cls(model, device, source=source)
        backend.hub = hub
        return backend

    @classmethod
    def from_model(cls, model: nn.Module, device: str | torch.device = "cpu") -> TimmBackend:
        """A timm model object; preprocessing from its ``pretrained_cfg``."""
        cfg = dict(getattr(model, "pretrained_cfg", None) or {})
        arch = cfg.get("architecture") or type(model).__name__
        tag = f".{cfg['tag']}" if cfg.get("tag") else ""
        return cls(model, device, source=f"object:timm:{arch}{tag}")

    # preprocessing -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL image -> (H, W, 3) uint8 as timm's eval transform: resize to input / crop_pct, centre crop."""
        if img.mode != "RGB":
            img = img.convert("RGB")
        H, W = self.input_size
        sh, sw = math.floor(H / self.crop_pct), math.floor(W / self.crop_pct)
        w0, h0 = img.size
        resize_to: tuple[int, int]
        if self.crop_mode == "squash":
            resize_to = (sh, sw)
        elif sh == sw:  # torchvision Resize(int): the shorter side becomes sh, the longer one is truncated
            resize_to = shortest_edge_size(w0, h0, sh)
        else:
            # timm ResizeKeepRatio: scale so that both sides cover the target, rounding each side
            ratio = min(h0 / sh, w0 / sw)
            resize_to = (round(h0 / ratio), round(w0 / ratio))
        return resize_center_crop(img, (H, W), resize_to=resize_to, resample=self.interpolation)

    # attention -----------------------------------------------------------------------------------
    def probes(self):
        """Per block: ``attn.attn_drop``, whose input is attn (B, h, S, S) in the non-fused path."""
        return [(blk.attn.attn_drop, _attn_drop_input) for blk in self.model.blocks]

    @contextlib.contextmanager
    def eager(self):
        """Set ``fused_attn = False`` on every module that has it; restore each previous value after."""
        mods = [m for m in self.model.modules() if hasattr(m, "fused_attn")]
        prev = [m.fused_attn for m in mods]
        try:
            for m in mods:
                m.fused_attn = False
            yield
        finally:
            for m, f in zip(mods, prev, strict=True):
                m.fused_attn = f

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """x: (B, 3, H, W) -> logits (B, C), or None for a model without a classifier (num_classes=0)."""
        out = self.model(x)
        return out if int(getattr(self.model, "num_classes", 0) or 0) > 0 else None

    # interventions: what differs from the template in Backend -------------------------------------
    def token_module(self) -> nn.Module:
        """``norm_pre``: the tokens (B, T + N, D) right after the position embeddings (and patch_drop)."""
        norm_pre = getattr(self.model, "norm_pre", None)
        if not isinstance(norm_pre, nn.Module):
            raise ModelLoadError(
                f"timm model {self.source or type(self.model).__name__} has no norm_pre module; token "
                "drop needs timm's VisionTransformer layout"
            )
        return norm_pre

    def bias_module(self, layer: int) -> nn.Module:
        return self.model.blocks[layer].attn

    def describe(self) -> dict:
        d = super().describe()
        d.update({
            "timm_class": type(self.model).__name__, "crop_pct": self.crop_pct, "crop_mode": self.crop_mode,
            "interpolation": self.interpolation,
        })
        if self.hub is not None:
            d["hub"] = dict(self.hub)
        return d


def _hub_id(timm, name: str) -> str | None:
    """The hub repo timm fetches ``name``'s pretrained weights from (``timm/<arch>.<tag>``), if any."""
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    if cfg is None:
        return None
    return getattr(cfg, "hf_hub_id", None) or None


def _pretrained_error(e: BaseException, hub_id: str | None, revision: str | None, name: str) -> ModelLoadError:
    if hub_id is not None:
        return load_error(e, hub_id, revision, "timm weights")
    return ModelLoadError(f"could not create timm model '{name}': {first_line(e)}")


def _load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a state dict from ``path`` into ``model`` strictly; every failure is a one-line ModelLoadError."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, pickle and zip errors have no common base class
        raise ModelLoadError(f"could not read weights {path}: {first_line(e)}") from e
    for key in _CHECKPOINT_KEYS:
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelLoadError(
            f"{path} does not hold a state dict of tensors (or one under 'model'/'state_dict')"
        )
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches; torch lists them one per line after a header
        lines = [s.strip() for s in str(e).splitlines() if "size mismatch" in s] or [first_line(e)]
        raise ModelLoadError(f"weights {path} do not fit timm model '{name}': {lines[0]}") from e
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise ModelLoadError(
            f"weights {path} do not fit timm model '{name}': {len(missing)} missing and {len(unexpected)} "
            f"unexpected keys (e.g. {example}); pass the model name these weights were trained with"
        )
