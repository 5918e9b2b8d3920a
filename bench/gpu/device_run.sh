#!/usr/bin/env bash
# The one prepared run on a borrowed GPU machine (1 GPU, 16 CPU cores, no network), from the repository root,
# with the data subsets of bench/gpu/device_data.py in .devdata/ and PYTHONPATH=src (no install needed there).
#   1. bench/gpu/gpu_check.sh: HF ViT-B/16 analysed on CUDA against the CPU; analysis vs plain forward (issue 10);
#   2. experiments/guided_training/guided_training.py --scale gpu: the MAE and token-dropping studies;
#   3. bench/gpu.py (issue 26): torch.profiler summary of one ViT-B/16 batch of 128, fp32 and bf16.
# For issue 26 alone (no training study, the GPU quiet for the timings):
#   OUT=/tmp/out SKIP_GUIDED=1 BUDGET=0 bash bench/gpu/device_run.sh
# Everything runs side by side; results and small logs go to $OUT (histories as one tar.gz).
#   OUT=/tmp/out SCALE=gpu DEVICE=cuda JOBS=10 BUDGET=300 bash bench/gpu/device_run.sh
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 SIFTLENS_DATA=$PWD/.devdata
export TRANSFORMERS_OFFLINE=1 HF_HUB_OFFLINE=1
PY=${PY:-python3}; export PY; OUT=${OUT:-/tmp/out}; SCALE=${SCALE:-gpu}; DEVICE=${DEVICE:-cuda}; JOBS=${JOBS:-10}; BUDGET=${BUDGET:-300}
RUNS=${RUNS:-/tmp/guided}
mkdir -p "$OUT" "$RUNS"
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; "$PY" -c \
  "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$OUT/machine.txt" 2>&1

if [ "$DEVICE" = cuda ] && [ -z "${SKIP_CHECK:-}" ]; then
  ( IMAGES=$PWD/.devdata/imagenet-sub.zip RATIO_MODELS=bench/.cache/hf-vit-b16,bench/.cache/hf-vit-s16,default \
    timeout ${CHECK_TIMEOUT:-240} bash bench/gpu/gpu_check.sh 32 > "$OUT/gpu_check.log" 2>&1
    cp bench/results/gpu_check.json "$OUT/" 2>/dev/null
    # issue 26: the profile of one ViT-B/16 batch of 128, fp32 then bf16, after the check (not beside it)
    for P in ${PROFILE_PRECISIONS-fp32 bf16}; do
      timeout ${PROFILE_TIMEOUT:-100} "$PY" bench/gpu.py --device cuda --batch-size 128 --precision "$P" \
          --images .devdata/imagenet-sub.zip > "$OUT/gpu_profile-$P.log" 2>&1
      cp bench/results/gpu_profile.json "$OUT/gpu_profile-$P.json" 2>/dev/null
    done ) &
fi
[ -n "${SKIP_GUIDED:-}" ] || ( timeout $((BUDGET + 150)) "$PY" experiments/guided_training/guided_training.py --scale "$SCALE" --device "$DEVICE" --jobs "$JOBS" \
    --budget "$BUDGET" --runs "$RUNS" --results "$OUT/guided_training.json" > "$OUT/guided.log" 2>&1 ) &
wait
# a run cut off by the timeout still leaves its history: analyse whatever finished
[ -n "${SKIP_GUIDED:-}" ] || "$PY" experiments/guided_training/guided_training.py --scale "$SCALE" --device "$DEVICE" --runs "$RUNS" --analyse-only \
    --results "$OUT/guided_training.json" >> "$OUT/guided.log" 2>&1
[ -n "${SKIP_GUIDED:-}" ] || tar czf "$OUT/guided_runs.tgz" -C "$(dirname "$RUNS")" --exclude='*.pt' --exclude='*.safetensors' \
    --exclude='*.npz' "$(basename "$RUNS")" 2>/dev/null
echo "device_run: $(( $(date +%s) - T0 )) s"; tail -5 "$OUT/guided.log" 2>/dev/null; tail -3 "$OUT/gpu_check.log" 2>/dev/null
tail -2 "$OUT"/gpu_profile-*.log 2>/dev/null
