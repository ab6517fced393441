#!/usr/bin/env bash
# Run this first on a new GPU machine: every CUDA path of lawder once, in about 5 minutes on one GPU, as JSON.
# Self-contained: it makes its own data (`lawder prepare synthetic`) and downloads nothing.
#   1. train-order --gpus 1 (MK-UNet-T/ORDER, 256 px), then --resume for one more epoch;
#   2. two DDP workers sharing the GPU (--gpus 1 --workers 2, gloo), with the default config and with
#      order.aux_weight 0 (heads left out of the loss must not break DDP);
#   3. train-law --gpus 1 with the autocast type the GPU runs natively (bf16 where native), and with fp16 forced
#      (grad scaler), each then --resume;
#   4. sample --gpus 1 (one Ray actor, model loaded once), predict and evaluate --dice with --device cuda;
#   5. 50 training steps of ORDER and MK-UNet-T at batch 32 x 256 px on the GPU against the loader's time per
#      batch (bench_loader.py --pipeline: the per-sample DataLoader vs DeviceBatches on the GPU).
#
#   benchmarks/gpu_smoke.sh [--out DIR]      # on the GPU; also writes benchmarks/results/gpu_smoke.json
#   benchmarks/gpu_smoke.sh --cpu [--out DIR] # the same steps on the CPU at toy size (what the tests run)
#
# Writes OUT/gpu_smoke.json (every check: command, exit code, seconds, log file; the timing block) and one log per
# check in OUT/logs/. Exit 0 when every check passed, 1 otherwise. OUT defaults to runs/gpu-smoke[-cpu] and is
# started afresh. Environment: LAWDER (the lawder command), PYTHON, SMOKE_TIMEOUT (seconds per check, 600).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lawder="${LAWDER:-lawder}"
python="${PYTHON:-python3}"
limit="${SMOKE_TIMEOUT:-600}"
cpu=0 out=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cpu) cpu=1; shift ;;
    --out) out="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_smoke.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $cpu -eq 1 ]]; then
  out="${out:-runs/gpu-smoke-cpu}"
  device=cpu gpus=(--gpus 0) shared=(--workers 2) sample_on=(--workers 1)
  data_args=(--n 24 --size 32) seg=(--size 32 --batch-size 4 --model mkunet-t-order)
  law=(--size 32 --preset tiny --batch-size 4 --save-every 2 --log-every 1 --sample-every 0)
  law_steps=(2 3) timing=(--n 16 --size 64 --batch 4 --batches 2 --steps 1)
else
  out="${out:-runs/gpu-smoke}"
  device=cuda gpus=(--gpus 1) shared=(--gpus 1 --workers 2) sample_on=(--gpus 1)
  data_args=(--n 240 --size 256) seg=(--size 256 --batch-size 32 --model mkunet-t-order)
  law=(--size 64 --preset small --batch-size 32 --save-every 50 --log-every 10 --sample-every 0)
  law_steps=(100 150) timing=(--n 600 --size 256 --batch 32 --batches 50 --steps 50)
fi
rm -rf "$out"
mkdir -p "$out/logs"
checks="$out/checks.jsonl"
: > "$checks"

# check NAME COMMAND...: run it (bounded), keep its log, record one JSON line; never stops the script
check() {
  local name="$1"; shift
  local start end code
  start=$(date +%s.%N)
  timeout "$limit" "$@" > "$out/logs/$name.out" 2> "$out/logs/$name.log"
  code=$?
  end=$(date +%s.%N)
  "$python" - "$name" "$code" "$start" "$end" "$out/logs/$name.log" "$@" >> "$checks" <<'PY'
import json, sys
name, code, start, end, log, *command = sys.argv[1:]
print(json.dumps({"name": name, "ok": code == "0", "exit_code": int(code), "seconds": round(float(end) - float(start), 1),
                  "log": log, "command": " ".join(command)}))
PY
  if [[ $code -eq 0 ]]; then echo "ok    $name" >&2; else echo "FAIL  $name (exit $code, see $out/logs/$name.log)" >&2; fi
}

