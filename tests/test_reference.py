"""The fast path against siftlens.reference (the method in plain float64), and the reference against brute force.

Tolerances. The reference computes in float64 from the very float32 attention the engine receives, so every
difference is the fast path's own rounding. Its O(h N^2) reductions (row and column sums, the contractions with
``w`` and the level indicators, distances, entropies, the sums of squares of the exact null) accumulate N
float32 products, each rounded to eps32 = 1.2e-7 relative: at most about N eps32 (2.3e-5 at N = 196), typically
sqrt(N) eps32; everything after them runs in float64. The quadratic-form variances can amplify that (they
subtract terms of size ``E[Q]^2``), but not for attention as far from uniform as here (softmax of N(0, 2^2)
logits; the built-in model with sharpened queries and keys), where the largest relative difference measured
over all cells is 1.2e-6. RTOL = 1e-4 is 4x above the worst-case reduction bound and about 100x above what is
measured, while a wrong term is far outside it: changing one attention entry by 1e-3 moves some cell by more
than 1e-4 relative. ATOL = 1e-6 only serves values that are 0 up to rounding (the null mean of ``cls_rho``,
whose rank vectors are centred). Where float32 sums cannot resolve a WI or R null variance, the fast path
reports 0 (near-uniform attention); these variances exceed that rounding bound thousands of times.
"""

from __future__ import annotations

import functools
from itertools import permutations

import numpy as np
import pytest
import torch

from siftlens import reference
from siftlens.analysis.config import AnalysisConfig, cells
from siftlens.analysis.engine import RunPlan, _exact_values, analyse_batch
from siftlens.attention import Rollout, capture
from siftlens.core import fused
from siftlens.core.metrics import layer_raw, prepare_maps
from siftlens.core.nullmodel import map_sums
from siftlens.keypoints import levels_of
from siftlens.models.native import NativeBackend

RTOL, ATOL = 1e-4, 1e-6


def grid_pos(gh: int, gw: int, patch: int = 16) -> torch.Tensor:
    """(N, 2) (x, y) centres of a row-major grid of patches, in pixels."""
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1).float() * patch + (patch - 1) / 2.0


def assert_cells_close(got: np.ndarray, want: np.ndarray, what: str, n_levels: int) -> None:
    """(H + 1, C) values of one image against the reference: the same missing cells, the rest within tolerance;
    the message names the head and cell of every miss."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: missing cells differ"
    bad = np.argwhere(~(np.abs(got - want) <= ATOL + RTOL * np.abs(want)) & ~np.isnan(want))
    cl = cells(n_levels)
    assert not len(bad), f"{what}: " + "; ".join(f"head {h} {cl[c]}: {got[h, c]!r} != {want[h, c]!r}"
                                                 for h, c in bad[:8])


# (grid, prefix tokens, CLS, heads, levels, images, layers): a non-square grid with CLS and a register, the
# same with a register but no CLS (the CLS row is then the column mean of Bt), and ViT-S/16 at 224
CASES = {
    "2x8-cls-register": ((2, 8), 2, True, 3, 3, 2, 2),
    "2x8-register-only": ((2, 8), 1, False, 2, 4, 2, 2),
    "14x14-cls-vit-s": ((14, 14), 1, True, 6, 3, 1, 1),
}


@functools.cache
def random_case(name: str):
    """Float32 attention of a few layers (one query of one head attends only to prefix tokens: its patch row
    is uniform), count weights with zeros and the levels of docs/method.md; and the reference's values."""
    (gh, gw), t, has_cls, h, n_levels, b, n_layers = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    n = gh * gw
    layers = [torch.softmax(torch.randn(b, h, t + n, t + n, generator=g) * 2.0, -1) for _ in range(n_layers)]
    layers[0][0, 1, t + 3] = 0.0
    layers[0][0, 1, t + 3, 0] = 1.0
    w = (torch.randint(0, 5, (b, n), generator=g) * (torch.rand(b, n, generator=g) < 0.6)).float()
    lv = torch.from_numpy(np.stack([levels_of(x, n_levels) for x in w.numpy()]))
    pos = grid_pos(gh, gw)
    ref = [[reference.image_metrics(a[i].numpy(), w[i].numpy(), lv[i].numpy(), n_levels, pos.numpy(), t, has_cls)
            for i in range(b)] for a in layers]
    return layers, w, lv, pos, ref


@pytest.mark.parametrize("path", ["fused", "eager"])
@pytest.mark.parametrize("name", CASES)
def test_engine_exact_path_equals_reference(request, name, path):
    # the engine's exact path: each layer's O(h N^2) sums (the fused kernel or the eager reductions), all layers
    # finished together into every cell's value and exact null mean and variance (metrics.py, nullmodel.py)
    if path == "eager":
        request.getfixturevalue("eager_reductions")
    elif not fused.available(torch.device("cpu")):
        pytest.skip(fused.unavailable_reason(torch.device("cpu")))
    layers, w, lv, pos, ref = random_case(name)
    _, t, has_cls, _, n_levels, _, _ = CASES[name]
    maps = prepare_maps(w[:, None], lv[:, None], n_levels, pos)
    raws = [layer_raw(a, t, maps, has_cls=has_cls, pattern=True) for a in layers]
    obs, mean, var = (v.numpy() for v in _exact_values(raws, maps, map_sums(maps)))  # (layers, B, h + 1, C)
    for k, per_image in enumerate(ref):
        for i, r in enumerate(per_image):
            for key, got in (("obs", obs), ("null_mean", mean), ("null_var", var)):
                assert_cells_close(got[k, i], r[key], f"layer {k} image {i} {key}", n_levels)


