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
    in_range,
    launch_config,
)
from lawder_core import numbers


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
                                   help="Per-worker batch size."),
    lr: float = typer.Option(None, "--lr", callback=in_range(numbers.LEARNING_RATE)),
    encoder_weights: str = typer.Option(None, "--encoder-weights", help="smp baselines: e.g. imagenet (downloads)."),
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
    from lawder_core.config import build_config
    from lawder_core.distributed.train import train_order as run_train_order
    from lawder_core.runs import config_path
    from lawder_core.train.configs import SegTrainConfig

    setup_logging()
    if config is None and resume:
        config = config_path(out)  # a resumed run continues with the config it was started with
    cfg = build_config(SegTrainConfig, config, data=data, out=str(out), model=model, synthetic=synthetic,
                       synthetic_ratio=synthetic_ratio, size=size, epochs=epochs, batch_size=batch_size, lr=lr,
                       encoder_weights=encoder_weights, labels=labels, seed=seed, resume=resume)
    with quiet_stdout():
        launch_cfg = launch_config(gpus, workers, ray_address, storage, out, wait_for_resources)
        result = run_train_order(cfg, launch_cfg, force=force)
    if json_out:
        print_json(result)
    else:
        err_console.print(f"trained {cfg.model}: best validation Dice {result['best_dice']:.4f} "
                          f"(epoch {result['best_epoch']}); checkpoints in {out}/best and {out}/last")
