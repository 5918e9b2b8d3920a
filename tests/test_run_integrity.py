"""Runs that must survive damage (issue 22, items 0, 1, 6-11): image identity, the demo folder, damaged,
orphaned and foreign parts, a changed source on resume, merge safety, torchrun cleanup and fsync.

All on the built-in model and the bundled CIFAR-10 sample, a few images per run.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

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


# -- helpers for the damage tests ----------------------------------------------------------------------------
def summary_bytes(out: Path) -> bytes:
    return (out / "summary.csv").read_bytes()


def parts(out: Path, kind: str = "metrics.parquet") -> list[Path]:
    return sorted((out / kind).glob("part-*.parquet"))


class Interrupted(BaseException):
    """Stands in for a kill: raised instead of the k-th rename into the run folder."""


def interrupt_at(monkeypatch, out: Path, k: int) -> None:
    """Make the k-th ``os.replace`` into ``out`` (an atomic write's commit) raise :class:`Interrupted`."""
    real, count = os.replace, [0]

    def replace(src, dst, *a, **kw):
        if Path(dst).resolve().is_relative_to(out.resolve()):
            count[0] += 1
            if count[0] == k:
                raise Interrupted(f"write {k}")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    """An uninterrupted 12-image run in 3 parts: the reference every repaired run must equal."""
    out = tmp_path_factory.mktemp("clean") / "run"
    run(out, limit=12)
    assert len(parts(out)) == 3
    return out


def damaged_copy(clean: Path, dst: Path) -> Path:
    shutil.copytree(clean, dst)
    (dst / "manifest.json").unlink()
    (dst / "summary.csv").unlink()
    return dst


# -- item 6: a truncated or empty part is found, redone, and reported in one warning line --------------------
@pytest.mark.parametrize("kind", ["metrics.parquet", "images.parts"])
@pytest.mark.parametrize("damage", ["truncate", "zero"])
def test_a_damaged_part_is_redone_with_one_warning(clean, tmp_path, kind, damage):
    out = damaged_copy(clean, tmp_path / "d")
    p = parts(out, kind)[1]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2] if damage == "truncate" else b"")
    with pytest.warns(UserWarning, match=f"part {p.name} is damaged") as w:
        res = run(out, limit=12, resume=True)
    assert len([x for x in w if "damaged" in str(x.message)]) == 1
    assert summary_bytes(out) == summary_bytes(clean)
    assert len(res.images) == 12 and res.images["name"].is_unique


