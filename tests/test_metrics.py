"""Tests of siftlens.core.metrics: closed-form cases, siftlens.reference, invariances, null models, statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _sums import direct_layer_sums
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from siftlens import reference as ref
from siftlens.analysis.engine import flatten_cells
from siftlens.core.metrics import (
    average_ranks,
    image_metrics,
    renormalise,
)
from siftlens.core.nullmodel import null_indices, with_null
from siftlens.core.stats import bh_qvalues, bootstrap_ci
from siftlens.errors import ConfigError, GeometryError

WEIGHTED = ("sal", "wi", "cls_lift")
PER_LEVEL = ("dist", "dist_rel", "entropy")


def grid_pos(gh: int, gw: int, patch: int = 16) -> torch.Tensor:
    """(N, 2) (x, y) patch centres of a row-major grid, as the backends compute them."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1).float() * patch + (patch - 1) / 2.0


def uniform_attn(B: int, h: int, S: int) -> torch.Tensor:
    return torch.full((B, h, S, S), 1.0 / S)


# ----------------------------------------------------------------------------------------------------
# the reference: siftlens.reference (docs/method.md in plain float64, one image and head at a time)

RANK_TOL = ref.RANK_TOL  # cls_rho: attention values this close (x max) are ties


def _spearman(a: np.ndarray, w: np.ndarray) -> float:
    """Spearman's rho with exact ties, by the reference."""
    return float(ref.unit_centred(ref.average_ranks(a)) @ ref.unit_centred(ref.average_ranks(w)))


def reference(attn, T, weights, levels, L, pos, has_cls):
    """The observed value of every image, head, map and cell of a batch by :mod:`siftlens.reference`:
    (B, H, K, C) float64 in the order of the analysis' cells (a map without keypoints: the neutral values)."""
    attn, weights, levels, pos = (x.double().numpy() if x.is_floating_point() else x.numpy()
                                  for x in (attn, weights, levels, pos))
    B, H = attn.shape[:2]
    K = weights.shape[1]
    dmat = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
    cl = ref.cells(L)
    out = np.full((B, H, K, len(cl)), np.nan)
    for b, h in np.ndindex(B, H):
        terms = ref.head_terms(attn[b, h], T, has_cls, dmat)
        for k in range(K):
            values = ref.head_metrics(terms, weights[b, k], levels[b, k], L, dmat.mean(1))
            out[b, h, k] = [values.get(c, np.nan) for c in cl]
    return out


def random_case(seed, B, H, T, N, K, L, *, has_cls=None, zero_img=False, onehot_rows=True):
    """Random attention (softmax rows, some one-hot rows, some rows with no mass on patches) and
    integer count weights with zeros; levels drawn from a random subset of [0, L) so some are empty."""
    g = np.random.default_rng(seed)
    S = T + N
    logits = g.normal(0, 2.0, (B, H, S, S))
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    if onehot_rows:
        for _ in range(g.integers(0, 4)):
            b, h, i = g.integers(B), g.integers(H), g.integers(S)
            attn[b, h, i] = 0.0
            attn[b, h, i, g.integers(S)] = 1.0  # a one-hot row; if it hits a prefix token the patch row is 0
    w = g.integers(0, 4, (B, K, N)).astype(np.float64) * (g.random((B, K, N)) < 0.6)
    if zero_img or g.random() < 0.2:
        w[g.integers(B)] = 0.0
    allowed = g.choice(L, size=g.integers(1, L + 1), replace=False)
    lv = allowed[g.integers(0, len(allowed), (B, K, N))]
    pos = g.uniform(0, 64, (N, 2))
    if has_cls is None:
        has_cls = T > 0
    return (torch.tensor(attn, dtype=torch.float32), T, torch.tensor(w, dtype=torch.float32),
            torch.tensor(lv, dtype=torch.int64), L, torch.tensor(pos, dtype=torch.float32), has_cls)


def assert_metrics_close(got, want, atol=1e-5, rtol=1e-4):
    """image_metrics' output against :func:`reference`'s (B, H, K, C), cell by cell."""
    flat = flatten_cells(got).numpy()
    for c, cell in enumerate(ref.cells(got["R"].shape[-1])):
        np.testing.assert_allclose(flat[..., c], want[..., c], atol=atol, rtol=rtol, equal_nan=True, err_msg=str(cell))


