"""Supervised training: it learns, and a resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _dist import torchrun
from PIL import Image

from siftlens.errors import ConfigError
from siftlens.models.vit import load_vit
from siftlens.training import TrainConfig, train
from siftlens.training.augment import augment


def make_folder(root, n=24, size=16):
    """Two classes that differ by where a bright square sits (top vs bottom half; flips keep it)."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("bottom", "top")):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            img = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            y0 = rng.integers(0, size // 2 - 6) + (1 - c) * size // 2
            x0 = rng.integers(0, size - 8)
            img[y0 : y0 + 6, x0 : x0 + 8] = 250
            Image.fromarray(img).save(root / cls / f"{i:03d}.png")


def cfg(tmp_path, out, **kw):
    base = dict(train=str(tmp_path / "data"), val=str(tmp_path / "data"), out=str(tmp_path / out), img_size=16,
                patch_size=4, dim=32, depth=2, heads=2, epochs=3, batch_size=8, lr=3e-3, warmup_epochs=0.5,
                pad=2, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_resume_continues_exactly(tmp_path):
    make_folder(tmp_path / "data")
    full = train(cfg(tmp_path, "full"))
    part = train(cfg(tmp_path, "part", stop_after=1))
    assert len(part["epochs"]) == 1 and not (tmp_path / "part" / "model").exists()
    with pytest.raises(ConfigError, match="--resume"):
        train(cfg(tmp_path, "part"))
    resumed = train(cfg(tmp_path, "part", resume=True))
    assert [e["train_loss"] for e in resumed["epochs"]] == pytest.approx([e["train_loss"] for e in full["epochs"]])
    a = load_vit(tmp_path / "full" / "model").state_dict()
    b = load_vit(tmp_path / "part" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m = load_vit(tmp_path / "full" / "model")
    assert m.cfg.class_names == ["bottom", "top"] and m.cfg.img_size == (16, 16)


def test_training_learns_a_simple_task(tmp_path):
    make_folder(tmp_path / "data", n=48)
    hist = train(cfg(tmp_path, "run", epochs=10, batch_size=16, pad=0))
    assert hist["epochs"][-1]["val_acc"] >= 0.7  # chance is 0.5
    assert hist["epochs"][-1]["train_loss"] < hist["epochs"][0]["train_loss"]


def test_augment_crops_and_flips_consistently():
    """A marked pixel lands where the drawn crop offset and flip put it: output (r, c) shows input
    (r + dy - pad, c + dx - pad), then column c goes to W - 1 - c when flipped; the padding is zero."""
    B, H, W, pad, seed = 16, 8, 10, 2, 7
    x = torch.zeros(B, 3, H, W)
    x[:, :, 3, 4] = torch.tensor([1.0, 2.0, 3.0])  # one marked pixel (row 3, column 4) per image
    y = augment(x, pad, torch.Generator().manual_seed(seed))
    ref = torch.Generator().manual_seed(seed)  # the draws, in augment's order: dy, dx, flip
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=ref)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=ref)
    flip = torch.rand(B, generator=ref) < 0.5
    assert flip.any() and (~flip).any() and (dy != pad).any() and (dx != pad).any()  # an identity would fail
    for i in range(B):
        r, c = 3 + pad - int(dy[i]), 4 + pad - int(dx[i])  # always inside for these offsets
        c = W - 1 - c if flip[i] else c
        expected = torch.zeros(3, H, W)
        expected[:, r, c] = torch.tensor([1.0, 2.0, 3.0])
        assert torch.equal(y[i], expected), (i, int(dy[i]), int(dx[i]), bool(flip[i]))
    # pad 0: no crop, only the flips (the marked column 4 of 10 is not its own mirror image)
    y0 = augment(x, 0, torch.Generator().manual_seed(seed))
    flip0 = torch.rand(B, generator=torch.Generator().manual_seed(seed)) < 0.5
    assert flip0.any() and (~flip0).any()
    for i in range(B):
        assert torch.equal(y0[i], x[i].flip(-1) if flip0[i] else x[i])
    # the padding shows as zeros: a crop offset dy = 0 on an all-ones image leaves the top pad rows empty
    ones = augment(torch.ones(B, 1, H, W), pad, torch.Generator().manual_seed(seed))
    for i in range(B):
        top, left = max(pad - int(dy[i]), 0), max(pad - int(dx[i]), 0)
        bottom, right = max(int(dy[i]) - pad, 0), max(int(dx[i]) - pad, 0)
        assert ones[i].sum() == (H - top - bottom) * (W - left - right)


def test_torchrun_two_processes_match_single_process(tmp_path):
    """DDP (gloo, 2 ranks, each half of every batch) ends with the weights of one process on whole batches."""
    import subprocess
    import sys

    make_folder(tmp_path / "data", n=16)
    common = ["--train", str(tmp_path / "data"), "--img-size", "16", "--patch-size", "4", "--dim", "32", "--depth",
              "1", "--heads", "2", "--epochs", "2", "--batch-size", "8", "--warmup-epochs", "0.5", "--pad", "2",
              "--no-progress", "--threads", "1"]
    r = torchrun(["train", "--out", str(tmp_path / "ddp"), *common], tmp_path / "logs")
    assert r.returncode == 0, r.stderr
    r1 = subprocess.run([sys.executable, "-m", "siftlens.cli", "train", "--out", str(tmp_path / "one"), *common],
                        capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr[-2000:]
    a = load_vit(tmp_path / "ddp" / "model").state_dict()
    b = load_vit(tmp_path / "one" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
