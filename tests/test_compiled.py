"""The accelerators' reductions (siftlens.core.compiled, issue 26 item 3): under ``torch.compile`` on the CPU against
the float64 reference and the eager path, with float32-derived tolerances (:func:`test_fused.tolerances`); bf16
attention reduced in float32; the fallback when compiling fails; the engine through that path; and the ranks and
renormalisation that run without a host sync on an accelerator."""

from __future__ import annotations

import warnings

import pytest
import torch
from _sums import direct_layer_sums
from test_fused import assert_within, layer
from test_reference import test_analyse_batch_equals_reference

from siftlens.core import compiled, fused, reductions
from siftlens.core.metrics import _device_ranks, average_ranks


@pytest.fixture
def compile_on(monkeypatch):
    """SIFTLENS_COMPILE=1 (the compiled path on the CPU too), the eager path for comparisons (SIFTLENS_FUSED=0)."""
    monkeypatch.setenv(compiled.COMPILE_ENV, "1")
    compiled.reset()
    yield monkeypatch
    monkeypatch.undo()  # the real _compiled back before it is reset
    compiled.reset()


def _eager(monkeypatch, *args):
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    try:
        return reductions.layer_sums(*args)
    finally:
        monkeypatch.setenv(compiled.COMPILE_ENV, "1")
        monkeypatch.delenv("SIFTLENS_FUSED")
        fused._load.cache_clear()


def test_compiled_reductions_equal_the_reference_and_the_eager_path(compile_on):
    # one compile (about 30 s cold, a few seconds from inductor's cache): 2 images, 3 heads, 4 x 5 patches, 3 levels,
    # a strided patch block, and one query row without attention to patches (the eager path reruns the layer on
    # renormalise()'d attention; the compiled one makes that row uniform with a where)
    attn, lhs, dmat = layer(2, 3, 4, 5, 3, seed=7)
    attn[1, 2, 6] = 0.0
    attn[1, 2, 6, 0] = 1.0
    patch = attn[:, :, 1:, 1:]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile must fail this test, not fall back
        got = reductions.layer_sums(patch, lhs, dmat, 3, pattern=True)
    assert not compiled._failed
    want = direct_layer_sums(reductions.renormalise(patch), lhs, dmat, 3)
    assert_within(got, want, 20, 3, 3)
    assert got.xx.dtype == got.xxt.dtype == torch.float64
    eager = _eager(compile_on, patch, lhs, dmat, 3, True)
    assert_within(got, {k: getattr(eager, k) for k in want}, 20, 3, 3, factor=2.0)


def test_bf16_attention_is_reduced_in_float32(compile_on):
    # the attention of a bf16 forward enters as it is (no float32 copy of it beforehand); the sums are those of its
    # bf16 values, within the float32 tolerances (not bf16's)
    attn, lhs, dmat = layer(2, 2, 3, 4, 2, seed=3)
    patch = attn[:, :, 1:, 1:].bfloat16()
    got = reductions.layer_sums(patch, lhs, dmat, 2, pattern=True)
    assert got.ent.dtype == torch.float32 and got.xx.dtype == torch.float64
    assert_within(got, direct_layer_sums(patch.double(), lhs, dmat, 2), 12, 2, 2)


def test_a_failed_compile_warns_once_and_the_eager_path_serves(compile_on):
    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler\nmore lines")

    compile_on.setattr(compiled, "_compiled", lambda: broken)
    attn, lhs, dmat = layer(1, 2, 3, 3, 2, seed=2)
    with pytest.warns(RuntimeWarning, match="torch.compile of the attention reductions failed .*no C\\+\\+ compiler"):
        got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2, pattern=True)
    assert_within(got, direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2), 9, 2, 2)
    assert not compiled.wanted(torch.device("cuda"))  # once failed, not tried again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2, pattern=True)


def test_compile_is_automatic_on_cuda_only(monkeypatch):
    compiled.reset()
    monkeypatch.delenv(compiled.COMPILE_ENV, raising=False)
    assert compiled.wanted(torch.device("cuda")) and not compiled.wanted(torch.device("cpu"))
    monkeypatch.setenv(compiled.COMPILE_ENV, "0")
    assert not compiled.wanted(torch.device("cuda"))


@pytest.mark.parametrize("kind", ["permute", "shift"])
def test_the_engine_through_the_compiled_path_equals_the_reference(compile_on, tiny_vit, kind):
    # the whole engine with the compiled path's function (uncompiled here: the graph is the one tested above) in
    # place of the eager reductions: capture without the float32 copy, layer_raw, the null moments
    calls = []

    def traced(*args):
        calls.append(args[0].dtype)
        return compiled.dense_sums(*args)

    compile_on.setattr(compiled, "_compiled", lambda: traced)
    test_analyse_batch_equals_reference(tiny_vit, kind)
    # one map per image (the exact permutation null) is the compiled path's; the shift null's many maps stay on the
    # eager path, which then receives the attention in the model's dtype and upcasts it itself
    assert bool(calls) == (kind == "permute")


def test_device_ranks_equal_the_cpu_ranks():
    # the accelerators' average_ranks (no host sync) on ties, NaNs and near-ties, with and without a tolerance
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 5, (4, 3, 17), generator=g).double()
    x[0, 1, 3] = float("nan")
    x[2] += torch.rand(3, 17, generator=g) * 1e-9 * (x[2] + 1)  # ties within the tolerance only
    y = torch.rand(2, 9, generator=g)
    for v in (x, y, x[3]):
        for tol in (0.0, 4 * torch.finfo(torch.float32).eps, 1e-6):
            torch.testing.assert_close(_device_ranks(v.contiguous(), tol), average_ranks(v, tol), rtol=0, atol=0,
                                       equal_nan=True)


def test_renormalise_without_the_host_branch_gives_the_same_values():
    # on an accelerator renormalise() always takes the where (no sync on "is any row sum 0?"): the same values
    x = torch.rand(3, 4, 6)
    for t in (x, x[0]):
        s = t.sum(-1, keepdim=True)
        torch.testing.assert_close(reductions._renormalise_rows(t, s, s > 0, None), reductions.renormalise(t),
                                   rtol=0, atol=0)
    x[1, 2] = 0.0
    s = x.sum(-1, keepdim=True)
    torch.testing.assert_close(reductions._renormalise_rows(x, s, s > 0, None), reductions.renormalise(x), rtol=0,
                               atol=0)
