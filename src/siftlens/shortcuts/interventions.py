"""Per-image interventions on the patch tokens, for any backend: drop, keep-top, attention bias.

All functions take a :class:`~siftlens.models.backend.Backend` and a normalised batch ``x: (B, 3, H, W)``
and work on patch masks over the model's grid (``N = g_h * g_w`` patches, row-major). They are used by
discovery's occlusion check (:mod:`~siftlens.shortcuts.discovery.causal`), prompting and repair.

Variable numbers of dropped tokens per image. ``mode="group"`` runs one forward per distinct number of
kept tokens (:func:`~siftlens.models.backend.forward_kept`), each with ``keep_idx`` (exact removal for every
model and pooling); ``mode="mask"`` runs one forward with ``-inf`` on the dropped keys in every layer, which
gives the same CLS output because a key with ``-inf`` receives zero attention from every query, so it never
influences another token (mean-pooling models differ: the masked tokens still enter the mean, except for the
native ViT, which leaves them out).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..models.backend import Backend, forward_kept

DROP_MODES = ("group", "mask")


def _ensure_logits(out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        raise ConfigError("this model has no classification head; interventions are measured on its logits")
    return out


def forward_drop(backend: Backend, x: torch.Tensor, drop: torch.Tensor, mode: str = "group",
                 key_bias: torch.Tensor | None = None, layers: Sequence[int] | None = None) -> torch.Tensor:
    """Logits (B, C) with the patches where ``drop: (B, N) bool`` is True removed from each image.

    An image whose every patch is flagged keeps them all (see :func:`~siftlens.models.backend.keep_groups`); callers
    can detect that case from ``drop.all(1)``. ``key_bias`` (B, N) and ``layers``: an attention bias applied as well, as
    :meth:`~siftlens.models.backend.Backend.forward_intervened` applies it (``mode="group"`` only).
    """
    if mode not in DROP_MODES:
        raise ConfigError(f"drop mode must be one of {', '.join(DROP_MODES)}, not {mode!r}")
    drop = drop.to(torch.bool).cpu()
    drop = drop & ~drop.all(1, keepdim=True)
    if not drop.any():
        return _ensure_logits(backend.forward_intervened(x, key_bias=key_bias, layers=layers))
    if mode == "mask":
        if key_bias is not None:
            raise ConfigError("a drop in mask mode takes no other attention bias; use mode 'group'")
        bias = torch.zeros(drop.shape, dtype=torch.float32).masked_fill(drop, float("-inf")).to(x.device)
        return _ensure_logits(backend.forward_intervened(x, key_bias=bias))

    def group(rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        kb = None if key_bias is None else key_bias[rows.to(key_bias.device)]
        return _ensure_logits(backend.forward_intervened(x[rows.to(x.device)], keep_idx=keep.to(x.device),
                                                         key_bias=kb, layers=layers))

    return forward_kept(drop, group)


def keep_top_idx(weights: torch.Tensor, q: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices (B, K) of the ``K = ceil(q * N)`` patches with the largest weight, ascending per row.

    weights: (B, N) semantic weight per patch. Ties (e.g. the many zero-weight patches) are broken by a
    random order drawn from ``generator``, so no image region is preferred among equals.
    """
    if not 0.0 < q <= 1.0:
        raise ConfigError(f"keep fraction q must be in (0, 1], got {q}")
    B, N = weights.shape
    K = max(1, int(np.ceil(q * N - 1e-9)))
    tie = torch.rand((B, N), generator=generator)
    order = torch.argsort(tie, dim=1)  # a random permutation per row ...
    w = torch.gather(weights.float().cpu(), 1, order)
    top = torch.argsort(-w, dim=1, stable=True)[:, :K]  # ... then a stable sort by weight inside it
    return torch.gather(order, 1, top).sort(1).values


def semantic_bias(weights: torch.Tensor, beta: float, eps: float = 1e-3) -> torch.Tensor:
    """Key bias (B, N) = beta * [log(eps + c_j) - log(eps + 1/N)], c_j = w_j / sum_k w_k.

    The semantic prior of METHOD.md section 4, shifted by its value at uniform concentration: the shift is
    the same for every patch key, so it only fixes the balance between patch keys and the prefix keys
    (CLS, registers), which get no bias. Thus keypoints spread evenly leave attention unchanged, and an
    image without keypoints gets no bias at all (no prior).
    """
    if eps <= 0:
        raise ConfigError(f"eps must be > 0, got {eps}")
    w = weights.float().clamp_min(0)
    N = w.shape[1]
    s = w.sum(1, keepdim=True)
    c = w / s.clamp_min(1e-12)
    bias = beta * (torch.log(eps + c) - float(np.log(eps + 1.0 / N)))
    return torch.where(s > 0, bias, torch.zeros_like(bias))


def forward_bias(
    backend: Backend, x: torch.Tensor, key_bias: torch.Tensor, layers: Sequence[int] | None = None
) -> torch.Tensor:
    """Logits (B, C) with ``key_bias: (B, N)`` added to the attention logits of patch keys in ``layers``."""
    return _ensure_logits(backend.forward_intervened(x, key_bias=key_bias.to(x.device), layers=layers))


def dilate(mask: torch.Tensor, grid: tuple[int, int], radius: int = 1) -> torch.Tensor:
    """Grow a patch mask (B, N) bool by ``radius`` patches on the grid (8-neighbourhood, square)."""
    if radius <= 0:
        return mask
    gh, gw = grid
    m = mask.float().view(-1, 1, gh, gw)
    m = torch.nn.functional.max_pool2d(m, 2 * radius + 1, stride=1, padding=radius)
    return m.view(mask.shape[0], -1) > 0