def test_cli_prints_one_warning_line_for_a_damaged_part(clean, tmp_path):
    import subprocess
    import sys

    out = damaged_copy(clean, tmp_path / "d")
    parts(out)[0].write_bytes(b"")
    args = ["analyze", "--model", "default", "--images", str(DEMO), "--limit", "12", "--batch-size", "4",
            "--part-size", "4", "--bootstrap", "200", "--explore", "0", "--overlays", "0", "--no-report",
            "--no-progress", "--out", str(out), "--resume"]
    r = subprocess.run([sys.executable, "-m", "siftlens.cli", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning:") and "damaged" in lines[0]
    assert summary_bytes(out) == summary_bytes(clean)


# -- item 7: a part missing either half is discarded and its images redone -----------------------------------
@pytest.mark.parametrize("kind", ["metrics.parquet", "images.parts"])
def test_a_part_missing_either_half_is_redone(clean, tmp_path, kind):
    out = damaged_copy(clean, tmp_path / "m")
    parts(out, kind)[1].unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = run(out, limit=12, resume=True)
    assert res.summary["n"].max() == 12 and res.manifest["images"]["analysed"] == 12
    assert summary_bytes(out) == summary_bytes(clean)


# -- item 8: resume refuses a source that changed since the run began ----------------------------------------
@pytest.mark.parametrize("change", ["rename", "modify"])
def test_resume_refuses_images_that_changed(tmp_path, monkeypatch, change):
    src = copy_images(tmp_path / "imgs", {f"{c}/{i}.jpg": f"{c}/000{i}.jpg" for c in ("cat", "dog", "ship")
                                          for i in range(2)})
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        interrupt_at(m, out, 3)  # run.json, then the first part's metrics and images: killed before the second
        with pytest.raises(Interrupted):
            run(out, src, part_size=2, batch_size=2)
    if change == "rename":
        os.rename(src / "dog" / "1.jpg", src / "dog" / "9.jpg")
    else:
        shutil.copy2(DEMO / "frog" / "0000.jpg", src / "ship" / "1.jpg")
    with pytest.raises(ConfigError, match="images of .* changed") as e:
        run(out, src, part_size=2, batch_size=2, resume=True)
    assert "\n" not in str(e.value)


# -- item 9: merge checks every shard before writing and builds the result beside out -------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("shards")
    for i in range(2):
        assert run(root / f"s{i}", limit=12, shard=(i, 2)) is None
    return [root / "s0", root / "s1"]


def nothing_written(out: Path) -> bool:
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_merge_refuses_duplicate_and_foreign_shards_before_writing(shards, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(ConfigError, match="given twice"):
        merge(out, [shards[0], shards[1], shards[0]], progress=False)
    assert nothing_written(out)
    twin = tmp_path / "s0-copy"
    shutil.copytree(shards[0], twin)
    with pytest.raises(ConfigError, match="shard 0 is in more than one folder"):
        merge(out, [shards[0], shards[1], twin], progress=False)
    foreign = tmp_path / "foreign"
    run(foreign, limit=10, shard=(1, 2))
    with pytest.raises(ConfigError, match="different"):
        merge(out, [shards[0], foreign], progress=False)
    assert nothing_written(out)


def test_a_failed_merge_leaves_nothing_and_a_retry_works(shards, clean, tmp_path, monkeypatch):
    out = tmp_path / "merged"
    with monkeypatch.context() as m:
        interrupt_at(m, out.parent, 2)  # the merged run.json lands, summary.csv does not
        with pytest.raises(Interrupted):
            merge(out, shards, progress=False)
    assert nothing_written(out)
    res = merge(out, shards, progress=False)
    assert res.out == out and len(res.images) == 12 and (out / "summary.csv").exists()
    assert summary_bytes(out) == summary_bytes(clean)


def test_merge_refuses_a_shard_with_a_damaged_part(shards, tmp_path):
    bad = tmp_path / "s1"
    shutil.copytree(shards[1], bad)
    p = parts(bad)[0]
    p.write_bytes(p.read_bytes()[:-20])
    with pytest.raises(ConfigError, match="damaged part .*--resume"):
        merge(tmp_path / "merged", [shards[0], bad], progress=False)
    assert nothing_written(tmp_path / "merged")


# -- item 10: under torchrun only rank 0 cleans up, before the other ranks start ------------------------------
def test_a_later_rank_does_not_delete_a_part_in_flight(tmp_path, monkeypatch):
    import siftlens.analysis.runner as run_mod
    from siftlens.devices import DistInfo

    out = tmp_path / "t"
    monkeypatch.setattr(run_mod, "init_distributed", lambda device: (DistInfo(0, 2), device))
    run(out, limit=12)
    in_flight = out / "metrics.parquet" / "part-0000-000099.parquet"  # rank 0 wrote its metrics, not yet its images
    shutil.copy2(parts(out)[0], in_flight)
    monkeypatch.setattr(run_mod, "init_distributed", lambda device: (DistInfo(1, 2), device))
    assert run(out, limit=12) is None
    assert in_flight.exists(), "rank 1 deleted rank 0's part in flight"


# -- item 11: a write is fsynced, renamed, and its folder fsynced -------------------------------------------
def test_atomic_write_fsyncs_file_then_renames_then_fsyncs_folder(tmp_path, monkeypatch):
    import stat

    from siftlens.io import write_text

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("fsync dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        return real_fsync(fd)

    def replace(src, dst):
        events.append("rename")
        return real_replace(src, dst)

    (tmp_path / "d").mkdir()
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    write_text(tmp_path / "d" / "a.txt", "hello")
    assert events == ["fsync file", "rename", "fsync dir"]
    assert (tmp_path / "d" / "a.txt").read_text() == "hello"


def test_a_zip_source_is_keyed_by_member_names_sizes_and_crcs(tmp_path):
    import zipfile

    def write_zip(members: dict[str, str], date=(2020, 1, 1, 0, 0, 0)) -> str:
        zp = tmp_path / "set.zip"
        with zipfile.ZipFile(zp, "w") as z:
            for name, demo in members.items():
                z.writestr(zipfile.ZipInfo(name, date), (DEMO / demo).read_bytes())
        return str(zp)

    base = {"cat/a.jpg": "cat/0000.jpg", "dog/b.jpg": "dog/0000.jpg"}
    first = ImageSource(write_zip(base)).fingerprint()
    assert ImageSource(write_zip(base, date=(2024, 5, 5, 0, 0, 0))).fingerprint() == first, "a re-zip is the same"
    assert ImageSource(write_zip({"cat/a.jpg": "cat/0000.jpg", "dog/c.jpg": "dog/0000.jpg"})).fingerprint() != first
    assert ImageSource(write_zip({"cat/a.jpg": "cat/0000.jpg", "dog/b.jpg": "dog/0001.jpg"})).fingerprint() != first


def test_resume_of_a_run_that_did_not_record_its_images_is_refused(tmp_path):
    import json

    out = tmp_path / "old"
    run(out, limit=4)
    desc = json.loads((out / "run.json").read_text())
    del desc["images"]["fingerprint"]  # as written before the images were recorded
    (out / "run.json").write_text(json.dumps(desc))
    with pytest.raises(ConfigError, match="older siftlens"):
        run(out, limit=4, resume=True)