@pytest.mark.parametrize("kind", ["permute", "shift"])
def test_analyse_batch_equals_reference(tiny_vit, kind):
    # the whole engine on the built-in ViT (3 x 4 grid, CLS + 1 register): capture, both layers, the head-mean
    # slot and rollout. Its random initialisation attends almost uniformly, so queries and keys are sharpened.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for blk in tiny_vit.blocks:
            dim = blk.attn.qkv.in_features
            blk.attn.qkv.weight[:2 * dim] = torch.randn(2 * dim, dim, generator=g) * 0.3
    backend = NativeBackend(tiny_vit)
    plan = RunPlan.build(backend, AnalysisConfig(null_kind=kind, rollout=True))
    n, t = backend.grid_size[0] * backend.grid_size[1], backend.num_prefix_tokens
    rng = np.random.default_rng(1)
    items = []
    for i in range(2):
        w = (rng.integers(0, 5, n) * (rng.random(n) < 0.6)).astype(np.float32)
        items.append({"index": i, "pixels": rng.integers(0, 256, (*backend.input_size, 3), dtype=np.uint8),
                      "weights": w, "levels": levels_of(w, 3)})
    got = analyse_batch(plan, items, ["a", "b"])
    attn, rollout = [], Rollout()
    with torch.no_grad(), capture(backend, lambda layer, a: (attn.append(a.double()), rollout.update(a))):
        backend.forward(backend.normalize(torch.from_numpy(np.stack([it["pixels"] for it in items]))))
    layers = [*attn, rollout.result[:, None].double()]  # rollout: one "head", the head-mean slot only
    for row, a in enumerate(layers):
        for i, it in enumerate(items):
            r = reference.image_metrics(a[i].numpy(), it["weights"], it["levels"], 3, plan.pos.numpy(), t,
                                        backend.has_cls, null=kind, grid=backend.grid_size)
            slots = slice(None) if row < len(attn) else slice(-1, None)  # rollout: the head-mean slot only
            for key in ("obs", "null_mean", "null_var"):
                assert_cells_close(getattr(got, key)[i, row, slots], r[key][slots], f"{kind} row {row} image {i} {key}",
                                   3)


# (grid, prefix tokens, CLS, heads, levels): every N! permutation of a tiny image
TINY = [((2, 2), 0, False, 2, 2), ((1, 5), 2, True, 2, 3), ((2, 3), 1, True, 2, 3), ((1, 6), 1, True, 1, 4)]


@pytest.mark.parametrize("grid, t, has_cls, h, n_levels", TINY)
def test_reference_null_moments_equal_all_permutations(grid, t, has_cls, h, n_levels):
    # the closed forms of the reference against the null's definition: the observed values of the map and its
    # levels moved by each of the N! permutations, with equal weight. Exact for every cell but dist_rel.
    n = grid[0] * grid[1]
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 2.0, (h, t + n, t + n))
    attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    w = rng.integers(0, 4, n).astype(np.float64)
    w[:2] = 0.0, 2.0  # a level 0 and a keypoint
    lv = levels_of(w, n_levels)
    pos = grid_pos(*grid).numpy()
    r = reference.image_metrics(attn, w, lv, n_levels, pos, t, has_cls)
    mean, var = reference.enumerated_null(attn, w, lv, n_levels, pos, [np.array(p) for p in permutations(range(n))],
                                          t, has_cls)
    assert np.array_equal(np.isnan(mean), np.isnan(r["null_mean"]))
    ratio = np.array([m == "dist_rel" for m, _, _ in r["cells"]])
    scale = 1e-10 * max(1.0, np.nanmax(np.abs(mean)) ** 2)
    np.testing.assert_allclose(r["null_mean"][:, ~ratio], mean[:, ~ratio], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(r["null_var"][:, ~ratio], var[:, ~ratio], rtol=1e-9, atol=scale)
    assert np.nanmax(var[:, ~ratio]) > 1e-3  # not trivially
    # dist_rel's delta method is an approximation: within 2% in the mean and 25% in the sd even at N <= 7
    have = ratio & ~np.isnan(mean).any(0)
    np.testing.assert_allclose(r["null_mean"][:, have], mean[:, have], rtol=0.02)
    np.testing.assert_allclose(np.sqrt(r["null_var"][:, have]), np.sqrt(var[:, have]), rtol=0.25, atol=1e-9)


def test_cells_are_in_the_analysis_order():
    for n_levels in (2, 3, 5):
        assert reference.cells(n_levels) == cells(n_levels)


def test_image_without_keypoints_is_excluded():
    attn = np.full((2, 5, 5), 0.2)
    r = reference.image_metrics(attn, np.zeros(4), np.zeros(4, int), 3, grid_pos(2, 2).numpy(), 1, True)
    assert all(np.isnan(r[k]).all() for k in ("obs", "null_mean", "null_var"))
