"""The one run-folder contract (nnU-Net's idea), shared by train-order, train-law, tune and pipeline.

    RUN/config.json        the config the run was started with (what --resume continues)
    RUN/metrics.jsonl      one JSON line per epoch / logged step
    RUN/last/              the newest checkpoint, swapped in atomically; --resume starts from it
    RUN/best/              segmenters: the checkpoint with the best validation Dice
    RUN/summary.json       what the command printed with --json, written when it finishes

A checkpoint folder holds the model (`save_pretrained` layout), `training_state.pt` (optimiser and schedule:
tensors and plain containers only, loaded with weights_only=True) and `progress.json`. It is written under
`NAME.partial` and renamed into place, so at every instant a complete checkpoint exists (a crash in the
middle of the swap leaves `NAME.old`, which is found too). Runs written before this contract (diffusion
`checkpoint/`, `train_config.json`, `pipeline_config.json`) are still read.

The order of a command is: validate the request, then `open_run` (which refuses to touch an earlier run unless
--resume or --force says what to do with it), then train.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from lawder_core.errors import DataError, EnvironmentProblem, LawderError, TrainingError, UsageError
from lawder_core.files import append_jsonl, read_jsonl, write_json, write_jsonl
from lawder_core.interrupts import signals_deferred
from lawder_core.locks import hold_output_lock

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LAST = "last"
BEST = "best"
STATE = "training_state.pt"
PROGRESS = "progress.json"
# inside a diffusion checkpoint
DENOISER = "denoiser"
DENOISER_EMA = "denoiser_ema"
LAW_WEIGHTS = "law.safetensors"
LAW_CONFIG = "law.json"
LEGACY_CONFIGS = ("train_config.json", "pipeline_config.json")
LEGACY_CHECKPOINTS = {LAST: "checkpoint"}
_PARTIAL, _OLD = ".partial", ".old"


def has_run(out: str | os.PathLike) -> bool:
    out = Path(out)
    return (out / METRICS).exists() or find_checkpoint(out) is not None or config_path(out) is not None


def open_run(out: str | os.PathLike, *, resume: bool, force: bool) -> Path:
    """The run folder, ready to write and locked for this process (a second writer exits 3 at once).

    --resume continues an earlier run (and is refused where there is none: a mistyped --out must not start a
    fresh run silently), --force deletes it, neither refuses to touch it.
    """
    out = Path(out)
    hold_output_lock(out)
    if resume and not has_run(out):
        raise UsageError(f"--resume: {out} holds no run to continue.",
                         "Check --out, or drop --resume to start a new run there.")
    if has_run(out) and not resume:
        if not force:
            raise UsageError(f"{out} already holds a run.",
                             "Pass --resume to continue it, --force to start over, or choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ---------------------------------------------------------------- config, metrics, summary


def config_path(out: str | os.PathLike) -> Path | None:
    for name in (CONFIG, *LEGACY_CONFIGS):
        path = Path(out) / name
        if path.exists():
            return path
    return None


def read_config(out: str | os.PathLike) -> dict[str, Any]:
    """The run's config.json (or a pre-contract name), refused with a DataError when unreadable."""
    path = config_path(out)
    if path is None:
        raise DataError(f"{out} holds no {CONFIG}.", "Pass the --out folder of a lawder run.")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path} cannot be read: {err}", "The run folder is damaged; start it again.") from err
    if not isinstance(config, dict):
        raise DataError(f"{path} does not hold a config object.", "The run folder is damaged; start it again.")
    return config


def write_config(out: str | os.PathLike, config: dict[str, Any]) -> Path:
    return write_json(Path(out) / CONFIG, config)


def append_metrics(out: str | os.PathLike, record: dict[str, Any]) -> None:
    append_jsonl(Path(out) / METRICS, record)


def read_metrics(out: str | os.PathLike) -> list[dict[str, Any]]:
    return read_jsonl(Path(out) / METRICS)


def trim_metrics(out: str | os.PathLike, key: str, last: int) -> None:
    """Drop lines logged after the checkpoint a run resumes from: they will be logged again."""
    path = Path(out) / METRICS
    if path.exists():
        write_jsonl(path, [r for r in read_jsonl(path) if r.get(key, last) <= last])


def write_summary(out: str | os.PathLike, summary: dict[str, Any]) -> Path:
    return write_json(Path(out) / SUMMARY, summary)


# ---------------------------------------------------------------- checkpoints


