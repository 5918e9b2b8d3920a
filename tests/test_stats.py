"""Exact permutation-null moments (siftlens.core.stats) against brute force and full enumeration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from siftlens.core.stats import (
    PATTERN_SIZES,
    PATTERNS,
    linear_moments,
    normal_two_sided_p,
    pair_sums,
    pattern_sums,
    qap_moments,
)
from siftlens.errors import ConfigError, GeometryError


def _rgs(idx: tuple[int, ...]) -> tuple[int, ...]:
    """Equality pattern of an index tuple as a restricted growth string."""
    first: dict[int, int] = {}
    return tuple(first.setdefault(v, len(first)) for v in idx)


def _brute_pattern_sums(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    out = dict.fromkeys(PATTERNS, 0.0)
    for i, j, k, l in itertools.product(range(n), repeat=4):
        out[_rgs((i, j, k, l))] += x[i, j] * x[k, l]
    return np.array([out[p] for p in PATTERNS])


def _perms(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))))


def _enum_qap(a: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Mean and variance of sum_ij A_ij W_pi(i)pi(j) over all N! permutations."""
    p = _perms(a.shape[0])
    q = (a[None] * w[p[:, :, None], p[:, None, :]]).sum((1, 2))
    return q.mean(), q.var()


def _enum_linear(c: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    s = (c[None] * x[_perms(c.shape[0])]).sum(1)
    return s.mean(), s.var()


def _qap(a: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    at, wt = torch.from_numpy(a), torch.from_numpy(w)
    mean, var = qap_moments(pattern_sums(at), pattern_sums(wt), a.shape[0], pa=pair_sums(at), pw=pair_sums(wt))
    return mean.item(), var.item()


def _close(got: float, want: float, rel: float = 1e-10) -> bool:
    return abs(got - want) <= rel * max(abs(want), 1e-300) + 1e-13


def test_partition_table() -> None:
    assert len(PATTERNS) == 15 and len(set(PATTERNS)) == 15  # Bell(4)
    assert [int((PATTERN_SIZES == m).sum()) for m in (1, 2, 3, 4)] == [1, 7, 6, 1]  # Stirling numbers S(4, m)
    assert all(_rgs(p) == p for p in PATTERNS)


@pytest.mark.parametrize("symmetric", [False, True])
def test_pattern_sums_brute_force(symmetric: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 5))
    if symmetric:
        x = x + x.T
    got = pattern_sums(torch.from_numpy(x)).numpy()
    want = _brute_pattern_sums(x)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)
    assert got.sum() == pytest.approx(x.sum() ** 2, rel=1e-12)


def test_pattern_sums_batched_and_small_n() -> None:
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(2, 3, 4, 4))
    got = pattern_sums(torch.from_numpy(xs)).numpy()
    assert got.shape == (2, 3, 15)
    for b, h in itertools.product(range(2), range(3)):
        np.testing.assert_allclose(got[b, h], _brute_pattern_sums(xs[b, h]), rtol=0, atol=1e-10)
    # N = 2: patterns with more than 2 blocks have no tuples.
    x2 = rng.normal(size=(2, 2))
    s2 = pattern_sums(torch.from_numpy(x2)).numpy()
    np.testing.assert_allclose(s2, _brute_pattern_sums(x2), rtol=0, atol=1e-12)
    assert np.all(np.abs(s2[PATTERN_SIZES > 2]) < 1e-12)


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_pattern_sums_never_materialises_n_cubed() -> None:
    n = 20  # n^2 = 400 exceeds the 15 x 15 Moebius table, n^3 = 8000 does not fit under it
    x = torch.randn(n, n, dtype=torch.float64)
    with _MaxNumel() as mode:
        pattern_sums(x)
    assert mode.max_numel <= n * n


def _qap_cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(2)
    n = 6
    a = rng.normal(size=(n, n))
    w = rng.normal(size=(n, n))
    stoch = rng.uniform(size=(n, n))
    stoch /= stoch.sum(1, keepdims=True)
    wv = rng.uniform(size=n)
    eye = np.eye(n)
    return [
        ("random", a, w),
        ("stochastic-wwT", stoch, np.outer(wv, wv)),
        ("indicator-a!=b", stoch, np.outer(eye[1], eye[4])),
        ("indicator-a==b", stoch, np.outer(eye[3], eye[3])),
        ("random-indicator", a, np.outer(eye[0], eye[5])),
    ]


@pytest.mark.parametrize("name,a,w", _qap_cases(), ids=[c[0] for c in _qap_cases()])
def test_qap_moments_enumeration_n6(name: str, a: np.ndarray, w: np.ndarray) -> None:
    want_mean, want_var = _enum_qap(a, w)
    mean, var = _qap(a, w)
    assert _close(mean, want_mean), (name, mean, want_mean)
    assert _close(var, want_var), (name, var, want_var)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_qap_moments_small_n(n: int) -> None:
    rng = np.random.default_rng(10 + n)
    a, w = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    want_mean, want_var = _enum_qap(a, w)
    mean, var = _qap(a, w)
    assert np.isfinite(mean) and np.isfinite(var)
    assert _close(mean, want_mean), (mean, want_mean)
    assert abs(var - want_var) <= 1e-10 * max(abs(want_var), 1.0)


