"""SpuriousCIFAR builder, visual vocabulary and discovery (with a tiny model that learns planted markers)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from siftlens.benchmarks.spurious_cifar import (
    GLYPH_NAMES,
    SpuriousConfig,
    build,
    builtin_markers,
    check_markers,
    glyph,
)
from siftlens.benchmarks.spurious_cifar_eval import evaluate_markers
from siftlens.errors import CandidatesError, ConfigError, SpuriousDataError
from siftlens.jobs import JobOptions, run_discovery
from siftlens.options import build as configure
from siftlens.shortcuts import DiscoveryConfig, discover, word_sets
from siftlens.shortcuts.discovery.vocabulary import kmeans, load_vocabulary, rootsift
from siftlens.shortcuts.groups import read_sidecar

CLASSES = ("ant", "bee", "cow")


def smooth_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    low = rng.integers(40, 216, (4, 4, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC)).astype(np.int16)
    return np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def fake_cifar(tmp_path_factory):
    """A CIFAR-like root: train/ (14 per class) and test/ (6 per class) of 32x32 JPEGs."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(1)
    for part, n in (("train", 14), ("test", 6)):
        for c in CLASSES:
            (root / part / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(smooth_image(rng)).save(root / part / c / f"{i:04d}.jpg", quality=95)
    return root


def _build(root, out, **kw):
    return build(SpuriousConfig(cifar=str(root), out=str(out), progress=False, **kw))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_builder_is_deterministic_by_seed(fake_cifar, tmp_path):
    _build(fake_cifar, tmp_path / "a", seed=3, rho=0.7)
    _build(fake_cifar, tmp_path / "b", seed=3, rho=0.7)
    _build(fake_cifar, tmp_path / "c", seed=4, rho=0.7)
    for split in ("train", "aligned", "conflicting"):
        sa, sb, sc = (read_sidecar(tmp_path / x / split / "markers.json")["images"] for x in "abc")
        assert sa == sb
        assert sa != sc
        for name in list(sa)[:10]:
            assert np.array_equal(_pixels(tmp_path / "a" / split / name), _pixels(tmp_path / "b" / split / name))
    # a limited build is a subset of the full build
    _build(fake_cifar, tmp_path / "lim", seed=3, rho=0.7, limit_per_class=5, splits=("aligned",))
    lim = read_sidecar(tmp_path / "lim" / "aligned" / "markers.json")["images"]
    full = read_sidecar(tmp_path / "a" / "aligned" / "markers.json")["images"]
    assert len(lim) == 15 and all(full[k] == v for k, v in lim.items())


def test_rho_is_honoured_and_boxes_match_the_marker_pixels(fake_cifar, tmp_path):
    man = _build(fake_cifar, tmp_path / "d", seed=0, rho=0.8, marker_size=6)
    assert man["splits"]["train"] == {"images": 42, "aligned": 3 * 11, "conflicting": 3 * 3, "skipped": []}
    markers = {c: _pixels(tmp_path / "d" / "markers" / f"{c}.png") for c in CLASSES}
    assert all(m.shape == (6, 6, 3) for m in markers.values())
    for split in ("train", "aligned", "conflicting"):
        side = read_sidecar(tmp_path / "d" / split / "markers.json")
        per_class: dict[str, int] = {}
        for name, r in side["images"].items():
            x0, y0, x1, y1 = r["box"]
            assert x1 - x0 == 6 and y1 - y0 == 6 and 0 <= x0 and x1 <= 32 and 0 <= y0 and y1 <= 32
            img = _pixels(tmp_path / "d" / split / name)
            assert np.array_equal(img[y0:y1, x0:x1], markers[r["marker"]]), name
            assert r["label"] == name.split("/")[0]
            assert r["aligned"] == (r["marker"] == r["label"])
            per_class[r["label"]] = per_class.get(r["label"], 0) + (not r["aligned"])
        if split == "train":
            assert per_class == {c: 3 for c in CLASSES}  # round((1 - 0.8) * 14) wrong markers per class
        elif split == "aligned":
            assert set(per_class.values()) == {0}
        else:  # conflicting: never the right marker
            assert per_class == {c: 6 for c in CLASSES}
            assert all(r["marker"] != r["label"] for r in side["images"].values())


def test_holdout_split_is_disjoint_from_the_evaluated_test_images(fake_cifar, tmp_path):
    man = _build(fake_cifar, tmp_path / "h", seed=2, rho=0.5, splits=("aligned", "holdout"), holdout_start=2)
    assert not (tmp_path / "h" / "train").exists()
    hold = read_sidecar(tmp_path / "h" / "holdout" / "markers.json")["images"]
    al = read_sidecar(tmp_path / "h" / "aligned" / "markers.json")["images"]
    # test images 2..5 of every class, named by their index in the class like the aligned split's
    assert sorted(hold) == sorted(f"{c}/{k:04d}.png" for c in CLASSES for k in range(2, 6))
    assert all(hold[n]["source"] == al[n]["source"] for n in hold)
    evaluated = {al[f"{c}/{k:04d}.png"]["source"] for c in CLASSES for k in range(2)}
    assert not evaluated & {r["source"] for r in hold.values()}
    wrong = {c: sum(not r["aligned"] for r in hold.values() if r["label"] == c) for c in CLASSES}
    assert wrong == {c: 2 for c in CLASSES}  # rho honoured as in train: round(0.5 * 4) per class
    assert man["splits"]["holdout"]["images"] == 12 and man["config"]["holdout_start"] == 2
    _build(fake_cifar, tmp_path / "h2", seed=2, rho=0.5, splits=("holdout",), holdout_start=1, limit_per_class=3)
    assert sorted(read_sidecar(tmp_path / "h2" / "holdout" / "markers.json")["images"]) == sorted(
        f"{c}/{k:04d}.png" for c in CLASSES for k in range(1, 4))
    with pytest.raises(ConfigError, match="holdout"):
        _build(fake_cifar, tmp_path / "h3", splits=("holdout",), holdout_start=-1)


def test_train_start_takes_the_half_an_encoder_trained_with_limit_never_saw(fake_cifar, tmp_path):
    from siftlens.data import ImageSource

    _build(fake_cifar, tmp_path / "t", seed=1, rho=0.5, splits=("train",), train_start=7)
    side = read_sidecar(tmp_path / "t" / "train" / "markers.json")["images"]
    assert sorted(side) == sorted(f"{c}/{k:04d}.png" for c in CLASSES for k in range(7, 14))
    encoder_half = set(ImageSource(str(fake_cifar / "train"), limit=7 * len(CLASSES)).names)
    used = {r["source"] for r in side.values()}
    assert len(used) == 7 * len(CLASSES) and len(encoder_half) == 7 * len(CLASSES)
    assert not used & encoder_half  # the two halves are disjoint and together cover train
    assert used | encoder_half == set(ImageSource(str(fake_cifar / "train")).names)
    with pytest.raises(ConfigError, match="start"):
        _build(fake_cifar, tmp_path / "t2", splits=("train",), train_start=-1)


def test_user_markers_are_resized_and_must_cover_every_class(fake_cifar, tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    rng = np.random.default_rng(0)
    for c in CLASSES[:2]:
        Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(d / f"{c}.png")
    with pytest.raises(SpuriousDataError, match="cow"):
        _build(fake_cifar, tmp_path / "o1", markers=str(d))
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(d / "cow.png")
    man = _build(fake_cifar, tmp_path / "o2", markers=str(d), splits=("aligned",), placement="bottom-right")
    assert man["markers"]["cow"] == "user:cow"
    side = read_sidecar(tmp_path / "o2" / "aligned" / "markers.json")
    assert {tuple(r["box"]) for r in side["images"].values()} == {(24, 24, 32, 32)}
    with pytest.raises(ConfigError, match="rho"):
        _build(fake_cifar, tmp_path / "o3", rho=1.5)


def test_builtin_markers_are_sift_rich_and_distinguishable():
    assert len(GLYPH_NAMES) == 10 and len({glyph(g).tobytes() for g in GLYPH_NAMES}) == 10
    rep = check_markers(builtin_markers(list(GLYPH_NAMES)), upsample=4.0, image_size=32)
    assert min(rep["keypoints"].values()) >= 5, rep["keypoints"]  # on every canvas tried
    assert rep["overall_nn_accuracy"] >= 0.85 and min(rep["nn_accuracy"].values()) >= 0.5, rep["nn_accuracy"]
    g = glyph("checker", 16)
    assert g.shape == (16, 16, 3) and set(np.unique(g)) == {0, 255}


def test_real_cifar_build(cifar_zip, tmp_path):
    man = _build(str(cifar_zip), tmp_path / "sc", limit_per_class=2, splits=("train", "conflicting"))
    assert man["classes"][:2] == ["airplane", "automobile"] and man["splits"]["train"]["images"] == 20
    assert man["markers"]["airplane"] == GLYPH_NAMES[0]


def test_kmeans_is_seeded_and_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.3 * torch.randn(50, 2, generator=g) for c in centers])
    a = kmeans(x, 3, seed=1)
    b = kmeans(x, 3, seed=1)
    assert torch.equal(a, b)
    found = sorted(a.round().tolist())
    assert found == sorted(centers.tolist())
    with pytest.raises(ConfigError, match="vocab"):
        kmeans(x[:2], 3)
    d = rootsift(np.array([[1.0, 3.0], [0.0, 0.0]]))
    assert torch.allclose(d[0], torch.tensor([0.5, 3**0.5 / 2])) and torch.equal(d[1], torch.zeros(2))


