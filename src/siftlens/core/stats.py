"""Exact permutation-null moments for linear and quadratic (Mantel) statistics (docs/method.md, "Null model
and dataset statistics").

Null model: the weight map is re-assigned to the ``N`` patch positions by a uniform random permutation
``pi``. The moments below are exact (closed forms, no sampling, checked against all N! permutations),
batched over leading dims ``...``, float64, device-agnostic. Exact: the mean and variance of every linear
statistic (SAL, CLS lift, rho, per-level distance and entropy) and of every quadratic form (WI, R). Not
exact: ``dist_rel``, a ratio of two linear statistics, whose moments
(:func:`siftlens.core.nullmodel.exact_moments`) are the delta-method approximation built from these exact
moments (its null sd is off by up to about 3% at N = 64, 2% at N = 196, and 1-30% below N = 10).

- Linear statistic ``S = sum_j c_j x_pi(j)`` (sampling without replacement), ``c, x: (..., N)``:
  ``E[S] = N mean(c) mean(x)``, ``Var[S] = sum_j (c_j - mean c)^2 sum_j (x_j - mean x)^2 / (N - 1)``.
- Quadratic assignment (Mantel 1967; Hubert and Schultz 1976) ``Q = sum_ij A_ij W_pi(i)pi(j)``,
  ``A, W: (..., N, N)``. With ``D_X = trace X`` and ``O_X = sum X - trace X`` (:func:`pair_sums`),
  ``E[Q] = D_A D_W / N + O_A O_W / (N (N - 1))``. For the second moment, split the index tuples
  ``(i, j, k, l)`` of ``X_ij X_kl`` by their equality pattern ``p`` (one of the 15 set partitions of the
  four positions, :data:`PATTERNS`, with ``m_p`` blocks, :data:`PATTERN_SIZES`). ``pi`` maps a tuple of
  pattern ``p`` uniformly onto the ``(N)_{m_p} = N! / (N - m_p)!`` tuples of the same pattern, so
  ``E[Q^2] = sum_p S_A(p) S_W(p) / (N)_{m_p}`` where ``S_X(p)`` sums ``X_ij X_kl`` over the tuples of
  pattern exactly ``p`` (:func:`pattern_sums`, ``(..., 15)``). ``S_X`` follows from the "at least ``p``"
  sums ``T_X(q)`` (same-block indices equal, others free; each an O(N^2) reduction) by Moebius inversion
  on the partition lattice: ``S(p) = sum_{q >= p} mu(p, q) T(q)``.
- Two-sided normal p-values for the resulting z-scores, without scipy (:func:`normal_two_sided_p`).
- Dataset statistics: the exact in-memory percentile bootstrap (:func:`bootstrap_ci`, the reference of the
  analysis' online Poisson bootstrap) and Benjamini-Hochberg q-values (:func:`bh_qvalues`).
"""

from __future__ import annotations

import math
import warnings
from itertools import product

import numpy as np
import torch

from ..errors import ConfigError, GeometryError

Partition = tuple[int, ...]

# Index positions of the product X_ij * X_kl: 0 = i, 1 = j, 2 = k, 3 = l.
_ARITY = 4
_LABELS = "abcd"


def _set_partitions(n: int) -> list[Partition]:
    """All set partitions of ``n`` positions as restricted growth strings (block label per position)."""
    parts = []
    for labels in product(range(n), repeat=n):
        if labels[0] == 0 and all(labels[t] <= max(labels[:t]) + 1 for t in range(1, n)):
            parts.append(labels)
    return parts


def _blocks(p: Partition) -> list[frozenset[int]]:
    """The blocks of partition ``p`` as sets of positions."""
    return [frozenset(t for t, b in enumerate(p) if b == label) for label in sorted(set(p))]


def _coarsens(q: Partition, p: Partition) -> bool:
    """True when ``q >= p`` in the partition lattice: every block of ``p`` lies inside a block of ``q``."""
    return all(q[s] == q[t] for s in range(len(p)) for t in range(len(p)) if p[s] == p[t])


def _moebius(p: Partition, q: Partition) -> int:
    """Moebius function ``mu(p, q)`` of the partition lattice for ``q >= p``."""
    mu = 1
    for block in _blocks(q):
        k = sum(1 for b in _blocks(p) if b <= block)
        mu *= (-1) ** (k - 1) * math.factorial(k - 1)
    return mu


