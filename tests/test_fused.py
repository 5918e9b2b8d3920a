"""The fused CPU kernel of the attention reductions (siftlens.core.fused, kernels/layer_sums.c) against a direct float64
reference, its fallbacks, its cache and its threads.

Every kernel test runs twice, with the 8-lane and with the 16-lane build forced by ``SIFTLENS_FUSED_WIDTH``
(the 16-lane run skips, saying so, on a CPU without AVX-512). Every tolerance is derived from the float32
computation (:func:`tolerances`), not measured on one machine.
"""

from __future__ import annotations

import platform
import warnings

import pytest
import torch
from _sums import direct_layer_sums

from siftlens.core import fused, reductions

# where the kernel cannot exist here; a failed build is not among them, so a broken kernel fails these tests
ABSENT = ("SIFTLENS_FUSED=0", "not an x86-64 CPU", "no C compiler", "the CPU lacks AVX2 or FMA")
WIDTH_ENV = "SIFTLENS_FUSED_WIDTH"
U = 2.0**-24  # the unit roundoff of float32
U64 = 2.0**-53


def gamma(k: int, u: float = U) -> float:
    """Higham's bound ``k u / (1 - k u)`` on the relative error of k roundings (and of a sum of k + 1 terms of one
    sign, in any order, with or without FMA)."""
    return k * u / (1 - k * u)


def tolerances(n: int, n_levels: int, nh: int) -> dict[str, tuple[float, float]]:
    """(rtol, atol) of each output of ``layer_sums`` against the float64 reference, from the float32 computation
    (kernel or eager; any summation order). An entry of Bt = P / rowsum carries the row sum of n terms and a
    division (the kernel: a reciprocal and a product): gamma(n + 1). A product of factors with gamma(j) and
    gamma(k) has gamma(j + k). A float32 sum of n terms is off by up to gamma(n - 1) times the sum of their
    absolute values.

    rowsum, colsum, xx, xxt are built from the centred Y = Bt - c (c = 1/n as a float32, n c = 1 to u): y = v - c
    is one more rounding of |v - c| <= v + c, so a row or column sum of Y is off by gamma(n) sum |y| <= gamma(n)
    (sum v + n c), an absolute part gamma(n) n c besides the relative gamma(b + n). The column sums are shifted
    by (sum of the row sums of Y - sum of their column sums) / n, each total off by gamma(n) sum |y| <= gamma(n)
    (n + n^2 c): 2 gamma(n) (1 + n c) more. xx = sum Y^2 + 2 c sum Y + n^2 c^2 (float32 row sums of Y^2,
    float64 across rows and for the rest): the error of the entries (gamma(b) v and u |v - c|) moves it by up to
    2 gamma(b + 2) xx (using n c <= xx, as xx = sum Bt^2 >= 1), the row sums of y^2 <= v^2 + c^2 by
    gamma(n) (xx + n^2 c^2) <= 2 gamma(n) xx, and 2 c sum Y by 2 c gamma(n) 2 n <= 4 gamma(n) xx: gamma(2 b + 6 n
    + 4) relative; xxt likewise (|y_ij y_ji| <= (y_ij^2 + y_ji^2) / 2). The head mean adds the h heads' Y first
    (gamma(h - 1) more on each entry). The entropy's terms p log p carry, besides, the error of log (taken as
    4 u (|log p| + 1), for the kernel's Cephes polynomial as for torch.log), and an absolute part (sum p = 1).
    The float64 reference adds gamma(n^2) in double; 1% covers the second-order terms."""
    b = n + 1  # roundings behind one entry of Bt
    ref = gamma(n * n, U64)
    nc = 1.0 + U  # n c, c = 1/n rounded to float32 (within u of 1/n)
    bounds = {
        "rowsum": (gamma(b + n), gamma(n) * nc),
        "colsum": (gamma(b + n), gamma(n) * nc + 2 * gamma(n) * (1 + nc)),
        "diag": (gamma(b), 0.0),
        "dist": (gamma(b + 1 + n - 1), 0.0),
        "ent": (gamma(b + 5 + n - 1), gamma(b + 4)),
        "pairs": (gamma(b + 1 + n - 1 + 1 + n - 1), 0.0),  # two contractions of n terms each
        "xx": (gamma(2 * b + 6 * n + 4), 0.0),  # from sum Y^2: see above
        "xxt": (gamma(2 * b + 6 * n + 4), 0.0),
    }
    # slot h of xx and xxt (the head mean): Y summed over h heads first
    bounds["xx_mean"] = bounds["xxt_mean"] = (gamma(2 * (b + nh - 1) + 6 * n + 4), 0.0)
    return {k: (1.01 * (r + ref), 1.01 * a) for k, (r, a) in bounds.items()}


