"""`lawder tune`: Ray Tune sweeps (ASHA by default) whose trials run the same training functions as the commands.

Each trial is a Tune function trainable on one worker (with `--gpus-per-trial` / `--cpus-per-trial`) that calls
`train_segmenter` or `train_diffusion` with the trial's values applied to the base config, and reports the
objective after every epoch / evaluation so ASHA can stop bad trials early.

Resuming never reads Ray's own experiment state: Ray restores a sweep by unpickling `experiment/tuner.pkl` and
the pickles inside its state files, and a sweep folder copied from someone else would run their code. Instead
each trial keeps its state in lawder's own files (`trials/NNNNN-HASH/`: the training run folder, its reports as
JSON lines, `trial.json` once it ended), `--resume` starts a fresh Ray experiment with the same seed (hence the same
trials in the same order), and each trial replays its recorded reports, returns if it had ended, or continues
training from its last checkpoint.

A trial trains and scores on the device its resources name: a GPU with `--gpus-per-trial` above 0, else the
CPU (even where a GPU is visible: Ray's accounting would not know of it). On a joined cluster every trial first
checks that it sees the sweep folder the driver reads (`shared_storage.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lawder_core import limits, numbers, runs
from lawder_core.config import to_dict, with_absolute_paths
from lawder_core.distributed.session import (
    check_local_gpus,
    ensure_ray,
    find_lawder_error,
    fit_interruptibly,
    wait_for_resources,
)
from lawder_core.distributed.shared_storage import check_marker, remove_marker, write_marker
from lawder_core.environment import DEFAULT_WAIT_S
from lawder_core.errors import EnvironmentProblem, TrainingError, UsageError
from lawder_core.files import append_jsonl, atomic_save, read_jsonl, write_json
from lawder_core.sweeps import apply_params, check_space, flatten_params

log = logging.getLogger(__name__)
EXPERIMENT = "experiment"
TRIALS = "trials"
REPORTS = "reports.jsonl"  # every report a trial made, replayed to Tune on --resume
ENDED = "trial.json"  # written once Tune has finished with a trial (completed or stopped early)
TRIAL_METRIC = "lawder_trial"


@dataclass(frozen=True)
class TuneOptions:
    trials: int = 8
    budget: int = 10  # epochs (order) or training steps (law) per trial
    gpus_per_trial: float = 0
    cpus_per_trial: float = 1
    scheduler: str = "asha"  # "asha" | "none"
    search: str = "random"  # "random" | "grid"
    seed: int = 0
    ray_address: str | None = None
    wait_for_resources: float = DEFAULT_WAIT_S  # a joined cluster: seconds to wait for one trial's resources

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"trials": numbers.TRIALS, "budget": numbers.EPOCHS,
                                    "gpus_per_trial": numbers.GPUS, "cpus_per_trial": numbers.CPUS,
                                    "seed": numbers.SEED, "wait_for_resources": numbers.WAIT_S})
        cores = os.cpu_count() or 1
        if self.ray_address is None and self.cpus_per_trial > cores:  # a local Ray would wait for them forever
            raise UsageError(f"--cpus-per-trial {self.cpus_per_trial:g} asks for more CPUs than this machine has "
                             f"({cores}).", f"Use --cpus-per-trial {cores} or fewer, or join a larger cluster "
                                            "with --ray-address.")
        if self.scheduler not in ("asha", "none") or self.search not in ("random", "grid"):
            raise UsageError("--scheduler must be asha or none; --search must be random or grid.")
        if self.trials < 1 or self.budget < 1:
            raise UsageError("--trials and --budget must be at least 1.")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise UsageError("--gpus-per-trial must be non-negative and --cpus-per-trial positive.")
        if self.wait_for_resources < 0:
            raise UsageError("--wait-for-resources must be 0 or more seconds.")


@dataclass(frozen=True)
class Sweep:
    """What a sweep optimises: the trainable, its metric and direction, and the time attribute ASHA uses."""

    trainable: Callable[..., None]
    metric: str
    mode: str


def trial_key(index: str, params: dict[str, Any]) -> str:
    """The trial's number in the sweep and a hash of its values: the same on a resumed sweep with the same seed."""
    values = json.dumps(flatten_params(params), sort_keys=True, default=str)
    return f"{index}-{hashlib.sha256(values.encode()).hexdigest()[:10]}"


