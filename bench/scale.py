"""Dataset-scale analysis: peak memory and throughput against the number of images, kill-and-resume, 2 ranks.

    python bench/scale.py                      # built-in model and HF ViT-S/16 at 224, 2,000 / 5,000 / 20,000 images
    python bench/scale.py --models default --sizes 2000,20000
    python bench/scale.py --quick              # 200 / 500 images, built-in model only (a smoke run)
    python bench/scale.py --fsync-rounds 5 --sizes 2000   # what durable writes cost: with / without fsync

Every analysis runs as its own ``siftlens analyze`` process (``--null exact``, no report) on CIFAR-10 training
images from ../shared/data (upsampled to 224 by the ViT-S/16's own preprocessing); its peak resident memory
is the child's ``ru_maxrss``. The memory target: peak RSS at the largest size within 15% of the smallest.
Checks on the built-in model at the smallest size: a run killed with SIGKILL mid-way and resumed gives the
summary of an uninterrupted run; ``torchrun --nproc_per_node 2`` (gloo) gives the summary of one process.
Results: bench/results/scale[-quick].json. ``--fsync-rounds K`` instead runs the first model and size K times
with fsync (the library as it is) and K times without (bench/_nofsync on PYTHONPATH), alternating, and writes
the median per-round throughput ratio to bench/results/scale-fsync.json (target: at most 3% slower).
Timings are only meaningful on a quiet machine (the load average
is recorded with them).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from _common import CACHE, CIFAR_ZIP, check, format_table, hf_backend, write_result

KEY = ["layer", "head", "metric", "level_a", "level_b"]
MODELS = {"default": "default", "vit-s": None}  # vit-s: a random HF ViT-S/16, written to bench/.cache once


def model_spec(name: str) -> str:
    if name == "vit-s":
        hf_backend("s")  # writes the folder if needed
        return str(CACHE / "hf-vit-s16")
    return MODELS[name]


def analyse_cmd(model: str, n: int, out: Path, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "siftlens.cli", "analyze", "--model", model, "--images",
            f"{CIFAR_ZIP}/cifar10/train", "--limit", str(n), "--out", str(out), "--no-report", "--no-progress",
            "--workers", "1", *extra]


def run_measured(cmd: list[str], env: dict | None = None) -> dict:
    """Run ``cmd``; its wall time and the peak RSS of the process tree's largest member (ru_maxrss)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({code}): {err[-1500:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1), "stdout": out.strip()}


def summary(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "summary.csv").sort_values(KEY).reset_index(drop=True)