def _moebius_matrix(parts: list[Partition]) -> np.ndarray:
    """``M[p, q] = mu(p, q)`` where ``q >= p``, else 0, so that ``S = T @ M.T``."""
    m = np.zeros((len(parts), len(parts)), dtype=np.float64)
    for a, p in enumerate(parts):
        for b, q in enumerate(parts):
            if _coarsens(q, p):
                m[a, b] = _moebius(p, q)
    return m


#: The 15 equality patterns of ``(i, j, k, l)``, each a block label per position (restricted growth string).
PATTERNS: tuple[Partition, ...] = tuple(_set_partitions(_ARITY))
#: Number of blocks (distinct indices) ``m_p`` of each pattern, shape ``(15,)``.
PATTERN_SIZES: np.ndarray = np.array([len(set(p)) for p in PATTERNS], dtype=np.int64)
PATTERN_SIZES.setflags(write=False)
_MOEBIUS = torch.from_numpy(_moebius_matrix(list(PATTERNS)))
# its inverse, the zeta matrix of the lattice (0/1 entries): at-least sums back from exact-pattern sums
_ZETA = torch.linalg.inv(_MOEBIUS).round()
# einsum equations for the "at least p" sums: positions in one block share a label; '...' batches (the
# slow, obviously correct reference of :func:`at_least_sums`)
_AT_LEAST_EQUATIONS = tuple("...{}{},...{}{}->...".format(*(_LABELS[b] for b in p)) for p in PATTERNS)


def _feature_of(p: Partition) -> str:
    """Which O(N^2) reduction gives ``T_X(p)`` for ``X_ij X_kl`` (positions i=0, j=1, k=2, l=3): its name in
    :func:`_features` (``S`` sum, ``t`` trace, ``r``/``c``/``d`` row sums, column sums, diagonal)."""
    blocks = frozenset(frozenset(b) for b in _blocks(p) if len(b) > 1)
    table = {
        frozenset(): "S*S", frozenset({frozenset({0, 1})}): "t*S", frozenset({frozenset({2, 3})}): "S*t",
        frozenset({frozenset({0, 2})}): "rr", frozenset({frozenset({1, 3})}): "cc",
        frozenset({frozenset({0, 3})}): "rc", frozenset({frozenset({1, 2})}): "rc",
        frozenset({frozenset({0, 1}), frozenset({2, 3})}): "t*t",
        frozenset({frozenset({0, 2}), frozenset({1, 3})}): "XX",
        frozenset({frozenset({0, 3}), frozenset({1, 2})}): "XXt",
        frozenset({frozenset({0, 1, 2})}): "dr", frozenset({frozenset({0, 2, 3})}): "dr",
        frozenset({frozenset({0, 1, 3})}): "dc", frozenset({frozenset({1, 2, 3})}): "dc",
        frozenset({frozenset({0, 1, 2, 3})}): "dd",
    }
    return table[blocks]


_FEATURES = tuple(_feature_of(p) for p in PATTERNS)


