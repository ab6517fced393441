"""Exit 70 is for what lawder did not foresee: out of memory is exit 4, a damaged checkpoint config exit 3, an
impossible --steps exit 2, wherever the library that met the cause raised it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from lawder_cli.main import app
from lawder_core.errors import DataError, EnvironmentProblem, known_cause
from tests.helpers import runner, synthetic_h5, untrained_checkpoint

pytestmark = pytest.mark.faults



def torch_save_on_a_full_disk() -> Exception:
    """torch.save's own error on a full disk: "unexpected pos", with the OSError only as its context."""
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534") from None
    except RuntimeError as err:
        err.__suppress_context__ = True  # as torch raises it: the context is there, not printed
        return err


class SafetensorError(Exception):
    """safetensors' error type (not an OSError)."""


@pytest.mark.parametrize(("error", "kind", "words"), [
    (MemoryError(), EnvironmentProblem, "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 4398046511104 bytes. Error code 12 (Cannot allocate memory)"),
     EnvironmentProblem, "out of memory (4,096 GiB asked for)"),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), EnvironmentProblem, "out of memory"),
    (OSError(errno.ENOMEM, "Cannot allocate memory"), EnvironmentProblem, "out of memory"),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     EnvironmentProblem, "the disk is full"),
    (torch_save_on_a_full_disk(), EnvironmentProblem, "the disk is full"),
    (OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: time = Fri Dec  4 22:10:55 2026\n"
                           ", filename = 'b.h5.partial', errno = 28)"), EnvironmentProblem, "the disk is full"),
], ids=["MemoryError", "torch-cpu-allocator", "torch-cuda", "ENOMEM", "safetensors", "torch.save", "h5py"])
def test_out_of_memory_and_a_full_disk_are_recognised_in_any_library_s_wrapping(error, kind, words):
    found = known_cause(error)
    assert isinstance(found, kind) and words in found.message and "\n" not in found.message


def test_an_unknown_failure_has_no_known_cause():
    assert known_cause(ValueError("boom")) is None


def test_out_of_memory_in_profile_and_onnx_export_exit_4(tmp_path: Path, monkeypatch):
    # the largest size the options allow, with the up-front estimate off: the allocation itself fails
    monkeypatch.setenv("LAWDER_NO_MEMORY_CHECK", "1")
    profile = runner.invoke(app, ["evaluate", "--profile", "--model", "mkunet-t", "--size", "65536",
                                  "-o", str(tmp_path / "ev")])
    assert profile.exit_code == 4 and "out of memory" in profile.output, profile.output
    checkpoint = untrained_checkpoint(tmp_path / "ck")
    export = runner.invoke(app, ["export", "onnx", "--run", str(checkpoint), "-o", str(tmp_path / "m.onnx"),
                                 "--size", "65536"])
    assert export.exit_code == 4 and "out of memory" in export.output, export.output
    assert not list(tmp_path.glob("m.onnx*"))
    for result in (profile, export):
        assert "Traceback" not in result.output and "unexpectedly" not in result.output


@pytest.mark.parametrize(("field", "value"), [("num_classes", "1"), ("in_channels", 3.5), ("name", 7),
                                              ("num_classes", True), ("order", [1])])
def test_a_checkpoint_config_of_the_wrong_type_is_a_data_error(tmp_path: Path, field, value):
    from lawder_core.models.factory import load_segmenter

    checkpoint = untrained_checkpoint(tmp_path / "ck")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(DataError, match=f"'{field}' is"):
        load_segmenter(checkpoint)
    result = runner.invoke(app, ["export", "onnx", "--run", str(checkpoint), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 3 and "is damaged" in result.output, result.output


def test_sample_steps_beyond_the_model_s_timesteps_is_a_usage_error(law_run: Path, tmp_path: Path):
    data = synthetic_h5(tmp_path / "s.h5", n=4, size=32)
    result = runner.invoke(app, ["sample", "--run", str(law_run), "--masks", str(data), "-o", str(tmp_path / "x.h5"),
                                 "--steps", "100000"])
    assert result.exit_code == 2, result.output
    assert "--steps 100000 is more than the 1000 timesteps" in " ".join(result.output.split())
    assert "unexpectedly" not in result.output
