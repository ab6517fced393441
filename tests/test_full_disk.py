"""A full disk: every writer exits 4 with one line, leaves no partial file, and advises only what works.

Where this process may mount a tmpfs (root with CAP_SYS_ADMIN) the disk is really full: a small tmpfs with a
filler file that leaves a given number of bytes. Elsewhere the writers are patched to raise ENOSPC the way the
libraries do on a full disk (h5py's OSError, safetensors' own error type).
"""

from __future__ import annotations

import errno
import functools
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lawder_cli.main import app
from tests.helpers import runner

pytestmark = pytest.mark.faults

LAWDER = str(Path(sys.executable).with_name("lawder"))
DISK = 4 << 20  # the tmpfs: 4 MiB


def can_mount(folder: Path) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


@contextmanager
def disk_with(folder: Path, free: int, monkeypatch: pytest.MonkeyPatch,
              fallback: Callable[[pytest.MonkeyPatch], None]) -> Iterator[Path]:
    """`folder` on a disk with about `free` bytes left: a real tmpfs where possible, else `fallback` patches the
    writers to fail as a full disk does. The up-front disk estimate is off: these tests are about a disk that fills
    while the command writes (another process, a wrong estimate); the estimate has its own tests."""
    monkeypatch.setenv("LAWDER_NO_MEMORY_CHECK", "1")
    if not can_mount(folder):
        fallback(monkeypatch)
        yield folder
        return
    try:
        (folder / "filler").write_bytes(b"\0" * (DISK - free))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def h5_writes_fail(monkeypatch: pytest.MonkeyPatch, after: int = 3) -> None:
    """h5py's error on a full disk, from the `after`-th write of images on."""
    import h5py

    calls = {"n": 0}
    setitem = h5py.Dataset.__setitem__

    def failing(self, key, value):
        if self.name == "/images":
            calls["n"] += 1
            if calls["n"] >= after:
                raise OSError(errno.ENOSPC, "Can't synchronously write data (file write failed: errno = 28, "
                                            "error message = 'No space left on device')")
        return setitem(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)


def checkpoint_writes_fail(after: int) -> Callable[[pytest.MonkeyPatch], None]:
    """safetensors' error on a full disk from its `after`-th file on (torch.save's comes with the OSError)."""

    def patch(monkeypatch: pytest.MonkeyPatch) -> None:
        import safetensors.torch

        calls = {"n": 0}
        save_file = safetensors.torch.save_file

        class SafetensorError(Exception):
            pass

        def failing(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] >= after:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return save_file(*args, **kwargs)

        import lawder_core.train.diffusion  # it binds save_file at import: patched there too, and undone after

        monkeypatch.setattr(safetensors.torch, "save_file", failing)
        monkeypatch.setattr(lawder_core.train.diffusion, "save_file", failing)

    return patch


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name != "filler" and (".partial" in p.name or p.is_file()))


def test_prepare_on_a_full_disk_exits_4_with_one_line_and_no_partial_file(tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    with disk_with(folder, 100 << 10, monkeypatch, h5_writes_fail) as disk:
        args = ["prepare", "synthetic", "-o", str(disk / "b.h5"), "--n", "64", "--size", "32"]
        if (disk / "filler").exists():  # a real full disk: in a process of its own (h5py used to segfault)
            done = subprocess.run([LAWDER, *args], capture_output=True, text=True, timeout=120)
            code, output = done.returncode, done.stdout + done.stderr
        else:
            result = runner.invoke(app, args)
            code, output = result.exit_code, result.output
        assert code == 4, output
        lines = output.strip().splitlines()
        assert lines[0].startswith("error: the disk is full") and len(lines) == 2, output
        assert "Traceback" not in output and "decrement" not in output
        assert leftovers(disk) == []  # no b.h5.partial, no side files of a data set that does not exist


SYNTHETIC = {"n": 16}  # images in the module's `data` (conftest)


@pytest.mark.slow
@pytest.mark.parametrize(("free", "fails_at", "advice", "not_advised"), [
    (400 << 10, 2, "--force", "--resume"),  # best/ fits, last/ does not: nothing to resume
    (1000 << 10, 3, "--resume", "--force"),  # epoch 0 is saved, epoch 1's last/ does not fit
], ids=["first-checkpoint", "later-checkpoint"])
def test_train_order_on_a_full_disk_exits_4_and_advises_resume_only_with_a_checkpoint(
        data, tmp_path, monkeypatch, free, fails_at, advice, not_advised):
    folder = tmp_path / "disk"
    with disk_with(folder, free, monkeypatch, checkpoint_writes_fail(fails_at)) as disk:
        out = disk / "run"
        result = runner.invoke(app, ["train-order", "--data", str(data), "--out", str(out), "--size", "32",
                                     "--epochs", "3", "--batch-size", "8", "--model", "mkunet-t"])
        assert result.exit_code == 4, result.output
        assert "the disk is full" in result.output and "Traceback" not in result.output
        assert advice in result.output and not_advised not in result.output
        assert not list(out.glob("*.partial"))  # the checkpoint cut short is gone


@pytest.mark.slow
def test_train_law_on_a_full_disk_exits_4_without_resume_advice(data, tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    with disk_with(folder, 200 << 10, monkeypatch, checkpoint_writes_fail(1)) as disk:
        out = disk / "run"
        result = runner.invoke(app, ["train-law", "--data", str(data), "--out", str(out), "--size", "32",
                                     "--steps", "2", "--batch-size", "4", "--preset", "tiny", "--sample-every", "0"])
        assert result.exit_code == 4, result.output
        assert "the disk is full" in result.output and "--resume" not in result.output
        assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("free", [60 << 10, 150 << 10], ids=["in-the-images", "at-the-grid"])
def test_sample_on_a_full_disk_exits_4_with_one_line_and_leaves_nothing(law_run, data, tmp_path, monkeypatch, free):
    folder = tmp_path / "disk"
    with disk_with(folder, free, monkeypatch, functools.partial(h5_writes_fail, after=1)) as disk:
        out = disk / "x.h5"
        result = runner.invoke(app, ["sample", "--run", str(law_run), "--masks", str(data), "-o", str(out),
                                     "--steps", "1", "--split", "all"])
        assert result.exit_code == 4, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert errors == [f"error: the disk is full: cannot write {out} (the partial file was removed)."], \
            result.output
        assert "Traceback" not in result.output and "decrement" not in result.output
        assert leftovers(disk) == []  # neither x.h5 nor its grid, nor a .partial
