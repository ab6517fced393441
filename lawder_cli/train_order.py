"""`lawder train-order`: train an ORDER / MK-UNet / smp segmenter through Ray Train."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, quiet_stdout, setup_logging
from lawder_cli.options import (
    CONFIG,
    FORCE,
    GPUS,
    JSON,
    LABELS,
    RAY_ADDRESS,
    RESUME,
    SEED,
    STORAGE,
    WAIT_FOR_RESOURCES,
    WORKERS,
    default,
    in_range,
    launch_config,
)
from lawder_core import numbers
from lawder_core.train.configs import SegTrainConfig


@handle_errors
def train_order(
    data: str = typer.Option(..., "--data", help="Prepared HDF5 file (its train and val splits are used)."),
    out: Path = typer.Option(..., "--out", help="Run folder."),
    model: str = typer.Option(None, "--model", help="mkunet-t-order (default), mkunet-{t,s,base,m,l}, unet-r34, ..."),
    synthetic: str = typer.Option(None, "--synthetic", help="Synthetic HDF5 from `lawder sample` to add."),
    synthetic_ratio: float = typer.Option(None, "--synthetic-ratio", callback=in_range(numbers.RATIO),
                                          help="Synthetic samples per real one."),
    size: int = typer.Option(None, "--size", callback=in_range(numbers.SEG_SIZE),
                             help="Training size (divisible by 32)."),
    epochs: int = typer.Option(None, "--epochs", callback=in_range(numbers.EPOCHS)),
    batch_size: int = typer.Option(None, "--batch-size", callback=in_range(numbers.BATCH),
                                   help=f"The global batch (default {default(SegTrainConfig, 'batch_size')}): "
                                        "N workers take batch/N each, so --gpus "
                                        "changes the speed, not the steps or the schedule."),
    lr: float = typer.Option(None, "--lr", callback=in_range(numbers.LEARNING_RATE)),
    encoder_weights: str = typer.Option(None, "--encoder-weights", help="smp baselines: e.g. imagenet (downloads)."),
    steps: int = typer.Option(None, "--steps", callback=in_range(numbers.COUNT),
                              help="Optimiser steps in all (equal budgets across compared runs); "
                                   "the epochs follow from it. Default: --epochs full epochs."),
    folds: int = typer.Option(None, "--folds", callback=in_range(numbers.FOLDS),
                              help="K-fold cross-validation over the non-test cases (with --fold); "
                                   "folds are drawn by case once per data file and kept beside it (DATA.foldsK.json)."),
    fold: int = typer.Option(None, "--fold", callback=in_range(numbers.FOLD),
                             help="With --folds: the held-out fold (0..K-1) to validate on; the "
                                  "run trains on the other folds. `lawder evaluate` then scores that fold."),
    select: str = typer.Option(None, "--select", help="Checkpoint that evaluate/predict use: best (validation "
                               "Dice, default) or last."),
    init_from: str = typer.Option(None, "--init-from", help="Start from this run's selected checkpoint (ORDER: the "
                                  "trunk of an MK-UNet run of the same width; ORDER's own weights start at zero)."),
    freeze_trunk: bool = typer.Option(None, "--freeze-trunk/--train-trunk",
                                      help="With --init-from and an ORDER model: train ORDER's parameters only "
                                           "(two-stage ORDER); the start is scored first and kept unless beaten."),
    labels: str = LABELS,
    seed: int = SEED,
    gpus: int = GPUS,
    workers: int = WORKERS,
    ray_address: str = RAY_ADDRESS,
    wait_for_resources: float = WAIT_FOR_RESOURCES,
    storage: str = STORAGE,
    config: Path = CONFIG,
    resume: bool = RESUME,
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Train a segmenter; writes best/ and last/ checkpoints, metrics.jsonl and curves.png to --out."""
    from lawder_core.distributed.train import train_order as run_train_order
    from lawder_core.train.configs import seg_config

    setup_logging()
    cfg = seg_config(config, data=data, out=str(out), model=model, synthetic=synthetic,
                       synthetic_ratio=synthetic_ratio, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                       encoder_weights=encoder_weights, labels=labels, seed=seed, resume=resume, steps=steps,
                       folds=folds, fold=fold, select=select, init_from=init_from, freeze_trunk=freeze_trunk)
    with quiet_stdout():
        launch_cfg = launch_config(gpus, workers, ray_address, storage, out, wait_for_resources)
        result = run_train_order(cfg, launch_cfg, force=force)
    if json_out:
        print_json(result)
    else:
        where = "the starting model" if result["best_epoch"] == -1 else f"epoch {result['best_epoch']}"
        err_console.print(f"trained {cfg.model} for {result['steps']} steps: best validation Dice "
                          f"{result['best_dice']:.4f} ({where}); checkpoints in {out}/best and {out}/last "
                          f"(evaluate and predict use {result['select']}/)")