def trial_folder(out: Path, params: dict[str, Any]) -> Path:
    from ray import tune

    index = tune.get_context().get_trial_id().rsplit("_", 1)[-1]  # Tune's per-experiment counter, 00000…
    return out / TRIALS / trial_key(index, params)


def replaying_reporter(folder: Path) -> tuple[Callable[[dict[str, Any]], None], bool]:
    """Replay what the trial reported before (a resumed sweep); the reporter records and forwards new reports.

    Returns (reporter, ended): `ended` means Tune had finished with this trial, so it must not train again.
    """
    from ray import tune

    folder.mkdir(parents=True, exist_ok=True)
    for record in read_jsonl(folder / REPORTS):
        tune.report(record)

    def report(record: dict[str, Any]) -> None:
        record = {**record, TRIAL_METRIC: folder.name}  # so the results can name the trial's folder
        append_jsonl(folder / REPORTS, record)
        tune.report(record)

    return report, (folder / ENDED).exists()


def trial_device(opts: TuneOptions) -> str:
    """Where each trial trains and scores: a GPU when it holds (a share of) one, else the CPU."""
    return "cuda" if opts.gpus_per_trial > 0 else "cpu"


def start_trial(out: str, device: str, shared_token: str | None) -> None:
    """In the trial's process: train on `device`, and (joined cluster) see the sweep folder the driver reads."""
    from lawder_core.train.runtime import DEVICE_ENV

    os.environ[DEVICE_ENV] = device
    if shared_token:
        check_marker(out, shared_token)


def order_trial(params: dict[str, Any], base: Any, out: str, device: str = "auto",
                shared_token: str | None = None) -> None:
    """One ORDER trial: train_segmenter with the trial's knobs; reports validation Dice every epoch."""
    from lawder_core.train.seg import train_segmenter

    start_trial(out, device, shared_token)
    run = trial_folder(Path(out), params)
    report, ended = replaying_reporter(run)
    if ended:
        return
    cfg = replace(apply_params(base, params), out=str(run), resume=(run / "last").exists())
    train_segmenter(cfg, report=lambda m: report({"val_dice": m["val_dice"], "epoch": m["epoch"]}))


def law_trial(params: dict[str, Any], base: Any, out: str, device: str = "auto",
              shared_token: str | None = None) -> None:
    """One LAW trial: train_diffusion with a checkpoint per round; each checkpoint is sampled and scored on the
    trial's device."""
    from lawder_core.sweeps import evaluation_set, generation_score, scoring_terms, training_config
    from lawder_core.train.diffusion import train_diffusion
    from lawder_core.train.runtime import device_kind

    start_trial(out, device, shared_token)
    cfg = apply_params(base, params)
    run = trial_folder(Path(out), params)
    report, ended = replaying_reporter(run)
    if ended:
        return
    terms = scoring_terms(cfg)
    images, masks = evaluation_set(cfg)

    def score_checkpoint(record: dict[str, Any]) -> None:
        if "checkpoint" in record:
            # law_departure: how far this trial's map has left the prior (clamp ranges only differ once it has)
            report({"step": record["step"], "law_departure": record.get("law_departure"),
                    **generation_score(cfg, str(run), terms, images, masks, device=device_kind())})

    resume = (run / "metrics.jsonl").exists()
    train_diffusion(training_config(cfg, str(run), resume), report=score_checkpoint)


def mark_ended(grid: Any, out: Path) -> None:
    """Record, in lawder's files, which trials Tune finished with, so a resumed sweep does not train them again."""
    for result in grid:
        name = (result.metrics or {}).get(TRIAL_METRIC)
        if result.error is None and name:
            folder = out / TRIALS / name
            write_json(folder / ENDED, {"reports": len(read_jsonl(folder / REPORTS))})


def sweep_for(kind: str) -> Sweep:
    if kind == "order":
        return Sweep(order_trial, metric="val_dice", mode="max")
    return Sweep(law_trial, metric="val_score", mode="min")


def to_tune_space(space: dict[str, dict[str, Any]], search: str) -> dict[str, Any]:
    from ray import tune

    converted: dict[str, Any] = {}
    for key, dist in space.items():
        (name, values), = dist.items()
        if name == "grid" or (name == "choice" and search == "grid"):
            converted[key] = tune.grid_search(list(values))
        elif name == "choice":
            converted[key] = tune.choice(list(values))
        elif name == "uniform":
            converted[key] = tune.uniform(*values)
        elif name == "loguniform":
            converted[key] = tune.loguniform(*values)
        elif name == "randint":
            converted[key] = tune.randint(*values)
    return converted


