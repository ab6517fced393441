#!/usr/bin/env bash
# KiTS19 / KiTS23 at GPU scale: 4 GPUs per training, case-level splits.
# Usage: examples/kits.sh ~/data/kits23/dataset [runs/kits]
set -euo pipefail
RAW=${1:?path to the KiTS folder with case_XXXXX/ sub-folders}
OUT=${2:-runs/kits}
GPUS=${GPUS:-4}
mkdir -p "$OUT"

# CT window -79..304 HU (nnU-Net's foreground range); kidney slices plus 10 % of the others; 8 cases at a time.
lawder prepare kits "$RAW" -o "$OUT/kits.h5" --size 256 --window=-79,304 --empty-share 0.1 --jobs 8

lawder train-law --data "$OUT/kits.h5" --size 128 --steps 30000 --batch-size 16 --weighting law \
    --preset base --gpus "$GPUS" --out "$OUT/law" --resume
lawder sample --run "$OUT/law" --masks "$OUT/kits.h5" --steps 50 --gpus "$GPUS" -o "$OUT/synthetic-law.h5" --force

lawder train-order --data "$OUT/kits.h5" --synthetic "$OUT/synthetic-law.h5" --model mkunet-t-order \
    --size 256 --epochs 200 --batch-size 32 --gpus "$GPUS" --out "$OUT/order" --resume
# Dice per case of kidney+masses (labels >= 1): segmenters are binary for now, so the masses and tumour
# regions nnU-Net also reports need the multi-class training of issue 15.
lawder evaluate --dice --run "$OUT/order" --data "$OUT/kits.h5" --split test --out "$OUT/order/eval"

# Sweep the range of LAW's factor on the prior with 1 GPU per trial; best.yaml feeds straight back into train-law.
lawder tune law-clamp --data "$OUT/kits.h5" --trials 4 --budget 6 --gpus-per-trial 1 --cpus-per-trial 4 \
    --segmenter "$OUT/order" --out "$OUT/tune-clamp"
