"""What every command shares: error reporting with exit codes, JSON output, progress bars on a terminal."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stdout
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lawder_core.errors import EXIT_INTERRUPTED, LawderError

F = TypeVar("F", bound=Callable[..., Any])

# Logs and tables go to stderr so that `--json` leaves stdout holding only the result.
err_console = Console(stderr=True)


def fail(error: LawderError) -> None:
    err_console.print(f"[bold red]error:[/] {error.message}", highlight=False, soft_wrap=True)
    if error.hint:
        err_console.print(error.hint, highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


def handle_errors(fn: F) -> F:
    """Turn LawderError into one paragraph on stderr and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LawderError as error:
            fail(error)
        except KeyboardInterrupt:
            err_console.print("interrupted: outputs written so far are complete; rerun with --resume to continue.")
            raise typer.Exit(EXIT_INTERRUPTED) from None

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
    sys.stdout.write(json.dumps(result, indent=1, default=str) + "\n")


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
