"""Which training images do the label-free error sets pick? (a diagnostic of JTT and of ``--error-set discovery``)

For each kind of a run.py working folder and each build (shortcut, control): the images that JTT upweights (its
``jtt-<build>/weights.csv``: the ERM model's training errors) and those that ``anchor-jtt --error-set discovery``
would upweight (the images carrying another class's flagged candidates of ``discover-<build>/discovery.json``,
computed here with the package's own rule, no training), each compared with the true conflicting images of the
build's ``markers.json``: size, precision (share of the set that is conflicting) and recall (share of the
conflicting images in the set). Group labels are read only to score the sets, never to make them.

    python experiments/shortcut_benchmark/error_sets.py runs/shortcut-bench-seed2 --jtt-only \
        --out experiments/shortcut_benchmark/results/error-sets-seed2.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch

from siftlens.data import ImageSource
from siftlens.models import load_backend
from siftlens.options import build
from siftlens.shortcuts.anchors import JTTConfig, flagged_conflicting
from siftlens.shortcuts.discovery.features import model_labels
from siftlens.shortcuts.groups import read_sidecar

KINDS = ("glyphs", "imagenet", "large", "watermark")


def scored(chosen: set[str], conflicting: set[str], n: int) -> dict:
    """Size, precision and recall of the set ``chosen`` against the true ``conflicting`` images (of ``n``)."""
    hit = len(chosen & conflicting)
    return {"size": len(chosen), "share": round(len(chosen) / n, 4),
            "precision": round(hit / len(chosen), 4) if chosen else None,
            "recall": round(hit / len(conflicting), 4) if conflicting else None}


def jtt_set(folder: Path) -> set[str] | None:
    """The images a finished JTT run upweighted (None: JTT did not run there)."""
    path = folder / "weights.csv"
    if not path.exists():
        return None
    with path.open() as f:
        return {r["name"] for r in csv.DictReader(f) if r["error"] == "True"}


def discovery_set(kind: Path, name: str) -> set[str]:
    """The images ``anchor-jtt --error-set discovery`` upweights on this build (the benchmark's flag options)."""
    erm, images = kind / f"erm-{name}" / "model", kind / f"{name}-data" / "train"
    cfg = build(JTTConfig, {"identifier": str(erm), "error_set": "discovery",
                            "candidates": str(kind / f"discover-{name}" / "discovery.json")})
    source = ImageSource(str(images))
    y = model_labels(source, load_backend(str(erm)))
    mask = flagged_conflicting(cfg, source, source.names, y, progress=False)
    return {n for n, m in zip(source.names, mask, strict=True) if m}


def one_build(kind: Path, name: str, with_discovery: bool = True) -> dict:
    side = read_sidecar(kind / f"{name}-data" / "train" / "markers.json")["images"]
    conflicting = {n for n, r in side.items() if not r["aligned"]}
    sets = {"discovery": discovery_set(kind, name) if with_discovery else None,
            "jtt_errors": jtt_set(kind / f"jtt-{name}")}
    return {"images": len(side), "conflicting": len(conflicting),
            **{k: scored(v, conflicting, len(side)) for k, v in sets.items() if v is not None}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="a run.py working folder (runs/shortcut-bench-<tag>)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", required=True, help="JSON to write")
    ap.add_argument("--jtt-only", action="store_true",
                    help="score JTT's sets only (a CSV read; discovery's runs SIFT and the flag rule on every image)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    out = {"work": a.work, "kinds": {}}
    for k in a.kinds.split(","):
        out["kinds"][k] = {name: one_build(Path(a.work) / k, name, not a.jtt_only) for name in ("shortcut", "control")}
        print(k, json.dumps(out["kinds"][k]), flush=True)
    Path(a.out).write_text(json.dumps(out, indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
