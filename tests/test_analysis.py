"""End-to-end analysis on real computations: exact answers for uniform attention, bad inputs counted."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from siftlens.analysis import analyze
from siftlens.errors import ConfigError
from siftlens.models.native import NativeBackend
from siftlens.models.vit import ViT, ViTConfig


def textured(rng, h, w):
    """A random image with blobs and edges, so SIFT finds keypoints."""
    img = np.full((h, w, 3), 90, np.uint8)
    for _ in range(6):
        y, x = rng.integers(0, h - 6), rng.integers(0, w - 6)
        img[y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = rng.integers(150, 255)
    return img


@pytest.fixture
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    for cls in ("a", "b"):
        (d / cls).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(textured(rng, 48, 64)).save(d / cls / f"{i}.png")
    return d


def uniform_model():
    """A ViT whose queries and keys are all zero: every attention row is exactly uniform."""
    torch.manual_seed(0)
    m = ViT(ViTConfig(img_size=(24, 32), patch_size=8, dim=32, depth=2, heads=2, num_classes=2))
    for blk in m.blocks:
        with torch.no_grad():
            blk.attn.qkv.weight[: 2 * 32].zero_()
            blk.attn.qkv.bias[: 2 * 32].zero_()
    return m.eval()


@pytest.mark.parametrize("null", ["exact", 30])
def test_uniform_attention_gives_exactly_one(image_dir, null):
    res = analyze(NativeBackend(uniform_model()), image_dir, null=null, n_boot=200,
                  progress=False, rollout=True)
    s = res.summary
    # nothing varies under uniform attention but raw distances: z, p and q are empty there, with the reason
    flat = s["note"] == "no variation"
    assert len(s) and not s.drop(columns=["z", "p", "q"]).isna().any().any()
    assert s[flat][["z", "p", "q"]].isna().all().all() and not s[~flat][["z", "p", "q"]].isna().any().any()
    for metric in ("sal", "wi", "cls_lift"):
        # rollout (layer 2) adds the residual identity: self-attention lifts WI above 1 there
        rows = s[(s["metric"] == metric) & ((s["layer"] < 2) | s["metric"].isin(["sal", "cls_lift"]))]
        np.testing.assert_allclose(rows["mean"], 1.0, atol=1e-5)
        np.testing.assert_allclose(rows["null_mean"], 1.0, atol=1e-5)
    wi_roll = s[(s["metric"] == "wi") & (s["layer"] == 2)]["mean"]
    assert (wi_roll > 1.0).all()
    np.testing.assert_allclose(s[(s["metric"] == "R") & (s["layer"] < 2)]["mean"], 1.0, atol=1e-5)
    np.testing.assert_allclose(s[s["metric"] == "cls_rho"]["mean"], 0.0, atol=1e-6)
    np.testing.assert_allclose(s[(s["metric"] == "entropy") & (s["layer"] < 2)]["mean"], np.log(12), atol=1e-5)
    # relative distance: exactly as far as uniform attention, for every level, although the raw distances
    # of the levels differ with where their patches sit; rollout's identity term makes it more local
    rel = s[(s["metric"] == "dist_rel") & (s["layer"] < 2)]
    assert len(rel) and set(rel["level_a"]) <= {0, 1, 2} and (rel["level_b"] == -1).all()
    for col in ("mean", "ci_lo", "ci_hi", "null_mean", "null_lo", "null_hi"):
        np.testing.assert_allclose(rel[col], 1.0, atol=1e-6)
    assert (s[(s["metric"] == "dist_rel") & (s["layer"] == 2)]["mean"] < 1.0).all()
    assert set(s["layer"]) == {0, 1, 2}, "layer 2 = rollout"
    assert (s[s["layer"] == 2]["head"] == -1).all()
    long = res.long
    assert not long.drop(columns="z").isna().any().any()
    assert set(long[long["z"].isna()]["note"]) <= {"no variation"}
    assert set(long.columns) == {"image", "layer", "head", "metric", "level_a", "level_b", "value", "null_mean",
                                 "null_sd", "z", "note"}
    # head means and rollout reach the per-image table too
    assert (long["head"] == -1).any() and (long["layer"] == 2).any()
    assert (long[long["layer"] == 2]["head"] == -1).all()
    assert long["image"].nunique() == 10
    lrel = long[(long["metric"] == "dist_rel") & (long["layer"] < 2)]
    assert len(lrel) and np.allclose(lrel["value"], 1.0, atol=1e-6)
    assert set(long["metric"]) >= {"dist", "dist_rel", "entropy"}


def test_bad_inputs_are_skipped_counted_and_listed(tmp_path, tiny_vit):
    rng = np.random.default_rng(1)
    d = tmp_path / "mixed"
    d.mkdir()
    Image.fromarray(textured(rng, 48, 64)).save(d / "good.png")
    Image.fromarray(textured(rng, 48, 64)).convert("L").save(d / "grey.png")
    Image.fromarray(textured(rng, 48, 64)).convert("RGBA").save(d / "rgba.png")
    Image.fromarray(textured(rng, 48, 64)).convert("P").save(d / "palette.png")
    Image.fromarray(textured(rng, 48, 64)[..., 0].astype(np.uint16) * 257).save(d / "deep16.png")
    Image.fromarray(np.full((48, 64, 3), 77, np.uint8)).save(d / "flat.png")  # no keypoints
    Image.fromarray(textured(rng, 48, 64)[:4, :4]).save(d / "tiny.png")  # smaller than a patch
    (d / "text.jpg").write_text("not an image at all")
    jpg = d / "trunc.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg, quality=95)
    jpg.write_bytes(jpg.read_bytes()[:1500])
    res = analyze(NativeBackend(tiny_vit), d, null=20, n_boot=50, progress=False)
    im = res.manifest["images"]
    assert im["total"] == 9
    assert im["skipped"] == 3 and im["no_keypoints"] == 1 and im["analysed"] == 5
    reasons = {r["name"]: r["reason"] for r in im["skipped_reasons"]}
    assert "not an image" in reasons["text.jpg"]
    assert "truncated" in reasons["trunc.jpg"]
    assert "smaller than one" in reasons["tiny.png"]
    imgs = res.images.set_index("name")
    assert imgs.loc["flat.png", "status"] == "no_keypoints"
    assert "flat.png" not in set(res.long["image"])
    json.dumps(res.manifest)  # serialisable


def test_outputs_are_written_atomically(tmp_path, image_dir, tiny_vit):
    res = analyze(NativeBackend(tiny_vit), image_dir, null=20, n_boot=50, progress=False,
                  limit=4)
    paths = res.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "images.csv", "images.parts", "manifest.json", "metrics.parquet", "run.json", "summary.csv"]
    assert not list((tmp_path / "out").rglob("*.part"))  # no temporary left behind
    back = pd.read_parquet(paths["metrics"])
    assert len(back) == len(res.long)
    summary = pd.read_csv(paths["summary"], keep_default_na=False, dtype=str)
    assert not summary.isin(["nan", "NaN", "inf", "-inf"]).any().any()
    empty = (summary[["z", "p", "q"]] == "").any(axis=1)  # only a cell with no variation has no z, p, q
    assert (summary[empty]["note"] == "no variation").all() and (summary[~empty]["note"] == "").all()


def test_config_errors(image_dir, tiny_vit):
    with pytest.raises(ConfigError, match="--null"):  # fewer Monte Carlo maps than the 20 a p-value needs
        analyze(NativeBackend(tiny_vit), image_dir, null=3, progress=False)
    with pytest.raises(ConfigError, match="unknown analysis option 'null_permutations'"):  # the old name is gone
        analyze(NativeBackend(tiny_vit), image_dir, null_permutations=200, progress=False)
    with pytest.raises(ConfigError, match="scheme"):
        analyze(NativeBackend(tiny_vit), image_dir, scheme="bogus", progress=False)
    with pytest.raises(ConfigError, match="unknown analysis option"):
        analyze(NativeBackend(tiny_vit), image_dir, colour="red", progress=False)


def test_batching_does_not_change_results(image_dir, tiny_vit):
    a = analyze(NativeBackend(tiny_vit), image_dir, null=20, n_boot=50, progress=False,
                batch_size=3)
    b = analyze(NativeBackend(tiny_vit), image_dir, null=20, n_boot=50, progress=False,
                batch_size=10)
    key = ["image", "layer", "head", "metric", "level_a", "level_b"]
    va = a.long.sort_values(key)["value"].to_numpy()
    vb = b.long.sort_values(key)["value"].to_numpy()
    np.testing.assert_allclose(va, vb, rtol=1e-4, atol=1e-5)


def test_workers_give_the_same_keypoints(image_dir, tiny_vit):
    a = analyze(NativeBackend(tiny_vit), image_dir, null=20, n_boot=50, progress=False)
    b = analyze(NativeBackend(tiny_vit), image_dir, null=20, n_boot=50, progress=False,
                workers=2)
    pd.testing.assert_frame_equal(a.long, b.long)


def test_flatten_follows_the_cell_order():
    # every metric/level gets a distinct code; the flat vector must list them in the order of _cells
    from siftlens.analysis import LEVEL_METRICS, SCALAR_METRICS, cells
    from siftlens.analysis.engine import flatten_cells

    L, B, h, K = 3, 2, 2, 4
    code = {m: 100.0 * (i + 1) for i, m in enumerate((*SCALAR_METRICS, "R", *LEVEL_METRICS))}
    res = {m: torch.full((B, h, K), code[m]) for m in SCALAR_METRICS}
    res["R"] = code["R"] + torch.arange(L * L, dtype=torch.float32).reshape(L, L).expand(B, h, K, L, L)
    for m in LEVEL_METRICS:
        res[m] = code[m] + 10 * torch.arange(L, dtype=torch.float32).expand(B, h, K, L)
    cell_list = cells(L)
    flat = flatten_cells(res)
    assert "dist_rel" in LEVEL_METRICS and flat.shape == (B, h, K, len(cell_list))
    want = [code[m] + (a * L + b if m == "R" else 10 * a if a >= 0 else 0) for m, a, b in cell_list]
    assert torch.equal(flat[1, 1, 3], torch.tensor(want, dtype=torch.float64))
