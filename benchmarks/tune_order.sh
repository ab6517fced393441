#!/usr/bin/env bash
# The pinned ORDER sweep of issue 14 (DESIGN §1.2): 128 px Kvasir-SEG, the eight points of
# benchmarks/tune_order_space.yaml, 10 epochs each, no early stopping, seed 0, one single-thread trial per core.
# Rerunning resumes. Usage: benchmarks/tune_order.sh [KVASIR_DIR] [WORK_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
data=${1:-$here/../../shared/data/kvasir-seg-256}
work=${2:-$here/work/tune_order}
lawder=${LAWDER:-lawder}
mkdir -p "$work"
[ -f "$work/kvasir-128.h5" ] || "$lawder" prepare kvasir "$data" -o "$work/kvasir-128.h5" --size 128 --seed 0
resume=()
[ -f "$work/sweep/config.json" ] && resume=(--resume)
"$lawder" tune order --data "$work/kvasir-128.h5" --out "$work/sweep" --config "$here/tune_order_128.yaml" \
  --space "$here/tune_order_space.yaml" --search grid --trials 1 --budget 10 --scheduler none --seed 0 \
  --cpus-per-trial 1 --json "${resume[@]}" > "$work/result.json"
cat "$work/result.json"
