"""One interface over the project's ViT, Hugging Face and timm models.

A :class:`Backend` knows, for its model:

- the preprocessing the model expects, split in two: :meth:`Backend.preprocess` turns a PIL image into
  the exact pixels the model sees (``(H, W, 3) uint8``, after resize/crop, before normalisation; SIFT
  runs on these), and :meth:`Backend.normalize` turns a batch of them into the model's input tensor;
- its geometry, read from the model: patch size ``P``, grid ``(g_h, g_w)``, prefix tokens ``T``;
- where post-softmax attention can be observed: :meth:`Backend.probes` lists, per layer, a module and a
  function that pulls ``attn: (B, h, S, S)`` out of that module's forward hook arguments, and
  :meth:`Backend.eager` is a context manager that makes the model materialise attention (fused
  kernels never do) and restores the previous mode on exit.

Capturing itself lives in :mod:`siftlens.attention`.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..devices import resolve_device
from ..errors import GeometryError, ModelLoadError

# extractor(module, args, kwargs, output) -> attn (B, h, S, S)
Extractor = Callable[[nn.Module, tuple, dict, object], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING,
}


def resize_center_crop(
    img: Image.Image,
    size: tuple[int, int],
    resize_to: int | tuple[int, int] | None = None,
    resample: str | int = "bicubic",
) -> np.ndarray:
    """Resize then centre-crop to ``size`` = (H, W); returns (H, W, 3) uint8.

    ``resize_to``: an int resizes the shorter side to it (aspect kept), a pair (H, W) resizes to exactly
    that, None resizes the shorter side to fit ``size`` (the common "resize + centre crop").
    """
    H, W = size
    rs = _RESAMPLE.get(resample, resample) if isinstance(resample, str) else resample
    w0, h0 = img.size
    if resize_to is None:
        scale = max(H / h0, W / w0)
        new = (max(W, round(w0 * scale)), max(H, round(h0 * scale)))
    elif isinstance(resize_to, int):
        scale = resize_to / min(w0, h0)
        new = (max(1, round(w0 * scale)), max(1, round(h0 * scale)))
    else:
        new = (resize_to[1], resize_to[0])
    if new != (w0, h0):
        img = img.resize(new, rs)
    w1, h1 = img.size
    if (w1, h1) != (W, H):
        if w1 < W or h1 < H:  # pad (rare: resize_to smaller than the crop)
            canvas = Image.new("RGB", (max(W, w1), max(H, h1)))
            canvas.paste(img, ((canvas.width - w1) // 2, (canvas.height - h1) // 2))
            img, (w1, h1) = canvas, canvas.size
        left, top = int(round((w1 - W) / 2.0)), int(round((h1 - H) / 2.0))
        img = img.crop((left, top, left + W, top + H))
    return np.asarray(img, dtype=np.uint8)


class Backend(abc.ABC):
    """Common interface; subclasses fill in the model-specific parts.

    Attributes read from the model: ``patch_size``, ``grid_size`` (g_h, g_w), ``num_prefix_tokens`` (T),
    ``num_layers``, ``num_heads``, ``input_size`` (H, W), ``mean``, ``std``, ``class_names`` (or None),
    ``has_cls`` (whether token 0 is a CLS token).
    """

    kind = "base"

    def __init__(self, model: nn.Module, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.model = model.eval()
        self.model.to(self.device)
        self.source = ""
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD
        self.class_names: list[str] | None = None
        self.has_cls = True

    # geometry ------------------------------------------------------------------------------------
    patch_size: int
    grid_size: tuple[int, int]
    num_prefix_tokens: int
    num_layers: int
    num_heads: int
    input_size: tuple[int, int]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def check_geometry(self) -> None:
        H, W = self.input_size
        P = self.patch_size
        if H % P or W % P:
            raise GeometryError(f"patch size {P} does not divide the model input {H}x{W}")
        if (H // P, W // P) != tuple(self.grid_size):
            raise GeometryError(f"grid {self.grid_size} does not match input {H}x{W} with patch {P}")

    def patch_centers(self) -> torch.Tensor:
        """(N, 2) float32 (x, y) centre of every patch in model-input pixels, row-major."""
        gh, gw = self.grid_size
        P = self.patch_size
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        return torch.stack([xs.flatten(), ys.flatten()], 1).float() * P + (P - 1) / 2.0

    # preprocessing -------------------------------------------------------------------------------
    def preprocess(self, img: Image.Image) -> np.ndarray:
        """PIL RGB image -> (H, W, 3) uint8, exactly the pixels the model sees before normalisation."""
        return resize_center_crop(img, self.input_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) uint8 -> (B, 3, H, W) float on the model's device and dtype."""
        x = pixels.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return ((x - mean) / std).to(self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # attention -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def probes(self) -> list[tuple[nn.Module, Extractor]]:
        """Per layer, in order: (module to hook, extractor of attn (B, h, S, S))."""

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Make attention observable for the duration of the block; restore the previous mode after."""
        yield

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Run the whole model. x: (B, 3, H, W) -> logits (B, C), or None for a model without a head."""

    # interventions (prompting, occlusion) ---------------------------------------------------------
    @abc.abstractmethod
    def forward_intervened(
        self,
        x: torch.Tensor,
        keep_idx: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
        layers: Sequence[int] | None = None,
    ) -> torch.Tensor | None:
        """Run the model with patch tokens dropped and/or an additive bias on the attention logits.

        x: (B, 3, H, W). keep_idx: (B, K) long indices in [0, N) of the patch tokens to keep (row-major
        patch order); the others are removed after the position embeddings were added, so every kept token
        keeps its own position; prefix tokens (CLS, registers) are always kept. key_bias: (B, N) float,
        added to the logits of every query towards patch key j (prefix keys get 0; ``-inf`` removes key j
        from every softmax), in the blocks listed in ``layers`` (negative from the end; None = all). With
        ``keep_idx``, key_bias still indexes the N original patches. Returns logits (B, C), or None for a
        model without a classifier. With neither argument it equals :meth:`forward`.
        """

    def describe(self) -> dict:
        """Everything a manifest needs to know about the model and its preprocessing."""
        return {
            "backend": self.kind, "source": self.source, "class": type(self.model).__name__,
            "patch_size": self.patch_size, "grid": list(self.grid_size),
            "prefix_tokens": self.num_prefix_tokens, "layers": self.num_layers, "heads": self.num_heads,
            "input_size": list(self.input_size), "mean": list(self.mean), "std": list(self.std),
            "has_cls": self.has_cls, "num_classes": len(self.class_names) if self.class_names else None,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


class NativeBackend(Backend):
    """The project's own :class:`~siftlens.models.vit.ViT`."""

    kind = "native"

    def __init__(self, model, device="cpu", source: str = ""):
        super().__init__(model, device)
        cfg = model.cfg
        self.source = source
        self.patch_size = model.patch_size
        self.grid_size = tuple(model.grid_size)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.num_layers = len(model.blocks)
        self.num_heads = model.blocks[0].attn.heads
        self.input_size = tuple(cfg.img_size)
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        self.class_names = list(cfg.class_names) or None
        self.has_cls = cfg.cls_token
        self.check_geometry()

    def probes(self):
        return [(blk.attn.probe, _probe_output) for blk in self.model.blocks]

    @contextlib.contextmanager
    def eager(self):
        prev = [blk.attn.fused for blk in self.model.blocks]
        self.model.set_fused(False)
        try:
            yield
        finally:
            for blk, f in zip(self.model.blocks, prev, strict=True):
                blk.attn.fused = f

    def forward(self, x):
        if self.model.cfg.num_classes > 0:
            return self.model(x)
        self.model.forward_features(x)
        return None

    def forward_intervened(self, x, keep_idx=None, key_bias=None, layers=None):
        if keep_idx is not None:
            check_keep_idx(keep_idx, x.shape[0], self.num_patches)
        bias = key_bias_tokens(key_bias, keep_idx, self.num_prefix_tokens)
        tokens = self.model.forward_features(x, keep_idx, bias, bias_layers=layers)
        if self.model.cfg.num_classes <= 0:
            return None
        key_mask = None
        if bias is not None and layers is None:  # mean pooling skips keys removed from every softmax
            key_mask = ~torch.isneginf(bias[:, 0, 0])
        return self.model.head(self.model.pool(tokens, key_mask))


def key_bias_tokens(
    key_bias: torch.Tensor | None, keep_idx: torch.Tensor | None, num_prefix: int
) -> torch.Tensor | None:
    """Patch key bias (B, N) -> additive logits bias (B, 1, 1, T + K) over the sequence actually run.

    Prefix keys get 0; with ``keep_idx`` (B, K) only the kept patches' entries remain, in that order.
    """
    if key_bias is None:
        return None
    if key_bias.ndim != 2:
        raise GeometryError(f"key_bias must be (B, N), got shape {tuple(key_bias.shape)}")
    kb = key_bias.float()
    if keep_idx is not None:
        kb = torch.gather(kb, 1, keep_idx.to(kb.device))
    prefix = kb.new_zeros(kb.shape[0], num_prefix)
    return torch.cat([prefix, kb], 1)[:, None, None, :]


def merge_mask_and_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An attention layer's mask (None, bool "may attend", or additive float) plus an additive key bias
    (broadcastable to it), as one additive float mask in ``bias``'s dtype."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=bias.dtype, device=bias.device).masked_fill(~mask, float("-inf")) + bias
    return mask.to(bias.dtype) + bias


def check_keep_idx(keep_idx: torch.Tensor, batch: int, num_patches: int) -> None:
    """Raise GeometryError unless keep_idx is (B, K) with indices in [0, N)."""
    if keep_idx.ndim != 2 or keep_idx.shape[0] != batch:
        raise GeometryError(f"keep_idx must be (B={batch}, K), got shape {tuple(keep_idx.shape)}")
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= num_patches):
        raise GeometryError(f"keep_idx holds indices outside [0, {num_patches})")


def _probe_output(module, args, kwargs, output) -> torch.Tensor:
    return output


# -- resolving a --model argument -------------------------------------------------------------------
BUILTIN = {"default": "default"}


def builtin_dir(name: str) -> Path:
    """Folder of a model that ships inside the package."""
    from importlib.resources import files

    return Path(str(files("siftlens") / "assets" / "models" / BUILTIN[name]))


def load_backend(spec: str, device: str | torch.device = "cpu", weights: str | None = None) -> Backend:
    """Resolve ``--model``: a built-in name, a local model folder (siftlens or Hugging Face), or
    ``timm:<name>`` (with ``weights``: a local .safetensors/.pth file; without, random init)."""
    from .vit import load_config, load_vit

    device = resolve_device(device)  # before any model is read: a bad --device fails fast, in one line
    if spec in BUILTIN:
        d = builtin_dir(spec)
        if not (d / "model.safetensors").exists():
            raise ModelLoadError(f"built-in model '{spec}' is missing from this installation ({d})")
        return NativeBackend(load_vit(d), device, source=f"builtin:{spec}")
    if spec.startswith("timm:"):
        from .timm_backend import TimmBackend

        return TimmBackend.load(spec[len("timm:") :], device=device, weights=weights)
    p = Path(spec)
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.exists():
            raise ModelLoadError(f"{spec} has no config.json; is it a siftlens or Hugging Face model folder?")
        import json

        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_file} is not valid JSON ({e.msg})") from e
        if raw.get("siftlens_model") == "vit":
            load_config(p)
            return NativeBackend(load_vit(p), device, source=str(p))
        from .hf_backend import HFBackend

        return HFBackend.load(str(p), device=device)
    if p.exists():
        raise ModelLoadError(f"{spec} is a file; --model takes a model folder, a built-in name or timm:<name>")
    if "/" in spec and not spec.startswith((".", "/", "~")) and os.path.sep + os.path.sep not in spec:
        raise ModelLoadError(
            f"'{spec}' is not a local folder; siftlens runs offline and never downloads from a hub: "
            "save the model with save_pretrained() elsewhere and pass that folder"
        )
    names = ", ".join(sorted(BUILTIN))
    raise ModelLoadError(f"model '{spec}' not found: give a local model folder, timm:<name>, or one of: {names}")
