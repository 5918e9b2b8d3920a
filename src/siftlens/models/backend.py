"""One interface over the project's ViT, Hugging Face and timm models, and the algorithms they share.

A :class:`Backend` knows, for its model:

- the preprocessing the model expects, split in two: :meth:`Backend.preprocess` turns a PIL image into
  the exact pixels the model sees (``(H, W, 3) uint8``, after resize/crop, before normalisation; SIFT
  runs on these), and :meth:`Backend.normalize` turns a batch of them into the model's input tensor;
- its geometry, read from the model: patch size ``P``, grid ``(g_h, g_w)``, prefix tokens ``T``;
- where post-softmax attention can be observed: :meth:`Backend.probes` lists, per layer, a module and a
  function that pulls ``attn: (B, h, S, S)`` out of that module's forward hook arguments, and
  :meth:`Backend.eager` is a context manager that makes the model materialise attention (fused
  kernels never do) and restores the previous mode on exit;
- how to intervene: :meth:`Backend.forward_intervened` is a template method. The base class checks the
  arguments, builds the key bias and, for a library model, registers the hooks that drop tokens and bias
  attention and removes them on exit. A backend supplies only :meth:`Backend.token_module` (whose output
  is the token sequence), :meth:`Backend.bias_module` (the attention module of a layer) and the name of
  that module's mask argument (:attr:`Backend.bias_arg`).

Capturing itself lives in :mod:`siftlens.attention`.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..devices import resolve_device
from ..errors import AttentionBackendError, GeometryError, ModelLoadError
from .layers import resolve_layers

# extractor(module, args, kwargs, output) -> attn (B, h, S, S)
Extractor = Callable[[nn.Module, tuple, dict, object], torch.Tensor]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
    "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING,
}


class Backend(abc.ABC):
    """Common interface; subclasses fill in the model-specific parts.

    Attributes read from the model: ``patch_size``, ``grid_size`` (g_h, g_w), ``num_prefix_tokens`` (T),
    ``num_layers``, ``num_heads``, ``input_size`` (H, W), ``mean``, ``std``, ``class_names`` (or None),
    ``has_cls`` (whether token 0 is a CLS token).
    """

    kind = "base"
    # name of the additive-mask argument of bias_module(layer).forward, and what to upgrade without one
    bias_arg = "attn_mask"
    bias_arg_needs = "a newer version of the model's library"

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

    # interventions (prompting, occlusion): the template ------------------------------------------
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
        if keep_idx is not None:
            check_keep_idx(keep_idx, x.shape[0], self.num_patches)
        bias = key_bias_tokens(key_bias, keep_idx, self.num_prefix_tokens)
        chosen = None
        if bias is not None:
            bias = bias.to(x.device)
            chosen = None if layers is None else resolve_layers(layers, self.num_layers)
        return self._forward_intervened(x, keep_idx, bias, chosen)

    def _forward_intervened(
        self,
        x: torch.Tensor,
        keep_idx: torch.Tensor | None,
        bias: torch.Tensor | None,
        layers: list[int] | None,
    ) -> torch.Tensor | None:
        """The run, with checked arguments: bias (B, 1, 1, T + K) over the run sequence, or None; layers
        resolved (None = all). This default hooks a library model; every hook is removed on exit.

        Drop: a forward hook on :meth:`token_module` keeps the prefix tokens and gathers the kept patch
        tokens of its output (plus any :meth:`drop_hooks`). Bias: a forward pre-hook on :meth:`bias_module` of
        each chosen layer adds the bias to its :attr:`bias_arg` argument (an additive mask on the logits).
        """
        handles = []
        try:
            if keep_idx is not None:
                hook = gather_tokens_hook(keep_idx, self.num_prefix_tokens)
                handles.append(self.token_module().register_forward_hook(hook))
                for mod, extra in self.drop_hooks(keep_idx):
                    handles.append(mod.register_forward_hook(extra))
            if bias is not None:
                for li in resolve_layers(layers, self.num_layers):
                    mod = self.bias_module(li)
                    hook = bias_pre_hook(mod, self.bias_arg, bias, self.bias_arg_needs)
                    handles.append(mod.register_forward_pre_hook(hook, with_kwargs=True))
            with self.intervention_mode():
                return self.forward(x)
        finally:
            for h in handles:
                h.remove()

    def drop_hooks(self, keep_idx: torch.Tensor) -> list[tuple[nn.Module, Callable]]:
        """(module, forward hook) pairs that a token drop needs besides gathering the tokens, e.g. gathering the
        output of a relative position bias module to the kept tokens; registered before the bias hooks."""
        return []

    def token_module(self) -> nn.Module:
        """The module whose output is the token sequence (B, T + N, D) with position embeddings added
        (every later step up to the first block being per token)."""
        raise AttentionBackendError(f"{type(self).__name__} does not support token drop (no token module)")

    def bias_module(self, layer: int) -> nn.Module:
        """The attention module of ``layer``; its forward takes :attr:`bias_arg`, added to the logits."""
        raise AttentionBackendError(f"{type(self).__name__} does not support an attention bias (no bias target)")

    def intervention_mode(self) -> contextlib.AbstractContextManager:
        """Context for an intervened forward, when the model's current attention path ignores the mask."""
        return contextlib.nullcontext()

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


