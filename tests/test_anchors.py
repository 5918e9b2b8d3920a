"""The label-free anchors (JTT, AFR) and the group-aware reference (DFR with the true groups) on a tiny planted
shortcut: three classes whose core feature is a shape glyph on the right half, with a colour marker on the left that
is the class's own in 90% of the 30 training images per class; a held-out split (70%) to refit heads on, and a
conflicting split where every marker is another class's. A tiny ViT trained 10 epochs (ERM) leans on the colour.

Measured (data seed 0, everything seeded): the ERM model's worst class on the conflicting split is at 0.0 to
0.083; DFR with the true groups raises it (see ``test_dfr``)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import siftlens
from siftlens.benchmarks.spurious_cifar import glyph
from siftlens.data import ImageSource
from siftlens.options import build
from siftlens.shortcuts.anchors import (
    AFRConfig,
    DFRConfig,
    JTTConfig,
    afr,
    afr_weights,
    anchor,
    dfr,
    fit_pulled_head,
    jtt,
    upsampled_folder,
)
from siftlens.shortcuts.groups import group_accuracy
from siftlens.shortcuts.retraining.head import fit_head
from siftlens.training import TrainConfig, train

CLASSES = ("ant", "bee", "cow")
COLOUR = np.array([(230, 40, 40), (40, 210, 40), (40, 40, 230)], np.uint8)
SHAPE = ("plus", "ring", "bars")
TRAIN = dict(img_size=32, patch_size=4, dim=32, depth=2, heads=2, epochs=10, batch_size=15, lr=3e-3,
             warmup_epochs=0.5, pad=0, seed=0)


def planted_split(root: Path, per_class: int, rho: float, rng: np.random.Generator) -> Path:
    """An ImageFolder of ``per_class`` images per class, marker = own colour with probability ``rho`` (else one
    of the two others), with its markers.json."""
    records = {}
    for k, cls in enumerate(CLASSES):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            m = k if rng.random() < rho else (k + 1 + i % 2) % 3
            img = (rng.integers(90, 160, 3)[None, None] + rng.integers(-10, 11, (32, 32, 3))).clip(0, 255)
            img = img.astype(np.uint8)
            left, top = rng.integers(0, 9), rng.integers(0, 25)
            img[top : top + 8, left : left + 8] = COLOUR[m]
            left, top = rng.integers(17, 25), rng.integers(0, 25)
            img[top : top + 8, left : left + 8] = glyph(SHAPE[k])
            name = f"{cls}/{i:03d}.png"
            Image.fromarray(img).save(root / name)
            records[name] = {"label": cls, "marker": CLASSES[m], "aligned": bool(m == k)}
    (root / "markers.json").write_text(json.dumps({"classes": list(CLASSES), "images": records}))
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(0)
    splits = {"train": planted_split(root / "train", 30, 0.9, rng),
              "holdout": planted_split(root / "holdout", 20, 0.7, rng),
              "conflicting": planted_split(root / "conflicting", 12, 0.0, rng)}
    tc = build(TrainConfig, TRAIN)
    train(None, str(splits["train"]), tc, progress=False, out=root / "erm")
    return {**{k: str(v) for k, v in splits.items()}, "erm": str(root / "erm" / "model"), "root": root, "tc": tc}


def predictions(model_dir: str, images: str) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true classes of a saved model (loaded as any siftlens model) on a folder."""
    backend = siftlens.load_backend(model_dir)
    src = ImageSource(images)
    x = torch.from_numpy(np.stack([backend.preprocess(src.load(i)) for i in range(len(src))]))
    with torch.no_grad():
        pred = backend.forward(backend.normalize(x)).argmax(1).numpy()
    return pred, np.asarray(src.labels)


def worst_class(model_dir: str, images: str) -> float:
    pred, y = predictions(model_dir, images)
    return group_accuracy(pred == y, np.array(CLASSES)[y])["worst_group"]["accuracy"]


def test_jtt_upweights_exactly_the_errors_of_the_short_erm_run(planted, tmp_path):
    tc = replace(planted["tc"], optim=replace(planted["tc"].optim, epochs=2))
    res = jtt(None, planted["train"], JTTConfig(lambda_up=2, erm_epochs=1, train=tc), progress=False)
    # the identification run is the first epoch of the same seeded schedule from the same start
    short = train(None, planted["train"], replace(tc, session=replace(tc.session, stop_after=1)), progress=False)
    short.save(tmp_path / "short")
    pred, y = predictions(str(tmp_path / "short" / "model"), planted["train"])
    t = res.table.set_index("name").loc[ImageSource(planted["train"]).names]
    assert (t["label"].to_numpy() == y).all()
    assert (t["error"].to_numpy() == (pred != y)).all() and 0 < t["error"].sum() < len(y)
    assert (t["weight"] == np.where(t["error"], 2, 1)).all()
    assert res.record["upsampled_images"] == len(y) + int(t["error"].sum())
    assert res.record["label_free"] is True and len(res.record["epochs"]) == 2
    paths = res.save(tmp_path / "jtt")
    assert set(pd.read_csv(paths["weights"])["name"]) == set(t.index)
    assert predictions(str(paths["model"]), planted["conflicting"])[0].shape == (36,)


