"""Ctrl-C or SIGTERM during a training (Ray or in-process): the last epoch stays, exit 130, --resume goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lawder_core.errors import EXIT_INTERRUPTED
from tests.helpers import synthetic_h5

# only the Ray variant joins the Ray group (one local Ray at a time); the in-process one runs beside it
pytestmark = [pytest.mark.faults, pytest.mark.slow]

LAWDER = str(Path(sys.executable).with_name("lawder"))


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise AssertionError(f"the training ended (exit {process.returncode}) before {text!r}:\n{path.read_text()}")
        time.sleep(0.5)
    raise AssertionError(f"no {text!r} after {timeout} s")


def shell_environment() -> dict[str, str]:
    """The environment of a user's shell: none of the RAY_* settings this test process (and its Ray) carries."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**clean, "RAY_USAGE_STATS_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}


@pytest.mark.parametrize("workers", [pytest.param("1", id="ray", marks=pytest.mark.ray),
                                     pytest.param("0", id="in-process")])
def test_ctrl_c_during_a_training_exits_130_and_resume_continues(tmp_path: Path, workers: str) -> None:
    data = synthetic_h5(tmp_path / "s.h5", n=16, size=32)
    out, log = tmp_path / "run", tmp_path / "train.log"
    args = [LAWDER, "train-order", "--data", str(data), "--out", str(out), "--size", "32", "--batch-size", "8",
            "--workers", workers, "--model", "mkunet-t"]
    with log.open("w") as sink:
        # a pytest-xdist worker ignores SIGINT and a child would inherit that: give it a terminal's default
        training = subprocess.Popen([*args, "--epochs", "50"], stdout=sink, stderr=subprocess.STDOUT,
                                    env=shell_environment(),
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_for(log, "epoch 0:", training)
            training.send_signal(signal.SIGINT)
            code = training.wait(timeout=120)
        finally:
            training.kill()
    output = log.read_text()
    assert code == EXIT_INTERRUPTED, output[-3000:]
    assert "interrupted" in output and "--resume" in output
    assert "Traceback" not in output, output[-4000:]  # lawder's lines and those Ray forwards from its actors
    done = json.loads((out / "last" / "progress.json").read_text())["epoch"]
    resumed = subprocess.run([*args, "--epochs", str(done + 2), "--resume", "--json"], capture_output=True, text=True,
                             timeout=300, env=shell_environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(done + 2))  # every epoch once: nothing lost, nothing repeated
