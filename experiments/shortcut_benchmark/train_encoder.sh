#!/bin/sh
# The clean encoder of the shortcut benchmark (issue 25): the default architecture trained supervised on the
# first half of CIFAR-10 train (2,500 images per class, ImageSource's spread of --limit 25000); the second half
# is left for the biased fine-tuning. Resumable: run it again and it continues from its checkpoint.
# CIFAR is the zip of docs/data.md ($SIFTLENS_DATA/cifar10-jpg.zip; by default ../shared/data next to the checkout).
set -e
cd "$(dirname "$0")/../.."
CIFAR=${CIFAR:-${SIFTLENS_DATA:-../shared/data}/cifar10-jpg.zip}
OUT=${OUT:-runs/encoder-half}
ARGS="--train $CIFAR/cifar10/train --limit 25000 --val $CIFAR/cifar10/test --out $OUT --dim 128 --depth 6 --heads 4
      --mlp-ratio 2 --patch-size 4 --epochs 40 --batch-size 256 --lr 1e-3 --threads ${THREADS:-1} --no-progress"
if [ -f "$OUT/checkpoint.pt" ]; then ARGS="$ARGS --resume"; fi
exec nice -n 19 .venv/bin/siftlens train $ARGS
