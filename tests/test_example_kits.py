"""examples/kits.sh as written, at toy scale on a fake KiTS folder: every command runs, and a rerun resumes (issue 15).

The script's last step is a `lawder tune` sweep, which starts a local Ray in the script's process: hence `ray`.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_fid_weights, write_kits_folder

SCRIPT = Path(__file__).parents[1] / "examples" / "kits.sh"
KITS_REGIONS = {"kidney_and_masses", "masses", "tumor"}
TOY_SCALE = {"GPUS": "0", "SIZE": "32", "JOBS": "1", "LAW_SIZE": "32", "LAW_PRESET": "tiny", "LAW_STEPS": "2",
             "LAW_BATCH": "2", "SAMPLE_STEPS": "2", "EPOCHS": "1", "BATCH": "4", "TRIALS": "1", "BUDGET": "1",
             "ROUND_STEPS": "1", "GPUS_PER_TRIAL": "0", "CPUS_PER_TRIAL": "1"}


def run_script(raw: Path, out: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(raw), str(out)], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
@pytest.mark.ray
def test_kits_example_runs_at_toy_scale_and_resumes(tmp_path):
    raw = write_kits_folder(tmp_path / "kits")
    out = tmp_path / "runs"
    space = tmp_path / "space.yaml"  # one of the built-in four clamp ranges: one trial
    space.write_text("clamp: {grid: [{law.w_min: 0.5, law.w_max: 2.0}]}\n")
    env = {**os.environ, **TOY_SCALE, "TUNE_SPACE": str(space),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           # one torch thread: toy-sized steps gain nothing from two, and beside other jobs two are several
           # times slower (README, Sweeps)
           "OMP_NUM_THREADS": "1",
           # KID with a tiny stand-in network, whatever Inception file this machine caches
           "LAWDER_FID_WEIGHTS": str(tiny_fid_weights(tmp_path / "fid.pt"))}
    first = run_script(raw, out, env)
    assert first.returncode == 0, first.stderr[-4000:]

    summary = json.loads((out / "order" / "eval" / "summary.json").read_text())
    assert set(summary["mean"]) == KITS_REGIONS
    assert summary["metric_per_case"] and all(set(c["metrics"]) == KITS_REGIONS for c in summary["metric_per_case"])
    assert all(0 <= summary["mean"][r]["Dice"] <= 1 for r in KITS_REGIONS)
    assert summary["metadata"]["segmenter"]["num_classes"] == 4  # background, kidney, tumour, cyst
    sweep = json.loads((out / "tune-clamp" / "summary.json").read_text())
    assert sweep["trials"] == 1 and sweep["errors"] == 0 and (out / "tune-clamp" / "best.yaml").exists()
    checkpoint = out / "order" / "last" / "model.safetensors"
    stamps = {path: path.stat().st_mtime_ns for path in (checkpoint, out / "synthetic-law.h5", out / "kits.h5")}

    # A rerun resumes every run (no '--resume: ... holds no run' on the first, none missing on the second) and
    # redoes nothing that is complete.
    again = run_script(raw, out, env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {path: path.stat().st_mtime_ns for path in stamps} == stamps
    assert set(json.loads((out / "order" / "eval" / "summary.json").read_text())["mean"]) == KITS_REGIONS
