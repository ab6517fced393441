#!/usr/bin/env bash
# Kvasir-SEG / CVC-ClinicDB recipe: prepare, train LAW, sample, train ORDER on real + synthetic, evaluate.
# Usage: examples/polyps.sh ~/data/Kvasir-SEG [runs/polyps]   (add GPUS=1 for a GPU; CPU works, slowly)
# Restartable: run the same command again after an interruption. Training runs continue where they stopped
# (--resume is passed where the folder already holds a run: on a first run it is refused), and the prepared file
# and the synthetic set are made again only when missing or older than what they are made from.
set -euo pipefail
RAW=${1:?path to the Kvasir-SEG folder (images/ + masks/)}
OUT=${2:-runs/polyps}
GPUS=${GPUS:-0}
SIZE=${SIZE:-256}
mkdir -p "$OUT"

# "--resume" where folder $1 already holds a run (its config.json or metrics.jsonl, as lawder_core/runs.py has_run
# decides), nothing otherwise.
resume() { if [[ -e $1/config.json || -e $1/metrics.jsonl ]]; then echo --resume; fi; }
# True when $1 exists and is newer than $2 (or $2 is missing): that step's output is up to date.
fresh() { [[ -e $1 && $1 -nt $2 ]]; }

# The fingerprint is written last: without it kvasir.h5 is an interrupted prepare and is replaced.
if [[ ! -e $OUT/kvasir.fingerprint.json ]]; then
  lawder prepare kvasir "$RAW" -o "$OUT/kvasir.h5" --size "$SIZE" --force
fi
lawder inspect "$OUT/kvasir.h5"

# LAW-weighted diffusion at 128 px (the pixel-space UNet).
# shellcheck disable=SC2046  # $(resume DIR) is one word or none
lawder train-law --data "$OUT/kvasir.h5" --size 128 --steps 20000 --batch-size 16 --weighting law \
    --preset base --gpus "$GPUS" --out "$OUT/law" $(resume "$OUT/law")
if ! fresh "$OUT/synthetic-law.h5" "$OUT/law/last/progress.json"; then
  lawder sample --run "$OUT/law" --masks "$OUT/kvasir.h5" --split train --steps 50 --scheduler ddim \
      -o "$OUT/synthetic-law.h5" --force
fi

for MODEL in mkunet-t mkunet-t-order; do
  # shellcheck disable=SC2046
  lawder train-order --data "$OUT/kvasir.h5" --synthetic "$OUT/synthetic-law.h5" --synthetic-ratio 1.0 \
      --model "$MODEL" --size "$SIZE" --epochs 200 --gpus "$GPUS" --out "$OUT/$MODEL" $(resume "$OUT/$MODEL")
  lawder evaluate --dice --run "$OUT/$MODEL" --data "$OUT/kvasir.h5" --split test --out "$OUT/$MODEL/eval"
done
lawder evaluate --fid --kid --real "$OUT/kvasir.h5" --real-split train --synthetic "$OUT/synthetic-law.h5" \
    --out "$OUT/fid"
