"""The exact null moments against Monte Carlo on real images and real attention (the built-in model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from siftlens.analysis import AnalysisConfig, configure
from siftlens.analysis.engine import RunPlan, analyse_batch
from siftlens.core.nullmodel import all_shifts, image_key, keyed_null_indices, null_indices
from siftlens.data import ImageSource
from siftlens.jobs import demo_images_dir
from siftlens.keypoints import sift_params
from siftlens.loading import KeypointDataset
from siftlens.models import load_backend


@pytest.fixture(scope="module")
def real_items():
    backend = load_backend("default")
    cfg = AnalysisConfig()
    ds = KeypointDataset(ImageSource(str(demo_images_dir())), backend, cfg, sift_params(backend.input_size, cfg.sift),
                         indices=[0, 57, 133])
    items = [ds[j] for j in range(len(ds))]
    return backend, items, [f"img{j}" for j in range(len(items))]


def _values(backend, items, names, **cfg):
    c = configure(None, rollout=True, **cfg)
    return analyse_batch(RunPlan.build(backend, c), items, names)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["permute", "shift"])
def test_exact_moments_agree_with_monte_carlo_at_20000(real_items, kind):
    backend, items, names = real_items
    ex = _values(backend, items, names, null="exact", null_kind=kind)
    mc = _values(backend, items, names, null=20000, null_kind=kind, seed=3)
    # the observed values do not depend on the null; the two paths contract the attention with the maps in a
    # different order (keys side first for one map, queries side first for many), so they agree to float32 rounding
    np.testing.assert_array_equal(np.isnan(ex.obs), np.isnan(mc.obs))
    np.testing.assert_allclose(ex.obs, mc.obs, rtol=1e-5, atol=1e-6)
    have = ~np.isnan(ex.obs)
    assert have.sum() > 1000
    np.testing.assert_array_equal(have, ~np.isnan(mc.null_mean))
    m_ex, m_mc = ex.null_mean[have], mc.null_mean[have]
    s_ex, s_mc = np.sqrt(ex.null_var[have]), np.sqrt(mc.null_var[have])
    # Monte Carlo's own error: the mean has standard error sd / sqrt(M) (about 0.7% of sd); the sd of a
    # heavy-tailed cell (CLS attention on one patch) has a standard error of a few percent even at M = 20,000
    mc_se = s_mc / np.sqrt(20000)
    assert np.all(np.abs(m_ex - m_mc) <= np.maximum.reduce([0.02 * np.abs(m_mc), np.full_like(m_mc, 0.01), 4 * mc_se]))
    close_sd = np.abs(s_ex - s_mc) <= np.maximum(0.02 * s_mc, 0.01)
    assert close_sd.mean() >= 0.995, f"{(~close_sd).sum()} of {close_sd.size} null sds differ by more than 2%"
    assert np.all(np.abs(s_ex - s_mc) <= 0.05 * s_mc + 0.01)
    # and not trivially: the null sd is far from zero in most cells
    assert np.median(s_ex) > 0.005


def test_monte_carlo_draws_are_keyed_by_image_not_by_batch():
    keys = [image_key(n) for n in ("a.png", "b.png", "c.png")]
    both = keyed_null_indices(keys, 16, 5, (4, 4), "permute", seed=1)
    alone = keyed_null_indices(keys[1:2], 16, 5, (4, 4), "permute", seed=1)
    assert torch.equal(both[1], alone[0])
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(keyed_null_indices(keys[:1], 16, 5, (4, 4), "permute", seed=2)[0], both[0])


def test_all_shifts_is_the_group_null_indices_samples():
    g = all_shifts((3, 4))
    assert g.shape == (12, 12) and torch.equal(g[0], torch.arange(12))
    assert {tuple(r) for r in g.tolist()} == {tuple(r) for r in
                                             null_indices(1, 12, 400, (3, 4), "shift",
                                                          torch.Generator().manual_seed(0))[0].tolist()}
    w = torch.arange(12.0).view(3, 4)
    assert torch.equal(w.flatten()[g[5]], torch.roll(w, (1, 1), (0, 1)).flatten())


def test_shift_null_is_sampled_where_the_group_is_too_large(real_items, monkeypatch):
    import siftlens.analysis.engine as E

    backend, items, names = real_items
    full = _values(backend, items, names, null="exact", null_kind="shift")
    monkeypatch.setattr(E, "SHIFT_ENUMERATE_MAX", 16)  # the built-in model's 64 patches now count as large
    monkeypatch.setattr(E, "SHIFT_SAMPLES", 4000)
    sampled = _values(backend, items, names, null="exact", null_kind="shift")
    again = _values(backend, items, names, null="exact", null_kind="shift")
    np.testing.assert_array_equal(sampled.null_mean, again.null_mean)  # keyed by image: reproducible
    have = ~np.isnan(full.obs)
    assert not np.array_equal(full.null_mean[have], sampled.null_mean[have])  # it did sample
    sd = np.sqrt(full.null_var[have])
    assert np.all(np.abs(full.null_mean[have] - sampled.null_mean[have]) <= 5 * sd / np.sqrt(4000) + 1e-6)


def test_layers_measured_together_equal_each_layer_alone():
    # the engine finishes every layer of a batch in one stacked call (terms of layer k at rows k * B + b,
    # maps and map sums tiled to match); a wrong tiling or stacking order would mix images or layers up.
    # One layer has a query whose attention all goes to CLS (an all-zero patch row: the uniform fallback).
    from siftlens.analysis.engine import _exact_values
    from siftlens.core.metrics import layer_raw, prepare_maps
    from siftlens.core.nullmodel import map_sums

    g = torch.Generator().manual_seed(3)
    B, H, T, N, L = 3, 2, 1, 16, 4
    w = torch.rand(B, N, generator=g) * (torch.rand(B, N, generator=g) < 0.6)
    lv = torch.bucketize(w, torch.tensor([1e-9, 0.4, 0.7]))
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], 1).float() * 8 + 3.5
    maps = prepare_maps(w[:, None], lv[:, None], L, pos)
    ms = map_sums(maps)
    layers = [torch.softmax(torch.randn(B, H, T + N, T + N, generator=g) * s, -1) for s in (1.0, 3.0, 0.5)]
    layers[1][1, 0, 5] = 0.0
    layers[1][1, 0, 5, 0] = 1.0  # image 1, head 0, query 5 attends only to CLS
    raws = [layer_raw(a, T, maps, pattern=True) for a in layers]
    together = _exact_values(raws, maps, ms)
    for k, raw in enumerate(raws):
        alone = _exact_values([raw], maps, ms)
        for t, a in zip(together, alone, strict=True):
            np.testing.assert_allclose(t[k].numpy(), a[0].numpy(), rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isfinite(together[0][1, 1, 0, :2].numpy()).all()  # the fallback row gives finite SAL and WI


def test_a_layers_raw_sums_keep_no_view_of_its_attention():
    # the engine holds every layer's raw sums until the batch ends; a view into the attention would keep
    # every layer's (B, h, S, S) attention alive at once (the memory benchmark measured 11 layers' worth)
    from siftlens.core.metrics import layer_raw, prepare_maps

    B, H, T, N = 2, 2, 1, 4
    attn = torch.softmax(torch.randn(B, H, T + N, T + N), -1)
    maps = prepare_maps(torch.rand(B, 1, N), torch.zeros(B, 1, N, dtype=torch.long), 1,
                        torch.rand(N, 2))
    raw = layer_raw(attn, T, maps, pattern=True)
    held = [raw.cls_row, *(v for v in vars(raw.sums).values() if isinstance(v, torch.Tensor))]
    assert all(t.untyped_storage().data_ptr() != attn.untyped_storage().data_ptr() for t in held)
