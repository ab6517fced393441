"""One writer per output: an exclusive lock on every HDF5 file, run folder and sweep folder a command writes.

Two `lawder prepare -o same.h5` or two `lawder train-order --out same` at once used to mix their files. The
first command now holds a `flock` on a hidden sibling file (`.NAME.lock`, next to the output so that `--force`
deleting the output cannot delete the lock) until it exits; a second one exits 3 at once and names the first.
The kernel drops the lock when its process dies, even by SIGKILL, so a stale lock file never blocks anyone.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from lawder_core.errors import DataError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; lawder (Ray, NCCL) runs on POSIX
    fcntl = None  # type: ignore[assignment]

_HELD: dict[Path, int] = {}


def lock_path(output: str | os.PathLike) -> Path:
    output = Path(output).absolute()
    return output.parent / f".{output.name}.lock"


def hold_output_lock(output: str | os.PathLike) -> Path:
    """Lock `output` for the rest of this process (re-entrant); DataError (exit 3) if another process holds it."""
    lock = lock_path(output)
    if lock in _HELD or fcntl is None:
        return lock
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise DataError(f"{Path(output)} is being written by {holder}.",
                            "Wait for that command to finish (or stop it), or choose another output.") from None
        if _same_file(lock, fd):
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, f"lawder (pid {os.getpid()}: {' '.join(sys.argv[:6])})".encode())
    _HELD[lock] = fd
    return lock


def release_output_lock(output: str | os.PathLike) -> None:
    """Give the lock back before exit (tests, long-lived processes); unlinking first keeps waiters correct."""
    _release(lock_path(output))


def _release(lock: Path) -> None:
    fd = _HELD.pop(lock, None)
    if fd is None:
        return
    lock.unlink(missing_ok=True)
    os.close(fd)


def _same_file(path: Path, fd: int) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD):
        _release(lock)


__all__ = ["hold_output_lock", "lock_path", "release_output_lock"]
