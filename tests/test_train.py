"""Supervised training: it learns, and a resumed run equals an uninterrupted one exactly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from _dist import torchrun
from PIL import Image

from siftlens.errors import ConfigError
from siftlens.models.vit import load_vit
from siftlens.options import build
from siftlens.training import TrainConfig, TrainResult, train
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


def cfg(tmp_path, **kw) -> TrainConfig:
    """A small TrainConfig from flat option names (``dim=32``, ``keep_rate=0.5`` ...)."""
    base = dict(val=str(tmp_path / "data"), img_size=16, patch_size=4, dim=32, depth=2, heads=2, epochs=3,
                batch_size=8, lr=3e-3, warmup_epochs=0.5, pad=2, seed=3)
    base.update(kw)
    return build(TrainConfig, base)


def run(tmp_path, out, model=None, **kw) -> TrainResult:
    """Train on tmp_path/data into tmp_path/out."""
    return train(model, str(tmp_path / "data"), cfg(tmp_path, **kw), progress=False, out=tmp_path / out)


def test_resume_continues_exactly(tmp_path):
    make_folder(tmp_path / "data")
    full = run(tmp_path, "full")
    part = run(tmp_path, "part", stop_after=1)
    assert len(part.history) == 1 and not part.complete and not (tmp_path / "part" / "model").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run(tmp_path, "part")
    resumed = run(tmp_path, "part", resume=True)
    assert list(resumed.history["train_loss"]) == pytest.approx(list(full.history["train_loss"]))
    a = load_vit(tmp_path / "full" / "model").state_dict()
    b = load_vit(tmp_path / "part" / "model").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    m = load_vit(tmp_path / "full" / "model")
    assert m.cfg.class_names == ["bottom", "top"] and m.cfg.img_size == (16, 16)


def test_training_learns_a_simple_task(tmp_path):
    make_folder(tmp_path / "data", n=48)
    hist = run(tmp_path, "run", epochs=10, batch_size=16, pad=0).history
    assert hist["val_acc"].iloc[-1] >= 0.7  # chance is 0.5
    assert hist["train_loss"].iloc[-1] < hist["train_loss"].iloc[0]


def test_result_without_out_saves_where_asked(tmp_path):
    """With no out, nothing is written beside the data; the result holds the model and one row per epoch, and
    .save(out) writes what `siftlens train` writes."""
    make_folder(tmp_path / "data", n=8)
    res = train(None, str(tmp_path / "data"), cfg(tmp_path, epochs=2), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    assert list(res.history["epoch"]) == [1, 2] and res.complete
    res.save(tmp_path / "saved")
    again = load_vit(tmp_path / "saved" / "model")
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v.cpu(), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="resume"):
        train(None, str(tmp_path / "data"), cfg(tmp_path, resume=True), progress=False)


def test_fine_tuning_starts_from_the_saved_weights(tmp_path):
    """train(model, ...) starts from model's weights: at learning rate 0 nothing changes (head kept: same classes);
    with another class set the body is kept and the head is new; the model's own shape wins over the config's."""
    make_folder(tmp_path / "data", n=8)
    run(tmp_path, "base", epochs=1)
    saved = load_vit(tmp_path / "base" / "model")
    same = train(tmp_path / "base" / "model", str(tmp_path / "data"),
                 cfg(tmp_path, epochs=1, lr=0.0, min_lr=0.0, dim=64, heads=4), progress=False)
    assert same.model.cfg.dim == 32 and same.model.cfg.mean == saved.cfg.mean
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(same.model.state_dict()[k].cpu(), v, rtol=0, atol=0)
    # one fine-tuning epoch moves the weights away from the start, and differs from a run from scratch
    tuned = train(saved, str(tmp_path / "data"), cfg(tmp_path, epochs=1, lr=1e-3), progress=False)
    scratch = run(tmp_path, "scratch", epochs=1, lr=1e-3)
    w = "blocks.0.attn.qkv.weight"
    d_tuned = (tuned.model.state_dict()[w] - saved.state_dict()[w]).abs().max()
    d_scratch = (scratch.model.state_dict()[w] - saved.state_dict()[w]).abs().max()
    assert 0 < d_tuned < d_scratch
    # another class set: a new head of the right size, the body as saved
    shutil.copytree(tmp_path / "data", tmp_path / "three")
    shutil.copytree(tmp_path / "data" / "top", tmp_path / "three" / "zzz")
    other = train(saved, str(tmp_path / "three"), cfg(tmp_path, val=None, epochs=1, lr=0.0, min_lr=0.0),
                  progress=False)
    assert other.model.cfg.class_names == ["bottom", "top", "zzz"] and other.model.head.out_features == 3
    torch.testing.assert_close(other.model.state_dict()[w], saved.state_dict()[w], rtol=0, atol=0)


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


@pytest.mark.parametrize("command", ["train", "pretrain"])
def test_every_config_option_is_in_the_help(command):
    """Each command is generated from its config: every field with cli=True (groups included) is an option
    of `siftlens <command>`, with the field's help text."""
    from typer.testing import CliRunner

    from siftlens.cli import app
    from siftlens.options import flat_options
    from siftlens.training import PretrainConfig

    cls = {"train": TrainConfig, "pretrain": PretrainConfig}[command]
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.replace("│", " ").split())
    options = flat_options(cls)
    assert len(options) > 30
    for o in options:
        assert f"--{o.flag} " in text, o.flag
        assert " ".join(o.help.split()) in text, o.flag
