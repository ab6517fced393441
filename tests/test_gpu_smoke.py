"""benchmarks/gpu_smoke.sh cannot rot: its --help, and its --cpu dry run (every step, at toy size) passing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_smoke.sh"
CHECKS = ["env", "prepare", "train-order", "train-order-resume", "ddp-two-workers", "ddp-aux-weight-0",
          "train-law-native", "train-law-native-resume", "train-law-fp16", "train-law-fp16-resume", "sample",
          "predict", "evaluate", "timing"]


def environment() -> dict[str, str]:
    """The lawder and python of this test run, importing this checkout."""
    return {**os.environ, "LAWDER": str(Path(sys.executable).parent / "lawder"), "PYTHON": sys.executable,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def test_help_says_what_it_runs():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert result.returncode == 0
    assert "new GPU machine" in result.stdout and "--cpu" in result.stdout and "set -" not in result.stdout
    wrong = subprocess.run(["bash", str(SCRIPT), "--gpu"], capture_output=True, text=True, check=False)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr


@pytest.mark.slow  # three Ray starts and nine small trainings: minutes on a shared 2-core machine
def test_the_cpu_dry_run_passes_every_check(tmp_path):
    out = tmp_path / "smoke"
    result = subprocess.run(["bash", str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True,
                            env=environment(), cwd=tmp_path, timeout=3000, check=False)
    summary = json.loads((out / "gpu_smoke.json").read_text())
    failed = [c["name"] for c in summary["checks"] if not c["ok"]]
    assert result.returncode == 0 and not failed, (failed, result.stderr[-3000:])
    assert [c["name"] for c in summary["checks"]] == CHECKS
    assert summary["device"] == "cpu" and summary["environment"]["torch"]  # `lawder env` recorded
    timing = summary["timing"]
    assert timing["device"] == "cpu" and set(timing["step_ms"]) == {"mkunet-t", "mkunet-t-order"}
    assert any(name.startswith("(b) DeviceBatches") for name in timing["rows"])