# -- discovery on a model that learned planted markers ---------------------------------------------------
PLANTED = {"ant": "checker", "bee": "ring", "cow": "l-corners"}


def noise_image(rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A flat random colour with pixel noise: no class signal at all."""
    base = rng.integers(70, 180, 3)
    return np.clip(base[None, None] + rng.integers(-12, 13, (size, size, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Noise images whose only class signal is a planted marker (rho = 1), and a tiny ViT trained on them."""
    from siftlens.options import build
    from siftlens.training import TrainConfig, train

    root = tmp_path_factory.mktemp("planted")
    data = root / "data"
    rng = np.random.default_rng(0)
    recs = {}
    for c, g in PLANTED.items():
        (data / c).mkdir(parents=True)
        for i in range(48):
            img = noise_image(rng)
            x0, y0 = (int(v) for v in rng.integers(0, 25, 2))
            img[y0 : y0 + 8, x0 : x0 + 8] = glyph(g)
            Image.fromarray(img).save(data / c / f"{i:03d}.png")
            recs[f"{c}/{i:03d}.png"] = {"label": c, "marker": c, "box": [x0, y0, x0 + 8, y0 + 8], "aligned": True}
    (data / "markers.json").write_text(json.dumps({"classes": list(PLANTED), "images": recs}))
    tc = build(TrainConfig, dict(img_size=32, patch_size=4, dim=32, depth=2, heads=2, epochs=20, batch_size=16,
                                 lr=3e-3, warmup_epochs=0.5, pad=0, seed=0))
    hist = train(None, str(data), tc, progress=False, out=root / "run").record
    return data, root / "run" / "model", hist


def test_discovery_ranks_the_planted_marker_first(planted, tmp_path):
    data, model, hist = planted
    assert hist["epochs"][-1]["train_acc"] > 0.9, hist["epochs"][-1]
    cfg = configure(DiscoveryConfig, dict(vocab=24, batch_size=48, causal_top=4, causal_images=8, gallery=4, top=5))
    res, paths = run_discovery(str(model), str(data), tmp_path / "disc", cfg, options=JobOptions(progress=False))
    ev = res.evaluation
    assert ev is not None and ev["ranks"] == {c: 1 for c in PLANTED}, (ev, res.top)
    # the ranked table, JSON, keypoints and a self-contained report are written
    cand = pd.read_csv(paths["candidates"])
    assert {"class", "word", "share", "lift", "assoc", "causal", "score", "rank"} <= set(cand.columns)
    top1 = cand[cand["rank"] == 1]
    assert len(top1) == 3 and (top1["causal"] > 0).all()
    kp = pd.read_parquet(paths["keypoints"])
    # SIFT keypoints (words 0..23), then one pseudo-keypoint per patch for the region words (24..24+R-1)
    assert len(kp) == len(res.features.kp_xy) and kp["word"].between(0, 24 + cfg.regions - 1).all()
    assert (kp["word"] >= 24).sum() == 64 * len(res.features.names)
    html_text = paths["report"].read_text()
    assert "data:image/png;base64," in html_text and "src='http" not in html_text and "<script" not in html_text
    vocab = load_vocabulary(tmp_path / "disc")
    assert vocab.centers.shape == (24, 128) and vocab.classes == list(PLANTED)
    one, three = word_sets(vocab, 1)[0], word_sets(vocab, 3)[0]
    assert len(one) <= 3 and one <= three
    # the same seed gives the same ranking
    again = discover(str(model), str(data), cfg, progress=False)
    pd.testing.assert_frame_equal(again.candidates, res.candidates)


def test_discovery_with_object_boxes_and_mean_occlusion(planted, tmp_path):
    data, model, _ = planted
    side = read_sidecar(data / "markers.json")
    # "object" boxes that exclude the marker: the marker's keypoints are all off-object
    boxes = {}
    for n, r in side["images"].items():
        x0, y0, x1, y1 = r["box"]
        boxes[n] = [0, 0, 32, y0] if y0 >= 8 else [0, y1, 32, 32]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    cfg = configure(DiscoveryConfig, dict(vocab=24, batch_size=48, causal_top=3, causal_images=6, gallery=0,
                                          occlude="mean", attention="rollout"))
    res = discover(str(model), str(data), cfg, boxes=tmp_path / "boxes.json", progress=False)
    assert "off_object" in res.candidates
    ev = evaluate_markers(res, side)
    marker_words = {w for ws in ev["marker_words"].values() for w in ws}
    off = res.candidates.set_index("word")["off_object"].groupby(level=0).mean()
    measured = [w for w in marker_words if w in off.index and np.isfinite(off[w])]
    assert measured, "no marker word has an off-object share to check"
    assert all(off[w] > 0.8 for w in measured), {w: off[w] for w in measured}
    assert sum(r == 1 for r in ev["ranks"].values()) >= 2, ev["ranks"]


def test_discovery_errors_are_one_line(tmp_path, planted):
    data, model, _ = planted
    with pytest.raises(ConfigError, match="vocab"):
        discover(str(model), str(data), DiscoveryConfig(vocab_size=10**6, causal_top=0), progress=False)
    with pytest.raises(ConfigError, match="attention"):
        DiscoveryConfig(attention="first").validate()
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(CandidatesError, match="not a discovery output"):
        load_vocabulary(tmp_path / "bad.json")
    with pytest.raises(CandidatesError, match="not found"):
        load_vocabulary(tmp_path / "missing.json")


def test_cli_make_spurious_and_discover(fake_cifar, planted, tmp_path):
    data, model, _ = planted
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "make-spurious", "--cifar", str(fake_cifar), "--out",
                        str(tmp_path / "sc"), "--rho", "0.5", "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "train        42 images (21 aligned, 21 conflicting)" in r.stdout
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "discover", "--model", str(model), "--images",
                        str(data), "--out", str(tmp_path / "d"), "--vocab", "24", "--causal-top", "2",
                        "--causal-images", "4", "--gallery", "2", "--no-progress"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "d" / "report.html").is_file()
    # the printed rates are the saved evaluation's, and the planted markers are found for some class
    evaluation = json.loads((tmp_path / "d" / "discovery.json").read_text())["evaluation"]
    printed = [int(x) for x in re.findall(r"own marker ranked first for (\d+)% of classes", r.stdout)]
    assert printed == [round(100 * evaluation["rank1"]), round(100 * evaluation["patch_rule"]["rank1"])]
    assert max(printed) > 0, r.stdout
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "make-spurious", "--cifar", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
