#!/usr/bin/env bash
# Kvasir-SEG / CVC-ClinicDB recipe: prepare, train LAW, sample, train ORDER on real + synthetic, evaluate.
# Usage: examples/polyps.sh ~/data/Kvasir-SEG [runs/polyps]   (add GPUS=1 for a GPU; CPU works, slowly)
set -euo pipefail
RAW=${1:?path to the Kvasir-SEG folder (images/ + masks/)}
OUT=${2:-runs/polyps}
GPUS=${GPUS:-0}
SIZE=${SIZE:-256}
mkdir -p "$OUT"

lawder prepare kvasir "$RAW" -o "$OUT/kvasir.h5" --size "$SIZE"
lawder inspect "$OUT/kvasir.h5"

# LAW-weighted diffusion at 128 px (the pixel-space UNet); --resume makes the script restartable.
lawder train-law --data "$OUT/kvasir.h5" --size 128 --steps 20000 --batch-size 16 --weighting law \
    --preset base --gpus "$GPUS" --out "$OUT/law" --resume
lawder sample --run "$OUT/law" --masks "$OUT/kvasir.h5" --split train --steps 50 --scheduler ddim \
    -o "$OUT/synthetic-law.h5" --force

for MODEL in mkunet-t mkunet-t-order; do
  lawder train-order --data "$OUT/kvasir.h5" --synthetic "$OUT/synthetic-law.h5" --synthetic-ratio 1.0 \
      --model "$MODEL" --size "$SIZE" --epochs 200 --gpus "$GPUS" --out "$OUT/$MODEL" --resume
  lawder evaluate --dice --run "$OUT/$MODEL" --data "$OUT/kvasir.h5" --split test --out "$OUT/$MODEL/eval"
done
lawder evaluate --fid --kid --real "$OUT/kvasir.h5" --real-split train --synthetic "$OUT/synthetic-law.h5" \
    --out "$OUT/fid"