def _assemble(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The 15 "at least" sums in :data:`PATTERNS` order from the named reductions ``f``."""
    f = {**f, "S*S": f["S"] * f["S"], "t*S": f["t"] * f["S"], "S*t": f["S"] * f["t"], "t*t": f["t"] * f["t"]}
    return torch.stack([f[name] for name in _FEATURES], dim=-1)


def _f64(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a float64 tensor on its own device."""
    return torch.as_tensor(t).to(torch.float64)


def _check_square(x: torch.Tensor, name: str) -> None:
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise GeometryError(f"{name} must have shape (..., N, N); got {tuple(x.shape)}")


def linear_moments(coef: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact permutation mean and variance of ``sum_j coef_j x_pi(j)``.

    ``coef: (..., N)``, ``x: (..., N)`` with broadcastable leading dims; returns ``(mean, var)``, each of the
    broadcast leading shape. ``var = 0`` when ``N == 1``.
    """
    coef, x = _f64(coef), _f64(x)
    if coef.ndim < 1 or x.ndim < 1 or coef.shape[-1] != x.shape[-1]:
        raise GeometryError(f"coef and x need the same last dim N; got {tuple(coef.shape)} and {tuple(x.shape)}")
    n = coef.shape[-1]
    if n < 1:
        raise GeometryError("linear_moments needs N >= 1 positions")
    mean = coef.sum(-1) * x.sum(-1) / n
    ss_coef = (coef - coef.mean(-1, keepdim=True)).square().sum(-1)
    ss_x = (x - x.mean(-1, keepdim=True)).square().sum(-1)
    var = ss_coef * ss_x / (n - 1) if n > 1 else torch.zeros_like(mean)
    return mean, var


def at_least_sums(X: torch.Tensor) -> torch.Tensor:
    """``T_X(p)``: sum of ``X_ij X_kl`` with same-block indices of ``p`` equal, the rest free.

    ``X: (..., N, N)`` -> ``(..., 15)`` in :data:`PATTERNS` order, from O(N^2) reductions: the sum, trace,
    row and column sums, diagonal, ``sum X^2`` and ``sum X * X^T`` (:func:`at_least_sums_einsum` is the
    slower reference it is tested against).
    """
    X = _f64(X)
    _check_square(X, "X")
    r, c, d = X.sum(-1), X.sum(-2), X.diagonal(dim1=-2, dim2=-1)
    return _assemble({"S": r.sum(-1), "t": d.sum(-1), "rr": r.square().sum(-1), "cc": c.square().sum(-1),
                      "rc": (r * c).sum(-1), "XX": X.square().sum((-2, -1)),
                      "XXt": (X * X.transpose(-1, -2)).sum((-2, -1)), "dr": (d * r).sum(-1),
                      "dc": (d * c).sum(-1), "dd": d.square().sum(-1)})


def sums_from_features(f: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`pattern_sums` from the named O(N^2) reductions of :func:`at_least_sums` (``S`` sum, ``t``
    trace, ``rr``/``cc`` squared row/column sums, ``rc`` row . column sums, ``XX`` sum of squares, ``XXt``
    sum of ``X * X^T``, ``dr``/``dc`` diagonal . row/column sums, ``dd`` squared diagonal), each (...,)
    float64, for callers that have some of them already."""
    t = _assemble(f)
    return t @ _MOEBIUS.to(t.device).T


def at_least_sums_einsum(X: torch.Tensor) -> torch.Tensor:
    """:func:`at_least_sums` as one generated two-operand einsum per pattern (the reference)."""
    X = _f64(X)
    _check_square(X, "X")
    return torch.stack([torch.einsum(eq, X, X) for eq in _AT_LEAST_EQUATIONS], dim=-1)


def outer_sums(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`pattern_sums` and :func:`pair_sums` of the outer product ``X = x y^T`` in O(N):
    ``x, y: (..., N)`` -> ``(..., 15)``, ``(..., 2)``. The weight side of WI (``w w^T``) and of R
    (``e_a e_b^T``) is such a product."""
    x, y = _f64(x), _f64(y)
    sx, sy, sxy = x.sum(-1), y.sum(-1), (x * y).sum(-1)
    sx2, sy2 = x.square().sum(-1), y.square().sum(-1)
    t = _assemble({"S": sx * sy, "t": sxy, "rr": sx2 * sy * sy, "cc": sy2 * sx * sx, "rc": sx * sy * sxy,
                   "XX": sx2 * sy2, "XXt": sxy * sxy, "dr": sy * (x * x * y).sum(-1), "dc": sx * (x * y * y).sum(-1),
                   "dd": (x * x * y * y).sum(-1)})
    return t @ _MOEBIUS.to(t.device).T, torch.stack([sxy, sx * sy - sxy], dim=-1)


def pattern_sums(X: torch.Tensor) -> torch.Tensor:
    """``S_X(p)``: sum of ``X_ij X_kl`` over tuples whose equality pattern is exactly ``p``.

    ``X: (..., N, N)`` -> ``(..., 15)`` in :data:`PATTERNS` order, by Moebius inversion of
    :func:`at_least_sums`. Patterns with more blocks than ``N`` come out as (rounding-level) zeros.
    """
    t = at_least_sums(X)
    return t @ _MOEBIUS.to(t.device).T


def pair_sums(X: torch.Tensor) -> torch.Tensor:
    """The two exact patterns of the sum ``sum_ij X_ij``: ``(..., N, N)`` -> ``(..., 2)`` = [trace, off-diagonal sum].

    The mean of ``Q`` is linear in ``A`` and ``W``, so it cannot be recovered (with its sign) from the
    quadratic :func:`pattern_sums`; :func:`qap_moments` takes these as well.
    """
    X = _f64(X)
    _check_square(X, "X")
    diag = X.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.stack([diag, X.sum((-2, -1)) - diag], dim=-1)


def _inverse_falling_factorials(n: int, sizes: np.ndarray) -> list[float]:
    """``1 / (n)_m`` for each ``m`` in ``sizes``; 0.0 where ``m > n`` (no tuple of that pattern exists)."""
    return [1.0 / math.perm(n, int(m)) if m <= n else 0.0 for m in sizes]


def centred_at_least_sums(t: torch.Tensor, pair: torch.Tensor, n: int) -> torch.Tensor:
    """The "at least" sums (:func:`at_least_sums`) of the centred matrix ``X' = X - o (J - I) - d I``.

    ``t: (..., 15)`` the at-least sums of ``X``, ``pair: (..., 2)`` = [trace, off-diagonal sum] of ``X``
    (:func:`pair_sums`), ``n`` its side ``N``. ``d = trace / N`` and ``o = off-diagonal sum / (N (N - 1))``
    are the mean diagonal and off-diagonal entries, so ``X'`` has trace 0 and off-diagonal sum 0. Subtracting
    ``o J + (d - o) I`` changes ``Q = sum_ij A_ij W_pi(i)pi(j)`` by a constant (``sum_ij W_pi(i)pi(j)`` and
    its trace do not depend on ``pi``), so the centred matrices have the same null variance, and their
    ``E[Q']`` is 0: ``Var[Q] = E[Q'^2]`` with no ``second - mean**2`` cancellation. Float64, ``(..., 15)``.
    """
    t, pair = _f64(t), _f64(pair)
    f = {name: t[..., _FEATURES.index(name)] for name in ("rr", "cc", "rc", "XX", "XXt", "dr", "dc", "dd")}
    tr, off = pair[..., 0], pair[..., 1]
    total = tr + off
    d = tr / n
    o = off / (n * (n - 1)) if n > 1 else torch.zeros_like(off)
    b = d - o  # X' = X - o J - b I
    k = n * o + b  # what X' takes from every row (and column) sum
    vec = n * k * k - 2 * k * total  # sum (r_i - k)^2 = rr + vec, likewise cc and rc
    mat = n * n * o * o + 2 * n * o * b + n * b * b - 2 * o * total - 2 * b * tr  # sum X'^2 = XX + mat
    zero = torch.zeros_like(tr)
    return _assemble({"S": zero, "t": zero, "rr": f["rr"] + vec, "cc": f["cc"] + vec, "rc": f["rc"] + vec,
                      "XX": f["XX"] + mat, "XXt": f["XXt"] + mat,
                      "dr": f["dr"] - k * tr - d * total + n * d * k, "dc": f["dc"] - k * tr - d * total + n * d * k,
                      "dd": f["dd"] - 2 * d * tr + n * d * d})


def _centred_pattern_sums(s: torch.Tensor, pair: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`pattern_sums` of the centred matrix (:func:`centred_at_least_sums`) from those of ``X``."""
    t = s @ _ZETA.to(s.device).T
    return centred_at_least_sums(t, pair, n) @ _MOEBIUS.to(s.device).T


def qap_moments(
    sa: torch.Tensor, sw: torch.Tensor, n: int, *, pa: torch.Tensor, pw: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact permutation mean and variance of the Mantel statistic ``Q = sum_ij A_ij W_pi(i)pi(j)``.

    ``sa = pattern_sums(A)``, ``sw = pattern_sums(W)``: ``(..., 15)``; ``pa = pair_sums(A)``,
    ``pw = pair_sums(W)``: ``(..., 2)``; leading dims broadcast against each other. ``n`` is the side ``N``
    of ``A`` and ``W``. Returns ``(mean, var)`` of the broadcast leading shape; ``var >= 0``.

    The variance is ``E[Q'^2]`` of the centred matrices (:func:`centred_at_least_sums`), never
    ``E[Q^2] - E[Q]^2``: for near-uniform attention the latter subtracts two numbers of size ``E[Q]^2``
    to get one many orders of magnitude smaller (docs/method.md, "Precision near uniform attention").
    """
    mean, var, _ = _qap_parts(sa, sw, n, pa, pw)
    return mean, var


def _qap_parts(sa, sw, n: int, pa, pw) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """:func:`qap_moments`'s ``(mean, var)`` and the pieces :func:`_rounding_bound` takes from it: the at-least
    sums of ``A`` and of its centred matrix, and the centred pattern sums of ``W`` times ``1 / (N)_m``."""
    if n < 1:
        raise ConfigError(f"qap_moments needs n >= 1; got {n}")
    sa, sw, pa, pw = _f64(sa), _f64(sw), _f64(pa), _f64(pw)
    _check_pattern_shapes(sa, sw, pa, pw)
    pair_coef = torch.tensor(_inverse_falling_factorials(n, np.array([1, 2])), dtype=torch.float64, device=pa.device)
    # contractions over the pattern axis with broadcasting: one batched matmul each, no (broadcast, 15) product
    mean = torch.einsum("...p,...p->...", pa * pair_coef, pw)
    coef = torch.tensor(_inverse_falling_factorials(n, PATTERN_SIZES), dtype=torch.float64, device=sa.device)
    t = sa @ _ZETA.to(sa.device).T
    tc = centred_at_least_sums(t, pa, n)
    wc = _centred_pattern_sums(sw, pw, n) * coef
    var = torch.einsum("...p,...p->...", wc, tc @ _MOEBIUS.to(sa.device).T).clamp_min(0.0)
    return mean.expand_as(var).contiguous(), var, (t, tc, wc, pa)


def qap_rounding_bound(
    sa: torch.Tensor, sw: torch.Tensor, n: int, *, pa: torch.Tensor, pw: torch.Tensor, eps: float
) -> torch.Tensor:
    """A bound on the error of :func:`qap_moments`'s variance from rounding in ``A``'s O(N^2) sums.

    Arguments as :func:`qap_moments`; ``eps``: the machine epsilon of the float sums that ``A``'s row sums,
    column sums, ``sum A^2`` and ``sum A * A^T`` were built from, as sums of the centred entries ``Y = A - c``
    (``c`` a constant near the mean entry; :class:`siftlens.core.reductions.LayerSums`: ``Bt - 1/N`` in float32,
    float32 per row, the rest added in float64). A float sum of ``N`` terms is off by at most ``N eps`` times
    the sum of their absolute values, so with ``q = sum Y^2`` (taken about the mean entry, from ``sum A^2`` and
    ``sum A``): ``sum Y^2`` and ``sum Y * Y^T`` are off by up to ``N eps q``; the vector of row (or column)
    sums by up to ``g = 2 N eps sqrt(N q)`` in norm (Cauchy-Schwarz; 2 for the column sums' shift onto the row
    sums' total), so a centred product of two such vectors ``u . v`` by up to ``|u| g + |v| g + g^2``. The
    diagonal is exact (entries, not sums). The variance is linear in the centred at-least sums of ``A``; the
    bound is the sum over them of ``|d var / d T_A'|`` times that error. The error is relative to the
    deviations of ``A`` from a constant, not to ``A``'s size: it vanishes with them, and an ``A`` that is
    constant up to rounding is caught by :func:`no_variation`. The rounding of ``A``'s entries themselves (each
    ``Bt`` a float32) is not in the bound: it changes the variance in second order (about 5e-5 of the sd at an
    attention logit sd of 1e-3, N = 196). Returns (broadcast leading shape,) float64, the unit of the variance.
    """
    sa, sw, pa, pw = _f64(sa), _f64(sw), _f64(pa), _f64(pw)
    _check_pattern_shapes(sa, sw, pa, pw)
    coef = torch.tensor(_inverse_falling_factorials(n, PATTERN_SIZES), dtype=torch.float64, device=sa.device)
    t = sa @ _ZETA.to(sa.device).T
    return _rounding_bound(t, centred_at_least_sums(t, pa, n), _centred_pattern_sums(sw, pw, n) * coef, pa, n, eps)


def _rounding_bound(t: torch.Tensor, tc: torch.Tensor, wc: torch.Tensor, pa: torch.Tensor, n: int,
                    eps: float) -> torch.Tensor:
    """:func:`qap_rounding_bound` from its pieces: ``t`` and ``tc`` the at-least sums of ``A`` and of its centred
    matrix, ``wc`` the centred pattern sums of ``W`` times the ``1 / (N)_m`` coefficients."""
    grad = wc @ _MOEBIUS.to(wc.device)  # d var / d T_A', (..., 15)

    def feature(name: str) -> torch.Tensor:
        return tc[..., _FEATURES.index(name)]

    total = pa.sum(-1)
    q = (t[..., _FEATURES.index("XX")] - total * total / (n * n)).clamp_min(0.0)  # sum of squared deviations
    gamma = n * eps
    g = 2 * gamma * (n * q).sqrt()  # row or column sums: the norm of their error vector
    norm = {name: feature(name).clamp_min(0.0).sqrt() for name in ("rr", "cc", "dd")}
    err = {"XX": gamma * q, "XXt": gamma * q, "rr": 2 * norm["rr"] * g + g * g, "cc": 2 * norm["cc"] * g + g * g,
           "rc": (norm["rr"] + norm["cc"]) * g + g * g, "dr": norm["dd"] * g, "dc": norm["dd"] * g}
    bound = torch.zeros(torch.broadcast_shapes(tc.shape[:-1], wc.shape[:-1]), dtype=torch.float64, device=tc.device)
    for p, name in enumerate(_FEATURES):
        if name in err:
            bound = bound + grad[..., p].abs() * err[name]
    return bound


def qap_resolved_moments(
    sa: torch.Tensor, sw: torch.Tensor, n: int, *, pa: torch.Tensor, pw: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qap_moments` with the variance set to 0 where :func:`qap_rounding_bound` could account for all of
    it (:func:`resolved_variance`): the same numbers, with the centred sums of ``A`` and ``W`` computed once for
    both. Arguments as :func:`qap_rounding_bound`."""
    mean, var, (t, tc, wc, pa) = _qap_parts(sa, sw, n, pa, pw)
    return mean, resolved_variance(var, _rounding_bound(t, tc, wc, pa, n, eps))


#: A variance counts as resolved when it exceeds its rounding bound this many times (its sd is then off by
#: at most 1%: ``sqrt(1 + 1/50) - 1``).
RESOLVE_FACTOR = 50.0


def resolved_variance(var: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``var`` where it exceeds :data:`RESOLVE_FACTOR` times its rounding ``bound``, else 0.0 (same shape)."""
    return torch.where(var > RESOLVE_FACTOR * bound, var, torch.zeros_like(var))


def _check_pattern_shapes(sa, sw, pa, pw) -> None:
    npat = len(PATTERNS)
    if sa.shape[-1:] != (npat,) or sw.shape[-1:] != (npat,):
        raise GeometryError(f"sa and sw must have shape (..., {npat}); got {tuple(sa.shape)}, {tuple(sw.shape)}")
    if pa.shape[-1:] != (2,) or pw.shape[-1:] != (2,):
        raise GeometryError(f"pa and pw must have shape (..., 2); got {tuple(pa.shape)}, {tuple(pw.shape)}")


def normal_two_sided_p(z: np.ndarray) -> np.ndarray:
    """Two-sided standard-normal p-value ``erfc(|z| / sqrt 2)``, elementwise, float64, same shape as ``z``.

    Never NaN for finite ``z`` (NaN stays NaN); it underflows to 0.0 for huge ``|z|`` (about 38 and beyond):
    the normal tail is not accurate that far out anyway, so reports print p below 1e-12 as "< 1e-12".
    """
    zt = torch.tensor(np.asarray(z, dtype=np.float64)).abs()
    p = torch.special.erfc(zt / math.sqrt(2.0)).clamp(0.0, 1.0)
    return p.numpy()


# z-scores and "no variation" (numpy, float64)

#: Metric values are computed in float32 and carry a few float32 epsilons of rounding (measured: up to 9
#: for WI at N = 196). A null sd at or below this many epsilons of the null mean cannot be told apart from
#: that rounding, so the z-score would measure rounding, not attention: the cell reads "no variation".
NO_VARIATION_EPS = 16
NO_VARIATION = "no variation"
_F32_EPS = float(np.finfo(np.float32).eps)


def no_variation(null_mean, null_var) -> np.ndarray:
    """True where a cell's null variance is zero (or not finite) or its sd is at most
    :data:`NO_VARIATION_EPS` float32 epsilons of ``|null_mean|``. Arrays of one shape, any unit; bool."""
    mean, var = np.asarray(null_mean, np.float64), np.asarray(null_var, np.float64)
    with np.errstate(invalid="ignore"):
        sd = np.sqrt(np.clip(var, 0, None))
        return ~np.isfinite(var) | (var <= 0) | (sd <= NO_VARIATION_EPS * _F32_EPS * np.abs(mean))


def z_scores(observed, null_mean, null_var) -> tuple[np.ndarray, np.ndarray]:
    """``(observed - null_mean) / null_sd`` and a note per cell; arrays of one shape, float64.

    z is NaN and the note :data:`NO_VARIATION` where :func:`no_variation` holds (never a clipped or
    floored huge z); elsewhere the note is ``""`` and z is 0.0 where ``observed`` equals the null mean to
    1e-9 of its size. Returns ``(z, note)``, note an object array of str.
    """
    obs, mean = np.asarray(observed, np.float64), np.asarray(null_mean, np.float64)
    var = np.asarray(null_var, np.float64)
    flat = no_variation(mean, var)
    diff = obs - mean
    with np.errstate(invalid="ignore", divide="ignore"):
        z = np.where(np.abs(diff) <= 1e-9 * np.maximum(1.0, np.abs(mean)), 0.0, diff / np.sqrt(var))
    z = np.where(flat, np.nan, z)
    return z, np.where(flat, NO_VARIATION, "").astype(object)


# dataset-level statistics (numpy, float64)


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, np.float64)


def bootstrap_ci(
    values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap confidence interval of the NaN-ignoring mean over axis 0.

    values: (n, ...) array or tensor (n images). Returns ``(lo, hi)``, each of shape ``values.shape[1:]``
    (float64): the ``alpha/2`` and ``1 - alpha/2`` percentiles of ``n_boot`` resampled means. A resample is
    a row of an ``(n_boot, n)`` index matrix, turned into per-image counts, so the means are one matrix
    product (memory-bounded chunks of resamples). A column's NaN entries are ignored; a column that is
    all NaN (or ``n == 0``) gives NaN. With ``n == 1``, ``lo == hi ==`` the value.
    """
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be >= 1, got {n_boot}")
    v = _np(values)
    if v.ndim == 0:
        raise GeometryError("bootstrap_ci needs values of shape (n, ...)")
    n, tail = v.shape[0], v.shape[1:]
    if n == 0:
        return np.full(tail, np.nan), np.full(tail, np.nan)
    flat = v.reshape(n, -1)
    ok = ~np.isnan(flat)
    x, okf = np.where(ok, flat, 0.0), ok.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.empty((n_boot, flat.shape[1]))
    chunk = max(1, (1 << 22) // n)  # bound the (chunk, n) count matrix to ~32 MB
    for s in range(0, n_boot, chunk):
        e = min(n_boot, s + chunk)
        idx = rng.integers(0, n, (e - s, n))
        counts = np.bincount((np.arange(e - s)[:, None] * n + idx).ravel(), minlength=(e - s) * n)
        counts = counts.reshape(e - s, n).astype(np.float64)
        tot, cnt = counts @ x, counts @ okf
        means[s:e] = np.where(cnt > 0, tot / np.maximum(cnt, 1.0), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns -> NaN, silently
        lo, hi = np.nanpercentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
    return lo.reshape(tail), hi.reshape(tail)


def bh_qvalues(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values) of a family of tests.

    p: (n,) (or any shape, treated as one family) p-values in [0, 1]. NaN entries stay NaN and do not
    count in n. ``q_(i) = min_{j >= i} p_(j) * n / j`` over the ascending order, clipped to 1, so q is
    monotone in p. Returns float64 of p's shape.
    """
    pa = _np(p)
    flat = pa.ravel()
    ok = ~np.isnan(flat)
    pv = flat[ok]
    if pv.size and (pv.min() < 0 or pv.max() > 1):
        raise ConfigError("p-values must lie in [0, 1]")
    q = np.full(flat.shape, np.nan)
    m = pv.size
    if m:
        order = np.argsort(pv, kind="stable")
        scaled = pv[order] * m / np.arange(1, m + 1)
        scaled = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
        out = np.empty(m)
        out[order] = scaled
        q[ok] = out
    return q.reshape(pa.shape)
