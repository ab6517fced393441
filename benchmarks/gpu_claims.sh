#!/usr/bin/env bash
# The paper's three claims at GPU scale, in about 10 minutes on one large GPU, as JSON:
#   1. LAW vs uniform weighting: FID/KID and mask adherence of one synthetic image per training mask
#      (diffusion at 128 px, 4,000 steps at batch 64, DDIM 25);
#   2. segmenters on real vs real + synthetic data (MK-UNet-T and ORDER at 256 px, 30 epochs);
#   3. ORDER vs MK-UNet-T on real data.
# It is `lawder pipeline --preset gpu-claims` on Kvasir-SEG plus the claims block of its summary.json.
#
#   benchmarks/gpu_claims.sh --kvasir ../shared/data/kvasir-seg-256 [--gpus 1] [--out runs/gpu-claims]
#   benchmarks/gpu_claims.sh --smoke [--out DIR]     # toy scale on the CPU (the built-in synthetic set)
# Also: --fid-weights FILE (offline Inception weights), --ray-address ADDR (join a running Ray).
#
# Writes OUT/gpu_claims.json (and, at full scale, benchmarks/results/gpu_claims.json). Rerunning resumes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
lawder="${LAWDER:-lawder}"
smoke=0 kvasir="" gpus=1 out="" extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --kvasir) kvasir="$2"; shift 2 ;;
    --gpus) gpus="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --fid-weights|--ray-address) extra+=("$1" "$2"); shift 2 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_claims.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [[ $smoke -eq 1 ]]; then
  out="${out:-runs/gpu-claims-smoke}"
  args=(--preset tiny --gpus 0)
else
  if [[ -z "$kvasir" ]]; then echo "gpu_claims.sh: --kvasir DIR is required (or --smoke)" >&2; exit 2; fi
  out="${out:-runs/gpu-claims}"
  args=(--preset gpu-claims --source kvasir --in "$kvasir" --gpus "$gpus")
fi
resume=()
[[ -f "$out/config.json" ]] && resume=(--resume)
start=$(date +%s)
mkdir -p "$(dirname "$out")"
"$lawder" pipeline "${args[@]}" "${extra[@]}" "${resume[@]}" --out "$out" --json > "$out.pipeline.json"
seconds=$(( $(date +%s) - start ))

"${PYTHON:-python3}" - "$out" "$seconds" "$smoke" <<'PY'
import json, platform, sys
from pathlib import Path

out, seconds, smoke = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
summary = json.loads((out / "summary.json").read_text())
config = json.loads((out / "config.json").read_text())
result = {"benchmark": "gpu_claims", "smoke": smoke, "preset": config["preset"], "seconds_this_invocation": seconds,
          "claims": summary["claims"], "timings": summary["timings"], "report": summary["report"],
          "machine": platform.platform()}
try:
    import torch
    result["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
except ImportError:
    pass
(out / "gpu_claims.json").write_text(json.dumps(result, indent=1))
print(json.dumps(result["claims"], indent=1))
PY
if [[ $smoke -eq 0 ]]; then cp "$out/gpu_claims.json" "$here/results/gpu_claims.json"; fi
echo "gpu_claims.sh: wrote $out/gpu_claims.json in ${seconds} s" >&2
