"""Per-image patch masks for the interventions: the patches holding a flagged visual word, and the semantic
weight of every patch from the keypoints that are not flagged."""

from __future__ import annotations

import numpy as np

from ..keypoints import Keypoints, patch_index, weight_map
from .discovery.vocabulary import Vocabulary


def footprint_patches(xy: np.ndarray, size: np.ndarray, P: int, grid: tuple[int, int]) -> np.ndarray:
    """(N,) bool: patches that overlap the square [x - s/2, x + s/2] x [y - s/2, y + s/2] of any keypoint
    (pixel x covers [x - 0.5, x + 0.5); touching a patch's edge does not count)."""
    gh, gw = grid
    m = np.zeros((gh, gw), bool)
    r = size / 2.0
    c0 = np.clip(np.floor((xy[:, 0] - r + 0.5) / P), 0, gw - 1).astype(int)
    c1 = np.clip(np.ceil((xy[:, 0] + r + 0.5) / P) - 1, 0, gw - 1).astype(int)  # half-open on the far side
    r0 = np.clip(np.floor((xy[:, 1] - r + 0.5) / P), 0, gh - 1).astype(int)
    r1 = np.clip(np.ceil((xy[:, 1] + r + 0.5) / P) - 1, 0, gh - 1).astype(int)
    for a, b, c, d in zip(r0, r1, c0, c1, strict=True):
        m[a : b + 1, c : d + 1] = True
    return m.reshape(-1)


def patch_masks(
    it: dict, vocab: Vocabulary | None, flagged: set[int], P: int, grid: tuple[int, int], scheme: str,
    extent: str = "center",
) -> tuple[np.ndarray, np.ndarray]:
    """(flag (N,) bool of patches holding a flagged word, semantic weight (N,) without flagged keypoints).

    it: one item of :class:`~siftlens.shortcuts.discovery.features.KeypointDataset` (``xy``, ``size``, ``response``,
    ``desc``); scheme: the weight scheme of :func:`~siftlens.keypoints.weight_map`.

    extent: ``center`` flags the patch of each flagged keypoint's centre; ``footprint`` every patch its
    square of side = keypoint size touches.
    """
    N = grid[0] * grid[1]
    xy, size = it["xy"], it["size"]
    fl = np.zeros(len(xy), bool)
    if vocab is not None and len(xy):
        fl = np.isin(vocab.words_of(it["desc"]), list(flagged))
    flag = np.zeros(N, bool)
    if fl.any():
        if extent == "footprint":
            flag = footprint_patches(xy[fl], size[fl], P, grid)
        else:
            flag[patch_index(xy[fl], P, grid)] = True
    keep = ~fl
    kp = Keypoints(xy[keep], size[keep], np.asarray(it["response"], np.float32)[keep],
                   np.zeros(int(keep.sum()), np.float32))
    return flag, weight_map(kp, P, grid, scheme)
