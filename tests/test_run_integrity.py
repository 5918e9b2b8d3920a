"""Runs that must survive damage (issue 22, items 0, 1, 6-11): image identity, the demo folder, damaged,
orphaned and foreign parts, a changed source on resume, merge safety, torchrun cleanup and fsync.

All on the built-in model and the bundled CIFAR-10 sample, a few images per run.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest

from siftlens.analysis import analyze, merge
from siftlens.data import ImageSource
from siftlens.errors import ConfigError, ImageSourceError
from siftlens.jobs import demo_images_dir, run_demo

DEMO = demo_images_dir()
FAST = {"progress": False, "n_boot": 200, "explore": 0, "overlays": 0, "batch_size": 4, "part_size": 4}


def run(out, images=DEMO, **kw):
    return analyze("default", images if isinstance(images, list) else str(images), out=out, **{**FAST, **kw})


def copy_images(dst: Path, layout: dict[str, str]) -> Path:
    """Copy demo images into ``dst``: ``layout`` maps a new relative path to a demo image's relative path."""
    for new, old in layout.items():
        (dst / new).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(DEMO / old, dst / new)
    return dst


# -- item 1: an image's identity is its path relative to the source root -------------------------------------
SAME_NAME = {"a/x.jpg": "cat/0000.jpg", "b/x.jpg": "dog/0000.jpg", "b/y.jpg": "ship/0000.jpg"}


@pytest.mark.parametrize("how", ["glob", "file list"])
def test_images_with_one_file_name_in_two_folders_are_three_images(tmp_path, how):
    root = copy_images(tmp_path / "imgs", SAME_NAME)
    images = str(root / "*" / "*.jpg") if how == "glob" else [str(root / p) for p in SAME_NAME]
    res = run(tmp_path / "out", images)
    assert res.summary["n"].max() == 3
    assert sorted(res.images["name"]) == sorted(SAME_NAME)
    assert set(res.long["image"]) == set(SAME_NAME)


def test_demo_glob_counts_every_analysed_image(tmp_path):
    res = run(tmp_path / "out", f"{DEMO}/*/000[01].jpg", part_size=64, batch_size=20)
    analysed = res.manifest["images"]["analysed"]
    assert analysed == 20 and res.summary["n"].max() == analysed


def test_names_of_folders_zips_and_single_folder_globs_are_unchanged(tmp_path):
    assert ImageSource(DEMO).names[:2] == ["airplane/0000.jpg", "airplane/0001.jpg"]
    assert ImageSource(f"{DEMO}/cat/*.jpg").names[0] == "0000.jpg"
    assert ImageSource([DEMO / "cat" / "0000.jpg", DEMO / "cat" / "0001.jpg"]).names == ["0000.jpg", "0001.jpg"]
    with pytest.raises(ImageSourceError, match="twice"):
        ImageSource([DEMO / "cat" / "0000.jpg", DEMO / "cat" / "0000.jpg"])


# -- item 0: the demo never deletes a folder it did not make -------------------------------------------------
def test_demo_refuses_a_users_folder_and_rebuilds_its_own(tmp_path):
    mine = tmp_path / "analysis"
    run(mine, limit=4)
    before = sorted(p.name for p in mine.iterdir())
    with pytest.raises(ConfigError, match="not made by 'siftlens demo'") as e:
        run_demo(mine, progress=False, limit=4, n_boot=50, explore=0, overlays=0)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in mine.iterdir()) == before
    demo = tmp_path / "demo"
    for _ in range(2):  # absent, then an earlier demo: rebuilt
        res, _paths = run_demo(demo, progress=False, limit=4, n_boot=50, explore=0, overlays=0)
        assert res.manifest["images"]["total"] == 4 and (demo / ".siftlens-demo").is_file()