def grid_size(space: dict[str, dict[str, Any]], search: str) -> int:
    gridded = ("grid", "choice") if search == "grid" else ("grid",)
    sizes = [len(v) for d in space.values() for k, v in d.items() if k in gridded]
    return math.prod(sizes) if sizes else 1


def stopper_on(event: threading.Event | None = None) -> Any:
    """A Tune stopper that ends every trial once `event` is set (lawder's Ctrl-C and SIGTERM set it).

    Tune copies and pickles its run config; the event stays in this process (a copy gets a fresh, unset one).
    """
    event = event if event is not None else threading.Event()
    from ray.tune.stopper import Stopper

    class StopOnEvent(Stopper):
        def __init__(self) -> None:
            self.event = event

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return self.event.is_set()

        def stop_all(self) -> bool:
            return self.event.is_set()

        def __reduce__(self) -> tuple[Any, ...]:
            return (stopper_on, ())

    return StopOnEvent()


def build_tuner(kind: str, base: Any, space: dict[str, dict[str, Any]], out: Path, opts: TuneOptions,
                shared_token: str | None = None, stop: threading.Event | None = None) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = sweep_for(kind)
    trainable = tune.with_resources(tune.with_parameters(sweep.trainable, base=base, out=str(out),
                                                         device=trial_device(opts),
                                                         shared_token=shared_token),
                                    {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=max(1, opts.budget), grace_period=1,
                               reduction_factor=2) if opts.scheduler == "asha" else FIFOScheduler())
    grid = grid_size(space, opts.search)
    samples = max(1, opts.trials // grid)
    import numpy as np

    np.random.seed(opts.seed)  # Tune's random search draws from numpy's global generator
    return tune.Tuner(
        trainable,
        param_space=to_tune_space(space, opts.search),
        tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=samples,
                                    scheduler=scheduler),
        run_config=tune.RunConfig(storage_path=str(out.resolve()), name=EXPERIMENT, verbose=0,
                                  stop=stopper_on(stop) if stop is not None else None),
    )


def trial_error(error: BaseException) -> str:
    """What went wrong in a trial, in one line: lawder's own message where there is one, else the exception's last
    line (Ray's first line only names the actor)."""
    found = find_lawder_error(error)
    if found is not None:
        return found.message
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def results_table(grid: Any, sweep: Sweep) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, trial config) per trial, best first (ties broken by trial name, so reruns agree)."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = history[sweep.metric].dropna().tolist() if history is not None and sweep.metric in history else []
        best = (max(values) if sweep.mode == "max" else min(values)) if values else None
        row = {
            "trial": (result.metrics or {}).get(TRIAL_METRIC) or (Path(result.path).name if result.path else ""),
            **flatten_params(result.config),
            sweep.metric: values[-1] if values else None,
            f"best_{sweep.metric}": best,
            "iterations": len(values),
            "error": trial_error(result.error) if result.error else None,
        }
        if history is not None and "law_departure" in history:
            departures = history["law_departure"].dropna().tolist()
            row["law_departure"] = departures[-1] if departures else None
        rows.append((row, result.config))
    sign = -1 if sweep.mode == "max" else 1

    def order(item: tuple[dict[str, Any], dict[str, Any]]) -> tuple:
        value = item[0][f"best_{sweep.metric}"]
        return (value is None, sign * (value or 0), item[0]["trial"])

    return sorted(rows, key=order)