def test_upsampled_folder_repeats_each_image_its_weight(planted, tmp_path):
    src = ImageSource(planted["holdout"])
    reps = np.arange(len(src)) % 3 + 1
    assert upsampled_folder(src, src.names, reps, tmp_path / "up") == reps.sum()
    up = ImageSource(tmp_path / "up")
    assert len(up) == reps.sum() and up.classes == list(CLASSES)
    stems = pd.Series([n.split("~")[0].removesuffix(".png") for n in up.names]).value_counts()
    assert all(stems[n.removesuffix(".png")] == r for n, r in zip(src.names, reps, strict=True))


def test_afr_weights_follow_exp_minus_gamma_p(planted, tmp_path):
    res = afr(planted["erm"], planted["holdout"], AFRConfig(gamma=4.0, pull=0.1, iters=50), progress=False)
    # p_ERM(y|x) computed independently, from the saved ERM model's own forward
    backend = siftlens.load_backend(planted["erm"])
    src = ImageSource(planted["holdout"])
    x = torch.from_numpy(np.stack([backend.preprocess(src.load(i)) for i in range(len(src))]))
    with torch.no_grad():
        p = backend.forward(backend.normalize(x)).softmax(1)[torch.arange(len(src)), torch.tensor(src.labels)]
    t = res.table.set_index("name").loc[src.names]
    assert np.allclose(t["p_erm"], p.numpy(), atol=1e-5)
    expected = np.exp(-4.0 * p.numpy().astype(np.float64))
    assert np.allclose(t["weight"], expected / expected.sum(), rtol=1e-4)
    assert res.record["label_free"] is True
    paths = res.save(tmp_path / "afr")
    assert predictions(str(paths["model"]), planted["conflicting"])[0].shape == (36,)


def test_afr_gamma_zero_is_the_plain_refit_and_the_pull_holds_the_head():
    torch.manual_seed(0)
    feats, y = torch.randn(60, 8), torch.arange(60) % 3
    start = torch.nn.Linear(8, 3)
    w = afr_weights(torch.rand(60), y, 0.0)
    assert torch.allclose(w, torch.full((60,), 1 / 60))
    plain = fit_head(feats, y, torch.ones(60), 3, 0.0, 50, init=start)
    ours = fit_pulled_head(feats, y, w, start, 0.0, 50)
    assert torch.allclose(ours(feats), plain(feats), atol=1e-3)
    held = fit_pulled_head(feats, y, w, start, 1e4, 50)
    assert (held.weight - start.weight).abs().max() < 1e-3
    assert (plain.weight - start.weight).abs().max() > 0.1
    cb = afr_weights(torch.zeros(4), torch.tensor([0, 0, 0, 1]), 1.0, balance_classes=True)
    assert torch.allclose(cb, torch.tensor([1 / 6, 1 / 6, 1 / 6, 1 / 2]))


def test_dfr_balances_the_true_groups_and_raises_the_worst_group(planted, tmp_path):
    side = json.loads((Path(planted["holdout"]) / "markers.json").read_text())["images"]
    res = dfr(planted["erm"], planted["holdout"], DFRConfig(draws=3, iters=100), progress=False)
    assert res.record["label_free"] is False
    assert len(res.record["cells"]) == 6 and len(set(res.record["per_cell"].values())) == 1
    assert all(int(side[r.name]["aligned"]) == r.group for r in res.table.itertuples())
    weighted = anchor("dfr", planted["erm"], planted["holdout"], DFRConfig(balance="weights", iters=100),
                      progress=False)
    totals = list(weighted.record["per_cell"].values())
    assert np.allclose(totals, totals[0])
    paths = res.save(tmp_path / "dfr")
    cfg = json.loads((paths["model"] / "config.json").read_text())
    assert cfg["extra"]["anchor"]["label_free"] is False
    erm, fixed = worst_class(planted["erm"], planted["conflicting"]), worst_class(str(paths["model"]),
                                                                                planted["conflicting"])
    print(f"conflicting worst class: ERM {erm:.3f}, DFR (true groups) {fixed:.3f}")
    assert fixed > erm
