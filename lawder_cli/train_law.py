"""`lawder train-law`: train a mask-conditioned denoiser (uniform, ratio or LAW weighting) through Ray Train."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, quiet_stdout, setup_logging
from lawder_cli.options import (
    CONFIG,
    FORCE,
    GPUS,
    JSON,
    LESION_LABELS,
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
from lawder_core.errors import UsageError
from lawder_core.train.configs import DiffusionTrainConfig as D  # noqa: N817 (help defaults read from it)


@handle_errors
def train_law(
    data: str = typer.Option(None, "--data", help="Prepared HDF5 file (its train split is used)."),
    out: Path = typer.Option(..., "--out", help="Run folder."),
    size: int = typer.Option(None, "--size", callback=in_range(numbers.LAW_SIZE),
                             help=f"Training resolution (default {default(D, 'size')})."),
    steps: int = typer.Option(None, "--steps", callback=in_range(numbers.COUNT),
                              help=f"Total optimiser steps (default {default(D, 'steps')})."),
    batch_size: int = typer.Option(None, "--batch-size", callback=in_range(numbers.BATCH),
                                   help=f"The global batch (default {default(D, 'batch_size')}): "
                                        "N workers take batch/N each, so --gpus "
                                        "changes the speed, not the steps or the schedule."),
    lr: float = typer.Option(None, "--lr", callback=in_range(numbers.LEARNING_RATE),
                             help=f"Denoiser learning rate (default {default(D, 'lr')})."),
    weighting: str = typer.Option(None, "--weighting",
                                  help=f"uniform | ratio | law (default {default(D, 'weighting')})."),
    objective: str = typer.Option(None, "--objective",
                                  help="LAW objective: hardness (default: weight goes where the denoiser errs) | "
                                       "influence (where the mask changes the prediction, |v_cond - v_uncond|; "
                                       "one extra forward pass per step) | descent (the original objective, an "
                                       "ablation: inverse-variance weighting)."),
    w_min: float = typer.Option(None, "--w-min", callback=in_range(numbers.W_MIN),
                                help=f"Lowest factor LAW may put on the prior (default {default(D, 'law.w_min')})."),
    w_max: float = typer.Option(None, "--w-max", callback=in_range(numbers.W_MAX),
                                help=f"Highest factor LAW may put on the prior (default {default(D, 'law.w_max')})."),
    gamma: float = typer.Option(None, "--gamma", callback=in_range(numbers.GAMMA),
                                help="Prior exponent: lesion weight ∝ (lesion share)^-γ "
                                     f"(default {default(D, 'law.gamma')}; 0: uniform)."),
    lesion_labels: str = LESION_LABELS,
    prediction: str = typer.Option(None, "--prediction",
                                   help="unet target: v (default) | flow (rectified flow) | epsilon."),
    snr_gamma: str = typer.Option(None, "--snr-gamma", metavar="GAMMA|none",
                                  help="Min-SNR-γ timestep weighting of the loss "
                                       f"(default {default(D, 'snr_gamma')}; LAW's objective gets "
                                       "the same weights); 'none' weighs every noise level alike."),
    cond_dropout: float = typer.Option(None, "--cond-dropout", callback=in_range(numbers.FRACTION),
                                       help="Share of rows trained with the null mask, for guidance "
                                            f"(default {default(D, 'cond_dropout')}; "
                                            "1: an unconditional model, a base for --init-from)."),
    init_from: str = typer.Option(None, "--init-from",
                                   help="Start the denoiser from this train-law run's EMA weights (fine-tuning); "
                                        "LAW and the optimisers start fresh. Same --size/--preset/--prediction. "
                                        "From a run with --cond-dropout 1 the mask inputs start at zero."),
    hflip: bool = typer.Option(None, "--hflip/--no-hflip",
                               help="Mirror training pairs left-right (polyps; never CT). Default: no augmentation."),
    preset: str = typer.Option(None, "--preset", help="UNet size: tiny | small (default) | base."),
    backbone: str = typer.Option(None, "--backbone", help="unet (default, pixel space) | controlnet."),
    pretrained: str = typer.Option(None, "--pretrained", help="controlnet: local Stable Diffusion 1.5-style folder."),
    prompt: str = typer.Option(None, "--prompt", help="controlnet: text prompt."),
    save_every: int = typer.Option(None, "--save-every", callback=in_range(numbers.EVERY),
                                   help="Checkpoint every N steps (0: only at the end)."),
    sample_every: int = typer.Option(None, "--sample-every", callback=in_range(numbers.EVERY),
                                     help="Preview grid every N steps (0: never)."),
    log_every: int = typer.Option(None, "--log-every", callback=in_range(numbers.COUNT),
                                  help="Metrics line every N steps."),
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
    """Train a mask-conditioned diffusion model; writes last/ (the checkpoint), metrics.jsonl, samples/*.png to --out.

    --config takes a YAML/TOML/JSON config, e.g. the best.yaml of `lawder tune law-clamp`; flags win over it.
    With --resume and no --config the run continues with the config it was started with.
    """
    from lawder_core.distributed.train import train_law as run_train_law
    from lawder_core.train.configs import law_config

    setup_logging()
    cfg = law_config(config, {"objective": objective, "w_min": w_min, "w_max": w_max, "gamma": gamma},
                     data=data, out=str(out), size=size, steps=steps, batch_size=batch_size,
                     lr=lr, weighting=weighting, lesion_labels=lesion_labels, preset=preset, backbone=backbone,
                     pretrained=pretrained, prompt=prompt, prediction=prediction, hflip=hflip,
                     cond_dropout=cond_dropout, init_from=init_from,
                     save_every=save_every, sample_every=sample_every, log_every=log_every, seed=seed, resume=resume)
    if snr_gamma is not None:
        cfg = replace(cfg, snr_gamma=parse_snr_gamma(snr_gamma))
    launch_cfg = launch_config(gpus, workers, ray_address, storage, out, wait_for_resources)
    with quiet_stdout():
        result = run_train_law(cfg, launch_cfg, force=force)
    if json_out:
        print_json(result)
        return
    show_summary(result)


def parse_snr_gamma(text: str) -> float | None:
    """'none' (any case) switches Min-SNR off; otherwise a positive number (the config checks the sign)."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError as err:
        raise UsageError(f"--snr-gamma {text!r} must be a positive number or 'none'.",
                         "Min-SNR-5 is the default; 'none' weighs every noise level alike.") from err


def show_summary(result: dict) -> None:
    loss = f"{result['loss']:.4f}" if result["loss"] is not None else "n/a"
    err_console.print(f"trained {result['weighting']} to step {result['step']}: loss {loss}, "
                      f"{result['sec_per_step'] or float('nan'):.3f} s/step")
    law = result["law"]
    if law.get("w_lesion") is not None:
        departure = law.get("law_departure")
        moved = f", departure from the prior {departure:.3f}" if departure is not None else ""
        err_console.print(f"weights: lesion {law['w_lesion']:.3f}, background {law['w_background']:.3f}, "
                          f"max {law['w_max']:.3f}{moved}")
    if result.get("init_from"):
        start = result["init_from"]
        zeroed = ", mask inputs at zero: it never saw a mask" if start.get("mask_inputs_zeroed") else ""
        err_console.print(f"started from {start['run']} (step {start['step']}, {start['weights']} weights{zeroed})")
    err_console.print(f"checkpoint {result['checkpoint']}" + (f"; preview {result['preview']}"
                                                              if result["preview"] else ""))