def write_results(rows: list[dict[str, Any]], out: Path, base: Any, best_params: dict[str, Any] | None) -> None:
    import csv

    write_json(out / "results.json", rows)
    keys = sorted({k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    tmp = out / "results.csv.partial"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out / "results.csv")
    if best_params is not None:
        # best.yaml is a training config as `--config` reads it; --data/--out come from the command line.
        best = to_dict(apply_params(base, best_params))
        for key in ("out", "resume", *getattr(base, "TUNE_ONLY_FIELDS", ())):
            best.pop(key, None)
        atomic_save(lambda p: p.write_text(yaml.safe_dump(best, sort_keys=False)), out / "best.yaml")


def check_sweep_memory(base: Any, opts: TuneOptions) -> None:
    """On a local Ray the trials run side by side, as many as its CPUs allow: each holds one training's memory.
    Checked against this machine before the sweep folder is touched (a joined cluster's nodes are its own)."""
    if opts.ray_address is not None:
        return
    from lawder_core.data.h5 import read_info, split_indices
    from lawder_core.train.configs import SegTrainConfig

    side_by_side = max(1, min(opts.trials, int((os.cpu_count() or 1) // opts.cpus_per_trial)))
    on_gpu = opts.gpus_per_trial > 0
    if isinstance(base, SegTrainConfig):
        info = read_info(base.data)
        samples = len(split_indices(base.data, "train")) + len(split_indices(base.data, "val"))
        limits.check_seg_training(base.model, base.size, base.batch_size, (info.height, info.width, info.channels),
                                  samples, processes=side_by_side, on_gpu=on_gpu, what="tune order")
    elif getattr(base, "backbone", "unet") == "unet":
        limits.check_law_training(base.preset, base.size, base.batch_size, processes=side_by_side, on_gpu=on_gpu)


def run_tune(kind: str, base: Any, space: dict[str, dict[str, Any]], out: str | Path,
             opts: TuneOptions, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run a sweep, or resume it with `resume`; writes config.json, results.csv/json, best.yaml, summary.json."""
    out = Path(out).resolve()
    # A sweep killed between writing its config and Ray's first trial holds only config.json: still a sweep.
    holds_sweep = (out / EXPERIMENT).exists() or (out / TRIALS).exists() or runs.config_path(out) is not None
    if holds_sweep and not (resume or force):
        raise UsageError(f"{out} already holds a sweep.",
                         "Pass --resume to continue it, --force to start over, or choose another --out.")
    if resume and not force and not holds_sweep:
        raise UsageError(f"--resume: {out} holds no sweep to continue.", "Drop --resume to start one.")
    check_space(base, space)
    check_local_gpus(opts.gpus_per_trial, opts.ray_address)
    check_sweep_memory(base, opts)
    runs.open_run(out, resume=resume, force=force)
    if resume and (out / EXPERIMENT).exists():
        # Ray's state is never restored (it is pickles): the trials resume from lawder's own files instead.
        log.info("resuming from %s; Ray's previous experiment state is discarded, not read", out / TRIALS)
        shutil.rmtree(out / EXPERIMENT)
    runs.write_config(out, {"kind": kind, "base": to_dict(base), "space": space, "options": to_dict(opts)})
    ensure_ray(opts.ray_address)
    trial_needs = {"CPU": opts.cpus_per_trial, **({"GPU": opts.gpus_per_trial} if opts.gpus_per_trial else {})}
    wait_for_resources(opts.ray_address, trial_needs, opts.wait_for_resources)
    base = with_absolute_paths(base)
    sweep = sweep_for(kind)
    token = write_marker(out) if opts.ray_address is not None else None
    # Off the main thread, Tune installs no SIGINT handler of its own (which let a Ctrl-C finish the sweep with
    # exit 0 or 5, and ray.init's SIGTERM handler exited 1): lawder's treatment applies, exit 130 or 143.
    stop = threading.Event()
    grid = fit_interruptibly(build_tuner(kind, base, space, out, opts, token, stop), stop)
    remove_marker(out)
    mark_ended(grid, out)
    table = results_table(grid, sweep)
    rows = [row for row, _ in table]
    if not rows or rows[0][f"best_{sweep.metric}"] is None:
        storage = next((e for e in (find_lawder_error(r.error) for r in grid if r.error)
                        if isinstance(e, EnvironmentProblem)), None)
        if storage is not None:  # e.g. the sweep folder not shared with the trials' machines
            raise storage
        errors = {r["error"] for r in rows if r["error"]}
        raise TrainingError(f"no trial of the sweep reported {sweep.metric}.",
                            f"Trial errors: {sorted(errors)[:3]}" if errors else "Check the trial logs in " + str(out))
    best_row, best_config = table[0]
    write_results(rows, out, base, best_config)
    summary = {"kind": kind, "trials": len(rows), "errors": sum(1 for r in rows if r["error"]),
               "best": {k: v for k, v in best_row.items() if k not in ("error",)},
               "metric": sweep.metric, "mode": sweep.mode, "out": str(out), "rows": rows}
    runs.write_summary(out, summary)
    return summary
