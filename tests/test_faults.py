"""Fault injection (issue 22): a small run interrupted at every atomic write, and parts damaged in 20 seeded
ways; every resume (or merge) must end with a summary.csv byte-identical to the undisturbed run's.

The run: the built-in model on 12 bundled images in 3 parts of 4. Its atomic writes, in order: run.json,
then metrics and images part of each of the 3 parts, then summary.csv, images.csv and manifest.json (10).
"""

from __future__ import annotations

import functools
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest

import siftlens
from siftlens.analysis import analyze, merge
from siftlens.errors import ConfigError
from siftlens.models import load_backend

ARGS = {"limit": 12, "part_size": 4, "batch_size": 4, "n_boot": 50, "explore": 0, "overlays": 0, "progress": False}
WRITES = ["run.json"] + [f"{kind}/part-0000-00000{i}.parquet" for i in range(3)
                         for kind in ("metrics.parquet", "images.parts")] + ["summary.csv", "images.csv",
                                                                            "manifest.json"]
DAMAGES = 20
DEMO = Path(siftlens.__file__).parent / "assets" / "demo_images"


@functools.cache
def model():
    """The built-in model, loaded once for the whole suite."""
    return load_backend("default", "cpu")


def run(out: Path, **kw):
    return analyze(model(), str(DEMO), out=out, **{**ARGS, **kw})


class Killed(BaseException):
    """Raised in place of the k-th commit (rename) of an atomic write into the run folder."""


def kill_at(monkeypatch, out: Path, k: int, leave_temp: bool, log: list | None = None) -> None:
    """Make the k-th ``os.replace`` into ``out`` raise :class:`Killed`; ``leave_temp`` also leaves a copy of
    the temporary file behind, as a SIGKILL would (atomic_path deletes its own on an exception)."""
    real, count = os.replace, [0]

    def replace(src, dst, *a, **kw):
        if Path(dst).resolve().is_relative_to(out.resolve()):
            count[0] += 1
            if log is not None:
                log.append(Path(dst).resolve().relative_to(out.resolve()).as_posix())
            if count[0] == k:
                if leave_temp:
                    shutil.copy2(src, f"{src}.killed.part")
                raise Killed(f"write {k}")
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "clean"
    log: list[str] = []
    with pytest.MonkeyPatch.context() as m:
        kill_at(m, out, 0, False, log)
        run(out)
    assert log == WRITES, "the write points this suite walks through"
    return out


def quiet_resume(out: Path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run(out, resume=True, **kw)


def test_a_run_interrupted_at_every_write_resumes_to_the_same_summary(clean, tmp_path, monkeypatch):
    for k in range(1, len(WRITES) + 1):
        out = tmp_path / f"k{k}"
        with monkeypatch.context() as m:
            kill_at(m, out, k, leave_temp=k % 2 == 0)
            with pytest.raises(Killed):
                run(out)
        assert not (out / "summary.csv").exists() or k > WRITES.index("summary.csv")
        quiet_resume(out)
        assert (out / "summary.csv").read_bytes() == (clean / "summary.csv").read_bytes(), f"killed at write {k}"
        assert (out / "images.csv").read_bytes() == (clean / "images.csv").read_bytes(), f"killed at write {k}"
        assert not list(out.rglob("*.part")), f"temporary files left after a kill at write {k}"


def damage(path: Path, how: str, rng: random.Random) -> None:
    """Damage one part file: cut it short, empty it, flip a few bytes, or delete it."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif how == "zero":
        path.write_bytes(b"")
    elif how == "flip":
        for pos in rng.sample(range(len(data)), rng.randint(1, 4)):
            data[pos] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
    else:
        path.unlink()


def damage_plan(seed: int) -> tuple[str, str, int]:
    rng = random.Random(seed)
    return (rng.choice(["truncate", "zero", "flip", "delete"]), rng.choice(["metrics.parquet", "images.parts"]),
            rng.randrange(3))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[Path], bytes]:
    """Two finished shards of the run, and the summary.csv of their undisturbed merge."""
    root = tmp_path_factory.mktemp("fault-shards")
    dirs = [root / "s0", root / "s1"]
    for i, d in enumerate(dirs):
        run(d, shard=(i, 2), part_size=2, batch_size=2)
    merge(root / "merged", dirs, progress=False)
    return dirs, (root / "merged" / "summary.csv").read_bytes()


@pytest.mark.parametrize("seed", range(DAMAGES))
def test_a_damaged_part_is_recovered_by_resume_or_refused_by_merge(clean, shards, tmp_path, seed):
    how, kind, which = damage_plan(seed)
    rng = random.Random(1000 + seed)
    if seed % 2 == 0:  # a finished run: --resume redoes the damaged part
        out = tmp_path / "run"
        shutil.copytree(clean, out)
        damage(sorted((out / kind).glob("part-*.parquet"))[which], how, rng)
        quiet_resume(out)
        assert (out / "summary.csv").read_bytes() == (clean / "summary.csv").read_bytes(), (how, kind, which)
        return
    # a shard: merge refuses it (one line) unless the damage left its data intact; --resume on the shard repairs it
    dirs, merged = shards
    bad = tmp_path / "s1"
    shutil.copytree(dirs[1], bad)
    damage(sorted((bad / kind).glob("part-*.parquet"))[which], how, rng)
    try:
        merge(tmp_path / "m1", [dirs[0], bad], progress=False)
    except ConfigError as e:
        assert "\n" not in str(e) and "--resume" in str(e)
        assert not (tmp_path / "m1").exists()
        quiet_resume(bad, shard=(1, 2), part_size=2, batch_size=2)
        merge(tmp_path / "m1", [dirs[0], bad], progress=False)
    assert (tmp_path / "m1" / "summary.csv").read_bytes() == merged, (how, kind, which)