def test_query_weighted_sal_is_wi():
    # docs/method.md: the query-weighted SAL, sum_i c_i sum_j Bt_ij w_j / mean w with c = w / sum w, is WI
    case = random_case(4, 2, 3, 1, 9, 2, 3)
    attn, T, w, lv, L, pos, _ = case
    wi = image_metrics(*case)["wi"].double().numpy()
    for b, h, k in np.ndindex(wi.shape):
        bt = ref.head_terms(attn[b, h].double().numpy(), T, True, np.zeros((9, 9)))["bt"]
        x = w[b, k].double().numpy()
        sal_w = (x / x.sum()) @ bt @ x / x.mean() if x.sum() > 0 else 1.0
        assert wi[b, h, k] == pytest.approx(sal_w, rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# closed-form cases


def test_uniform_attention_is_neutral():
    # 2x2 grid, weights with all three levels present, CLS + 1 register
    N, T = 4, 2
    w = torch.tensor([[[2.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 2.0]]])  # (1, 2, 4): observed + one resampling
    lv = torch.tensor([[[2, 0, 1, 0], [0, 1, 0, 2]]])
    out = image_metrics(uniform_attn(1, 3, T + N), T, w, lv, 3, grid_pos(2, 2), has_cls=True)
    for key in WEIGHTED:
        assert out[key].shape == (1, 3, 2)
        torch.testing.assert_close(out[key], torch.ones(1, 3, 2), atol=1e-6, rtol=0)
    assert torch.equal(out["cls_rho"], torch.zeros(1, 3, 2))
    assert out["R"].shape == (1, 3, 2, 3, 3) and not out["R"].isnan().any()
    torch.testing.assert_close(out["R"], torch.ones(1, 3, 2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["entropy"], torch.full((1, 3, 2, 3), math.log(4)), atol=1e-6, rtol=0)
    # every query of a 2x2 grid (16-pixel patches) sees distances 0, 16, 16, 16*sqrt(2): mean 8 + 4*sqrt(2),
    # which is also the mean pairwise distance of the grid
    torch.testing.assert_close(out["dist"], torch.full((1, 3, 2, 3), 8 + 4 * math.sqrt(2)), atol=1e-4, rtol=0)
    # the distances are float32 dot products: uniform attention gives 1.0 to float32 rounding
    torch.testing.assert_close(out["dist_rel"], torch.ones(1, 3, 2, 3), atol=1e-6, rtol=0)
    for v in out.values():
        assert v.dtype == torch.float32


def test_uniform_attention_random_sizes_and_no_cls():
    g = torch.Generator().manual_seed(0)
    B, H, N, K, L = 2, 2, 12, 3, 3
    w = torch.randint(0, 3, (B, K, N), generator=g).float()
    lv = torch.randint(0, L, (B, K, N), generator=g)
    lv[:, :, :L] = torch.arange(L)  # all levels present
    pos = grid_pos(3, 4, patch=8)
    out = image_metrics(uniform_attn(B, H, N), 0, w, lv, L, pos, has_cls=False)
    for key in WEIGHTED:
        torch.testing.assert_close(out[key], torch.ones(B, H, K), atol=1e-6, rtol=0)
    assert torch.equal(out["cls_rho"], torch.zeros(B, H, K))
    torch.testing.assert_close(out["R"], torch.ones(B, H, K, L, L), atol=1e-5, rtol=0)
    torch.testing.assert_close(out["entropy"], torch.full((B, H, K, L), math.log(N)), atol=1e-5, rtol=0)
    # the level means of the per-query mean distance, weighted by level size, give the mean pairwise distance
    D = torch.cdist(pos.double(), pos.double())
    counts = torch.nn.functional.one_hot(lv, L).sum(-2).double()  # (B, K, L)
    pooled = (out["dist"].double() * counts[:, None]).sum(-1) / N
    torch.testing.assert_close(pooled, torch.full((B, H, K), D.mean().item(), dtype=torch.float64),
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(out["dist_rel"], torch.ones(B, H, K, L), atol=1e-6, rtol=0)


def test_attention_on_keypoint_patches_by_hand():
    # N = 4 patches on a 2x2 grid (16 px), count weights w = [2, 0, 1, 0]: keypoint set J = {0, 2}.
    # Every row (CLS and patch queries) puts mass 1/2 on each patch of J.
    T, N = 1, 4
    w = torch.tensor([[[2.0, 0.0, 1.0, 0.0]]])
    lv = torch.tensor([[[2, 0, 1, 0]]])  # level 0: {1, 3}; level 1: {2}; level 2: {0}
    attn = torch.zeros(1, 1, T + N, T + N)
    attn[..., T + 0] = 0.5
    attn[..., T + 2] = 0.5
    out = image_metrics(attn, T, w, lv, 3, grid_pos(2, 2), has_cls=True)
    # SAL = mean_{j in J} w_j / mean_j w_j = 1.5 / 0.75
    assert out["sal"].item() == pytest.approx(2.0, abs=1e-6)
    # WI = sum_i w_i * 1.5 / (3 * 3 / 4) = 4.5 / 2.25; SAL_w equals WI by definition
    assert out["wi"].item() == pytest.approx(2.0, abs=1e-6)
    assert out["cls_lift"].item() == pytest.approx(2.0, abs=1e-6)
    # ranks: a = [.5, 0, .5, 0] -> [3.5, 1.5, 3.5, 1.5]; w -> [4, 1.5, 3, 1.5];
    # centred: [1, -1, 1, -1] . [1.5, -1, .5, -1] = 4; norms 2 and sqrt(4.5)
    assert out["cls_rho"].item() == pytest.approx(4 / (2 * math.sqrt(4.5)), abs=1e-6)
    # R_ab: key level 0 gets no mass; levels 1 and 2 get 1/2 each over n_b / N = 1/4 -> 2, for every
    # query level
    expected_r = torch.tensor([[0.0, 2.0, 2.0]] * 3)
    torch.testing.assert_close(out["R"][0, 0, 0], expected_r, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["entropy"][0, 0, 0], torch.full((3,), math.log(2)), atol=1e-6, rtol=0)
    # distances: queries 0 and 2 (left column) see 0 and 16 -> 8; queries 1 and 3 see 16 and 16*sqrt(2)
    expected_d = torch.tensor([8 + 8 * math.sqrt(2), 8.0, 8.0])
    torch.testing.assert_close(out["dist"][0, 0, 0], expected_d, atol=1e-4, rtol=0)
    # every query of a 2x2 grid has the same uniform distance 8 + 4*sqrt(2)
    torch.testing.assert_close(out["dist_rel"][0, 0, 0], expected_d / (8 + 4 * math.sqrt(2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid", [(2, 2), (3, 3), (1, 5), (14, 14), (7, 5)])
@pytest.mark.parametrize("T", [0, 1, 4])
def test_uniform_attention_gives_relative_distance_exactly_one(grid, T):
    # softmax of constant logits, as a model with zero queries or keys produces it; levels hold central
    # and border patches alike, whose raw distances differ, but the relative distance is 1.0 (float32)
    N = grid[0] * grid[1]
    g = torch.Generator().manual_seed(N + T)
    w = torch.randint(0, 3, (2, 4, N), generator=g).float()
    lv = torch.randint(0, 3, (2, 4, N), generator=g)
    attn = torch.softmax(torch.zeros(2, 3, T + N, T + N), -1)
    out = image_metrics(attn, T, w, lv, 3, grid_pos(*grid), has_cls=T > 0)
    present = torch.nn.functional.one_hot(lv, 3).sum(-2)[:, None].expand_as(out["dist_rel"]) > 0
    torch.testing.assert_close(out["dist_rel"][present], torch.ones(int(present.sum())), atol=1e-6, rtol=0)
    assert out["dist_rel"][~present].isnan().all()


def test_relative_distance_removes_the_centre_confound():
    # 3x3 grid: under uniform attention the centre query is nearer to everything than a corner query, so
    # raw distance separates the levels; relative distance does not
    pos = grid_pos(3, 3)
    lv = torch.zeros(1, 1, 9, dtype=torch.long)
    lv[0, 0, 4] = 1  # level 1: the centre patch; level 0: the 8 border patches
    w = lv.float()
    out = image_metrics(uniform_attn(1, 1, 9), 0, w, lv, 2, pos, has_cls=False)
    r2, r5 = math.sqrt(2), math.sqrt(5)
    # mean distance (in units of 16 px) from a patch to all 9: centre 4 + 4 sqrt2, corner 6 + 3 sqrt2 +
    # 2 sqrt5, edge 5 + 2 sqrt2 + 2 sqrt5
    centre, corner, edge = (16 * (4 + 4 * r2) / 9, 16 * (6 + 3 * r2 + 2 * r5) / 9, 16 * (5 + 2 * r2 + 2 * r5) / 9)
    torch.testing.assert_close(out["dist"][0, 0, 0, 1], torch.tensor(centre, dtype=torch.float32))
    torch.testing.assert_close(out["dist"][0, 0, 0, 0], torch.tensor((corner + edge) / 2, dtype=torch.float32))
    assert out["dist"][0, 0, 0, 1] < out["dist"][0, 0, 0, 0]  # the confound
    torch.testing.assert_close(out["dist_rel"], torch.ones(1, 1, 1, 2), atol=1e-6, rtol=0)  # gone


def test_self_attention_gives_relative_distance_zero():
    T, N = 1, 6
    attn = torch.zeros(2, 2, T + N, T + N)
    attn[..., 0, :] = 1.0 / (T + N)  # the CLS row may be anything
    attn[:, :, T:, T:] = torch.eye(N)  # every patch attends only to itself
    w = torch.tensor([[1.0, 0, 0, 2, 0, 3]]).expand(2, 3, N)
    lv = torch.tensor([[1, 0, 0, 2, 0, 2]]).expand(2, 3, N)
    out = image_metrics(attn, T, w, lv, 3, grid_pos(2, 3), has_cls=True)
    assert torch.equal(out["dist"], torch.zeros(2, 2, 3, 3))
    assert torch.equal(out["dist_rel"], torch.zeros(2, 2, 3, 3))


def test_relative_distance_by_hand_on_a_2x2_grid():
    # patches 0 1 / 2 3, 16 px apart; every query's uniform distance is u = (0 + 16 + 16 + 16*sqrt(2)) / 4
    pos = grid_pos(2, 2)
    attn = torch.zeros(1, 1, 4, 4)
    attn[0, 0, 0, 0] = 1.0  # query 0 attends to itself: distance 0
    attn[0, 0, 1, 2] = 1.0  # query 1 attends to the opposite corner: 16*sqrt(2)
    attn[0, 0, 2] = 0.25  # query 2 is uniform: u
    attn[0, 0, 3, 1] = attn[0, 0, 3, 2] = 0.5  # query 3 attends to both neighbours: 16
    lv = torch.tensor([[[1, 0, 0, 1]]])  # level 1 = {0, 3}, level 0 = {1, 2}
    out = image_metrics(attn, 0, lv.float(), lv, 2, pos, has_cls=False)
    u, r2 = 8 + 4 * math.sqrt(2), math.sqrt(2)
    want_dist = torch.tensor([(16 * r2 + u) / 2, (0 + 16) / 2])
    torch.testing.assert_close(out["dist"][0, 0, 0], want_dist, atol=1e-5, rtol=0)
    torch.testing.assert_close(out["dist_rel"][0, 0, 0], want_dist / u, atol=1e-6, rtol=0)
    assert out["dist_rel"][0, 0, 0, 1].item() == pytest.approx(2 - r2, abs=1e-6)  # 8 / (8 + 4 sqrt 2)


def test_coincident_positions_give_neutral_relative_distance():
    # one patch, or all centres at one point: no distance to compare against, so dist_rel is the neutral 1
    out = image_metrics(uniform_attn(1, 1, 2), 1, torch.ones(1, 1, 1), torch.zeros(1, 1, 1, dtype=torch.long),
                        2, grid_pos(1, 1), has_cls=True)
    assert out["dist_rel"][0, 0, 0, 0].item() == 1.0 and out["dist_rel"][0, 0, 0, 1].isnan()
    attn = torch.softmax(torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(0)), -1)
    lv = torch.tensor([[[0, 1, 1]]])
    out = image_metrics(attn, 0, lv.float(), lv, 2, torch.zeros(3, 2), has_cls=False)
    assert torch.equal(out["dist_rel"], torch.ones(1, 1, 1, 2))


def test_all_zero_weights_are_neutral_and_finite():
    T, N = 1, 6
    attn = torch.softmax(torch.randn(2, 2, T + N, T + N, generator=torch.Generator().manual_seed(1)), -1)
    w = torch.zeros(2, 3, N)
    w[1] = torch.tensor([1.0, 0, 0, 2, 0, 0])
    lv = (w > 0).long()
    out = image_metrics(attn, T, w, lv, 2, grid_pos(2, 3), has_cls=True)
    for key in WEIGHTED:
        assert torch.equal(out[key][0], torch.ones(2, 3))
        assert torch.isfinite(out[key]).all()
    assert torch.equal(out["cls_rho"][0], torch.zeros(2, 3))
    # image 0 has no keypoints: only level 0 exists, so R has only the (0, 0) entry
    assert not out["R"][0, ..., 0, 0].isnan().any()
    assert out["R"][0, ..., 1, :].isnan().all() and out["R"][0, ..., :, 1].isnan().all()
    assert out["dist"][0, ..., 1].isnan().all() and not out["dist"][0, ..., 0].isnan().any()


def test_zero_patch_rows_fall_back_to_uniform():
    # a query that attends only to the CLS token has an all-zero patch row: it counts as uniform
    T, N = 1, 4
    attn = torch.zeros(1, 1, T + N, T + N)
    attn[..., 0] = 1.0
    w = torch.tensor([[[2.0, 0.0, 1.0, 0.0]]])
    lv = torch.tensor([[[2, 0, 1, 0]]])
    out = image_metrics(attn, T, w, lv, 3, grid_pos(2, 2), has_cls=True)
    for key in WEIGHTED:
        assert out[key].item() == pytest.approx(1.0, abs=1e-6)
    assert out["cls_rho"].item() == 0.0
    torch.testing.assert_close(out["entropy"][0, 0, 0], torch.full((3,), math.log(4)), atol=1e-6, rtol=0)
    assert torch.equal(renormalise(torch.zeros(2, 5)), torch.full((2, 5), 0.2))


def test_matches_reference_fixed_cases():
    for seed, (B, H, T, N, K, L) in enumerate([(2, 3, 1, 9, 4, 3), (1, 2, 0, 7, 2, 2), (3, 1, 2, 16, 3, 4)]):
        case = random_case(seed, B, H, T, N, K, L)
        assert_metrics_close(image_metrics(*case), reference(*case))


def test_average_ranks_ties():
    x = torch.tensor([[3.0, 1.0, 3.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(average_ranks(x), torch.tensor([[5.5, 3.0, 5.5, 1.0, 3.0, 3.0]],
                                                              dtype=torch.float64))


def test_average_ranks_tolerance_separates_close_values():
    # an attention-like row of N = 10 values near 1/N: 0.1 and 0.1 + 1e-7 are different attention values
    # (1e-6 of each other, about 8 float32 epsilons), and so are 0.1 - 3e-7 and 0.1 + 5e-7
    x = torch.tensor([0.1, 0.1 + 1e-7, 0.12, 0.08, 0.1 - 3e-7, 0.11, 0.09, 0.1 + 5e-7, 0.095, 0.105],
                     dtype=torch.float64)
    want = torch.tensor([5, 6, 10, 1, 4, 9, 2, 7, 3, 8], dtype=torch.float64)  # all distinct
    got = average_ranks(x, tol=RANK_TOL)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got[1] - got[0] == 1.0  # 0.1 + 1e-7 ranks right above 0.1, not tied with it
    torch.testing.assert_close(got, torch.as_tensor(ref.average_ranks(x.numpy(), RANK_TOL)), rtol=0, atol=0)
    # batched rows are independent; tol = 0 is the exact-equality ranking
    xb = torch.stack([x, torch.full((10,), 0.1, dtype=torch.float64)])
    torch.testing.assert_close(average_ranks(xb, tol=RANK_TOL)[0], want)
    assert torch.equal(average_ranks(xb, tol=RANK_TOL)[1], torch.full((10,), 5.5, dtype=torch.float64))
    assert torch.equal(average_ranks(x, tol=0.0), average_ranks(x))


def test_average_ranks_tolerance_matches_a_loop_on_signed_rows_with_and_without_ties():
    # rows of both signs, some with float-noise ties (relative 1e-8) and some without: the rows without ties take
    # the sorted-position shortcut, the others the run search; both must agree with the loop
    g = np.random.default_rng(3)
    x = g.normal(size=(6, 40))
    x[1, 5:9] = x[1, 4] * (1 + 1e-8 * np.arange(1, 5))  # negative or positive run of five
    x[3, :3] = -x[3, 10] * (1 + 1e-8 * np.arange(3))
    got = average_ranks(torch.as_tensor(x), tol=RANK_TOL).numpy()
    for row, want in zip(got, (ref.average_ranks(r, RANK_TOL) for r in x), strict=True):
        np.testing.assert_array_equal(row, want)
    assert len(set(got[1])) == 36 and len(set(got[0])) == 40
    no_ties = average_ranks(torch.as_tensor(x[[0, 2]]), tol=RANK_TOL).numpy()  # the shortcut alone
    np.testing.assert_array_equal(no_ties, np.argsort(np.argsort(x[[0, 2]], -1), -1) + 1.0)


def test_average_ranks_tolerance_ties_float32_noise():
    f = np.float32(0.1)
    up, down = np.nextafter(f, np.float32(1)), np.nextafter(f, np.float32(0))
    # a uniform row computed in float32 with one-ulp noise: all ten values are one run of ties
    x = torch.tensor(np.array([f, up, f, down, f, f, up, f, down, f], np.float32)).double()
    assert len(torch.unique(x)) == 3
    assert torch.equal(average_ranks(x, tol=RANK_TOL), torch.full((10,), 5.5, dtype=torch.float64))
    assert not torch.equal(average_ranks(x), torch.full((10,), 5.5, dtype=torch.float64))  # exact: 3 runs
    # noise ties inside a run, real differences separate runs: {0.1, up} < {0.3, nextafter(0.3)}
    g = np.float32(0.3)
    y = torch.tensor(np.array([g, f, np.nextafter(g, np.float32(1)), up], np.float32)).double()
    assert average_ranks(y, tol=RANK_TOL).tolist() == [3.5, 1.5, 3.5, 1.5]
    # integer input and NaN: NaNs sort last and tie among themselves
    assert average_ranks(torch.tensor([3, 1, 2]), tol=RANK_TOL).tolist() == [3.0, 1.0, 2.0]
    z = torch.tensor([0.2, float("nan"), 0.1, float("nan")], dtype=torch.float64)
    assert average_ranks(z, tol=RANK_TOL).tolist() == [2.0, 3.5, 1.0, 3.5]
    with pytest.raises(ConfigError):
        average_ranks(x, tol=-1.0)


def test_uniform_attention_with_float32_noise_gives_rho_zero():
    N, T = 10, 1
    attn = uniform_attn(1, 2, T + N)
    noisy = attn[0, 0, 0].numpy().copy()  # 1/11 in float32
    noisy[[2, 5]] = np.nextafter(noisy[[2, 5]], np.float32(1))
    noisy[7] = np.nextafter(noisy[7], np.float32(0))
    attn[0, 0, 0] = torch.from_numpy(noisy)
    w = torch.arange(N, dtype=torch.float32).view(1, 1, N)
    out = image_metrics(attn, T, w, (w > 4).long().view(1, 1, N), 2, grid_pos(2, 5), has_cls=True)
    assert torch.equal(out["cls_rho"], torch.zeros(1, 2, 1))


def test_cls_rho_keeps_distinct_close_attention_values_apart():
    """Five pairs of CLS attention values 3e-7 apart (about 2e-5 of 1/N): real, distinct values, which
    rounding to 1e-5 of 1/N merged. Weights order each pair the other way round."""
    N, T = 10, 1
    base = [0.06, 0.07, 0.09, 0.11, 0.17]  # sum 0.5: the pairs sum to 1 - 5 * 3e-7
    a = [v + d for v in base for d in (0.0, 3e-7)]
    attn = torch.zeros(1, 1, T + N, T + N, dtype=torch.float64)
    attn[0, 0, :, T:] = 1.0 / N
    attn[0, 0, 0, T:] = torch.tensor(a, dtype=torch.float64)
    w = torch.tensor([2.0, 1.0, 4.0, 3.0, 6.0, 5.0, 8.0, 7.0, 10.0, 9.0]).view(1, 1, N)
    lv = torch.ones(1, 1, N, dtype=torch.long)
    got = image_metrics(attn, T, w, lv, 2, grid_pos(2, 5), has_cls=True)["cls_rho"].item()

    # exact Spearman by hand: a is strictly increasing (ranks 1..10), w has no ties
    ra = list(range(1, N + 1))
    rw = [sorted(w.flatten().tolist()).index(v) + 1 for v in w.flatten().tolist()]
    exact = 1 - 6 * sum((p - q) ** 2 for p, q in zip(ra, rw, strict=True)) / (N * (N * N - 1))
    assert exact == pytest.approx(1 - 60 / 990)
    assert got == pytest.approx(exact, abs=1e-6)
    # what merging each pair into a tie gives: a different number
    merged = _spearman(np.round(np.array(a) / sum(a) * (N * 1e5)), w.flatten().double().numpy())
    assert abs(merged - exact) > 0.03


# ----------------------------------------------------------------------------------------------------
# invariances


def test_relabelling_patches_changes_nothing():
    B, H, T, N, K, L = 2, 3, 2, 12, 4, 3
    attn, _, w, lv, _, pos, _ = random_case(7, B, H, T, N, K, L)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(3))
    full = torch.cat([torch.arange(T), T + perm])
    attn_p = attn[:, :, full][:, :, :, full]
    a = image_metrics(attn, T, w, lv, L, pos, has_cls=True)
    b = image_metrics(attn_p, T, w[..., perm], lv[..., perm], L, pos[perm], has_cls=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, equal_nan=True, msg=key)


def test_batch_independence():
    B, H, T, N, K, L = 3, 2, 1, 10, 5, 3
    case = list(random_case(11, B, H, T, N, K, L, zero_img=True))
    attn, _, w, lv, _, pos, _ = case
    full = image_metrics(attn, T, w, lv, L, pos, has_cls=True)
    for b in range(B):
        one = image_metrics(attn[b:b + 1], T, w[b:b + 1], lv[b:b + 1], L, pos, has_cls=True)
        for key in full:
            torch.testing.assert_close(full[key][b:b + 1], one[key], atol=1e-6, rtol=1e-6, equal_nan=True,
                                       msg=key)


def test_input_dtypes_agree():
    case = list(random_case(5, 2, 2, 1, 8, 3, 3))
    base = image_metrics(*case)
    case[0] = case[0].double()
    case[2] = case[2].double()
    again = image_metrics(*case)
    for key in base:
        assert again[key].dtype == torch.float32
        torch.testing.assert_close(base[key], again[key], atol=1e-5, rtol=1e-5, equal_nan=True)


def test_bad_inputs_raise():
    attn = uniform_attn(1, 1, 5)
    w = torch.ones(1, 1, 4)
    lv = torch.zeros(1, 1, 4, dtype=torch.long)
    pos = grid_pos(2, 2)
    with pytest.raises(GeometryError):
        image_metrics(attn, 2, w, lv, 2, pos)  # 2 + 4 != 5 tokens
    with pytest.raises(ConfigError):
        image_metrics(uniform_attn(1, 1, 4), 0, w, lv, 2, pos, has_cls=True)  # no CLS token to read
    with pytest.raises(ConfigError):
        image_metrics(attn, 1, w, lv + 2, 2, pos)  # level out of range
    with pytest.raises(GeometryError):
        image_metrics(attn, 1, w, lv, 2, pos[:3])


# ----------------------------------------------------------------------------------------------------
# property tests on random shapes


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(0, 2), N=st.integers(1, 20),
    K=st.integers(1, 5), L=st.integers(2, 4), cls_flag=st.booleans(),
)
def test_property_random_shapes(seed, B, H, T, N, K, L, cls_flag):
    case = random_case(seed, B, H, T, N, K, L, has_cls=cls_flag and T > 0)
    attn, T, w, lv, L, pos, has_cls = case
    out = image_metrics(*case)
    for key in (*WEIGHTED, "cls_rho"):
        assert out[key].shape == (B, H, K)
        assert torch.isfinite(out[key]).all(), key
    assert (out["cls_rho"].abs() <= 1).all()
    assert "sal_w" not in out  # reported once, as WI
    present = torch.nn.functional.one_hot(lv, L).sum(-2) > 0  # (B, K, L)
    both = present[:, None, :, :, None] & present[:, None, :, None, :]
    assert out["R"].shape == (B, H, K, L, L)
    assert torch.equal(out["R"].isnan(), ~both.expand_as(out["R"]))
    assert torch.isfinite(out["R"][both.expand_as(out["R"])]).all()
    for key in PER_LEVEL:
        assert out[key].shape == (B, H, K, L)
        mask = present[:, None].expand_as(out[key])
        assert torch.equal(out[key].isnan(), ~mask)
        assert torch.isfinite(out[key][mask]).all()
    assert (out["entropy"][present[:, None].expand_as(out["entropy"])] <= math.log(N) + 1e-5).all()
    # each query level's row of R, weighted by n_b / N, sums to 1 (rows of Bt sum to 1)
    frac = present.double() * torch.nn.functional.one_hot(lv, L).sum(-2) / N  # (B, K, L)
    rowsum = (out["R"].double().nan_to_num(0.0) * frac[:, None, :, None, :]).sum(-1)
    ok = present[:, None].expand_as(rowsum)
    torch.testing.assert_close(rowsum[ok], torch.ones_like(rowsum[ok]), atol=1e-5, rtol=0)
    assert_metrics_close(out, reference(*case))


# ----------------------------------------------------------------------------------------------------
# null models


def test_with_null_permutations_keep_the_observed_map_and_multiset():
    g = torch.Generator().manual_seed(0)
    B, N, M = 3, 10, 7
    w = torch.randint(0, 4, (B, N), generator=g).float()
    lv = torch.randint(0, 3, (B, N), generator=g)
    idx = null_indices(B, N, M, kind="permute", generator=g)
    assert idx.shape == (B, M, N) and idx.dtype == torch.int64
    assert torch.equal(idx.sort(-1).values, torch.arange(N).expand(B, M, N))
    wk, lk = with_null(w, lv, idx)
    assert wk.shape == (B, M + 1, N) and lk.shape == (B, M + 1, N)
    assert torch.equal(wk[:, 0], w) and torch.equal(lk[:, 0], lv)
    assert torch.equal(wk.sort(-1).values, w.sort(-1).values[:, None].expand(B, M + 1, N))
    # weights and levels travel together: the null map m is w[idx[m]], l[idx[m]]
    for m in range(M):
        assert torch.equal(wk[:, m + 1], w.gather(1, idx[:, m]))
        assert torch.equal(lk[:, m + 1], lv.gather(1, idx[:, m]))
    # reproducible from the generator
    a = null_indices(B, N, M, generator=torch.Generator().manual_seed(5))
    b = null_indices(B, N, M, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_shift_null_is_a_cyclic_2d_shift():
    # grid 2 x 3, cells [[0, 1, 2], [3, 4, 5]]; shifted map w'[r, c] = w[(r - dy) % 2, (c - dx) % 3]
    by_hand = {
        (0, 1): [2, 0, 1, 5, 3, 4],
        (0, 2): [1, 2, 0, 4, 5, 3],
        (1, 0): [3, 4, 5, 0, 1, 2],
        (1, 1): [5, 3, 4, 2, 0, 1],
        (1, 2): [4, 5, 3, 1, 2, 0],
    }
    for (dy, dx), m in by_hand.items():
        rolled = torch.roll(torch.arange(6).view(2, 3), (dy, dx), (0, 1)).flatten().tolist()
        assert rolled == m
    idx = null_indices(2, 6, 300, grid=(2, 3), kind="shift", generator=torch.Generator().manual_seed(0))
    seen = {tuple(r) for r in idx.reshape(-1, 6).tolist()}
    assert seen == {tuple(m) for m in by_hand.values()} | {tuple(range(6))}  # the whole group, identity too
    w = torch.tensor([[5.0, 0.0, 1.0, 0.0, 2.0, 0.0]])
    wk, _ = with_null(w, (w > 0).long(), idx[:1, :4])
    for m in range(4):
        assert any(torch.equal(wk[0, m + 1], torch.roll(w.view(2, 3), s, (0, 1)).flatten())
                   for s in [*by_hand, (0, 0)])
    with pytest.raises(GeometryError):
        null_indices(1, 6, 2, grid=(2, 2), kind="shift")
    with pytest.raises(ConfigError):
        null_indices(1, 6, 2, kind="rotate")


@pytest.mark.parametrize("kind", ["permute", "shift"])
def test_null_distribution_of_uniform_attention_is_exactly_one(kind):
    B, H, T, N, M, L = 2, 2, 1, 12, 20, 3
    g = torch.Generator().manual_seed(1)
    w = torch.randint(0, 5, (B, N), generator=g).float()
    lv = torch.randint(0, L, (B, N), generator=g)
    idx = null_indices(B, N, M, grid=(3, 4), kind=kind, generator=g)
    wk, lk = with_null(w, lv, idx)
    out = image_metrics(uniform_attn(B, H, T + N), T, wk, lk, L, grid_pos(3, 4), has_cls=True)
    sal = out["sal"]
    assert torch.equal(sal, sal[..., :1].expand_as(sal))  # the null value is identical to the observed one
    torch.testing.assert_close(sal, torch.ones_like(sal), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["wi"], torch.ones_like(sal), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# dataset-level statistics


def test_bootstrap_ci_contains_mean_and_shrinks():
    g = np.random.default_rng(0)
    small, large = g.normal(1.0, 0.5, 40), g.normal(1.0, 0.5, 2000)
    lo_s, hi_s = bootstrap_ci(small, n_boot=500)
    lo_l, hi_l = bootstrap_ci(large, n_boot=500)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < 0.5 * (hi_s - lo_s)
    # the standard error is 0.5 / sqrt(2000); the 95% interval is about 2 * 1.96 of it wide
    assert (hi_l - lo_l) == pytest.approx(2 * 1.96 * 0.5 / math.sqrt(2000), rel=0.2)


def test_bootstrap_ci_matches_loop_definition_and_handles_nan():
    g = np.random.default_rng(1)
    v = g.normal(size=(30, 2, 3))
    v[g.random(v.shape) < 0.2] = np.nan
    v[:, 1, 2] = np.nan  # an all-NaN column
    lo, hi = bootstrap_ci(v, n_boot=200, alpha=0.1, seed=4)
    assert lo.shape == hi.shape == (2, 3)
    assert np.isnan(lo[1, 2]) and np.isnan(hi[1, 2])
    idx = np.random.default_rng(4).integers(0, 30, (200, 30))
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        means = np.nanmean(v[idx], axis=1)  # (200, 2, 3)
    ok = np.ones((2, 3), bool)
    ok[1, 2] = False
    np.testing.assert_allclose(lo[ok], np.percentile(means, 5, axis=0)[ok], rtol=1e-12)
    np.testing.assert_allclose(hi[ok], np.percentile(means, 95, axis=0)[ok], rtol=1e-12)
    mean = np.nanmean(v[:, ok], 0)
    assert np.all(lo[ok] <= mean) and np.all(mean <= hi[ok])
    one_lo, one_hi = bootstrap_ci(np.array([[0.7, np.nan]]))
    assert one_lo[0] == one_hi[0] == 0.7 and np.isnan(one_lo[1]) and np.isnan(one_hi[1])
    t_lo, t_hi = bootstrap_ci(torch.tensor([1.0, 2.0, 3.0]), n_boot=100)
    assert t_lo.shape == () and 1.0 <= t_lo <= 2.0 <= t_hi <= 3.0


def test_bh_qvalues_by_hand():
    # sorted p: 0.01, 0.03, 0.04, 0.5 -> p * n / rank = 0.04, 0.06, 0.0533, 0.5 -> running min from the top
    q = bh_qvalues(np.array([0.01, 0.04, 0.03, 0.5]))
    np.testing.assert_allclose(q, [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    np.testing.assert_allclose(bh_qvalues([0.01, 0.02, 0.03, 0.04, 0.05]), [0.05] * 5)
    np.testing.assert_allclose(bh_qvalues([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])  # n = 2
    np.testing.assert_allclose(bh_qvalues([0.9, 0.8]), [0.9, 0.9])
    assert bh_qvalues(np.array([])).shape == (0,)
    p = np.random.default_rng(0).random(50)
    q = bh_qvalues(p)
    assert np.all(q >= p - 1e-12) and np.all(q <= 1)  # p * n / n may round down
    order = np.argsort(p)
    assert np.all(np.diff(q[order]) >= 0)
    with pytest.raises(ConfigError):
        bh_qvalues([0.5, 1.5])


@pytest.mark.parametrize("chunk_elems", [1, 10_000])
def test_fast_path_with_prepared_null_maps_and_small_chunks_matches_reference(monkeypatch, chunk_elems):
    # the analysis' path: null maps made by with_null, prepared once with null_index (ranks gathered, not
    # sorted again), then image_metrics(maps=...) layer after layer, in chunks of images. Forcing tiny
    # chunks (one image each) must not change a single value against the loop-by-loop reference.
    import siftlens.core.metrics as M
    import siftlens.core.reductions as reductions

    monkeypatch.setattr(reductions, "_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(11)
    B, H, T, N, L, K1 = 3, 2, 1, 12, 3, 5
    attn = torch.softmax(torch.randn(B, H, T + N, T + N, generator=g) * 2, -1)
    w = (torch.randint(0, 4, (B, N), generator=g) * (torch.rand(B, N, generator=g) < 0.6)).float()
    lv = torch.where(w > 0, 1 + (w > 1).long(), torch.zeros_like(w, dtype=torch.long))
    idx = null_indices(B, N, K1 - 1, generator=g)
    wk, lk = with_null(w, lv, idx)
    pos = grid_pos(3, 4)
    maps = M.prepare_maps(wk, lk, L, pos, null_index=idx)
    for layer_attn in (attn, attn.flip(-1).softmax(-1)):  # the same maps serve every layer
        fast = image_metrics(layer_attn, T, wk, lk, L, pos, has_cls=True, maps=maps)
        assert_metrics_close(fast, reference(layer_attn, T, wk, lk, L, pos, True))


@pytest.mark.parametrize("chunk_elems", [100, 1 << 18])
@pytest.mark.parametrize("k_maps", [1, 3])
def test_layer_sums_equal_direct_sums_however_the_layer_is_chunked(monkeypatch, eager_reductions, chunk_elems,
                                                                  k_maps):
    # the eager path (the fused CPU kernel has its own tests in test_fused.py). 100 elements per chunk puts each
    # head of a 9-patch image in its own chunk: the head mean's sums of squares then come from the sum over
    # heads, else from the Gram totals; k_maps > 1 takes the Monte Carlo layout.
    import siftlens.core.reductions as reductions

    monkeypatch.setattr(reductions, "_CHUNK_ELEMS", chunk_elems)
    g = torch.Generator().manual_seed(5)
    B, H, T, N, L = 3, 4, 1, 9, 2
    attn = torch.softmax(torch.randn(B, H, T + N, T + N, generator=g) * 2, -1)
    w = torch.rand(B, k_maps, 1, N, generator=g)
    onehot = torch.nn.functional.one_hot(torch.randint(0, L, (B, k_maps, N), generator=g), L).float().transpose(2, 3)
    lhs = torch.cat([w, onehot], 2).reshape(B, k_maps * (L + 1), N)  # per map the rows [w, one-hot(levels)]
    dmat = torch.cdist(grid_pos(3, 3), grid_pos(3, 3))
    r = reductions.layer_sums(attn[:, :, T:, T:], lhs, dmat, L, pattern=True)
    want = direct_layer_sums(attn[:, :, T:, T:], lhs, dmat, L)
    for name, value in want.items():
        torch.testing.assert_close(getattr(r, name).double(), value, rtol=1e-5, atol=1e-6, msg=name)
