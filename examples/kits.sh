#!/usr/bin/env bash
# KiTS19 / KiTS23: prepare, train LAW, sample, train a multi-class ORDER segmenter on real + synthetic slices,
# evaluate it per case volume, sweep LAW's clamp range. The defaults are GPU scale: 4 GPUs per training.
# Usage: examples/kits.sh ~/data/kits23/dataset [runs/kits]
#
# Scale, by environment variable [default]:
#   GPUS [4]             GPU workers of train-law, sample and train-order (0: the CPU, in this process)
#   SIZE [256]           prepared slices and segmenter training size (a multiple of 32)
#   JOBS [8]             cases `prepare kits` converts in parallel
#   LAW_SIZE [128]       diffusion resolution           LAW_PRESET [base]   denoiser UNet: tiny | small | base
#   LAW_STEPS [30000]    diffusion steps                LAW_BATCH [16]      diffusion batch (global)
#   SAMPLE_STEPS [50]    DDIM steps of `sample` and of the sweep's scoring samples
#   EPOCHS [200]         segmenter epochs               BATCH [32]          segmenter batch (global)
#   TRIALS [4]           sweep trials per clamp range (the built-in space has 4 ranges: 4 x TRIALS trials)
#   TUNE_SPACE [unset]   a YAML search space replacing the built-in one (`lawder tune --space`)
#   BUDGET [6]           scoring rounds per trial       ROUND_STEPS [250]   diffusion steps per round
#   GPUS_PER_TRIAL [1]   CPUS_PER_TRIAL [4]             resources of each trial (on CPUs keep CPUS_PER_TRIAL=1)
# A toy run on the CPU (tests/test_example_kits.py runs this on a fake KiTS folder):
#   GPUS=0 GPUS_PER_TRIAL=0 CPUS_PER_TRIAL=1 SIZE=32 JOBS=1 LAW_SIZE=32 LAW_PRESET=tiny LAW_STEPS=2 LAW_BATCH=2 \
#   SAMPLE_STEPS=2 EPOCHS=1 BATCH=4 TRIALS=1 BUDGET=1 ROUND_STEPS=1 examples/kits.sh RAW OUT
#
# Restartable: run the same command again after an interruption. Training runs and an interrupted sweep continue
# where they stopped (--resume is passed where the folder already holds a run: on a first run it is refused), the
# prepared file and the synthetic set are made again only when missing or older than what they are made from, and
# a finished sweep is not run again (delete OUT/tune-clamp to redo it).
set -euo pipefail
RAW=${1:?path to the KiTS folder with case_XXXXX/ sub-folders}
OUT=${2:-runs/kits}
GPUS=${GPUS:-4}
SIZE=${SIZE:-256}
JOBS=${JOBS:-8}
LAW_SIZE=${LAW_SIZE:-128}
LAW_PRESET=${LAW_PRESET:-base}
LAW_STEPS=${LAW_STEPS:-30000}
LAW_BATCH=${LAW_BATCH:-16}
SAMPLE_STEPS=${SAMPLE_STEPS:-50}
EPOCHS=${EPOCHS:-200}
BATCH=${BATCH:-32}
TRIALS=${TRIALS:-4}
BUDGET=${BUDGET:-6}
ROUND_STEPS=${ROUND_STEPS:-250}
GPUS_PER_TRIAL=${GPUS_PER_TRIAL:-1}
CPUS_PER_TRIAL=${CPUS_PER_TRIAL:-4}
mkdir -p "$OUT"

# "--resume" where folder $1 already holds a run (its config.json or metrics.jsonl, as lawder_core/runs.py has_run
# decides), nothing otherwise.
resume() { if [[ -e $1/config.json || -e $1/metrics.jsonl ]]; then echo --resume; fi; }
# True when $1 exists and is newer than $2 (or $2 is missing): that step's output is up to date.
fresh() { [[ -e $1 && $1 -nt $2 ]]; }

# CT window -79..304 HU (nnU-Net's foreground range); kidney slices plus 10 % of the others for train/val cases,
# every slice of the test cases (per-case Dice is a volume Dice); JOBS cases at a time. The fingerprint is
# written last, so without it kits.h5 is an interrupted prepare and is replaced.
if [[ ! -e $OUT/kits.fingerprint.json ]]; then
  lawder prepare kits "$RAW" -o "$OUT/kits.h5" --size "$SIZE" --window=-79,304 --empty-share 0.1 --jobs "$JOBS" --force
fi

# LAW's lesion on KiTS is tumour + cyst (--lesion-labels to change it); the denoiser sees every label.
# shellcheck disable=SC2046  # $(resume DIR) is one word or none
lawder train-law --data "$OUT/kits.h5" --size "$LAW_SIZE" --steps "$LAW_STEPS" --batch-size "$LAW_BATCH" \
    --weighting law --preset "$LAW_PRESET" --gpus "$GPUS" --out "$OUT/law" $(resume "$OUT/law")
if ! fresh "$OUT/synthetic-law.h5" "$OUT/law/last/progress.json"; then
  lawder sample --run "$OUT/law" --masks "$OUT/kits.h5" --steps "$SAMPLE_STEPS" --gpus "$GPUS" \
      -o "$OUT/synthetic-law.h5" --force
fi

# Softmax over background, kidney, tumour and cyst (--labels: every foreground label by default).
# shellcheck disable=SC2046
lawder train-order --data "$OUT/kits.h5" --synthetic "$OUT/synthetic-law.h5" --model mkunet-t-order \
    --size "$SIZE" --epochs "$EPOCHS" --batch-size "$BATCH" --gpus "$GPUS" --out "$OUT/order" $(resume "$OUT/order")
# Dice per case volume on KiTS's nested regions, as the challenge and nnU-Net report them: kidney_and_masses
# (labels >= 1), masses (tumour + cyst) and tumor -> OUT/order/eval/summary.json.
lawder evaluate --dice --run "$OUT/order" --data "$OUT/kits.h5" --split test --out "$OUT/order/eval"

# Sweep the range of LAW's factor on the prior. Each trial trains LAW as above for BUDGET rounds of ROUND_STEPS
# steps and is scored by the segmenter's mask adherence (plus KID where FID weights are found: $LAWDER_FID_WEIGHTS,
# clean-fid's cache). best.yaml feeds straight back into `lawder train-law --config OUT/tune-clamp/best.yaml`.
if [[ ! -e $OUT/tune-clamp/summary.json ]]; then  # written when the sweep has finished
  cat > "$OUT/tune-clamp.yaml" <<EOF
size: $LAW_SIZE
preset: $LAW_PRESET
batch_size: $LAW_BATCH
steps_per_round: $ROUND_STEPS
eval_sampling_steps: $SAMPLE_STEPS
EOF
  # shellcheck disable=SC2046
  lawder tune law-clamp --data "$OUT/kits.h5" --config "$OUT/tune-clamp.yaml" --trials "$TRIALS" --budget "$BUDGET" \
      --gpus-per-trial "$GPUS_PER_TRIAL" --cpus-per-trial "$CPUS_PER_TRIAL" --segmenter "$OUT/order" \
      ${TUNE_SPACE:+--space "$TUNE_SPACE"} --out "$OUT/tune-clamp" $(resume "$OUT/tune-clamp")
fi
