"""What every command shares: error reporting with exit codes, JSON output, progress bars on a terminal."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lawder_core.errors import (
    EXIT_INTERRUPTED,
    DataError,
    EnvironmentProblem,
    InternalError,
    LawderError,
)
from lawder_core.files import json_text
from lawder_core.limits import out_of_memory

F = TypeVar("F", bound=Callable[..., Any])

# Logs and tables go to stderr so that `--json` leaves stdout holding only the result.
err_console = Console(stderr=True)


def fail(error: LawderError) -> None:
    # markup=False: messages and hints carry file names and `pip install 'lawder[fid-offline]'`, not rich markup
    err_console.print("[bold red]error:[/] ", end="", highlight=False)
    err_console.print(error.message, markup=False, highlight=False, soft_wrap=True)
    if error.hint:
        err_console.print(error.hint, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


def debugging() -> bool:
    return os.environ.get("LAWDER_DEBUG", "") not in ("", "0")


def as_lawder_error(error: Exception) -> LawderError:
    """What a failure outside lawder's own checks means to the user: full disk, no memory, a path it cannot use."""
    oom = out_of_memory(error)  # MemoryError, PyTorch's "can't allocate memory", CUDA's out of memory
    if oom is not None:
        return oom
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return EnvironmentProblem(f"the disk is full: {error}", "Free space or write --out elsewhere.")
    if isinstance(error, OSError) and "filter returned failure" in str(error):
        # HDF5 chunks carry a Fletcher-32 checksum (lawder writes them with one): changed bytes are caught here
        return DataError(f"an HDF5 file is corrupt: a chunk failed its checksum or decompression ({error}).",
                         "Prepare the file again from the raw data (or restore it from a copy).")
    if isinstance(error, FileExistsError) and error.filename:
        return DataError(f"cannot create the folder {error.filename}: a file is in the way.",
                         "Choose another output path, or move that file.")
    if isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR,
                                                      errno.EISDIR, errno.ENOENT):
        name = error.filename or ""
        return DataError(f"cannot use {name}: {error.strerror}." if name else f"{error}",
                         "Check the path and its permissions.")
    return InternalError(f"lawder failed unexpectedly: {type(error).__name__}: {error}",
                         "Rerun with --debug (or LAWDER_DEBUG=1) for the traceback, and please report it.")


def handle_errors(fn: F) -> F:
    """The one error boundary: a one-line cause, a hint and the documented exit code; Ctrl-C exits 130.

    `--debug` / LAWDER_DEBUG=1 lets the traceback through instead.
    """

    # only commands that have --resume may suggest it (`prepare` has none)
    resume_hint = "; rerun with --resume to continue" if "resume" in inspect.signature(fn).parameters else ""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LawderError as error:
            if debugging():
                raise
            fail(error)
        except KeyboardInterrupt:
            err_console.print(f"interrupted: outputs written so far are complete{resume_hint}.")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as error:
            if debugging():
                raise
            fail(as_lawder_error(error))

    return wrapper  # type: ignore[return-value]


@contextmanager
def quiet_stdout(enabled: bool = True) -> Iterator[None]:
    """Send library chatter (Ray Tune's tables, ...) to stderr, so `--json` leaves stdout to the result."""
    if not enabled:
        yield
        return
    with redirect_stdout(sys.stderr):
        yield


def print_json(result: Any) -> None:
    """The result as strict JSON on stdout (NaN and infinity as null: `files.json_text`)."""
    sys.stdout.write(json_text(result, indent=1) + "\n")


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


@contextmanager
def progress_bar(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yields `advance(n)`; draws a bar only when stderr is a terminal (never in CI logs)."""
    if not err_console.is_terminal:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)
