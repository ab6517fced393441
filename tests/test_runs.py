"""The one run-folder contract: refuse / resume / force, atomic checkpoints, legacy folder names."""

import json

import numpy as np
import pytest

from lawder_core import runs
from lawder_core.errors import UsageError
from lawder_core.files import atomic_save, read_jsonl


def test_a_run_is_never_clobbered_without_force(tmp_path):
    out = tmp_path / "run"
    runs.open_run(out, resume=False, force=False)
    runs.append_metrics(out, {"epoch": 0})
    with pytest.raises(UsageError, match="--resume"):
        runs.open_run(out, resume=False, force=False)
    runs.open_run(out, resume=True, force=False)
    assert runs.read_metrics(out) == [{"epoch": 0}]
    runs.open_run(out, resume=False, force=True)
    assert runs.read_metrics(out) == []


def test_a_checkpoint_appears_complete_or_not_at_all(tmp_path):
    tmp = runs.new_checkpoint(tmp_path, runs.LAST)
    (tmp / "weights").write_text("one")
    assert runs.find_checkpoint(tmp_path) is None  # not committed yet
    final = runs.commit_checkpoint(tmp, tmp_path, runs.LAST, {"step": 1})
    assert runs.find_checkpoint(tmp_path) == final
    tmp = runs.new_checkpoint(tmp_path, runs.LAST)
    (tmp / "weights").write_text("two")
    runs.commit_checkpoint(tmp, tmp_path, runs.LAST, {"step": 2})
    assert runs.read_progress(runs.find_checkpoint(tmp_path)) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_crash_in_the_middle_of_a_swap_leaves_the_old_checkpoint_findable(tmp_path):
    old = tmp_path / "last.old"
    old.mkdir()
    (old / runs.PROGRESS).write_text(json.dumps({"step": 5}))
    assert runs.find_checkpoint(tmp_path) == old


def test_runs_written_before_the_contract_are_still_read(tmp_path):
    legacy = tmp_path / "checkpoint"
    legacy.mkdir()
    (legacy / runs.PROGRESS).write_text(json.dumps({"step": 3}))
    (tmp_path / "train_config.json").write_text("{}")
    assert runs.find_checkpoint(tmp_path) == legacy
    assert runs.config_path(tmp_path) == tmp_path / "train_config.json"
    assert runs.has_run(tmp_path)


def test_trim_metrics_drops_lines_after_the_resumed_checkpoint(tmp_path):
    for step in (1, 2, 3):
        runs.append_metrics(tmp_path, {"step": step})
    runs.trim_metrics(tmp_path, "step", 2)
    assert [r["step"] for r in runs.read_metrics(tmp_path)] == [1, 2]


def test_atomic_save_leaves_no_partial_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")

    def broken(path):
        path.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save(broken, target)
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_read_jsonl_skips_a_line_torn_by_a_kill(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    assert read_jsonl(path) == [{"a": 1}]


@pytest.mark.faults
def test_resume_on_a_folder_without_a_run_is_refused(tmp_path):
    with pytest.raises(UsageError, match="holds no run"):
        runs.open_run(tmp_path / "typo", resume=True, force=False)


HOLD = """
import sys, time
from lawder_core.locks import hold_output_lock
hold_output_lock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.faults
@pytest.mark.parametrize("kind", ["run folder", "hdf5"])
def test_a_second_writer_of_the_same_output_is_refused_at_once_and_told_who(tmp_path, kind):
    import subprocess
    import sys

    from lawder_core.data.h5 import H5Writer
    from lawder_core.errors import DataError

    out = tmp_path / ("run" if kind == "run folder" else "data.h5")
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "held"
        with pytest.raises(DataError, match=f"pid {first.pid}") as refused:
            if kind == "run folder":
                runs.open_run(out, resume=False, force=True)
            else:
                H5Writer(out, height=4, width=4, channels=1, label_names=("background", "lesion"), source="t",
                         force=True)
        assert refused.value.exit_code == 3
    finally:
        first.kill()
        first.wait()
    # the kernel dropped the killed holder's lock: the output is free again, stale lock file or not
    if kind == "run folder":
        runs.open_run(out, resume=False, force=True)
        assert out.is_dir()
    else:
        writer = H5Writer(out, height=4, width=4, channels=1, label_names=("background", "lesion"), source="t")
        writer.add(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), "c0", "train")
        writer.close()
        assert out.exists()
