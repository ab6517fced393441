"""Errors that carry a user-facing message and a documented exit code.

The CLI turns any LawderError into one paragraph on stderr and `sys.exit(error.exit_code)`;
nothing else should reach the user as a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_DATA = 3
EXIT_ENVIRONMENT = 4
EXIT_TRAINING = 5
EXIT_INTERNAL = 70  # EX_SOFTWARE: a lawder bug, not the user's input
EXIT_INTERRUPTED = 130


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
