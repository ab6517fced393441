"""benchmarks/gpu_claims.sh at toy scale: the whole claims run on the CPU, ending in a JSON of the three claims."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_claims.sh"


@pytest.mark.slow
def test_gpu_claims_smoke_writes_the_three_claims(tmp_path):
    venv = Path(sys.executable).parent
    env = {**os.environ, "LAWDER": str(venv / "lawder"), "PYTHON": sys.executable}
    out = tmp_path / "claims"
    done = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "gpu_claims.json").read_text())
    claims = result["claims"]
    assert result["smoke"] is True and result["preset"]["size"] == 32
    assert set(claims["synthesis"]) == {"uniform", "law"}
    assert all(0 <= s["adherence"] <= 1 for s in claims["synthesis"].values())
    assert set(claims["test_dice"]) == {"mkunet-t", "mkunet-t-order"}
    assert set(claims["test_dice"]["mkunet-t"]) == {"real", "real+law", "real+uniform"}
    assert "law_adherence_gain" in claims and "order_dice_gain" in claims
    again = subprocess.run(["bash", str(SCRIPT), "--smoke", "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]  # a rerun resumes: every stage is already done
    assert json.loads((out / "gpu_claims.json").read_text())["claims"] == claims


def test_gpu_claims_refuses_a_full_run_without_data(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--out", str(tmp_path / "x")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "--kvasir" in done.stderr
