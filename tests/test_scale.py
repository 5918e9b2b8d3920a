"""Dataset-scale runs: parts on disk, resume after SIGKILL, shards + merge, torchrun, keyed randomness.

All on the built-in model and the bundled CIFAR-10 sample (real images, real attention).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _dist import torchrun

from siftlens.analysis import analyze, merge, read_long
from siftlens.core.stats import bootstrap_ci
from siftlens.errors import ConfigError
from siftlens.jobs import demo_images_dir

DEMO = str(demo_images_dir())
KEY = ["layer", "head", "metric", "level_a", "level_b"]
CLI = [sys.executable, "-m", "siftlens.cli"]


def summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv").sort_values(KEY).reset_index(drop=True)


def assert_same_summary(a: pd.DataFrame, b: pd.DataFrame, rtol=1e-5, atol=1e-6) -> None:
    assert len(a) == len(b) and len(a) > 100
    pd.testing.assert_frame_equal(a[KEY], b[KEY])
    for col in ("n", "mean", "ci_lo", "ci_hi", "null_mean", "null_sd", "z"):
        np.testing.assert_allclose(a[col], b[col], rtol=rtol, atol=atol, err_msg=col)


def run(out, **kw):
    kw = {"limit": 60, "progress": False, **kw}
    return analyze("default", DEMO, out=out, **kw)


@pytest.mark.parametrize("null", ["exact", 20])
def test_summary_does_not_depend_on_batch_size_workers_or_part_size(tmp_path, null):
    run(tmp_path / "a", null=null, batch_size=7, part_size=10)
    run(tmp_path / "b", null=null, batch_size=32, workers=2, rollout=False)
    assert_same_summary(summary(tmp_path / "a"), summary(tmp_path / "b"))
    assert len(list((tmp_path / "a" / "metrics.parquet").glob("part-*.parquet"))) == 5  # 14, 14, 14, 14, 4 images


def test_resume_after_sigkill_gives_the_same_summary(tmp_path):
    args = ["analyze", "--model", "default", "--images", DEMO, "--batch-size", "4", "--part-size", "8",
            "--no-report", "--no-progress", "--limit", "120"]
    subprocess.run([*CLI, *args, "--out", str(tmp_path / "whole")], check=True, capture_output=True)
    cut = tmp_path / "cut"
    proc = subprocess.Popen([*CLI, *args, "--out", str(cut)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list((cut / "images.parts").glob("part-*")) and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.4))  # somewhere in the middle of the run
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(pd.concat([pd.read_parquet(p) for p in (cut / "images.parts").glob("part-*")]))
    assert 0 < done < 120, "the kill should land mid-run"
    assert not (cut / "summary.csv").exists()
    again = subprocess.run([*CLI, *args, "--out", str(cut)], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    subprocess.run([*CLI, *args, "--out", str(cut), "--resume"], check=True, capture_output=True)
    assert_same_summary(summary(tmp_path / "whole"), summary(cut))
    images = pd.read_csv(cut / "images.csv")
    assert len(images) == 120 and images["name"].is_unique


def test_orphan_part_is_removed_and_its_images_redone(tmp_path):
    out = tmp_path / "o"
    run(out, limit=24, part_size=8)
    parts = sorted((out / "images.parts").glob("part-*"))
    parts[-1].unlink()  # as if the run died between writing the metrics part and committing it
    (out / "manifest.json").unlink()
    res = run(out, limit=24, part_size=8, resume=True)
    assert res.images["name"].is_unique and len(res.images) == 24
    long = read_long(out)
    assert long.groupby(["image", "layer", "head", "metric", "level_a", "level_b"]).size().max() == 1


def test_finished_run_is_not_overwritten_and_resume_checks_options(tmp_path):
    out = tmp_path / "f"
    run(out, limit=12)
    before = (out / "summary.csv").read_bytes()
    with pytest.raises(ConfigError, match="already holds a finished analysis"):
        run(out, limit=12)
    with pytest.raises(ConfigError, match="differ"):
        run(out, limit=12, scheme="response", resume=True)
    assert (out / "summary.csv").read_bytes() == before


def test_three_shards_merged_equal_one_run(tmp_path):
    run(tmp_path / "one")
    shards = []
    for i in range(3):
        d = tmp_path / f"s{i}"
        assert run(d, shard=(i, 3), batch_size=5) is None
        shards.append(d)
    with pytest.raises(ConfigError, match="every finished shard"):
        merge(tmp_path / "partial", shards[:2], progress=False)
    res = merge(tmp_path / "merged", shards, progress=False)
    assert_same_summary(summary(tmp_path / "one"), summary(tmp_path / "merged"))
    one = pd.read_csv(tmp_path / "one" / "images.csv")
    pd.testing.assert_frame_equal(one, pd.read_csv(tmp_path / "merged" / "images.csv"))
    assert len(res.overlays) == 4  # the model was reloaded from run.json for the report's figures


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    run(tmp_path / "one")
    r = torchrun(["analyze", "--model", "default", "--images", DEMO, "--out", str(tmp_path / "two"), "--limit", "60",
                  "--no-report", "--no-progress"], tmp_path / "logs")
    assert r.returncode == 0, r.stderr
    assert_same_summary(summary(tmp_path / "one"), summary(tmp_path / "two"))
    shards = {p.name.split("-")[1] for p in (tmp_path / "two" / "metrics.parquet").glob("part-*")}
    assert shards == {"0000", "0001"}, "each rank wrote its own parts"
    assert r.stdout.count("analysed 60 images") == 1, "only rank 0 reports"


def test_online_poisson_ci_agrees_with_exact_bootstrap(tmp_path):
    res = run(tmp_path / "ci", limit=200, n_boot=4000)
    long = res.long
    s = res.summary.set_index(KEY)
    widths, errs = [], []
    for key, grp in long[long["head"] == -1].groupby(KEY):
        v = grp["value"].to_numpy(np.float64)
        lo, hi = bootstrap_ci(v, n_boot=4000, seed=1)
        row = s.loc[key]
        widths.append(hi - lo)
        errs.append(max(abs(row["ci_lo"] - lo), abs(row["ci_hi"] - hi)))
    widths, errs = np.array(widths), np.array(errs)
    assert len(widths) > 100
    assert np.median(errs / widths) < 0.05 and np.all(errs <= 0.2 * widths)


def test_rollout_multiplies_every_layer_whatever_subset_is_analysed(tmp_path):
    all_layers = run(tmp_path / "all", limit=16, rollout=True).summary
    subset = run(tmp_path / "sub", limit=16, rollout=True, layers=[0]).summary
    depth = 6
    a = all_layers[all_layers["layer"] == depth].sort_values(KEY).reset_index(drop=True)
    b = subset[subset["layer"] == depth].sort_values(KEY).reset_index(drop=True)
    assert len(a) > 10 and set(subset["layer"]) == {0, depth}
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=1e-6)
