"""SIGTERM is Ctrl-C: every command stops at a safe point with one line and exit 130 (SIGINT) or 143 (SIGTERM);
its partial files are removed and its child processes terminated and waited for."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawder_cli.main import app
from lawder_core import runs
from lawder_core.data import h5
from lawder_core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED
from tests.helpers import runner, synthetic_h5, write_kits_folder

pytestmark = pytest.mark.faults

LAWDER = str(Path(sys.executable).with_name("lawder"))
SIGNALS = [(signal.SIGINT, EXIT_INTERRUPTED, "SIGINT"), (signal.SIGTERM, EXIT_TERMINATED, "SIGTERM")]
SIGNAL_IDS = ["SIGINT", "SIGTERM"]


def signal_self_after(monkeypatch: pytest.MonkeyPatch, owner: object, name: str, signum: int) -> None:
    """`owner.name` sends this process `signum` after its first call returns: a real signal, at a point where
    the command is in the middle of its work."""
    original = getattr(owner, name)

    def then_signal(*args, **kwargs):
        result = original(*args, **kwargs)
        os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, name, then_signal)


def stopped_once(output: str, code: int, expected: int, name: str) -> None:
    assert code == expected, output
    assert f"interrupted by {name}" in output and "Traceback" not in output
    assert output.count("interrupted by") == 1


SYNTHETIC = {"n": 16}  # images in the module's `data` (conftest)


@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signal_stops_train_order_after_a_complete_epoch(data, tmp_path, monkeypatch, signum, expected, name):
    signal_self_after(monkeypatch, runs, "append_metrics", signum)  # after epoch 0 is saved and logged
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-order", "--data", str(data), "--out", str(out), "--size", "32",
                                 "--epochs", "20", "--batch-size", "8", "--model", "mkunet-t"])
    stopped_once(result.output, result.exit_code, expected, name)
    assert "--resume" in result.output  # a checkpoint exists to resume from
    assert json.loads((out / "last" / "progress.json").read_text())["epoch"] == 0
    assert not list(out.glob("*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signal_stops_train_law(data, tmp_path, monkeypatch, signum, expected, name):
    signal_self_after(monkeypatch, runs, "append_metrics", signum)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-law", "--data", str(data), "--out", str(out), "--size", "32", "--steps",
                                 "50", "--log-every", "1", "--batch-size", "4", "--preset", "tiny",
                                 "--sample-every", "0"])
    stopped_once(result.output, result.exit_code, expected, name)
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signal_stops_sample_while_it_writes_and_removes_the_partial_file(data, law_run, tmp_path, monkeypatch,
                                                                            signum, expected, name):
    signal_self_after(monkeypatch, h5.H5Writer, "add_batch", signum)
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["sample", "--run", str(law_run), "--masks", str(data), "-o", str(out),
                                 "--steps", "1", "--split", "all"])
    stopped_once(result.output, result.exit_code, expected, name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no x.h5, no x.h5.partial, no grid, no lock


def wait_for_children(process: subprocess.Popen, count: int = 1, timeout: float = 120) -> list[int]:
    """The pids of `process`'s spawned workers once it has `count` of them (multiprocessing's resource tracker,
    which ends on its own after its parent, is not one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = [pid for pid in descendants(process.pid) if b"spawn_main" in cmdline(pid)]
        if len(children) >= count:
            return children
        if process.poll() is not None:
            raise AssertionError(f"the command ended (exit {process.returncode}) before starting its children")
        time.sleep(0.05)
    raise AssertionError(f"no {count} child process(es) after {timeout} s")


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        todo += [int(c) for c in children]
    return found


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def interrupt(process: subprocess.Popen, signum: int) -> None:
    """SIGTERM as `kill` sends it (this process only); SIGINT as a terminal's Ctrl-C does (the whole group)."""
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signal_stops_prepare_kits_and_its_pool_without_tracebacks(tmp_path, signum, expected, name):
    raw = write_kits_folder(tmp_path / "raw", cases=8, shape=(96, 96, 24))
    out = tmp_path / "k.h5"
    process = subprocess.Popen([LAWDER, "prepare", "kits", str(raw), "-o", str(out), "--size", "64", "--jobs", "2"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        pool = wait_for_children(process, 2)
        interrupt(process, signum)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    stopped_once(output, process.returncode, expected, name)
    assert "BrokenPipe" not in output and "KeyboardInterrupt" not in output, output
    assert not [pid for pid in pool if alive(pid)]  # the pool was terminated and waited for
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]  # no k.h5.partial, no side files


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc (Linux)")
def test_sigterm_during_the_nnunet_check_terminates_its_process(tmp_path):
    pytest.importorskip("nnunetv2", reason="the check runs only where lawder[nnunet] is installed")
    data = synthetic_h5(tmp_path / "s.h5", n=12, size=32)
    process = subprocess.Popen([LAWDER, "export", "nnunet", str(data), "-o", str(tmp_path / "raw"), "--dataset-id",
                                "7", "--name", "T"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        check = wait_for_children(process)
        time.sleep(0.5)  # into the check's imports
        check = [pid for pid in descendants(process.pid) if b"spawn_main" in cmdline(pid)] or check
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    stopped_once(output, process.returncode, EXIT_TERMINATED, "SIGTERM")
    assert not [pid for pid in check if alive(pid)]  # the check's process (and any pool of its own) is gone
    assert (tmp_path / "raw" / "Dataset007_T" / "dataset.json").exists()  # written before the check: complete


def test_a_second_sigterm_during_the_clean_up_is_ignored(tmp_path, monkeypatch):
    """The clean-up the first SIGTERM starts (partial files removed, children and Ray stopped) runs to its end."""
    out = tmp_path / "d.h5"
    abort = h5.H5Writer.abort

    def abort_under_fire(self):
        os.kill(os.getpid(), signal.SIGTERM)  # a second `kill` while lawder is cleaning up
        abort(self)

    monkeypatch.setattr(h5.H5Writer, "abort", abort_under_fire)
    signal_self_after(monkeypatch, h5.H5Writer, "add_batch", signal.SIGTERM)
    before = signal.getsignal(signal.SIGTERM)
    result = runner.invoke(app, ["prepare", "synthetic", "-o", str(out), "--n", "8", "--size", "16"])
    stopped_once(result.output, result.exit_code, EXIT_TERMINATED, "SIGTERM")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handlers are undone when it ends


@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signalled_then_resumed_train_order_ends_bit_identical_to_an_uninterrupted_one(
        data, tmp_path, monkeypatch, signum, expected, name):
    args = ["--data", str(data), "--size", "32", "--epochs", "2", "--batch-size", "8", "--model", "mkunet-t"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert runner.invoke(app, ["train-order", "--out", str(whole), *args]).exit_code == 0
    signal_self_after(monkeypatch, runs, "append_metrics", signum)  # after epoch 0 is saved and logged
    result = runner.invoke(app, ["train-order", "--out", str(split), *args])
    stopped_once(result.output, result.exit_code, expected, name)
    monkeypatch.undo()
    resumed = runner.invoke(app, ["train-order", "--out", str(split), *args, "--resume"])
    assert resumed.exit_code == 0, resumed.output
    a, b = (load_file(run / "last" / "model.safetensors") for run in (whole, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(("signum", "expected", "name"), SIGNALS, ids=SIGNAL_IDS)
def test_a_signal_stops_a_tune_sweep_with_130_or_143_not_1(data, tmp_path, signum, expected, name):
    """Tune used to catch Ctrl-C itself and carry on to a result (exit 0 or 5), and ray.init's SIGTERM handler
    exited 1, the code of a failed gate."""
    out = tmp_path / "sweep"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # a user's shell, not this Ray
    process = subprocess.Popen([LAWDER, "tune", "order", "--data", str(data), "--out", str(out), "--trials", "2",
                                "--budget", "30"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**clean, "RAY_USAGE_STATS_ENABLED": "0"},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 400
        while not list(out.glob("trials/*/config.json")):  # a trial is training
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
            time.sleep(0.5)
        interrupt(process, signum)
        output, _ = process.communicate(timeout=180)
    finally:
        process.kill()
    stopped_once(output, process.returncode, expected, name)
    assert "--resume" in output


def test_prepare_interrupted_just_after_its_rename_leaves_the_fingerprint_too(tmp_path, monkeypatch):
    """The side files are written before the HDF5 file is renamed into place: a file that exists has them."""
    out = tmp_path / "d.h5"
    release = h5.release_output_lock
    calls = {"n": 0}

    def interrupted_after_the_rename(path):
        calls["n"] += 1
        if calls["n"] == 1:
            assert out.exists()  # the rename has happened
            raise KeyboardInterrupt
        release(path)

    monkeypatch.setattr(h5, "release_output_lock", interrupted_after_the_rename)
    result = runner.invoke(app, ["prepare", "synthetic", "-o", str(out), "--n", "8", "--size", "16"])
    stopped_once(result.output, result.exit_code, EXIT_INTERRUPTED, "SIGINT")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.fingerprint.json", "d.h5", "d.splits.json"]
    assert json.loads((tmp_path / "d.fingerprint.json").read_text())["samples"] == 8


def test_a_signal_in_the_middle_of_a_training_state_write_stops_the_run_after_it(tmp_path, monkeypatch):
    """torch.save calls the file's write from C++: an interrupt raised there came back as torch's RuntimeError
    ("unexpected pos"), so a Ctrl-C at that moment ended a training with exit 5 instead of 130 (CI, stop 35)."""
    save = torch.save

    def save_through_a_write_that_is_interrupted(state, f):
        class InterruptedAtItsSecondWrite:  # the first write's interrupt escapes as itself; later ones do not
            writes = 0

            def write(self, data):
                self.writes += 1
                if self.writes == 2:
                    os.kill(os.getpid(), signal.SIGINT)
                return f.write(data)

            def flush(self):
                f.flush()

        save(state, InterruptedAtItsSecondWrite())

    monkeypatch.setattr(torch, "save", save_through_a_write_that_is_interrupted)
    state = {"epoch": 3, "weights": torch.arange(1000.0)}
    # Ctrl-C's own handler, as a command has it, whatever this test process inherited (a runner may ignore SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            runs.save_state(tmp_path, state)
    finally:
        signal.signal(signal.SIGINT, previous)
    written = torch.load(tmp_path / runs.STATE, weights_only=True)  # the write ran to its end first
    assert written["epoch"] == 3 and torch.equal(written["weights"], state["weights"])
