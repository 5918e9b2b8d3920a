"""The method of docs/method.md in one file: every metric of one image and its exact permutation null.

Written for reading, not for speed: plain numpy float64, one image and one layer at a time, loops where they
make the idea clearer. The fast path (metrics.py, reductions.py and the fused kernel, nullmodel.py, stats.py)
computes the same numbers for batches of images, from float32 reductions and closed forms;
tests/test_reference.py checks it against this file, and this file against all N! permutations of tiny
images. Nothing here imports the fast path, so the check is independent.

Top to bottom: the inputs (one layer's attention, the patch weight map and its levels), the metrics of one
head, the null moments (linear statistics, quadratic forms, one ratio), and :func:`image_metrics`, which puts
every cell of one layer together, per head and for the head mean, in the order of the analysis' tables.
"""

from __future__ import annotations

import math
from itertools import product

import numpy as np

SCALAR_METRICS = ("sal", "wi", "cls_lift", "cls_rho")
LEVEL_METRICS = ("dist", "dist_rel", "entropy")  # per query level a
RANK_TOL = 4 * float(np.finfo(np.float32).eps)  # CLS attention values this close (relative) are tied


def cells(n_levels: int) -> list[tuple[str, int, int]]:
    """The cells (metric, level_a, level_b) of one layer, -1 where a level does not apply."""
    out = [(m, -1, -1) for m in SCALAR_METRICS]
    out += [("R", a, b) for a in range(n_levels) for b in range(n_levels)]
    return out + [(m, a, -1) for m in LEVEL_METRICS for a in range(n_levels)]


# ---- inputs (docs/method.md, "Keypoints on the patch grid" and "Attention") -----------------------------
# N patches in row-major order, each with a semantic weight w_p (keypoints.py: count, response or footprint)
# and a level (0: no keypoint, then per-image quantile bins of the non-zero weights); T prefix tokens (CLS,
# registers) come first in the attention and belong to no patch.


def head_terms(attn_head: np.ndarray, num_prefix: int, has_cls: bool, dmat: np.ndarray) -> dict:
    """What the metrics need of one head's attention ``(T + N, T + N)``, prefix tokens first:

    - ``bt``: the patch block ``A[T:, T:]`` with rows renormalised (a row without patch mass is uniform);
    - ``a``: the CLS row ``A[0, T:]`` renormalised over the patches, or without CLS the column mean of ``bt``;
    - ``ra``: the centred, unit-norm average ranks of ``a``, tied within :data:`RANK_TOL` ("Ties in CLS ranks");
    - ``d``, ``e``: per query i, the attention distance ``sum_j bt_ij D_ij`` and entropy ``-sum_j bt_ij log bt_ij``.
    """
    block = attn_head[num_prefix:, num_prefix:]
    n = len(block)
    bt = np.array([row / row.sum() if row.sum() > 0 else np.full(n, 1.0 / n) for row in block])
    if has_cls:
        cls = attn_head[0, num_prefix:]
        a = cls / cls.sum() if cls.sum() > 0 else np.full(n, 1.0 / n)
    else:
        a = bt.mean(0)
    entropy = [-(p[p > 0] * np.log(p[p > 0])).sum() for p in bt]  # 0 log 0 = 0
    return {"bt": bt, "a": a, "ra": unit_centred(average_ranks(a, RANK_TOL)), "d": (bt * dmat).sum(1),
            "e": np.array(entropy)}


def average_ranks(x: np.ndarray, tol: float = 0.0) -> np.ndarray:
    """1-based ranks of ``x``, a run of ties sharing its average rank. Neighbours in sorted order with
    ``x_(k+1) - x_(k) <= tol * max(|x_(k)|, |x_(k+1)|)`` are in one run (runs chain); tol = 0: exact ties."""
    order = np.argsort(x, kind="stable")
    sx, ranks, start = x[order], np.empty(len(x)), 0
    for k in range(1, len(x) + 1):
        if k == len(x) or sx[k] - sx[k - 1] > tol * max(abs(sx[k - 1]), abs(sx[k])):  # a run ends at k
            ranks[order[start:k]] = (start + 1 + k) / 2  # the mean of positions start + 1 .. k
            start = k
    return ranks


