"""The exact null near uniform attention (issue 22, item 2): z agrees with a float64 reference, or the cell
reads "no variation"; never z = +-1e6 with q = 0."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from siftlens.analysis import analyze
from siftlens.analysis.engine import BatchValues, _exact_values
from siftlens.analysis.store import long_rows
from siftlens.core.metrics import layer_raw, prepare_maps
from siftlens.core.nullmodel import map_sums
from siftlens.core.reductions import renormalise
from siftlens.core.stats import PATTERN_SIZES, linear_moments, pair_sums, pattern_sums
from siftlens.keypoints import levels_of
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig

N, HEADS, GRID, PATCH, L = 196, 6, 14, 16, 3
CELLS = [("sal", -1, -1), ("wi", -1, -1)] + [("R", a, b) for a in range(L) for b in range(L)] + [
    ("entropy", a, -1) for a in range(L)]


def vit_s_layer(logit_sd: float, images: int = 2, seed: int = 0):
    """Attention of one ViT-S-sized layer (CLS + 14 x 14 patches, 6 heads) from random logits of sd
    ``logit_sd`` (0: exactly uniform), float32, with random keypoint counts and their levels."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(images, HEADS, N + 1, N + 1, generator=g, dtype=torch.float64) * logit_sd
    attn = logits.float().softmax(-1)
    w = np.random.default_rng(seed).poisson(1.0, (images, N)).astype(np.float32)
    lv = np.stack([levels_of(x, L) for x in w])
    ys, xs = np.divmod(np.arange(N), GRID)
    pos = torch.tensor(np.stack([xs * PATCH + 7.5, ys * PATCH + 7.5], 1), dtype=torch.float32)
    maps = prepare_maps(torch.from_numpy(w)[:, None], torch.from_numpy(lv)[:, None], L, pos)
    return attn, w, lv, maps


def _centred(x: torch.Tensor) -> torch.Tensor:
    """x (..., N, N) minus its mean off-diagonal entry off the diagonal and its mean diagonal entry on it."""
    n = x.shape[-1]
    eye = torch.eye(n, dtype=x.dtype)
    diag = x.diagonal(dim1=-2, dim2=-1)
    d = diag.mean(-1)[..., None, None]
    o = ((x.sum((-2, -1)) - diag.sum(-1)) / (n * (n - 1)))[..., None, None]
    return x - o * (1 - eye) - d * eye


