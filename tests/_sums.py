"""Direct float64 reference for :func:`siftlens.core.reductions.layer_sums`, shared by the metric and kernel tests."""

from __future__ import annotations

import torch


def direct_layer_sums(patch: torch.Tensor, lhs: torch.Tensor, dmat: torch.Tensor, n_levels: int) -> dict:
    """Every output of ``layer_sums`` computed the obvious way in float64.

    patch: (B, h, N, N) patch block of the attention (rows with positive sums); lhs: (B, K (L + 1), N);
    dmat: (N, N)."""
    bsz, nh, n, _ = patch.shape
    k_maps = lhs.shape[1] // (n_levels + 1)
    bt = patch.double()
    bt = bt / bt.sum(-1, keepdim=True)
    mean = bt.mean(1)
    rows = lhs.double().view(bsz, k_maps, n_levels + 1, n)
    return {
        "rowsum": bt.sum(-1), "colsum": bt.sum(-2), "diag": bt.diagonal(dim1=-2, dim2=-1),
        "dist": (bt * dmat.double()).sum(-1), "ent": -torch.special.xlogy(bt, bt).sum(-1),
        "pairs": torch.einsum("bkai,bhij,bkcj->bkahc", rows, bt, rows).reshape(bsz * k_maps, n_levels + 1, nh,
                                                                               n_levels + 1),
        "xx": torch.cat([bt.square().sum((-2, -1)), mean.square().sum((-2, -1))[:, None]], 1),
        "xxt": torch.cat([(bt * bt.mT).sum((-2, -1)), (mean * mean.mT).sum((-2, -1))[:, None]], 1),
    }