data="$out/data.h5"
printf 'order:\n  aux_weight: 0.0\n' > "$out/aux0.yaml"
printf 'amp_dtype: fp16\n' > "$out/fp16.yaml"

check env "$lawder" env --json
check prepare "$lawder" prepare synthetic -o "$data" "${data_args[@]}" --seed 0
check train-order "$lawder" train-order --data "$data" --out "$out/order" "${seg[@]}" --epochs 2 "${gpus[@]}" --json
check train-order-resume "$lawder" train-order --data "$data" --out "$out/order" --epochs 3 --resume "${gpus[@]}" --json
check ddp-two-workers "$lawder" train-order --data "$data" --out "$out/ddp" "${seg[@]}" --epochs 1 "${shared[@]}" --json
check ddp-aux-weight-0 "$lawder" train-order --data "$data" --out "$out/ddp-aux0" "${seg[@]}" --epochs 1 \
  --config "$out/aux0.yaml" "${shared[@]}" --json
check train-law-native "$lawder" train-law --data "$data" --out "$out/law" "${law[@]}" --steps "${law_steps[0]}" \
  "${gpus[@]}" --json
check train-law-native-resume "$lawder" train-law --data "$data" --out "$out/law" --steps "${law_steps[1]}" --resume \
  "${gpus[@]}" --json
check train-law-fp16 "$lawder" train-law --data "$data" --out "$out/law-fp16" "${law[@]}" --config "$out/fp16.yaml" \
  --steps "${law_steps[0]}" "${gpus[@]}" --json
check train-law-fp16-resume "$lawder" train-law --data "$data" --out "$out/law-fp16" --steps "${law_steps[1]}" \
  --resume "${gpus[@]}" --json
check sample "$lawder" sample --run "$out/law" --masks "$data" --n 16 --steps 10 --batch-size 4 \
  -o "$out/synthetic.h5" "${sample_on[@]}" --json
check predict "$lawder" predict "$data" --split test --run "$out/order" -o "$out/predict" --device "$device" --json
check evaluate "$lawder" evaluate --dice --run "$out/order" --data "$data" --split test -o "$out/evaluate" \
  --device "$device" --json
check timing "$python" "$here/bench_loader.py" --pipeline --device "$device" --threads 1 "${timing[@]}" \
  --out "$out/timing.json"

"$python" - "$out" "$device" <<'PY'
import json, platform, sys
from pathlib import Path

out, device = Path(sys.argv[1]), sys.argv[2]
checks = [json.loads(line) for line in (out / "checks.jsonl").read_text().splitlines()]


def read(name):
    try:
        return json.loads((out / "logs" / f"{name}.out").read_text())
    except (OSError, ValueError):
        return None


predicted = read("predict") or {}
if predicted and not str(predicted.get("device", "")).startswith(device):  # ran, but not where asked
    for c in checks:
        if c["name"] == "predict":
            c.update(ok=False, problem=f"predicted on {predicted.get('device')}, not {device}")
timing = json.loads((out / "timing.json").read_text()) if (out / "timing.json").exists() else None
result = {"benchmark": "gpu_smoke", "device": device, "ok": all(c["ok"] for c in checks),
          "passed": sum(c["ok"] for c in checks), "checks": checks, "environment": read("env"),
          "timing": timing, "machine": platform.platform()}
(out / "gpu_smoke.json").write_text(json.dumps(result, indent=1))
print(json.dumps({k: result[k] for k in ("device", "ok", "passed")} | {"of": len(checks)}))
PY
if [[ $cpu -eq 0 ]]; then cp "$out/gpu_smoke.json" "$here/results/gpu_smoke.json"; fi
"$python" -c "import json, sys; sys.exit(0 if json.load(open('$out/gpu_smoke.json'))['ok'] else 1)"