def find_checkpoint(out: str | os.PathLike, name: str = LAST) -> Path | None:
    """RUN/name, or the `.old` copy a crash in the middle of a swap left, or a pre-contract folder name."""
    out = Path(out)
    names = [name] + ([LEGACY_CHECKPOINTS[name]] if name in LEGACY_CHECKPOINTS else [])
    for candidate in names:
        for folder in (out / candidate, out / (candidate + _OLD)):
            if (folder / PROGRESS).exists():
                return folder
    return None


SELECTIONS = (BEST, LAST)


def selected_name(run: str | os.PathLike) -> str:
    """The checkpoint a segmenter run's `select` names for evaluate/predict: best (default) or last."""
    path = Path(run) / CONFIG
    try:
        select = json.loads(path.read_text()).get("select", BEST) if path.exists() else BEST
    except (OSError, ValueError, AttributeError):
        select = BEST
    return select if select in SELECTIONS else BEST


def segmenter_checkpoint(run: str | os.PathLike) -> Path:
    """The checkpoint folder a run's `select` names (best/ unless trained with --select last); a checkpoint
    folder given directly is itself."""
    from lawder_core.models.configs import CHECKPOINT_CONFIG

    run = Path(run)
    name = selected_name(run)
    for candidate in (find_checkpoint(run, name), run / name):
        if candidate is not None and (candidate / CHECKPOINT_CONFIG).exists():
            return candidate
    if (run / CHECKPOINT_CONFIG).exists() and not (run / METRICS).exists():  # a checkpoint, not a run folder
        return run
    raise DataError(f"{run} holds no segmenter checkpoint (expected {run}/{name}/{CHECKPOINT_CONFIG}).",
                    "Pass the --out folder of `lawder train-order`.")


def new_checkpoint(out: str | os.PathLike, name: str = LAST) -> Path:
    """An empty folder to write the next checkpoint into; hand it to `commit_checkpoint` when complete."""
    tmp = Path(out) / (name + _PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, out: str | os.PathLike, name: str, progress: dict[str, Any]) -> Path:
    """Write progress.json (the completeness marker) and swap the folder in."""
    write_json(tmp / PROGRESS, progress)
    final, old = Path(out) / name, Path(out) / (name + _OLD)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def remove_partial_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Delete checkpoint folders cut short (`NAME.partial`: a full disk, an interrupt in the middle of a save);
    the committed ones, and a `.old` a crashed swap left (`find_checkpoint` reads it), stay."""
    out = Path(out)
    removed = sorted(out.glob("*" + _PARTIAL)) if out.is_dir() else []
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def with_resume_advice(error: LawderError, out: str | os.PathLike) -> LawderError:
    """A training that stopped on the machine's or the training's account (exit 4, 5): say how to go on, and
    suggest --resume only when a checkpoint exists to resume from."""
    if not isinstance(error, EnvironmentProblem | TrainingError) or "resume" in (error.hint or ""):
        return error
    if find_checkpoint(out, LAST) is not None:
        advice = "then rerun with --resume to continue from the last checkpoint."
    else:
        advice = "no checkpoint was written: rerun with --force to start over."
    hint = f"{error.hint.rstrip('.')}; {advice}" if error.hint else advice[0].upper() + advice[1:]
    return type(error)(error.message, hint)


def read_progress(checkpoint: Path,
                  hint: str = "Start the run over with --force, or restore the folder from a copy.") -> dict[str, Any]:
    """The checkpoint's progress record; a torn or foreign one is a DataError, for every command that reads it."""
    path = checkpoint / PROGRESS
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # not JSON, or not UTF-8
        raise DataError(f"{path} is damaged: not valid JSON ({err}).", hint) from err


def save_state(checkpoint: Path, state: dict[str, Any]) -> None:
    import torch

    # through a Python file object: on a full disk torch's own error ("unexpected pos ...") then carries the
    # OSError (ENOSPC) it met as its context, which `errors.known_cause` recognises. A Ctrl-C raised inside that
    # file's write would become the same RuntimeError (a "training failed", exit 5, instead of 130), so signals
    # wait for the write's end: it takes milliseconds, and the interrupt then stops the run as usual.
    with signals_deferred(), open(checkpoint / STATE, "wb") as f:
        torch.save(state, f)


def load_state(checkpoint: Path, map_location: Any = "cpu") -> dict[str, Any] | None:
    import torch

    path = checkpoint / STATE
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # UnpicklingError for planted code, RuntimeError/EOFError for a torn or foreign file
        raise DataError(f"{path} is not a training state lawder wrote ({type(err).__name__}); it was not loaded, "
                        "and no code in it ran.",
                        "Start the run over with --force (or move the run folder away); --resume cannot use it.",
                        ) from err