# -- interventions ------------------------------------------------------------------------------------
def check_keep_idx(keep_idx: torch.Tensor, batch: int, num_patches: int) -> None:
    """Raise GeometryError unless keep_idx is (B, K) with indices in [0, N)."""
    if keep_idx.ndim != 2 or keep_idx.shape[0] != batch:
        raise GeometryError(f"keep_idx must be (B={batch}, K), got shape {tuple(keep_idx.shape)}")
    if keep_idx.numel() and (int(keep_idx.min()) < 0 or int(keep_idx.max()) >= num_patches):
        raise GeometryError(f"keep_idx holds indices outside [0, {num_patches})")


def keep_groups(drop: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """drop (B, N) bool -> one ``(rows (b,), keep (b, k) long)`` per number ``k`` of kept patches: the images with
    that many kept patches and the indices of those patches (row-major, ascending per row). An image whose every
    patch is flagged keeps them all (an empty sequence of patches is not a valid input for every model)."""
    drop = drop.to(torch.bool).cpu()
    drop = drop & ~drop.all(1, keepdim=True)
    counts = (~drop).sum(1)
    out = []
    for k in counts.unique().tolist():
        rows = (counts == k).nonzero().flatten()
        out.append((rows, (~drop[rows]).nonzero()[:, 1].view(len(rows), k)))
    return out


def forward_kept(drop: torch.Tensor, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Logits (B, C) of a batch whose images keep their own patches: ``forward(rows (b,), keep (b, k))`` -> (b, C)
    is called once per group of :func:`keep_groups` (``drop``: (B, N) bool) and the rows are put back in order.
    Differentiable: the groups' logits are written into one new tensor."""
    out: torch.Tensor | None = None
    for rows, keep in keep_groups(drop):
        logits = forward(rows, keep)
        if out is None:
            out = logits.new_empty((drop.shape[0], logits.shape[1]))
        out[rows.to(out.device)] = logits
    assert out is not None
    return out


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


def gather_tokens_hook(keep_idx: torch.Tensor, num_prefix: int) -> Callable:
    """Forward hook: tokens (B, T + N, D) -> (B, T + K, D), the prefix kept, the patches in ``keep_idx``
    (B, K) gathered. An output tuple (e.g. HF ViT-MAE's embeddings) has the tokens first."""

    def hook(module, args, output):
        tokens = output[0] if isinstance(output, tuple) else output
        idx = keep_idx.to(tokens.device).unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        tokens = torch.cat([tokens[:, :num_prefix], torch.gather(tokens[:, num_prefix:], 1, idx)], 1)
        return (tokens, *output[1:]) if isinstance(output, tuple) else tokens

    return hook


def bias_pre_hook(module: nn.Module, arg: str, bias: torch.Tensor, needs: str) -> Callable:
    """Forward pre-hook on an attention module: its mask argument ``arg`` <- mask + bias (B, 1, 1, S).

    The hidden states (B, S, D) are the module's first argument. Raises ModelLoadError when the module's
    forward takes no ``arg`` (upgrading to ``needs`` helps).
    """
    names = list(inspect.signature(module.forward).parameters)
    if arg not in names:
        raise ModelLoadError(
            f"{type(module).__name__}.forward takes no {arg} in this version; attention bias needs {needs}"
        )
    pos = names.index(arg)

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs[names[0]]
        b = bias.to(hidden.dtype)
        if b.shape[-1] != hidden.shape[1]:
            raise GeometryError(f"attention bias covers {b.shape[-1]} keys but the layer sees {hidden.shape[1]}")
        if len(args) > pos:
            return (*args[:pos], merge_mask_and_bias(args[pos], b), *args[pos + 1 :]), kwargs
        return args, {**kwargs, arg: merge_mask_and_bias(kwargs.get(arg), b)}

    return hook


# -- preprocessing ------------------------------------------------------------------------------------
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


def shortest_edge_size(w0: int, h0: int, s: int) -> tuple[int, int]:
    """(H, W) after resizing the shorter side of a w0 x h0 image to ``s``, the longer side truncated
    (HF's shortest-edge resize and torchvision's ``Resize(int)``)."""
    short, long = (w0, h0) if w0 <= h0 else (h0, w0)
    new_long = int(s * long / short)
    return (new_long, s) if w0 <= h0 else (s, new_long)


# -- reading configs and loading ----------------------------------------------------------------------
def pair(v, what: str) -> tuple[int, int]:
    """An int, a [height, width] pair or {height, width} -> (H, W); else a ModelLoadError naming ``what``."""
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (int(v[0]), int(v[1]))
    if isinstance(v, dict) and "height" in v and "width" in v:
        return (int(v["height"]), int(v["width"]))
    raise ModelLoadError(f"cannot read {what}={v!r}; expected an int, [height, width] or {{height, width}}")


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when there is none)."""
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return lines[0] if lines else type(e).__name__