def max_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest relative difference ``|x - y| / max(1, |x|)`` of mean, CI, null moments and z between two
    summaries of the same cells (summary.csv holds 6 significant digits; float32 sums of differently
    composed batches differ in the last digits)."""
    if len(a) != len(b) or not a[KEY].equals(b[KEY]):
        return float("inf")
    cols = ["mean", "ci_lo", "ci_hi", "null_mean", "null_sd", "z"]
    x, y = a[cols].to_numpy(), b[cols].to_numpy()
    return float(np.nanmax(np.abs(x - y) / np.maximum(1.0, np.abs(x))))


def kill_and_resume(model: str, n: int, whole: Path, work: Path) -> dict:
    """SIGKILL a run at a random point after its first part, resume it, compare with ``whole``."""
    out = work / "killed"
    cmd = analyse_cmd(model, n, out, ["--part-size", "128"])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list((out / "images.parts").glob("part-*")):
        time.sleep(0.05)
    delay = random.Random().uniform(0.0, 3.0)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    parts = list((out / "images.parts").glob("part-*"))
    done = int(sum(len(pd.read_parquet(p)) for p in parts))
    resumed = run_measured([*cmd, "--resume"])
    return {"images_done_when_killed": done, "killed_after_first_part_s": round(delay, 2),
            "resume_wall_s": resumed["wall_s"], "max_rel_diff": max_diff(summary(whole), summary(out))}


def two_ranks(model: str, n: int, whole: Path, work: Path) -> dict:
    out = work / "two-ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "siftlens.cli",
           *analyse_cmd(model, n, out)[3:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = run_measured(cmd, env=env)
    return {"wall_s": r["wall_s"], "max_rel_diff": max_diff(summary(whole), summary(out))}


def fsync_cost(model: str, n: int, rounds: int, work: Path) -> dict:
    """``rounds`` alternating pairs of the same analysis with and without fsync; per-round throughput ratios."""
    no_fsync = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent / "_nofsync"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    pairs = []
    for k in range(rounds):
        walls = {}
        for side in (("fsync", "no_fsync") if k % 2 == 0 else ("no_fsync", "fsync")):
            out = work / f"fsync-{k}-{side}"
            env = no_fsync if side == "no_fsync" else None
            walls[side] = run_measured(analyse_cmd(model, n, out), env=env)["wall_s"]
            shutil.rmtree(out, ignore_errors=True)
        pairs.append({**walls, "load_average": list(os.getloadavg())})
        print(pairs[-1], flush=True)
    slowdown = float(np.median([p["fsync"] / p["no_fsync"] for p in pairs]))
    return {"model": model, "images": n, "rounds": pairs, "median_wall_ratio_fsync_over_no_fsync": round(slowdown, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 / 500 images, built-in model only")
    ap.add_argument("--models", default=None, help="comma-separated: default, vit-s")
    ap.add_argument("--sizes", default=None, help="comma-separated image counts")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (in a temporary directory)")
    ap.add_argument("--checks-only", action="store_true",
                    help="rerun only the kill-and-resume and 2-rank checks; keep the runs of the last result file")
    ap.add_argument("--fsync-rounds", type=int, default=0, metavar="K",
                    help="only measure what fsync costs: K alternating pairs of the first model and size")
    a = ap.parse_args()
    if not CIFAR_ZIP.is_file():
        sys.exit(f"CIFAR-10 not found at {CIFAR_ZIP}")
    models = (a.models or ("default" if a.quick else "default,vit-s")).split(",")
    sizes = [int(s) for s in (a.sizes or ("200,500" if a.quick else "2000,5000,20000")).split(",")]
    work = Path(tempfile.mkdtemp(prefix="siftlens-scale-"))
    if a.fsync_rounds:
        try:
            res = fsync_cost(model_spec(models[0]), sizes[0], a.fsync_rounds, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ratio = res["median_wall_ratio_fsync_over_no_fsync"]
        checks = [check("throughput with fsync / without: wall-time ratio", ratio, 1.03)]
        print(format_table(checks))
        path = write_result("scale-fsync", {**res, "checks": checks,
                                            "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]])}, False)
        print(f"results: {path}")
        return
    runs, checks, extra = [], [], {}
    if a.checks_only:
        from _common import RESULTS

        old = json.loads((RESULTS / f"scale{'-quick' if a.quick else ''}.json").read_text())
        runs, checks = old["runs"], [c for c in old["checks"] if "peak RSS" in c["name"]]
        extra["runs_command"] = old.get("runs_command", old.get("command"))
        models = []
        run_measured(analyse_cmd("default", sizes[0], work / f"default-{sizes[0]}"))
    try:
        for m in models:
            spec = model_spec(m)
            for n in sizes:
                out = work / f"{m}-{n}"
                load = list(os.getloadavg())
                r = run_measured(analyse_cmd(spec, n, out))
                rec = {"model": m, "images": n, **{k: r[k] for k in ("wall_s", "peak_rss_mb")},
                       "images_per_s": round(n / r["wall_s"], 2), "load_average_before": load}
                runs.append(rec)
                print(rec, flush=True)
            small, large = (next(x for x in runs if x["model"] == m and x["images"] == s)
                            for s in (sizes[0], sizes[-1]))
            checks.append(check(f"{m}: peak RSS at {sizes[-1]} / at {sizes[0]} images",
                                large["peak_rss_mb"] / small["peak_rss_mb"], 1.15))
        whole = work / f"default-{sizes[0]}"
        if "default" in models or a.checks_only:
            extra["kill_and_resume"] = kr = kill_and_resume("default", sizes[0], whole, work)
            checks.append(check("kill + resume: max relative summary difference", kr["max_rel_diff"], 1e-4))
            extra["two_ranks"] = tr = two_ranks("default", sizes[0], whole, work)
            checks.append(check("2 gloo ranks vs 1 process: max relative summary difference", tr["max_rel_diff"], 1e-4))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(format_table(checks))
    path = write_result("scale", {"runs": runs, "checks": checks, **extra,
                                  "command": " ".join(["python", "bench/scale.py", *sys.argv[1:]])}, a.quick)
    print(f"results: {path}")


if __name__ == "__main__":
    main()