def unit_centred(x: np.ndarray) -> np.ndarray:
    """``x - mean(x)`` scaled to unit norm; 0 for a constant ``x``. Spearman's rho is the dot product of two
    such rank vectors."""
    c = x - x.mean()
    norm = math.sqrt(c @ c)
    return c / norm if norm > 0 else np.zeros_like(c)


# ---- metrics (docs/method.md, "Metrics (per image, layer and head)") ------------------------------------


def head_metrics(t: dict, w: np.ndarray, levels: np.ndarray, n_levels: int, u: np.ndarray) -> dict:
    """The observed value of every cell for one head's terms ``t`` and one weight map ``w`` with its levels,
    keyed by cell; cells of an empty level are absent (missing, not 0). ``u_i = mean_j D_ij`` is the distance
    uniform attention gives query i. A map without keypoints gets the neutral 1.0 (rho: 0, as its ranks tie)."""
    bt, n, has_w = t["bt"], len(w), w.sum() > 0
    out = {
        ("sal", -1, -1): np.mean([bt[i] @ w for i in range(n)]) / w.mean() if has_w else 1.0,
        ("wi", -1, -1): w @ bt @ w / (w.sum() * w.sum() / n) if has_w else 1.0,
        ("cls_lift", -1, -1): t["a"] @ w / w.mean() if has_w else 1.0,
        ("cls_rho", -1, -1): t["ra"] @ unit_centred(average_ranks(w)),  # weights: exact ties
    }
    members = [np.flatnonzero(levels == k) for k in range(n_levels)]
    for a, qa in enumerate(members):
        if len(qa) == 0:
            continue
        out["dist", a, -1] = t["d"][qa].mean()
        out["dist_rel", a, -1] = t["d"][qa].sum() / u[qa].sum() if u[qa].sum() > 0 else 1.0
        out["entropy", a, -1] = t["e"][qa].mean()
        for b, kb in enumerate(members):
            if len(kb):
                out["R", a, b] = np.mean([bt[i, kb].sum() for i in qa]) / (len(kb) / n)
    return out


# ---- the null (docs/method.md, "Null model and dataset statistics") -------------------------------------
# The weight map and its levels move to the patch positions by a uniformly random permutation pi: patch j
# gets the weight w_pi(j). The attention stays where it is.


def linear_cov(c1: np.ndarray, x1: np.ndarray, c2: np.ndarray, x2: np.ndarray) -> float:
    """Covariance of ``S1 = sum_j c1_j x1_pi(j)`` and ``S2 = sum_j c2_j x2_pi(j)`` under one uniform pi
    (sampling without replacement): ``sum (c1 - mean)(c2 - mean) * sum (x1 - mean)(x2 - mean) / (N - 1)``."""
    n = len(c1)
    return float((c1 - c1.mean()) @ (c2 - c2.mean()) * ((x1 - x1.mean()) @ (x2 - x2.mean())) / (n - 1)) if n > 1 \
        else 0.0


