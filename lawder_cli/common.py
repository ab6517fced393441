"""What every command shares: error reporting with exit codes, JSON output, progress bars on a terminal."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lawder_core.errors import InternalError, LawderError, first_line, known_cause
from lawder_core.files import json_text
from lawder_core.interrupts import exit_code_of, on_sigterm, raise_terminated, signal_name

F = TypeVar("F", bound=Callable[..., Any])


class PrintableConsole(Console):
    """A rich Console that shows control characters in text as escapes: a file named with ANSI sequences (or a
    bell, a carriage return) cannot recolour, rewrite or clear the user's terminal through lawder's messages."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(printable(o) if isinstance(o, str) else o for o in objects), **kwargs)


# C0 controls but newline and tab, DEL and the C1 controls (0x9b is a one-byte CSI on some terminals)
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    """A score for a table: fixed point, except where that would hide the value: large ones, and non-zero ones it
    prints as 0.0000 (a spurious area of a few pixels in 240 images, a difference called beside a column of zeros)."""
    if value is None:
        return "n/a"
    sign = "+" if signed else ""
    if abs(value) >= 1000:
        return f"{value:{sign}.{digits}g}"
    if value != 0 and abs(value) < 0.5 * 10 ** -digits:
        return f"{value:{sign}.2e}"
    return f"{value:{sign}.{digits}f}"


def printable(text: str) -> str:
    """`text` with every control character written as its escape (ESC as \\x1b)."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


# Logs and tables go to stderr so that `--json` leaves stdout holding only the result.
err_console = PrintableConsole(stderr=True)


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
    """What a failure outside lawder's own checks means to the user (`errors.known_cause`), else exit 70."""
    return known_cause(error) or InternalError(
        f"lawder failed unexpectedly: {type(error).__name__}: {first_line(error)}",
        "Rerun with --debug (or LAWDER_DEBUG=1) for the traceback, and please report it.")


def handle_errors(fn: F) -> F:
    """The one error boundary: a one-line cause, a hint and the documented exit code.

    Ctrl-C and SIGTERM are one treatment: SIGTERM raises `Terminated` (a KeyboardInterrupt), so the same clean-up
    runs (partial files removed, child processes and Ray stopped), then one line and exit 130 (SIGINT) or 143
    (SIGTERM). `--debug` / LAWDER_DEBUG=1 lets the traceback through instead.
    """

    # only commands that have --resume may suggest it (`prepare` has none)
    resume_hint = "; rerun with --resume to continue" if "resume" in inspect.signature(fn).parameters else ""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = on_sigterm(raise_terminated)
        try:
            return fn(*args, **kwargs)
        except LawderError as error:
            if debugging():
                raise
            fail(error)
        except KeyboardInterrupt as stop:
            on_sigterm(signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short or print a traceback
            err_console.print(f"interrupted by {signal_name(stop)}: outputs written so far are complete"
                              f"{resume_hint}.", markup=False, highlight=False)
            raise typer.Exit(exit_code_of(stop)) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as error:
            if debugging():
                raise
            fail(as_lawder_error(error))
        finally:
            on_sigterm(previous)

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


class PrintableFormatter(logging.Formatter):
    """Log lines with control characters escaped (see `printable`)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_logging(verbose: bool = False) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])


# Commands that configure no logging (prepare, inspect) print warnings through Python's last-resort handler.
if logging.lastResort is not None:
    logging.lastResort.setFormatter(PrintableFormatter("%(message)s"))


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
