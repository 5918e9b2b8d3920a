"""The command line: help, one-line errors without tracebacks, and a real analyze run."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from siftlens.models.vit import save_vit


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "siftlens.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_help_explains_every_command():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("analyze", "demo", "train"):
        assert cmd in r.stdout
    r = run("analyze", "--help")
    assert r.returncode == 0
    for opt in ("--model", "--revision", "--images", "--out", "--batch-size", "--device", "--workers", "--layers",
                "--scheme", "--levels", "--upsample", "--null", "--seed", "--limit"):
        assert opt in r.stdout


@pytest.mark.parametrize(
    "model, needle",
    [("does/not/exist/anywhere", "not found"), ("./missing-model-dir", "not found"),
     ("google/vit-base-patch16-224", "not in the local cache")],
)
def test_model_errors_are_one_line(tmp_path, model, needle):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "imgs" / "a.png")
    # an empty hub cache, offline: a hub id is looked up there and nowhere else
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "analyze", "--model", model, "--images",
                        str(tmp_path / "imgs"), "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_train_geometry_error_is_one_line(tmp_path):
    """Real images in ImageFolder layout, so the run gets past decoding to the geometry check."""
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 40, 200 - 40 * i)).save(tmp_path / "imgs" / c / f"{i}.png")
    r = run("train", "--train", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"), "--img-size", "30",
            "--patch-size", "4", "--no-progress")
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "patch size 4 does not divide the input 30x30" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_train_model_fine_tunes_that_model(tmp_path):
    """--model starts from the folder: its shape, statistics and head are kept, its weights are the starting point
    (a new model, which ignoring --model would give, is nowhere near them)."""
    from siftlens.models.vit import ViT, ViTConfig, load_vit

    torch.manual_seed(3)
    start = ViT(ViTConfig(img_size=(16, 16), patch_size=8, dim=16, depth=1, heads=2, num_classes=2,
                          class_names=["a", "b"], mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5)))
    save_vit(start, tmp_path / "start")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    r = run("train", "--train", str(tmp_path / "imgs"), "--out", str(tmp_path / "ft"),
            "--model", str(tmp_path / "start"), "--epochs", "1", "--lr", "1e-6", "--warmup-epochs", "0",
            "--batch-size", "6", "--no-progress")
    assert r.returncode == 0, r.stderr
    tuned = load_vit(tmp_path / "ft" / "model")
    assert (tuned.cfg.dim, tuned.cfg.img_size, tuned.cfg.mean) == (16, (16, 16), (0.1, 0.2, 0.3))
    before = start.state_dict()
    drift = max((v - before[k]).abs().max().item() for k, v in tuned.state_dict().items())
    assert 0 < drift < 1e-4  # one step at a tiny learning rate, head included


def test_analyze_end_to_end(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "model")
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(6):
        img = np.full((48, 64, 3), 80, np.uint8)
        for _ in range(5):
            y, x = rng.integers(0, 40), rng.integers(0, 56)
            img[y : y + 5, x : x + 5] = rng.integers(150, 255)
        Image.fromarray(img).save(d / f"{i}.png")
    (d / "broken.png").write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    r = run("analyze", "--model", str(tmp_path / "model"), "--images", str(d), "--out", str(out), "--null", "20",
            "--bootstrap", "50", "--no-progress", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert "analysed 6 images" in r.stdout and "1 skipped" in r.stdout
    for name in ("metrics.parquet", "summary.csv", "images.csv", "manifest.json", "report.html"):
        assert (out / name).stat().st_size > 0
    assert Path(r.stdout.strip().splitlines()[-1].split("report: ")[-1]) == out / "report.html"
    assert not list(out.glob("*.part")), "no temporary files left behind"


def test_a_missing_c_compiler_is_one_warning_line_and_the_run_completes(tmp_path, tiny_vit):
    save_vit(tiny_vit, tmp_path / "model")
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    env = {**os.environ, "CC": "no-such-compiler", "SIFTLENS_CACHE": str(tmp_path / "cache")}
    env.pop("SIFTLENS_FUSED", None)
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", "analyze", "--model", str(tmp_path / "model"),
                        "--images", str(d), "--out", str(tmp_path / "out"), "--no-progress", "--no-report"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert "analysed 3 images" in r.stdout
    if platform.machine().lower() in ("x86_64", "amd64"):  # elsewhere the kernel is not tried at all
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines == ["warning: fused attention kernel unavailable: no C compiler (no-such-compiler); siftlens uses "
                         "the slower eager path"], r.stderr
