#!/usr/bin/env bash
# GPU check of the analysis engine (run on a machine with CUDA, from the repository root):
#   1. HF ViT-B/16 (random init, 224) analysed on CUDA and on the CPU: the summaries must agree;
#   2. GPU images/s of the analysis (forward + capture + metrics + exact null) against a plain eager forward.
# Usage: bash bench/gpu/gpu_check.sh [N_IMAGES]   (default 64; needs ../shared/data/imagenet-samples-dev.zip)
# Writes bench/results/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-64}
PY=${PY:-.venv/bin/python}
DATA=${SIFTLENS_DATA:-../shared/data}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
MODEL=${MODEL:-bench/.cache/hf-vit-b16}
DEV=${DEV:-cuda}  # DEV=cpu: a dry run of the script on a machine without CUDA
[ -f "$MODEL/model.safetensors" ] || "$PY" scripts/make_random_hf_vit.py "$MODEL" --size b
[ -f bench/.cache/hf-vit-s16/model.safetensors ] || "$PY" scripts/make_random_hf_vit.py bench/.cache/hf-vit-s16 --size s
IMAGES=${IMAGES:-$DATA/imagenet-samples-dev.zip}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true

"$PY" -m siftlens.cli analyze --model "$MODEL" --images "$IMAGES" --limit "$N" --out "$WORK/cuda" \
    --device "$DEV" --batch-size 32 --workers 4 --no-report --no-progress
"$PY" -m siftlens.cli analyze --model "$MODEL" --images "$IMAGES" --limit "$N" --out "$WORK/cpu" \
    --device cpu --batch-size 16 --no-report --no-progress
# issue 26 item 4: the same images with the forward in bf16 (PRECISION_CHECK=0 skips it); compared below
if [ "${PRECISION_CHECK:-1}" = 1 ]; then
  "$PY" -m siftlens.cli analyze --model "$MODEL" --images "$IMAGES" --limit "$N" --out "$WORK/bf16" \
      --device "$DEV" --batch-size 32 --workers 4 --precision bf16 --no-report --no-progress
fi

"$PY" - "$WORK" "$MODEL" "$IMAGES" "$N" "$DEV" <<'PY'
import json, os, sys, time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, "bench")
from _common import machine_info  # noqa: E402

from siftlens.analysis import AnalysisConfig, configure
from siftlens.loading import KeypointDataset
from siftlens.keypoints import sift_params
from siftlens.analysis.engine import RunPlan, analyse_batch
from siftlens.data import ImageSource
from siftlens.io import write_json
from siftlens.models import load_backend

work, model, images, n, dev = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
key = ["layer", "head", "metric", "level_a", "level_b"]
a = pd.read_csv(work / "cuda" / "summary.csv").sort_values(key).reset_index(drop=True)
b = pd.read_csv(work / "cpu" / "summary.csv").sort_values(key).reset_index(drop=True)
same_cells = a[key].equals(b[key])
diff = {c: float(np.max(np.abs(a[c] - b[c]))) for c in ("mean", "ci_lo", "ci_hi", "null_mean", "null_sd", "z")}

def best_of(fn, k=5):
    fn()
    times = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def sync():
    if dev == "cuda":
        torch.cuda.synchronize()


def ratio(model_path: str, batch: int = 32) -> dict:
    """Analysis (forward + capture + metrics + exact null) against a plain eager forward, same batch."""
    backend = load_backend(model_path, dev)
    cfg = configure(None, device=dev)
    ds = KeypointDataset(ImageSource(images, limit=batch), backend, cfg, sift_params(backend.input_size, cfg.sift))
    items = [it for it in (ds[i] for i in range(len(ds))) if "skip" not in it]
    names = [str(i) for i in range(len(items))]
    plan = RunPlan.build(backend, cfg)
    pixels = torch.from_numpy(np.stack([it["pixels"] for it in items]))

    def forward():
        with torch.inference_mode(), backend.eager():
            backend.forward(backend.normalize(pixels))
        sync()

    def analysis():
        analyse_batch(plan, items, names)
        sync()

    tf, ta = best_of(forward), best_of(analysis)
    return {"batch": len(items), "forward_images_per_s": len(items) / tf, "analysis_images_per_s": len(items) / ta,
            "analysis_over_forward": ta / tf}


def precision_check() -> dict | None:
    """bf16 against fp32 on the same device: the share of cells whose bf16 mean lies in fp32's 95% bootstrap CI."""
    if not (work / "bf16" / "summary.csv").exists():
        return None
    c = pd.read_csv(work / "bf16" / "summary.csv")
    m = a.merge(c, on=key, suffixes=("", "_bf16")).dropna(subset=["mean", "mean_bf16"])
    inside = (m["mean_bf16"] >= m["ci_lo"] - 1e-6) & (m["mean_bf16"] <= m["ci_hi"] + 1e-6)
    return {"cells": len(m), "inside_fp32_ci": int(inside.sum()), "share_inside": float(inside.mean()),
            "max_abs_diff_mean": float((m["mean_bf16"] - m["mean"]).abs().max())}


res = {"benchmark": "gpu_check", "machine": machine_info(), "bf16_vs_fp32": precision_check(),
       "gpu": torch.cuda.get_device_name(0) if dev == "cuda" else None,
       "images": n, "cuda_vs_cpu_same_cells": same_cells, "cuda_vs_cpu_max_abs_diff": diff, **ratio(model),
       "ratio_by_model": {m: ratio(m) for m in os.environ.get("RATIO_MODELS", model).split(",")}}
print(json.dumps(res, indent=2))
write_json("bench/results/gpu_check.json" if dev == "cuda" else f"{work}/gpu_check.json", res)
ok = same_cells and diff["mean"] <= 1e-3 + 1e-9 and diff["z"] < 0.05 * max(1.0, float(np.abs(b["z"]).max()))
sys.exit(0 if ok else 1)
PY