def _qap_reference(bt: torch.Tensor, wmat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mantel null mean and variance in float64 from explicitly centred matrices (the variance of Q is
    E[Q'^2] of the centred ones): bt (B, h, N, N), wmat (B, ..., N, N) -> (B, h, ...)."""
    n = bt.shape[-1]
    extra = wmat.ndim - 3
    a = bt.reshape(*bt.shape[:2], *([1] * extra), n, n)
    wb = wmat[:, None]
    coef = torch.tensor([1.0 / np.prod(np.arange(n - m + 1, n + 1, dtype=np.float64)) for m in PATTERN_SIZES],
                        dtype=torch.float64)
    var = (pattern_sums(_centred(a)) * coef * pattern_sums(_centred(wb))).sum(-1)
    pa, pw = pair_sums(a), pair_sums(wb)
    mean = pa[..., 0] * pw[..., 0] / n + pa[..., 1] * pw[..., 1] / (n * (n - 1))
    return mean, var


def reference_null(attn: torch.Tensor, w: np.ndarray, lv: np.ndarray) -> dict:
    """Float64 null (mean, var) of sal, wi, R and entropy, per image and head (head mean last), from the
    same float32 attention."""
    bt = renormalise(attn[:, :, 1:, 1:].double())
    bt = torch.cat([bt, bt.mean(1, keepdim=True)], 1)  # (B, h + 1, N, N)
    w64 = torch.from_numpy(w).double()
    wsq = w64.sum(-1) ** 2 / N
    mean, var = _qap_reference(bt, w64[:, :, None] * w64[:, None, :])
    out = {("wi", -1, -1): (mean / wsq[:, None], var / wsq[:, None] ** 2)}
    onehot = torch.nn.functional.one_hot(torch.from_numpy(lv), L).double().transpose(1, 2)  # (B, L, N)
    cnt = onehot.sum(-1)
    mean, var = _qap_reference(bt, onehot[:, :, None, :, None] * onehot[:, None, :, None, :])  # (B, h1, L, L)
    scale = N / (cnt[:, :, None] * cnt[:, None, :])[:, None]
    for a in range(L):
        for b in range(L):
            out[("R", a, b)] = (mean[..., a, b] * scale[..., a, b], var[..., a, b] * scale[..., a, b] ** 2)
    heads = attn.shape[1]
    x = (w64 / w64.mean(-1, keepdim=True))[:, None]
    out[("sal", -1, -1)] = linear_moments(bt[:, :heads].sum(-2) / N, x)
    sal_mean = linear_moments(bt[:, :heads].sum(-2).mean(1, keepdim=True) / N, x)
    out[("sal", -1, -1)] = tuple(torch.cat([u, v], 1) for u, v in zip(out[("sal", -1, -1)], sal_mean, strict=True))
    ent = -(bt[:, :heads] * bt[:, :heads].log()).sum(-1)
    ent = torch.cat([ent, ent.mean(1, keepdim=True)], 1)
    for a in range(L):
        m, v = linear_moments(ent, onehot[:, a][:, None])
        out[("entropy", a, -1)] = (m / cnt[:, a][:, None], v / cnt[:, a][:, None] ** 2)
    return out


def library_rows(attn: torch.Tensor, maps) -> pd.DataFrame:
    """The per-image rows siftlens writes for one layer (metrics.parquet's columns), and ``value64``: the
    observed value in float64, from which z is computed (``value`` is stored as float32, whose rounding alone
    moves a z by about 1% where the null sd is 6e-6 of the mean, at logit sd 1e-3)."""
    from siftlens.analysis.config import cells

    raw = layer_raw(attn, 1, maps, has_cls=True, pattern=True)
    obs, mean, var = (v[0].cpu().numpy()[:, None] for v in _exact_values([raw], maps, map_sums(maps)))
    b = attn.shape[0]
    v = BatchValues(list(range(b)), np.ones(b, bool), obs, mean, var, [None] * b)
    rows = long_rows(v, [f"img{i}" for i in range(b)], [0], attn.shape[1], cells(L))
    rows["value64"] = obs[~np.isnan(obs)]  # long_rows keeps the cells that exist, in this order
    assert np.allclose(rows["value64"], rows["value"], rtol=1e-6)
    return rows


@pytest.fixture(params=["default", "eager"])
def reductions_path(request, monkeypatch):
    """The reductions as this machine runs them (the fused kernel where it can), then the eager path."""
    from siftlens.core import fused

    if request.param == "eager":
        monkeypatch.setenv("SIFTLENS_FUSED", "0")
    fused._load.cache_clear()
    yield request.param
    fused._load.cache_clear()


@pytest.mark.parametrize("logit_sd", [0.05, 0.005, 0.001, 0.0])
def test_z_agrees_with_a_float64_null_or_reads_no_variation(logit_sd, reductions_path):
    """Every cell's z is within 1% of z from the float64 null (of the same observed value), or the cell reads
    "no variation". Down to logit sd 1e-3 (a randomly initialised model) every WI and R cell is resolved: the
    attention's sums behind their null variance are sums of Bt - 1/N, precise relative to the deviations."""
    attn, w, lv, maps = vit_s_layer(logit_sd)
    rows = library_rows(attn, maps)
    notes = rows["note"] if "note" in rows else np.full(len(rows), "")
    ref = reference_null(attn, w, lv)
    checked = 0
    resolved_quadratic = logit_sd in (0.005, 0.001)
    for cell, (rmean, rvar) in ref.items():
        metric, a, b = cell
        sel = rows[(rows["metric"] == metric) & (rows["level_a"] == a) & (rows["level_b"] == b)]
        for _, r in sel.iterrows():
            img, head = int(r["image"][3:]), int(r["head"])
            h = HEADS if head == -1 else head
            if notes[r.name] == "no variation":
                assert np.isnan(r["z"]), "a cell with no variation has no z"
                assert not (resolved_quadratic and metric in ("wi", "R")), f"{cell} head {head}: not resolved"
                continue
            sd = float(rvar[img, h]) ** 0.5
            assert sd > 0, f"{cell} head {head}: the reference has no variation, the library gives z = {r['z']}"
            z_ref = (float(r["value64"]) - float(rmean[img, h])) / sd
            assert abs(r["z"] - z_ref) <= 0.01 * max(1.0, abs(z_ref)), (cell, head, float(r["z"]), z_ref)
            checked += 1
    assert np.all(np.isnan(rows["z"]) | (np.abs(rows["z"]) < 1e3)), "no z from rounding noise"
    if logit_sd == 0.05:  # far enough from uniform that float32 sums resolve most cells: not a vacuous test
        assert checked >= 0.8 * len(rows[rows["metric"].isin(["sal", "wi", "R", "entropy"])])
    if logit_sd == 0.0:  # exactly uniform attention: nothing varies but the geometry of raw distances
        assert checked == 0
        flat = rows[rows["metric"] != "dist"]
        assert (notes[flat.index] == "no variation").all()


def _uniform_vit() -> ViT:
    """A ViT whose queries and keys are all zero: every attention row is exactly uniform."""
    torch.manual_seed(0)
    m = ViT(ViTConfig(img_size=(24, 32), patch_size=8, dim=32, depth=2, heads=2, num_classes=2))
    for blk in m.blocks:
        with torch.no_grad():
            blk.attn.qkv.weight[: 2 * 32].zero_()
            blk.attn.qkv.bias[: 2 * 32].zero_()
    return m.eval()


def test_a_model_with_uniform_attention_reads_no_variation_not_q_zero(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            img = np.full((48, 64, 3), 90, np.uint8)
            for _ in range(6):
                y, x = rng.integers(0, 42), rng.integers(0, 58)
                img[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = rng.integers(150, 255)
            Image.fromarray(img).save(tmp_path / "imgs" / cls / f"{i}.png")
    res = analyze(NativeBackend(_uniform_vit()), tmp_path / "imgs", out=tmp_path / "out", n_boot=50, progress=False)
    s = pd.read_csv(tmp_path / "out" / "summary.csv", keep_default_na=False)
    for col in ("z", "p", "q"):
        vals = pd.to_numeric(s[col].replace("", np.nan))
        assert not s[col].astype(str).str.lower().isin(["nan", "inf", "-inf"]).any(), f"{col}: NaN written"
        assert (vals.dropna().abs() < 1e3).all() if col == "z" else (vals.dropna() > 1e-6).all(), col
    # everything but the raw distance (geometry, not attention) has nothing to vary
    content = s[s["metric"] != "dist"]
    assert (content["note"] == "no variation").all() and (content[["z", "p", "q"]] == "").all().all()
    assert (s[s["metric"] == "dist"]["note"] == "").all()
    long = res.long
    assert set(long[long["z"].isna()]["note"]) == {"no variation"}


def test_tiny_p_and_q_print_as_below_1e_12_and_no_variation_prints_no_number():
    from siftlens.report.findings import fmt_p, fmt_q, fmt_z

    assert fmt_q(2e-213) == "q < 1e-12" and fmt_q(0.0) == "q < 1e-12" and fmt_p(1e-301) == "p < 1e-12"
    assert fmt_q(0.0031) == "q=0.0031" and fmt_q(1e-12) == "q=1e-12"
    assert fmt_q(float("nan")) == fmt_z(float("nan")) == "no variation"


def test_the_report_of_a_uniform_model_prints_no_variation_not_nan(tmp_path):
    from siftlens.report import write_report

    rng = np.random.default_rng(3)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    for i in range(4):
        img = np.full((48, 64, 3), 90, np.uint8)
        for _ in range(6):
            y, x = rng.integers(0, 42), rng.integers(0, 58)
            img[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = rng.integers(150, 255)
        Image.fromarray(img).save(tmp_path / "imgs" / "a" / f"{i}.png")
    res = analyze(NativeBackend(_uniform_vit()), tmp_path / "imgs", n_boot=50, progress=False)
    text = write_report(tmp_path / "rep", res.summary, res.manifest, dpi=40).read_text()
    assert "no variation" in text.lower()
    assert ">nan<" not in text.lower() and "q=nan" not in text.lower() and "z=nan" not in text.lower()
    assert "1e-300" not in text