def test_qap_moments_broadcasting() -> None:
    rng = np.random.default_rng(3)
    n = 5
    a = torch.from_numpy(rng.normal(size=(2, 3, n, n)))  # (B, H, N, N)
    w = torch.from_numpy(rng.normal(size=(2, 1, n, n)))  # (B, 1, N, N)
    mean, var = qap_moments(pattern_sums(a), pattern_sums(w), n, pa=pair_sums(a), pw=pair_sums(w))
    assert mean.shape == var.shape == (2, 3) and mean.dtype == var.dtype == torch.float64
    for b, h in itertools.product(range(2), range(3)):
        want_mean, want_var = _enum_qap(a[b, h].numpy(), w[b, 0].numpy())
        assert _close(mean[b, h].item(), want_mean) and _close(var[b, h].item(), want_var)


def test_qap_moments_rejects_bad_input() -> None:
    s, p = torch.zeros(15, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ConfigError):
        qap_moments(s, s, 0, pa=p, pw=p)
    with pytest.raises(GeometryError):
        qap_moments(s[:14], s, 4, pa=p, pw=p)
    with pytest.raises(GeometryError):
        pattern_sums(torch.zeros(3, 4, dtype=torch.float64))


def test_linear_moments_enumeration_n6() -> None:
    rng = np.random.default_rng(4)
    n = 6
    c = rng.normal(size=(2, 3, n))  # (B, H, N)
    x = rng.uniform(size=(2, 1, n))  # (B, 1, N)
    mean, var = linear_moments(torch.from_numpy(c), torch.from_numpy(x))
    assert mean.shape == var.shape == (2, 3) and mean.dtype == torch.float64
    for b, h in itertools.product(range(2), range(3)):
        want_mean, want_var = _enum_linear(c[b, h], x[b, 0])
        assert _close(mean[b, h].item(), want_mean) and _close(var[b, h].item(), want_var)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_linear_moments_small_n(n: int) -> None:
    rng = np.random.default_rng(20 + n)
    c, x = rng.normal(size=n), rng.normal(size=n)
    mean, var = linear_moments(torch.from_numpy(c), torch.from_numpy(x))
    want_mean, want_var = _enum_linear(c, x)
    assert np.isfinite(mean.item()) and np.isfinite(var.item())
    assert _close(mean.item(), want_mean) and abs(var.item() - want_var) <= 1e-12


def test_linear_moments_rejects_mismatched_n() -> None:
    with pytest.raises(GeometryError):
        linear_moments(torch.zeros(4, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))


def test_normal_two_sided_p() -> None:
    assert normal_two_sided_p(np.array(0.0)) == 1.0
    p = normal_two_sided_p(np.array([1.959964, -1.959964, 50.0, -1e300, 3.0]))
    assert p[0] == pytest.approx(0.05, abs=1e-6) and p[1] == p[0]
    assert np.isfinite(p).all() and ((p >= 0) & (p <= 1)).all()
    assert p[4] == pytest.approx(0.0026997960632601866, rel=1e-12)
    assert p.shape == (5,) and p.dtype == np.float64


def test_fast_at_least_sums_and_outer_sums_match_the_references():
    from siftlens.core.stats import at_least_sums, at_least_sums_einsum, outer_sums, pair_sums, pattern_sums

    g = torch.Generator().manual_seed(7)
    X = torch.rand(3, 2, 7, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(at_least_sums(X), at_least_sums_einsum(X), rtol=1e-12, atol=1e-10)
    x, y = torch.rand(4, 7, generator=g, dtype=torch.float64), torch.rand(4, 7, generator=g, dtype=torch.float64)
    s, p = outer_sums(x, y)
    torch.testing.assert_close(s, pattern_sums(x[:, :, None] * y[:, None, :]), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(p, pair_sums(x[:, :, None] * y[:, None, :]), rtol=1e-12, atol=1e-12)


def test_resolved_moments_equal_the_moments_and_bound_computed_apart():
    """qap_resolved_moments shares the centred sums between the variance and its rounding bound: the same numbers
    as qap_moments with resolved_variance(qap_rounding_bound), resolved and unresolved cells alike."""
    from siftlens.core.stats import (
        pair_sums,
        pattern_sums,
        qap_moments,
        qap_resolved_moments,
        qap_rounding_bound,
        resolved_variance,
    )

    g = torch.Generator().manual_seed(3)
    n = 9
    scale = torch.tensor([1.0, 1e-3, 1e-6, 0.0], dtype=torch.float64)[:, None, None]
    logits = torch.randn(4, n, n, generator=g, dtype=torch.float64) * scale
    a = torch.softmax(logits, -1)  # from far from uniform to exactly uniform
    w = torch.rand(4, n, generator=g, dtype=torch.float64)
    wm = w[:, :, None] * w[:, None, :]
    sa, sw, pa, pw = pattern_sums(a), pattern_sums(wm), pair_sums(a), pair_sums(wm)
    eps = float(torch.finfo(torch.float32).eps)
    mean, var = qap_moments(sa, sw, n, pa=pa, pw=pw)
    apart = resolved_variance(var, qap_rounding_bound(sa, sw, n, pa=pa, pw=pw, eps=eps))
    got_mean, got_var = qap_resolved_moments(sa, sw, n, pa=pa, pw=pw, eps=eps)
    torch.testing.assert_close(got_mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(got_var, apart, rtol=1e-12, atol=0)
    assert (apart > 0).any() and (apart == 0).any()  # both kinds of cell were compared
