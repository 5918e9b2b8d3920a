"""The null model, "attention ignores where the keypoints are", per image (docs/method.md, "Null model and
dataset statistics").

Three ways to get each image's null mean and variance of every metric, all keyed by image so that a
result never depends on batching, sharding or where a run was interrupted:

- ``exact`` (default, ``null="exact"``) for the uniform permutation null: closed forms, no resampling.
  Linear statistics (SAL, CLS lift, Spearman rho, per-level distance and entropy) use the moments of
  sampling without replacement (:func:`siftlens.core.stats.linear_moments`); WI and R are quadratic forms
  ``sum_ij Bt_ij W_pi(i)pi(j)`` and use the exact Mantel / quadratic-assignment moments
  (:func:`siftlens.core.stats.qap_moments`); ``dist_rel`` is a ratio of two linear statistics of the same
  permuted level indicator and uses the delta method on their exact joint moments.
- ``exact`` for the cyclic-shift null: the N cyclic 2-D shifts of the grid form a group, and all of them
  are enumerated (:func:`all_shifts`), so the moments are exact over the group.
- Monte Carlo (``null=M``): M random maps per image, drawn from a generator seeded by the run seed and
  the image's key (:func:`image_key`); the reference the exact moments are tested against.

The head mean (head slot ``h``) of a linear statistic is the same statistic with the head-mean
coefficient vector; of a quadratic form, the form of the head-mean matrix. So every moment of the head
mean is exact too, not an average of per-head moments.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError, GeometryError
from .metrics import AttentionTerms, WeightMaps, repeat_rows
from .stats import linear_moments, outer_sums, qap_resolved_moments

NULL_KINDS = ("permute", "shift")
_F32_EPS = float(torch.finfo(torch.float32).eps)


def null_indices(
    B: int,
    N: int,
    M: int,
    grid: tuple[int, int] | None = None,
    kind: str = "permute",
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Index maps of the null model: (B, M, N) int64; null map m of image b is ``w[b, idx[b, m]]``.

    ``permute``: M independent uniform random permutations of the N patch positions per image.
    ``shift``: M random cyclic 2-D shifts of the row-major ``grid = (g_h, g_w)`` map per image, drawn
    uniformly, with replacement, from the group of all ``g_h * g_w`` shifts (the identity included, as a
    permutation null includes the identity permutation); see :func:`all_shifts`.
    Randomness comes from ``generator`` (on its own device) and the result is moved to ``device``.
    """
    if kind not in NULL_KINDS:
        raise ConfigError(f"unknown null model {kind!r}; choose one of {', '.join(NULL_KINDS)}")
    if B < 0 or N < 1 or M < 0:
        raise ConfigError(f"need B >= 0, N >= 1, M >= 0; got B={B}, N={N}, M={M}")
    gen_dev = generator.device if generator is not None else (device if device is not None else "cpu")
    if kind == "permute":
        idx = torch.rand(B, M, N, generator=generator, device=gen_dev).argsort(-1)
        return idx.to(device if device is not None else gen_dev)
    if grid is None or grid[0] * grid[1] != N:
        raise GeometryError(f"the shift null model needs a grid (g_h, g_w) with g_h * g_w = {N}, got {grid}")
    if N < 2:
        raise ConfigError("the shift null model needs a grid with more than one patch")
    s = torch.randint(0, N, (B, M), generator=generator, device=gen_dev)  # flat shift index
    return all_shifts(grid).to(gen_dev)[s].to(device if device is not None else gen_dev)


