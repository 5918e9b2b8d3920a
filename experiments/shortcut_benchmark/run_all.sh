#!/bin/sh
# The whole benchmark in one resumable chain (issue 25): wait for the encoder, keep a copy of it beside this script,
# run the validation builds (seed 0, siftlens's methods only), then the final table (seed 2) without JTT and with it
# (JTT last: it costs the most), then mark the method chosen on the validation results. Rerun to resume.
set -e
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
RUN="$PY experiments/shortcut_benchmark/run.py"
HERE=experiments/shortcut_benchmark
while [ ! -f runs/encoder-half/model/model.safetensors ]; do sleep 20; done
if [ ! -f $HERE/encoder/model/model.safetensors ]; then
  mkdir -p $HERE/encoder && cp -r runs/encoder-half/model $HERE/encoder/ && cp runs/encoder-half/history.json $HERE/encoder/
fi
ENC=$HERE/encoder/model
$RUN --encoder $ENC --seed 0 --scale validation --without jtt,afr,dfr
$RUN --encoder $ENC --seed 2 --without jtt
$RUN --encoder $ENC --seed 2
$RUN --encoder $ENC --seed 2 --annotate --validation $HERE/results/benchmark-validation-seed0.json
