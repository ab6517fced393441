"""`lawder tune`: Ray Tune sweeps (ASHA by default) whose trials run the same training functions as the commands.

Each trial is a Tune function trainable on one worker (with `--gpus-per-trial` / `--cpus-per-trial`) that calls
`train_segmenter` or `train_diffusion` with the trial's values applied to the base config, and reports the
objective after every epoch / evaluation so ASHA can stop bad trials early. The experiment lives in
`OUT/experiment`; running the same command again restores it and never redoes finished trials.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from lawder_core import runs
from lawder_core.config import to_dict, with_absolute_paths
from lawder_core.distributed.train import ensure_ray
from lawder_core.errors import TrainingError, UsageError
from lawder_core.files import atomic_save, write_json
from lawder_core.tune import apply_params, flatten_params

log = logging.getLogger(__name__)
EXPERIMENT = "experiment"


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

    def __post_init__(self) -> None:
        if self.scheduler not in ("asha", "none") or self.search not in ("random", "grid"):
            raise UsageError("--scheduler must be asha or none; --search must be random or grid.")
        if self.trials < 1 or self.budget < 1:
            raise UsageError("--trials and --budget must be at least 1.")
        if self.gpus_per_trial < 0 or self.cpus_per_trial <= 0:
            raise UsageError("--gpus-per-trial must be non-negative and --cpus-per-trial positive.")


@dataclass(frozen=True)
class Sweep:
    """What a sweep optimises: the trainable, its metric and direction, and the time attribute ASHA uses."""

    trainable: Callable[..., None]
    metric: str
    mode: str


def trial_folder(out: Path) -> Path:
    from ray import tune

    return out / "trials" / tune.get_context().get_trial_id()


def order_trial(params: dict[str, Any], base: Any, out: str) -> None:
    """One ORDER trial: train_segmenter with the trial's knobs; reports validation Dice every epoch."""
    from ray import tune

    from lawder_core.train.seg import train_segmenter

    run = trial_folder(Path(out))
    cfg = replace(apply_params(base, params), out=str(run), resume=(run / "last").exists())
    train_segmenter(cfg, report=lambda m: tune.report({"val_dice": m["val_dice"], "epoch": m["epoch"]}))


def law_trial(params: dict[str, Any], base: Any, out: str) -> None:
    """One LAW trial: train_diffusion with a checkpoint per round; each checkpoint is sampled and scored."""
    from ray import tune

    from lawder_core.train.diffusion import train_diffusion
    from lawder_core.tune import evaluation_set, generation_score, scoring_terms, training_config

    cfg = apply_params(base, params)
    run = trial_folder(Path(out))
    terms = scoring_terms(cfg)
    images, masks = evaluation_set(cfg)

    def score_checkpoint(record: dict[str, Any]) -> None:
        if "checkpoint" in record:
            tune.report({"step": record["step"], **generation_score(cfg, str(run), terms, images, masks)})

    resume = (run / "metrics.jsonl").exists()
    train_diffusion(training_config(cfg, str(run), resume), report=score_checkpoint)


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


def build_tuner(kind: str, base: Any, space: dict[str, dict[str, Any]], out: Path, opts: TuneOptions) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    sweep = sweep_for(kind)
    trainable = tune.with_resources(tune.with_parameters(sweep.trainable, base=base, out=str(out)),
                                    {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial})
    if Path(out / EXPERIMENT).exists() and tune.Tuner.can_restore(str(out / EXPERIMENT)):
        log.info("restoring the experiment in %s: finished trials are kept", out / EXPERIMENT)
        return tune.Tuner.restore(str(out / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=True)
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
        run_config=tune.RunConfig(storage_path=str(out.resolve()), name=EXPERIMENT, verbose=0),
    )


def results_table(grid: Any, sweep: Sweep) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, trial config) per trial, best first (ties broken by trial name, so reruns agree)."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        values = history[sweep.metric].dropna().tolist() if history is not None and sweep.metric in history else []
        best = (max(values) if sweep.mode == "max" else min(values)) if values else None
        row = {
            "trial": Path(result.path).name if result.path else "",
            **flatten_params(result.config),
            sweep.metric: values[-1] if values else None,
            f"best_{sweep.metric}": best,
            "iterations": len(values),
            "error": str(result.error).splitlines()[0] if result.error else None,
        }
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


def run_tune(kind: str, base: Any, space: dict[str, dict[str, Any]], out: str | Path,
             opts: TuneOptions, *, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Run a sweep, or resume it with `resume`; writes config.json, results.csv/json, best.yaml, summary.json."""
    out = Path(out).resolve()
    if (out / EXPERIMENT).exists() and not (resume or force):
        raise UsageError(f"{out} already holds a sweep.",
                         "Pass --resume to continue it, --force to start over, or choose another --out.")
    if resume and not force and not (out / EXPERIMENT).exists():
        raise UsageError(f"--resume: {out} holds no sweep to continue.", "Drop --resume to start one.")
    runs.open_run(out, resume=resume, force=force)
    runs.write_config(out, {"kind": kind, "base": to_dict(base), "space": space, "options": to_dict(opts)})
    ensure_ray(opts.ray_address)
    base = with_absolute_paths(base)
    sweep = sweep_for(kind)
    grid = build_tuner(kind, base, space, out, opts).fit()
    table = results_table(grid, sweep)
    rows = [row for row, _ in table]
    if not rows or rows[0][f"best_{sweep.metric}"] is None:
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