def linear_null(c: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Exact mean and variance of the linear statistic ``S = sum_j c_j x_pi(j)``: ``E[S] = N mean(c) mean(x)``."""
    return len(c) * c.mean() * x.mean(), linear_cov(c, x, c, x)


# the 15 equality patterns of an index tuple (i, j, k, l), as the block label of each position: (0, 1, 0, 2)
# is i = k with j, l distinct from it and from each other
PATTERNS = [p for p in product(range(4), repeat=4) if all(p[s] <= max(p[:s], default=-1) + 1 for s in range(4))]


def pattern_sums(X: np.ndarray) -> dict:
    """``S_X(p)``: the sum of ``X_ij X_kl`` over the index tuples whose equalities are exactly those of ``p``.
    First the "at least p" sums (same-block indices equal, the others free: one einsum), then, coarsest pattern
    first, subtract from each the exact sums of the strictly coarser patterns it includes."""
    at_least = {p: np.einsum("{}{},{}{}->".format(*("abcd"[b] for b in p)), X, X, optimize=True) for p in PATTERNS}
    exact: dict = {}
    for p in sorted(PATTERNS, key=lambda p: len(set(p))):
        coarser = [q for q in exact if all(q[s] == q[r] for s in range(4) for r in range(4) if p[s] == p[r])]
        exact[p] = at_least[p] - sum(exact[q] for q in coarser)
    return exact


def qap_null(A: np.ndarray, W: np.ndarray) -> tuple[float, float]:
    """Exact mean and variance of the quadratic-assignment statistic ``Q = sum_ij A_ij W_pi(i)pi(j)`` (Mantel
    1967; Hubert and Schultz 1976). pi maps an index tuple with m distinct indices uniformly onto the ``(N)_m``
    tuples of its equality pattern, so ``E[Q] = sum over the patterns of (i, j) of S_A S_W / (N)_m`` and
    ``E[Q^2] = sum_p S_A(p) S_W(p) / (N)_{m_p}`` over the 15 patterns of (i, j, k, l)."""
    n = len(A)
    pairs_a, pairs_w = [(np.trace(X), X.sum() - np.trace(X)) for X in (A, W)]  # i = j, and i != j
    mean = sum(pa * pw / math.perm(n, m) for m, pa, pw in zip((1, 2), pairs_a, pairs_w, strict=True) if m <= n)
    sa, sw = pattern_sums(A), pattern_sums(W)
    second = sum(sa[p] * sw[p] / math.perm(n, len(set(p))) for p in PATTERNS if len(set(p)) <= n)
    return mean, max(second - mean * mean, 0.0)


def ratio_null(d: np.ndarray, u: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Mean and variance of ``X / Y``, ``X = sum_i d_i x_pi(i)``, ``Y = sum_i u_i x_pi(i)`` (dist_rel: x is a
    level's indicator). APPROXIMATE: the delta method, second order for the mean and first for the variance,
    from the exact means, variances and covariance of X and Y. Coincident positions (Y = 0): (1.0, 0.0)."""
    (mx, vx), (my, vy), cxy = linear_null(d, x), linear_null(u, x), linear_cov(d, x, u, x)
    if my <= 0:
        return 1.0, 0.0
    mean = mx / my + mx * vy / my**3 - cxy / my**2
    return mean, max(vx / my**2 - 2 * mx * cxy / my**3 + mx**2 * vy / my**4, 0.0)


def scaled(moments: tuple[float, float], s: float) -> tuple[float, float]:
    """The mean and variance of ``s * S`` from those of S."""
    return moments[0] * s, moments[1] * s * s


def head_null(t: dict, w: np.ndarray, levels: np.ndarray, n_levels: int, u: np.ndarray) -> dict:
    """(null mean, null variance) of every cell of :func:`head_metrics` (w must have a keypoint). SAL, CLS
    lift and rho are linear in the moved map, level means linear in the moved level indicators ``e_a``; WI
    (``W = w w^T``) and ``R_ab`` (``W = e_a e_b^T``) are quadratic forms; dist_rel is a ratio."""
    bt, n = t["bt"], len(w)
    x = w / w.mean()
    out = {
        ("sal", -1, -1): linear_null(bt.mean(0), x),  # sal = sum_j (column mean of bt)_j w_j / mean(w)
        ("wi", -1, -1): scaled(qap_null(bt, np.outer(w, w)), n / w.sum() ** 2),
        ("cls_lift", -1, -1): linear_null(t["a"], x),
        ("cls_rho", -1, -1): linear_null(t["ra"], unit_centred(average_ranks(w))),
    }
    indicator = [(levels == k).astype(np.float64) for k in range(n_levels)]
    for a, ea in enumerate(indicator):
        if ea.sum() == 0:
            continue
        out["dist", a, -1] = scaled(linear_null(t["d"], ea), 1 / ea.sum())
        out["dist_rel", a, -1] = ratio_null(t["d"], u, ea)
        out["entropy", a, -1] = scaled(linear_null(t["e"], ea), 1 / ea.sum())
        for b, eb in enumerate(indicator):
            if eb.sum():
                out["R", a, b] = scaled(qap_null(bt, np.outer(ea, eb)), n / (ea.sum() * eb.sum()))
    return out


# ---- one image and layer, every cell ----------------------------------------------------------------------


def cyclic_shifts(grid: tuple[int, int]) -> list[np.ndarray]:
    """The N cyclic 2-D shifts of a row-major (g_h, g_w) grid as index maps: shift (dy, dx) moves the weight of
    patch (r, c) to patch (r + dy, c + dx), i.e. patch (r, c) gets that of ((r - dy) % g_h, (c - dx) % g_w)."""
    gh, gw = grid
    r, c = np.divmod(np.arange(gh * gw), gw)
    return [((r - dy) % gh) * gw + (c - dx) % gw for dy in range(gh) for dx in range(gw)]


def image_metrics(attn, weights, levels, n_levels: int, pos, num_prefix: int = 1, has_cls: bool = True,
                  null: str | None = "permute", grid: tuple[int, int] | None = None) -> dict:
    """Every cell of one image and layer: its observed value, null mean and null variance, per head and for the
    head mean.

    attn: (H, T + N, T + N) post-softmax attention, ``T = num_prefix`` prefix tokens first; weights (N,) and
    levels (N,) (integers in ``[0, n_levels)``) of the patches in row-major order; pos: (N, 2) patch centres in
    input pixels. null: ``"permute"`` (the exact moments of the uniform permutation null), ``"shift"`` (every
    cyclic shift of ``grid``, enumerated) or None (observed values only).

    Returns ``{"cells": cells(n_levels), "obs", "null_mean", "null_var": (H + 1, C) arrays}``, row H the head
    mean (head -1): the mean of the heads' values; its null moments are those of the head-mean terms, since every
    statistic is linear in them. NaN where a cell does not exist, and everywhere for an image without keypoints,
    which the analysis excludes.
    """
    attn, w, lv = np.asarray(attn, np.float64), np.asarray(weights, np.float64), np.asarray(levels)
    pos = np.asarray(pos, np.float64)
    dmat = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))  # patch-centre distances, pixels
    u = dmat.mean(1)
    heads = [head_terms(x, num_prefix, has_cls, dmat) for x in attn]
    mean_head = {k: np.mean([t[k] for t in heads], 0) for k in heads[0]}
    cl = cells(n_levels)
    out = {"cells": cl, **{k: np.full((len(heads) + 1, len(cl)), np.nan) for k in ("obs", "null_mean", "null_var")}}
    if w.sum() == 0:
        return out
    for h, t in enumerate(heads):
        obs = head_metrics(t, w, lv, n_levels, u)
        out["obs"][h] = [obs.get(c, np.nan) for c in cl]
    out["obs"][-1] = out["obs"][:-1].mean(0)
    if null == "permute":
        for h, t in enumerate([*heads, mean_head]):
            moments = head_null(t, w, lv, n_levels, u)
            out["null_mean"][h], out["null_var"][h] = np.array([moments.get(c, (np.nan, np.nan)) for c in cl]).T
    elif null == "shift":
        out["null_mean"], out["null_var"] = enumerated_null(attn, w, lv, n_levels, pos, cyclic_shifts(grid),
                                                            num_prefix, has_cls)
    return out


def enumerated_null(attn, weights, levels, n_levels: int, pos, maps, num_prefix: int = 1, has_cls: bool = True):
    """Null mean and variance of every cell by enumeration: the observed values of the moved maps
    ``weights[m], levels[m]`` for each index map m in ``maps``, with equal weight (a group of maps: the N cyclic
    shifts of a grid; for a tiny image, all N! permutations). (H + 1, C) each."""
    w, lv = np.asarray(weights), np.asarray(levels)
    values = np.stack([image_metrics(attn, w[m], lv[m], n_levels, pos, num_prefix, has_cls, null=None)["obs"]
                       for m in maps])
    return values.mean(0), values.var(0)
