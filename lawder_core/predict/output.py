"""`lawder predict`'s output folder: refusals before anything is written, safe writes, inputs skipped one by one,
and `OUT/predict_summary.json`.

- OUT, OUT/masks and OUT/overlays must not be symbolic links, nor any file predict is about to write (checked
  before the first write and again at each write, `paths.write_safely`): a DataError (exit 3) names the link,
  with or without --force.
- Input folders: a symbolic link that resolves outside the folder is not followed unless `--follow-symlinks`;
  the ones left out are logged (count and first names) and listed in the summary.
- An input that cannot be read or segmented (a corrupt or empty image, an unreadable HDF5 row, a volume that is
  not 3D) is logged and skipped; the others are written. At the end the summary is written atomically, and if
  anything was skipped `SkippedInputs` (a DataError, exit 3) says so and points at the summary. A run stopped
  by an error it cannot skip (a planted link, a full disk, Ctrl-C) writes the summary with `complete: false`.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lawder_core.errors import DataError, LawderError, UsageError
from lawder_core.files import write_json
from lawder_core.paths import links_leaving, refuse_symlink, write_safely

log = logging.getLogger("lawder_core.predict")

SUMMARY = "predict_summary.json"
FIRST_NAMES = 5  # names shown in a log line or an error message; the summary lists them all


class SkippedInputs(DataError):
    """Some inputs could not be segmented: the rest were written; `result` is the summary (also in the file)."""

    def __init__(self, message: str, hint: str | None = None, result: dict[str, Any] | None = None) -> None:
        super().__init__(message, hint)
        self.result = result or {}

    def __reduce__(self):
        return (type(self), (self.message, self.hint, self.result))


def describe(error: BaseException) -> str:
    """One line for a log or the summary: a lawder error's own message, else the exception's type and text."""
    if isinstance(error, LawderError):
        return error.message
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def input_failure(error: Exception) -> bool:
    """Whether `error` concerns one input (skip it) rather than the machine (stop): memory and a full disk stop."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":  # torch's CUDA OOM
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return False
    return isinstance(error, (DataError, OSError, ValueError, RuntimeError))


def first_names(names: list[str]) -> str:
    shown = ", ".join(names[:FIRST_NAMES])
    return shown + (f", ... ({len(names) - FIRST_NAMES} more)" if len(names) > FIRST_NAMES else "")


@dataclass
class Outcome:
    """What happened to the inputs of one `predict` run."""

    kind: str  # "images" or "volumes": the key of the input count in the result
    total: int = 0
    written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    links_not_followed: list[str] = field(default_factory=list)

    def skip(self, name: str, error: BaseException) -> None:
        reason = describe(error)
        log.warning("skipped %s: %s", name, reason)
        self.skipped.append({"input": name, "reason": reason})

    def to_dict(self) -> dict[str, Any]:
        return {self.kind: self.total, "written": self.written, "skipped": len(self.skipped),
                "skipped_inputs": self.skipped, "links_not_followed": self.links_not_followed}


def check_output(out: Path, force: bool, folders: Iterable[str]) -> None:
    """Before any work: OUT and its sub-folders are not links; a non-empty OUT needs --force (exit 2)."""
    refuse_symlink(out, "output folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty.", "Choose another -o folder, or pass --force to write into it.")
    for name in folders:
        refuse_symlink(out / name, "output folder")


def make_output(out: Path, folders: Iterable[str]) -> None:
    """Create OUT and its sub-folders, checking again that none is a link (one may have appeared meanwhile)."""
    out.mkdir(parents=True, exist_ok=True)
    refuse_symlink(out, "output folder")
    for name in folders:
        refuse_symlink(out / name, "output folder")
        (out / name).mkdir(exist_ok=True)
        refuse_symlink(out / name, "output folder")


def refuse_links(paths: Iterable[Path]) -> None:
    """Before the first write: none of the files this run will write is a link."""
    for path in paths:
        refuse_symlink(path)


def write_png(array: np.ndarray, path: Path) -> Path:
    """A PNG written atomically, never through a link (`paths.write_safely`)."""
    return write_safely(path, lambda f: Image.fromarray(array).save(f, format="PNG"))


def keep_inside(folder: Path, named: list[tuple[str, Path]], follow_symlinks: bool,
                outcome: Outcome) -> list[tuple[str, Path]]:
    """The (name, file) pairs of a folder minus those whose file leads outside it, unless `follow_symlinks`."""
    if follow_symlinks:
        return named
    leaving = set(links_leaving(folder, [path for _, path in named]))
    if not leaving:
        return named
    left_out = sorted(str(path.relative_to(folder)) for path in leaving)
    outcome.links_not_followed.extend(left_out)
    log.warning("not following %d symbolic link(s) that lead outside %s: %s (pass --follow-symlinks to use them)",
                len(left_out), folder, first_names(left_out))
    return [(name, path) for name, path in named if path not in leaving]


def nothing_found(what: str, source: Path, outcome: Outcome) -> DataError:
    links = outcome.links_not_followed
    hint = (f"{len(links)} symbolic link(s) in it lead outside it ({first_names(links)}): pass --follow-symlinks "
            "to use them." if links else None)
    return DataError(f"no {what} in {source}.", hint)


def write_predict_summary(out: Path, summary: dict[str, Any]) -> Path:
    refuse_symlink(out / SUMMARY)
    return write_json(out / SUMMARY, summary)


@contextmanager
def summary_on_abort(out: Path, outcome: Outcome, result: dict[str, Any]) -> Iterator[None]:
    """A run stopped by an error it cannot skip still leaves OUT/predict_summary.json, marked incomplete."""
    try:
        yield
    except BaseException as error:
        try:
            write_predict_summary(out, {**result, **outcome.to_dict(), "complete": False, "error": describe(error)})
        except Exception as failed:  # a full disk, or the summary itself is a planted link: the error above wins
            log.warning("could not write %s: %s", out / SUMMARY, describe(failed))
        raise


def finish(out: Path, outcome: Outcome, result: dict[str, Any]) -> dict[str, Any]:
    """Write the summary; return it, or raise `SkippedInputs` (exit 3) after writing it when inputs were skipped."""
    summary = {**result, **outcome.to_dict(), "complete": True}
    path = write_predict_summary(out, summary)
    if outcome.skipped:
        first = outcome.skipped[0]
        more = f"; {len(outcome.skipped) - 1} more" if len(outcome.skipped) > 1 else ""
        raise SkippedInputs(f"{len(outcome.skipped)} of {outcome.total} {outcome.kind} could not be segmented and "
                            f"were skipped ({first['input']}: {first['reason']}{more}); the other {outcome.written} "
                            f"were written to {out}.", f"{path} lists every skipped input and why.", summary)
    return summary
