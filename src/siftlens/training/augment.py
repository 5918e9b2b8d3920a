"""Batch augmentation on the training device: random crop with zero padding, then horizontal flip.

The draws are separate from their application (:func:`draw_augment`, :func:`apply_augment`), so MAE
pre-training can move cached SIFT keypoints with exactly the crop and flip its pixels got
(:func:`siftlens.training.keypoint_bank.transform_keypoints`); supervised training calls :func:`augment`.

Geometry of a crop with padding ``pad`` and offsets ``(dy, dx)``: output pixel ``(r, c)`` is padded
pixel ``(r + dy, c + dx)``, i.e. original pixel ``(r + dy - pad, c + dx - pad)``. A horizontal flip
then maps column ``c`` to ``W - 1 - c``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugParams:
    """Per-image augmentation of a batch: crop offsets ``dy, dx`` (B,) long in [0, 2 pad] (None when
    ``pad == 0``: no crop) and ``flip`` (B,) bool."""

    dy: torch.Tensor | None
    dx: torch.Tensor | None
    flip: torch.Tensor


def draw_augment(batch: int, pad: int, gen: torch.Generator) -> AugParams:
    """Draw crops and flips for ``batch`` images from ``gen``: ``dy``, then ``dx`` (when ``pad > 0``), then
    the flips. This order is part of every run's random stream (resume and DDP rely on it)."""
    dy = dx = None
    if pad > 0:
        dy = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (batch,), generator=gen)
    return AugParams(dy, dx, torch.rand(batch, generator=gen) < 0.5)


def apply_augment(x: torch.Tensor, p: AugParams, pad: int) -> torch.Tensor:
    """Crop with zero padding, then flip. x: (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = x.shape
    if p.dy is not None:
        xp = F.pad(x, (pad, pad, pad, pad))
        rows = (p.dy[:, None] + torch.arange(H)[None]).to(x.device)  # (B, H)
        cols = (p.dx[:, None] + torch.arange(W)[None]).to(x.device)  # (B, W)
        bidx = torch.arange(B, device=x.device)[:, None, None]
        x = xp.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = p.flip.to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Draw and apply a random crop and flip per image. x: (B, C, H, W) float -> same shape."""
    return apply_augment(x, draw_augment(len(x), pad, gen), pad)


def augment_patch_mask(mask: torch.Tensor, p: AugParams, pad: int, patch: int) -> torch.Tensor:
    """A patch mask moved with each image's crop and flip: mask (B, g_h, g_w) bool over the original image ->
    (B, g_h, g_w) bool over the augmented one, True where an augmented patch holds any pixel of a True original
    patch (padding holds none). So a model trained on the augmented image with the result's tokens removed sees no
    pixel of the original's True patches."""
    pixels = mask.float().repeat_interleave(patch, 1).repeat_interleave(patch, 2)[:, None]  # (B, 1, H, W)
    moved = apply_augment(pixels, p, pad)
    return F.max_pool2d(moved, patch)[:, 0] > 0
