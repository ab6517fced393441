"""Errors that carry a user-facing message and a documented exit code.

The CLI turns any LawderError into one paragraph on stderr and `sys.exit(error.exit_code)`;
nothing else should reach the user as a traceback.
"""

from __future__ import annotations

import errno
import re

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_ENVIRONMENT = 4
EXIT_TRAINING = 5
EXIT_INTERNAL = 70  # EX_SOFTWARE: a lawder bug, not the user's input
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class LawderError(Exception):
    """Base class: `str(error)` is the whole message shown to the user."""

    exit_code = EXIT_DATA

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n{hint}")

    def __reduce__(self):  # keep message and hint apart when raised in a worker process
        return (type(self), (self.message, self.hint))


class UsageError(LawderError):
    """The command line or a config file asks for something impossible."""

    exit_code = EXIT_USAGE


class DataError(LawderError):
    """Input data is missing, unreadable, inconsistent or would be overwritten."""

    exit_code = EXIT_DATA


class EnvironmentProblem(LawderError):
    """A dependency, weights file or device the command needs is not available."""

    exit_code = EXIT_ENVIRONMENT


class TrainingError(LawderError):
    """Training diverged (NaN loss) or a distributed run failed."""

    exit_code = EXIT_TRAINING


class InternalError(LawderError):
    """A failure lawder did not foresee: reported in one line (the traceback with --debug), exit 70."""

    exit_code = EXIT_INTERNAL


# ---------------------------------------------------------------- known causes of foreign exceptions

DISK_FULL_HINT = "Free space on that disk, or write the output elsewhere."
MEMORY_HINT = "Use a smaller --size or --batch-size, or a machine with more memory."
_DISK_FULL_WORDS = ("No space left on device", "os error 28", "Disk quota exceeded")
# lower case; matched against "TypeName: message" of every exception in the chain
_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory", "failed to allocate memory",
              "bad_alloc", "bad allocation", "outofmemoryerror", "running low on memory")
# Where wrappers keep the exception they wrap: Python's chain, and Ray Train's worker and controller failures and
# RayTaskError's cause (read by name: this module imports no Ray).
_WRAPPED = ("__cause__", "__context__", "cause", "controller_failure")


def causes(error: BaseException) -> list[BaseException]:
    """`error` and everything it was raised from or during, including what Ray's wrappers carry (libraries wrap
    the OSError they met: safetensors and torch.save turn a full disk into their own exception types)."""
    seen: list[BaseException] = []
    stack = [error]
    while stack:
        err = stack.pop()
        if any(err is s for s in seen):
            continue
        seen.append(err)
        stack.extend(getattr(err, "worker_failures", {}).values())
        stack.extend(e for e in (getattr(err, attr, None) for attr in _WRAPPED) if isinstance(e, BaseException))
    return seen


def is_disk_full(error: BaseException) -> bool:
    return any((isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
               or any(w in str(e) for w in _DISK_FULL_WORDS) for e in causes(error))


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError (NumPy's too), torch's OutOfMemoryError (CUDA), its CPU allocator's RuntimeError, ENOMEM, Ray's
    memory monitor killing a worker; anywhere in the chain of wrapped exceptions."""
    return any(isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno == errno.ENOMEM)
               or (not isinstance(e, LawderError) and any(w in f"{type(e).__name__}: {e}".lower() for w in _OOM_WORDS))
               for e in causes(error))


def out_of_memory(error: BaseException) -> EnvironmentProblem | None:
    """"out of memory" (exit 4, a smaller-size hint, never --resume) when `error` is an allocation failure."""
    return EnvironmentProblem(f"out of memory{memory_wanted(error)}.", MEMORY_HINT) if is_out_of_memory(error) else None


def first_line(error: BaseException, limit: int = 200) -> str:
    """An exception's text on one line (h5py's run over several, with timestamps and buffer addresses)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def memory_wanted(error: BaseException) -> str:
    """ " (N GiB asked for)" when the allocator said how much, else ""."""
    for err in causes(error):
        found = re.search(r"tried to allocate (\d+(?:\.\d+)?) ?(bytes|[KMGT]i?B)", str(err))
        if found:
            amount, unit = float(found.group(1)), found.group(2)
            if unit == "bytes":
                amount, unit = amount / 2**30, "GiB"
            return f" ({amount:,.0f} {unit} asked for)" if amount >= 100 else f" ({amount:.3g} {unit} asked for)"
    return ""


def known_cause(error: BaseException, writing: object = None) -> LawderError | None:
    """What a failure outside lawder's own checks means to the user: a full disk or no memory (exit 4), a
    corrupt HDF5 chunk or a path it cannot use (exit 3); None when the cause is not known.

    `writing` names the output the command was writing, for a full disk whose error names no file.
    """
    if isinstance(error, LawderError):
        return error
    oom = out_of_memory(error)
    if oom is not None:
        return oom
    if is_disk_full(error):
        names = [e.filename for e in causes(error) if isinstance(e, OSError) and e.filename] or [writing]
        where = f" while writing {names[0]}" if names[0] else ""
        return EnvironmentProblem(f"the disk is full{where} (No space left on device).", DISK_FULL_HINT)
    if isinstance(error, OSError) and "filter returned failure" in str(error):
        # HDF5 chunks carry a Fletcher-32 checksum (lawder writes them with one): changed bytes are caught here
        return DataError(f"an HDF5 file is corrupt: a chunk failed its checksum or decompression "
                         f"({first_line(error)}).",
                         "Prepare the file again from the raw data (or restore it from a copy).")
    if isinstance(error, FileExistsError) and error.filename:
        return DataError(f"cannot create the folder {error.filename}: a file is in the way.",
                         "Choose another output path, or move that file.")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                                      errno.EISDIR, errno.ENOENT):
        name = error.filename or ""
        return DataError(f"cannot use {name}: {error.strerror}." if name else first_line(error),
                         "Check the path and its permissions.")
    return None
