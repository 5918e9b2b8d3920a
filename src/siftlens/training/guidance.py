"""Keypoint guidance shared by every training loop (docs/method.md, "Guided training"): one sampler for guided masks and
guided token dropping, and the augmented batch's keypoint counts it samples from.

The sampler: ``score_p = tau * log(w_p + eps) + g_p`` with ``g = -log(-log u)`` Gumbel noise from uniform
``u``. Taking the ``k`` *highest* scores draws ``k`` patches without replacement with probability
proportional to ``(w_p + eps) ** tau`` at every draw (Gumbel-top-k; Kool et al. 2019). ``tau = 0`` gives
the same choice as the plain argsort of ``u`` (g is increasing in u), so the guided and random policies
differ only by the weights, never by the random numbers.

- MAE masking hides the top ``M`` scores (:mod:`siftlens.training.masking`): tau > 0 hides keypoint-rich
  patches.
- Token dropping keeps the top ``K = round(r * N)`` scores (:func:`keep_indices`): tau > 0 keeps
  keypoint-rich patches; ``keep_policy='random'`` keeps the top ``K`` of ``u`` (PatchDropout, FLIP).

A given per-image drop (a caller's patch mask, e.g. a discovered shortcut's tokens, each image its own number) runs
through :func:`forward_dropping`.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..models.backend import forward_kept
from .augment import AugParams
from .keypoint_bank import KeypointBank, patch_counts, transform_keypoints

KEEP_POLICIES = ("random", "sift")


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniform u in [0, 1): -log(-log u), an increasing function of u."""
    return -torch.log(-torch.log(u.clamp_min(1e-30)))


def guided_scores(u: torch.Tensor, weights: torch.Tensor, tau: float, eps: float) -> torch.Tensor:
    """u: (B, N) uniform noise; weights w: (B, N) >= 0 -> scores tau * log(w + eps) + gumbel(u), (B, N)."""
    return tau * torch.log(weights + eps) + gumbel(u)


def keep_count(rate: float, n: int) -> int:
    """Tokens kept of ``n`` at keep-rate ``rate``: round(rate * n), at least 1."""
    return max(1, min(n, round(rate * n)))


def check_keep(rate: float, policy: str, eps: float) -> None:
    """Raise ConfigError for a keep-rate outside (0, 1] or an unknown keep policy."""
    if not 0 < rate <= 1:
        raise ConfigError(f"--keep-rate must be in (0, 1], got {rate}")
    if policy not in KEEP_POLICIES:
        raise ConfigError(f"--keep-policy must be one of {', '.join(KEEP_POLICIES)}, not {policy!r}")
    if policy == "sift" and eps <= 0:
        raise ConfigError(f"--keep-eps must be > 0 (patches without keypoints need a weight), got {eps}")


def keep_indices(u: torch.Tensor, k: int, counts: torch.Tensor | None = None, tau: float = 1.0,
                 eps: float = 1.0) -> torch.Tensor:
    """The ``k`` patch tokens each image keeps: (B, N) noise [, (B, N) keypoint counts] -> (B, k) long,
    sorted by position. Without ``counts``: uniformly at random; with them: probability proportional to
    ``(count + eps) ** tau`` at every draw."""
    scores = u if counts is None else guided_scores(u, counts, tau, eps)
    return scores.topk(k, dim=1).indices.sort(dim=1).values


def augmented_counts(bank: KeypointBank, idx: torch.Tensor, aug: AugParams, pad: int, img_size: tuple[int, int],
                     patch: int, grid: tuple[int, int], device: str) -> tuple[torch.Tensor, torch.Tensor,
                                                                              torch.Tensor]:
    """Cached keypoints of images ``idx`` (B,) moved with their crop and flip ``aug``: xy (B, K, 2), valid
    (B, K) and keypoints per patch (B, g_h * g_w) of the augmented images."""
    kxy, valid = bank.batch(idx, device)
    kxy, valid = transform_keypoints(kxy, valid, aug, pad, img_size)
    return kxy, valid, patch_counts(kxy, valid, patch, grid)


def forward_dropping(model: torch.nn.Module, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Logits (B, C) of a siftlens ViT on x (B, 3, H, W) with the patches where ``drop`` (B, N) bool is True
    removed: one forward per number of kept tokens (:func:`~siftlens.models.backend.forward_kept`), each image with
    its own position embeddings. Differentiable; an image whose every patch is True keeps them all."""
    return forward_kept(drop, lambda rows, keep: model(x[rows.to(x.device)], keep.to(x.device)))