def assert_within(got, want: dict, n: int, n_levels: int, nh: int, factor: float = 1.0, names=None) -> None:
    """Every output of ``got`` (a LayerSums or a dict) within ``factor`` times its :func:`tolerances` of ``want``
    (the float64 reference; factor 2: two computations, each within its bound of it)."""
    tol = tolerances(n, n_levels, nh)
    for name in names or ("rowsum", "colsum", "diag", "dist", "ent", "pairs", "xx", "xxt"):
        value = got[name] if isinstance(got, dict) else getattr(got, name)
        expect = want[name].double()
        parts = [(name, value, expect)]
        if name in ("xx", "xxt"):  # per head, and the head mean in slot h
            parts = [(name, value[:, :-1], expect[:, :-1]), (f"{name}_mean", value[:, -1:], expect[:, -1:])]
        for key, v, w in parts:
            rtol, atol = tol[key]
            torch.testing.assert_close(v.double(), w, rtol=factor * rtol, atol=factor * atol,
                                       msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory):
    """One kernel cache for the session's tests, never the user's."""
    return tmp_path_factory.mktemp("siftlens-cache")


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, kernel_cache):
    monkeypatch.setenv("SIFTLENS_CACHE", str(kernel_cache))
    monkeypatch.delenv(WIDTH_ENV, raising=False)
    monkeypatch.delenv("SIFTLENS_FUSED", raising=False)
    fused._load.cache_clear()
    yield
    fused._load.cache_clear()  # before monkeypatch restores the environment


def force_width(monkeypatch, width: int) -> int:
    """Force the ``width``-lane build (skip where this CPU has none) and check that it is the only one loaded."""
    monkeypatch.setenv(WIDTH_ENV, str(width))
    fused._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        why = fused.unavailable_reason(torch.device("cpu"))
    if why.startswith(ABSENT):
        pytest.skip(f"no fused kernel here: {why}")
    if "lacks AVX-512" in why:
        pytest.skip(f"no {width}-lane build on this CPU: {why}")
    assert why == "", why
    assert sorted(fused._load()[0]) == [width], f"{WIDTH_ENV}={width} loaded {sorted(fused._load()[0])}"
    return width


