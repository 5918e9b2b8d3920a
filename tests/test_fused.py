"""The fused CPU kernel of the attention reductions (siftlens.fused, kernels/layer_sums.c) against a direct float64
reference, its fallbacks, its cache and its threads."""

from __future__ import annotations

import platform
import warnings

import pytest
import torch
from _sums import direct_layer_sums

from siftlens import fused, reductions

# where the kernel cannot exist here; a failed build is not among them, so a broken kernel fails these tests
ABSENT = ("SIFTLENS_FUSED=0", "not an x86-64 CPU", "no C compiler", "the CPU lacks AVX2 or FMA")


@pytest.fixture
def kernel():
    fused._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        why = fused.unavailable_reason(torch.device("cpu"))
    if why.startswith(ABSENT):
        pytest.skip(f"no fused kernel here: {why}")
    assert why == "", why
    yield
    fused._load.cache_clear()


def layer(bsz: int, nh: int, gh: int, gw: int, n_levels: int, seed: int = 0, prefix: int = 1):
    """Attention (B, h, S, S) with ``prefix`` leading tokens, maps' rows (B, L + 1, N) and distances (N, N)."""
    g = torch.Generator().manual_seed(seed)
    n = gh * gw
    attn = torch.softmax(torch.randn(bsz, nh, prefix + n, prefix + n, generator=g) * 3, -1)
    w = torch.rand(bsz, 1, n, generator=g) * (torch.rand(bsz, 1, n, generator=g) < 0.7)
    levels = torch.randint(0, n_levels, (bsz, n), generator=g)
    lhs = torch.cat([w, torch.nn.functional.one_hot(levels, n_levels).float().transpose(1, 2)], 1)
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    pos = torch.stack([xs.flatten(), ys.flatten()], 1).float() * 16 + 7.5
    return attn, lhs.contiguous(), torch.cdist(pos, pos)


# 9 and 35 patches need the padded row buffer, 16 does not (with 8 lanes); L = 7 is the kernel's most rows (8)
@pytest.mark.parametrize(("gh", "gw", "n_levels"), [(3, 3, 2), (4, 4, 3), (5, 7, 7)])
@pytest.mark.parametrize("pattern", [True, False])
@pytest.mark.parametrize("width", fused.WIDTHS)
def test_kernel_equals_direct_sums(kernel, monkeypatch, gh, gw, n_levels, pattern, width):
    if width not in fused._load()[0]:
        pytest.skip(f"no {width}-lane build on this CPU")
    monkeypatch.setattr(fused, "WIDE_FROM", 0 if width == fused.WIDTHS[1] else 10**9)
    attn, lhs, dmat = layer(3, 4, gh, gw, n_levels)
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, n_levels, pattern)  # a strided patch block
    want = direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, n_levels)
    for name, value in want.items():
        if name in ("xx", "xxt") and not pattern:
            assert getattr(got, name) is None
            continue
        torch.testing.assert_close(getattr(got, name).double(), value, rtol=2e-5, atol=1e-6, msg=name)


def test_kernel_equals_the_eager_path_on_a_vit_s_sized_layer(kernel, monkeypatch):
    attn, lhs, dmat = layer(2, 6, 14, 14, 3, seed=3)
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    want = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    for name in ("rowsum", "colsum", "diag", "dist", "ent", "pairs", "xx", "xxt"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6, msg=name)


def test_a_query_without_patch_attention_is_uniform_as_on_the_eager_path(kernel):
    attn, lhs, dmat = layer(2, 3, 3, 3, 2, seed=1)
    attn[1, 2, 4] = 0.0
    attn[1, 2, 4, 0] = 1.0  # patch 3 of image 1, head 2 attends only to the CLS token
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2, pattern=True)
    want = direct_layer_sums(reductions.renormalise(attn[:, :, 1:, 1:]), lhs, dmat, 2)
    assert got.ent[1, 2, 3].item() == pytest.approx(torch.log(torch.tensor(9.0)).item(), rel=1e-6)
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).double(), value, rtol=2e-5, atol=1e-6, msg=name)


def test_results_do_not_depend_on_the_number_of_threads(kernel):
    # 2 threads split the batch only above 2^21 attention elements per thread: 12 ViT-S-sized images
    attn, lhs, dmat = layer(12, 6, 14, 14, 3, seed=2)
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            outs.append(fused.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, pattern=True))
    finally:
        torch.set_num_threads(before)
    for name in outs[0]:
        assert torch.equal(outs[0][name], outs[1][name]), name


def test_kernel_is_compiled_once_into_the_cache(kernel, monkeypatch, tmp_path):
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path))
    fused._load.cache_clear()
    assert fused.available(torch.device("cpu"))
    libs = sorted((tmp_path / "kernels").glob("layer_sums*.so"))
    assert [p.name.split("-")[0] for p in libs] == ["layer_sums16", "layer_sums8"]  # both builds, whatever the CPU
    stamps = [p.stat().st_mtime_ns for p in libs]
    fused._load.cache_clear()
    assert fused.available(torch.device("cpu"))
    assert [p.stat().st_mtime_ns for p in libs] == stamps
    assert sorted((tmp_path / "kernels").iterdir()) == libs  # no temporary files left


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the kernel is x86-64 only")
def test_a_failed_build_warns_once_and_the_eager_path_serves(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path))
    fused._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="slower eager path"):
            assert not fused.available(torch.device("cpu"))
        attn, lhs, dmat = layer(2, 2, 3, 3, 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2, pattern=True)
        want = direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2)
        torch.testing.assert_close(got.ent.double(), want["ent"], rtol=1e-5, atol=1e-6)
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        fused._load.cache_clear()


def test_float64_attention_is_read_as_float32(kernel):
    attn, lhs, dmat = layer(2, 3, 4, 4, 3, seed=4)
    got = fused.layer_sums(attn[:, :, 1:, 1:].double(), lhs.double(), dmat.double(), pattern=True)
    want = fused.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, pattern=True)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_cache_folder_that_cannot_be_created_falls_back_to_the_temporary_directory(kernel, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(fused.tempfile, "tempdir", str(tmp_path / "tmp"))
    fused._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the kernel is built, only elsewhere
        assert fused.available(torch.device("cpu"))
    assert len(list((tmp_path / "tmp").glob("siftlens-*/kernels/layer_sums8-*.so"))) == 1
