"""--precision (issue 26 item 4) and the loader's pace (item 2): bf16 against fp32 on the demo images, the one-line
refusal of fp16 on the CPU, the workers' default, the prefetcher and the SIFT-bound note."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from siftlens.analysis import analyze
from siftlens.analysis.prefetch import Prefetcher, default_workers, pace_note
from siftlens.errors import ConfigError
from siftlens.jobs import demo_images_dir

KEY = ["layer", "head", "metric", "level_a", "level_b"]


def _run(tmp_path, name, **kw):
    opts = {"limit": 32, "batch_size": 32, "n_boot": 200, "explore": 0, "overlays": 0, **kw}
    return analyze("default", str(demo_images_dir()), out=tmp_path / name, progress=False, **opts)


def test_bf16_summary_agrees_with_fp32_within_the_bootstrap_ci(tmp_path):
    a = _run(tmp_path, "fp32")
    b = _run(tmp_path, "bf16", precision="bf16")
    assert b.manifest["params"]["precision"] == "bf16"
    m = a.summary.merge(b.summary, on=KEY, suffixes=("_32", "_16")).dropna(subset=["mean_32", "mean_16"])
    assert len(m) == len(a.summary.dropna(subset=["mean"]))
    assert (m["mean_32"] != m["mean_16"]).any()  # the forward did run in bf16
    # every cell's bf16 mean inside fp32's 95% bootstrap interval (widened by float32 rounding of its ends)
    slack = 1e-6 * np.maximum(1.0, np.abs(m["mean_32"]))
    inside = (m["mean_16"] >= m["ci_lo_32"] - slack) & (m["mean_16"] <= m["ci_hi_32"] + slack)
    assert inside.all(), m.loc[~inside, KEY + ["mean_32", "mean_16", "ci_lo_32", "ci_hi_32"]].head().to_string()


def test_fp16_on_the_cpu_is_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="fp16 is not supported on the CPU") as e:
        _run(tmp_path, "fp16", precision="fp16")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="--precision must be one of"):
        _run(tmp_path, "x", precision="fp8")


def test_workers_default_to_the_free_cores_on_a_gpu_only(tmp_path):
    assert default_workers("cpu") == 0
    assert default_workers("cuda") >= 0 and default_workers("cuda", world=10**6) == 0
    res = _run(tmp_path, "w", limit=4, batch_size=4)
    assert res.manifest["params"]["run"]["workers"] == 0  # resolved and recorded: 0 on the CPU


def test_the_prefetcher_yields_every_batch_in_order_and_times_the_waits():
    def slow():
        for k in range(3):
            time.sleep(0.05)
            yield [{"index": k, "pixels": np.zeros((2, 2, 3), np.uint8)}]

    p = Prefetcher(slow(), torch.device("cpu"))
    got = [b.items[0]["index"] for b in p]
    assert got == [0, 1, 2] and not p.stage
    assert p.wait_s >= 0.15


def test_the_progress_bar_says_when_sift_is_the_bottleneck():
    assert pace_note(10.0, 4.0, 5, 2).startswith("SIFT-bound: add --workers (now 2")
    assert pace_note(4.0, 10.0, 5, 2) == ""
    assert pace_note(10.0, 4.0, 1, 2) == ""  # not from the first batch alone