@pytest.fixture
def any_kernel():
    """The kernel with whatever builds this CPU has (skip where it has none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        why = fused.unavailable_reason(torch.device("cpu"))
    if why.startswith(ABSENT):
        pytest.skip(f"no fused kernel here: {why}")
    assert why == "", why


@pytest.fixture(params=[8, 16], ids=["8-lane", "16-lane"])
def kernel(request, monkeypatch):
    """The kernel with its 8-lane, then its 16-lane build forced; the width."""
    return force_width(monkeypatch, request.param)


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
def test_kernel_equals_direct_sums(kernel, gh, gw, n_levels, pattern):
    attn, lhs, dmat = layer(3, 4, gh, gw, n_levels)
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, n_levels, pattern)  # a strided patch block
    want = direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, n_levels)
    assert_within(got, want, gh * gw, n_levels, 4, names=None if pattern else
                  ("rowsum", "colsum", "diag", "dist", "ent", "pairs"))
    if not pattern:
        assert got.xx is None and got.xxt is None


def test_kernel_equals_the_eager_path_on_a_vit_s_sized_layer(kernel, monkeypatch):
    attn, lhs, dmat = layer(2, 6, 14, 14, 3, seed=3)
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    eager = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3, pattern=True)
    want = direct_layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 3)
    assert_within(got, want, 196, 3, 6)
    assert_within(eager, want, 196, 3, 6)
    assert_within(got, {k: getattr(eager, k) for k in want}, 196, 3, 6, factor=2.0)


# exactly uniform attention, where float32 sums of N^2 equal terms drift furthest (the regime of a randomly
# initialised model, item 2 of issue 22), and nearly uniform attention (logits with sd 1e-3); N = 196 and 1000
@pytest.mark.parametrize(("gh", "gw", "logit_sd"), [(14, 14, 0.0), (14, 14, 1e-3), (25, 40, 0.0)])
def test_the_null_variance_terms_are_float64_and_within_their_bound_near_uniform_attention(kernel, monkeypatch, gh,
                                                                                           gw, logit_sd):
    n, nh = gh * gw, 2
    g = torch.Generator().manual_seed(5)
    attn = torch.softmax(torch.randn(1, nh, n, n, generator=g) * logit_sd, -1)
    _, lhs, dmat = layer(1, 1, gh, gw, 3, seed=5)
    want = direct_layer_sums(attn, lhs, dmat, 3)
    got = reductions.layer_sums(attn, lhs, dmat, 3, pattern=True)
    monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    eager = reductions.layer_sums(attn, lhs, dmat, 3, pattern=True)
    for sums in (got, eager):
        assert sums.xx.dtype == sums.xxt.dtype == torch.float64
        assert_within(sums, want, n, 3, nh, names=("xx", "xxt"))


def test_a_query_without_patch_attention_is_uniform_as_on_the_eager_path(kernel):
    attn, lhs, dmat = layer(2, 3, 3, 3, 2, seed=1)
    attn[1, 2, 4] = 0.0
    attn[1, 2, 4, 0] = 1.0  # patch 3 of image 1, head 2 attends only to the CLS token
    got = reductions.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, 2, pattern=True)
    want = direct_layer_sums(reductions.renormalise(attn[:, :, 1:, 1:]), lhs, dmat, 2)
    rtol, atol = tolerances(9, 2, 3)["ent"]
    assert got.ent[1, 2, 3].item() == pytest.approx(torch.log(torch.tensor(9.0, dtype=torch.float64)).item(),
                                                    rel=rtol, abs=atol)
    assert_within(got, want, 9, 2, 3)


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


def test_kernel_is_compiled_once_into_the_cache(any_kernel, monkeypatch, tmp_path):
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
        assert_within(got, want, 9, 2, 2)
        assert not list((tmp_path / "kernels").glob("*.so"))
    finally:
        fused._load.cache_clear()


def test_float64_attention_is_read_as_float32(kernel):
    attn, lhs, dmat = layer(2, 3, 4, 4, 3, seed=4)
    got = fused.layer_sums(attn[:, :, 1:, 1:].double(), lhs.double(), dmat.double(), pattern=True)
    want = fused.layer_sums(attn[:, :, 1:, 1:], lhs, dmat, pattern=True)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_a_cache_folder_that_cannot_be_created_falls_back_to_the_temporary_directory(any_kernel, monkeypatch,
                                                                                    tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("SIFTLENS_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(fused.tempfile, "tempdir", str(tmp_path / "tmp"))
    fused._load.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the kernel is built, only elsewhere
        assert fused.available(torch.device("cpu"))
    assert len(list((tmp_path / "tmp").glob("siftlens-*/kernels/layer_sums8-*.so"))) == 1