def all_shifts(grid: tuple[int, int]) -> torch.Tensor:
    """Every cyclic 2-D shift of a row-major (g_h, g_w) grid: (N, N) int64, row s the shift by
    ``(dy, dx) = (s // g_w, s % g_w)``, row 0 the identity; map s of w is ``w[idx[s]]``, i.e.
    ``torch.roll(w.view(g_h, g_w), (dy, dx), (0, 1))``: ``w'[r, c] = w[(r - dy) % g_h, (c - dx) % g_w]``."""
    gh, gw = grid
    s = torch.arange(gh * gw)
    dy, dx = (s // gw)[:, None, None], (s % gw)[:, None, None]
    rows, cols = torch.arange(gh)[:, None], torch.arange(gw)[None, :]
    return (((rows - dy) % gh) * gw + (cols - dx) % gw).reshape(gh * gw, gh * gw)


def with_null(
    weights: torch.Tensor, levels: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the observed maps with their null resamplings.

    weights: (B, N) float, levels: (B, N) int, idx: (B, M, N) from :func:`null_indices`.
    Returns weights (B, 1 + M, N) and levels (B, 1 + M, N); index 0 is the observed map,
    index 1 + m is ``weights[b, idx[b, m]]`` (levels gathered with the same indices).
    """
    if weights.ndim != 2 or levels.shape != weights.shape:
        raise GeometryError(f"weights and levels must both be (B, N); got {tuple(weights.shape)} and "
                            f"{tuple(levels.shape)}")
    b, n = weights.shape
    if idx.ndim != 3 or idx.shape[0] != b or idx.shape[2] != n:
        raise GeometryError(f"null indices must be ({b}, M, {n}), got {tuple(idx.shape)}")
    idx = idx.to(weights.device)
    m = idx.shape[1]
    w_null = torch.gather(weights[:, None, :].expand(b, m, n), 2, idx)
    l_null = torch.gather(levels[:, None, :].expand(b, m, n), 2, idx.to(levels.device))
    return torch.cat([weights[:, None], w_null], 1), torch.cat([levels[:, None], l_null], 1)


def image_key(name: str) -> int:
    """A stable 63-bit key of an image name: the seed of every random draw that belongs to the image."""
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def keyed_generator(seed: int, key: int) -> torch.Generator:
    """A CPU generator that depends only on the run seed and the image key."""
    mixed = np.random.SeedSequence([seed & 0xFFFFFFFF, key & 0xFFFFFFFF, key >> 32]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(mixed[0] >> np.uint64(1)))


def keyed_null_indices(keys: list[int], n: int, m: int, grid: tuple[int, int], kind: str, seed: int) -> torch.Tensor:
    """Monte Carlo null index maps (B, M, N) int64, image b drawn from ``keyed_generator(seed, keys[b])``."""
    return torch.cat([null_indices(1, n, m, grid=grid, kind=kind, generator=keyed_generator(seed, k))
                      for k in keys]) if keys else torch.zeros(0, m, n, dtype=torch.long)


def _with_head_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, h, ...) -> (B, h + 1, ...): the head-mean coefficients appended as slot h."""
    return torch.cat([x, x.mean(1, keepdim=True)], 1)


def _unit(x: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """x / norm, 0 where the norm is 0."""
    ok = norm > 0
    return torch.where(ok[..., None], x / torch.where(ok, norm, torch.ones_like(norm))[..., None], torch.zeros_like(x))


def _level_moments(coef: torch.Tensor, m: WeightMaps) -> tuple[torch.Tensor, torch.Tensor]:
    """Moments of the level mean ``sum_i [level(pi(i)) = a] coef_i / n_a``; coef (B, h1, N) -> (B, h1, L)."""
    b = coef.shape[0]
    onehot = m.ohT.view(b, -1, m.n_levels, m.shape[2])[:, 0]  # (B, L, N) observed levels
    cnt = m.cnt_safe[:, 0]  # (B, L)
    mean, var = linear_moments(coef[:, :, None, :], onehot[:, None])  # (B, h1, L)
    return mean / cnt[:, None], var / cnt[:, None].square()


def _ratio_moments(d: torch.Tensor, m: WeightMaps) -> tuple[torch.Tensor, torch.Tensor]:
    """Delta-method moments of ``dist_rel_a = sum_{i in a} d_i / sum_{i in a} u_i`` for a random level
    assignment; d (B, h1, N) -> (B, h1, L). Subset sums over a uniformly random subset of size n_a have
    mean ``n_a x_bar`` and covariance ``f * sum (x - x_bar)(y - y_bar)``, ``f = n_a (N - n_a) / (N (N - 1))``."""
    n = d.shape[-1]
    u = m.dmat.mean(-1)  # (N,) the distance uniform attention gives each query
    cnt = m.cnt_safe[:, 0][:, None]  # (B, 1, L)
    f = cnt * (n - cnt) / (n * max(n - 1, 1))
    dc, uc = d - d.mean(-1, keepdim=True), u - u.mean()
    mx, my = cnt * d.mean(-1, keepdim=True), cnt * u.mean()
    vx, vy, cxy = f * dc.square().sum(-1, keepdim=True), f * uc.square().sum(), f * (dc * uc).sum(-1, keepdim=True)
    my = torch.where(my > 0, my, torch.ones_like(my))
    mean = mx / my + mx * vy / my**3 - cxy / my**2
    var = vx / my**2 - 2 * mx * cxy / my**3 + mx**2 * vy / my**4
    return mean, var.clamp_min(0)


def _qap(sa, sw, n, pa, pw, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~siftlens.core.stats.qap_moments` with the variance set to 0 where rounding in the attention's sums
    of squares (machine epsilon ``eps``) could account for all of it."""
    return qap_resolved_moments(sa, sw, n, pa=pa, pw=pw, eps=eps)


@dataclass
class MapSums:
    """The weight side of the quadratic null moments, per image (depends on the maps only: computed once
    per batch). WI: ``w w^T``; R: ``e_a e_b^T`` for every level pair. Pattern sums (..., 15) and pair sums
    (..., 2) of :mod:`siftlens.core.stats`."""

    wi: tuple[torch.Tensor, torch.Tensor]  # (B, 15), (B, 2)
    r: tuple[torch.Tensor, torch.Tensor]  # (B, L, L, 15), (B, L, L, 2)


def map_sums(m: WeightMaps) -> MapSums:
    """:class:`MapSums` of the observed maps (K = 1), in O(B L^2 N)."""
    b, _, n = m.shape
    w = m.w64[:, 0]
    onehot = m.ohT.view(b, -1, m.n_levels, n)[:, 0]  # (B, L, N)
    return MapSums(outer_sums(w, w), outer_sums(onehot[:, :, None, :], onehot[:, None, :, :]))


def tile_sums(ms: MapSums, r: int) -> MapSums:
    """:class:`MapSums` of ``r`` stacked copies of the batch (as :func:`siftlens.core.metrics.tile_maps`)."""
    return MapSums(*(tuple(repeat_rows(x, r) for x in pair) for pair in (ms.wi, ms.r)))


def exact_moments(t: AttentionTerms, m: WeightMaps, ms: MapSums | None = None, sums_eps: float = _F32_EPS
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact permutation-null mean and variance of every metric of one layer, for the observed maps.

    t: the terms of :func:`siftlens.core.metrics.attention_terms` (h heads, one map per image); m: the maps
    (K = 1); ms: ``map_sums(m)``, computed once per batch (else here). Returns ``{metric: (mean, var)}``
    with a head-mean slot appended (h + 1 heads), shapes as :func:`siftlens.core.metrics.image_metrics` without
    the K axis: scalars (B, h + 1), ``R`` (B, h + 1, L, L), per-level metrics (B, h + 1, L); float64.
    Entries of missing levels are NaN.

    ``sums_eps``: the machine epsilon of the dtype the attention's sums of squares (``xx``, ``xxt`` of
    :class:`siftlens.core.reductions.LayerSums`) were accumulated in. A WI or R variance within the rounding
    error those sums allow (:func:`siftlens.core.stats.resolved_variance`) is returned as 0.0: the null cannot
    be resolved there, and the cell reads "no variation".
    """
    n = m.shape[2]
    w = m.w64[:, 0]  # (B, N)
    x = (w / m.wmean[:, :1])[:, None]  # (B, 1, N): SAL and CLS lift are linear in w / mean(w)
    out = {
        "sal": linear_moments(_with_head_mean(t.colmean), x),
        "cls_lift": linear_moments(_with_head_mean(t.cls), x),
        "cls_rho": linear_moments(_with_head_mean(_unit(t.ranks_a, t.ranks_a.square().sum(-1).sqrt())),
                                  _unit(m.rw[:, :1], m.rw_norm[:, :1])),
        "dist": _level_moments(_with_head_mean(t.dist_q), m),
        "entropy": _level_moments(_with_head_mean(t.ent_q), m),
        "dist_rel": _ratio_moments(_with_head_mean(t.dist_q), m),
    }
    ms = ms or map_sums(m)
    (s_wi, p_wi), (s_r, p_r) = ms.wi, ms.r
    mean, var = _qap(t.psums, s_wi[:, None], n, t.psum2, p_wi[:, None], sums_eps)  # (B, h1)
    out["wi"] = (mean / m.wsq[:, :1], var / m.wsq[:, :1].square())
    cnt = m.cnt_safe[:, 0]
    scale = n / (cnt[:, :, None] * cnt[:, None, :])  # (B, L, L)
    mean, var = _qap(t.psums[:, :, None, None], s_r[:, None], n, t.psum2[:, :, None, None], p_r[:, None],
                     sums_eps)  # (B, h1, L, L)
    present = m.present[:, 0]
    both = (present[:, :, None] & present[:, None, :])[:, None]
    nan = torch.tensor(float("nan"), dtype=mean.dtype, device=mean.device)
    out["R"] = (torch.where(both, mean * scale[:, None], nan), torch.where(both, var * scale[:, None].square(), nan))
    for k in ("dist", "entropy", "dist_rel"):
        out[k] = tuple(torch.where(present[:, None], v, nan) for v in out[k])
    return out
