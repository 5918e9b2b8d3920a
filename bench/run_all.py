"""Run every benchmark and print one table of ratio vs target.

    python bench/run_all.py [--quick] [--only NAME ...] [--strict]

``--quick`` runs each benchmark's smoke mode (all of them in well under 5 minutes on a quiet 2-core machine);
without it, the full mode (about 20 minutes). Each benchmark runs in its own process at nice 19 and writes
``bench/results/<name>[-quick].json`` (atomically, with machine info); this script then writes
``bench/results/summary[-quick].json`` with every check and prints the table. ``--strict`` exits with 1 when a
check fails (the default is 0: on a shared machine a FAIL is information, not an error).

The pre-training benchmark runs only when the pre-training code is present (``siftlens.training.pretraining``), the
retrain one only when the shortcut benchmark's encoder is.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import _common as C

BENCHMARKS = ("keypoints", "attention_metrics", "memory", "data_loading", "pretrain_step", "retrain_step")


def available(name: str) -> bool:
    if name == "pretrain_step":
        src = C.ROOT / "src" / "siftlens"
        return (src / "training" / "masking.py").exists() and (src / "models" / "mae.py").exists()
    if name == "retrain_step":  # the shortcut benchmark's encoder, committed with it
        return (C.ROOT / "experiments" / "shortcut_benchmark" / "encoder" / "model" / "config.json").exists()
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke mode of every benchmark")
    ap.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    a = ap.parse_args(argv)
    C.be_nice()
    suffix = "-quick" if a.quick else ""
    t_all = time.perf_counter()
    checks, runs = [], {}
    for name in a.only or BENCHMARKS:
        if not available(name):
            print(f"== {name}: skipped (its code is not in this checkout)")
            runs[name] = {"status": "skipped"}
            continue
        print(f"== {name}{' (quick)' if a.quick else ''}", flush=True)
        t0 = time.time()
        cmd = [sys.executable, str(C.ROOT / "bench" / f"{name}.py")] + (["--quick"] if a.quick else [])
        p = subprocess.run(cmd, cwd=C.ROOT)
        seconds = time.time() - t0
        path = C.RESULTS / f"{name}{suffix}.json"
        if p.returncode or not path.exists() or path.stat().st_mtime < t0:
            print(f"   {name} failed (exit {p.returncode})", flush=True)
            runs[name] = {"status": "error", "exit": p.returncode, "seconds": round(seconds, 1)}
            checks.append(C.check(f"{name}: benchmark ran", None, 0.0, note=f"exit {p.returncode}"))
            continue
        res = json.loads(path.read_text())
        runs[name] = {"status": "ok", "seconds": round(seconds, 1), "result": path.name}
        checks += [dict(c, benchmark=name) for c in res.get("checks", [])]
    total = time.perf_counter() - t_all
    summary = {"mode": "quick" if a.quick else "full", "seconds": round(total, 1), "benchmarks": runs,
               "checks": checks}
    path = C.write_result("summary", summary, a.quick)
    print()
    print(C.format_table(checks))
    failed = sum(c["status"] in ("FAIL", "n/a") for c in checks)
    print(f"\n{len(checks)} rows, {sum(c['status'] == 'PASS' for c in checks)} PASS, {failed} FAIL or not measured; "
          f"{total:.0f} s in all; written {path}")
    return 1 if a.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
