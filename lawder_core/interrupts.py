"""Ctrl-C and SIGTERM, one treatment: both raise a KeyboardInterrupt, so every clean-up written for Ctrl-C (partial
files removed, child processes and Ray stopped) runs for SIGTERM too; the CLI then exits 130 or 143.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from lawder_core.errors import EXIT_INTERRUPTED, EXIT_TERMINATED


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`, `timeout`) as Ctrl-C's exception; the CLI exits 143 for it."""


def raise_terminated(signum: int, frame: object) -> None:
    """The SIGTERM handler: stop the way Ctrl-C stops. Later SIGTERMs are ignored, so the clean-up this one starts
    runs to its end (SIGKILL still ends everything)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def exit_code_of(stop: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED


def signal_name(stop: KeyboardInterrupt) -> str:
    return "SIGTERM" if isinstance(stop, Terminated) else "SIGINT (Ctrl-C)"


def on_sigterm(handler: object) -> object:
    """Install a SIGTERM handler where Python can (the main thread); returns the one it replaced (None if not)."""
    if threading.current_thread() is not threading.main_thread() or handler is None:
        return None
    return signal.signal(signal.SIGTERM, handler)


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait for the end of the block, then act as usual.

    For starting child processes: a spawned child reads its start-up data from a pipe, and a parent stopped in the
    middle of writing it leaves a child that prints a traceback, and a pool that was never built, so nothing
    terminates its workers.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def remember(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, remember) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):  # delivered again, now to the handlers the block set aside
            os.kill(os.getpid(), sig)
