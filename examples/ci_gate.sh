#!/usr/bin/env bash
# A CI gate: fail the job when a retrained segmenter or a new synthetic set gets worse.
# Exit codes: 0 all gates hold, 1 a gate was missed (the message says which and by how much),
# 2 usage, 3 data, 4 environment (e.g. no FID weights offline: pass --fid-weights), 5 training failed.
set -euo pipefail
RUN=${1:?a train-order run folder}
DATA=${2:?the prepared HDF5 file}
SYNTHETIC=${3:-}

lawder evaluate --dice --run "$RUN" --data "$DATA" --split test --min-dice 0.80 --out ci-eval --json > dice.json
if [ -n "$SYNTHETIC" ]; then
  lawder evaluate --fid --kid --real "$DATA" --real-split train --synthetic "$SYNTHETIC" \
      --max-fid 60 --adherence --segmenter "$RUN" --min-adherence 0.7 --out ci-fid --json > fid.json
fi
echo "all gates hold"
