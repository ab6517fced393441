"""Driver side of `lawder train-law`: validate the request, launch the workers, summarise the run folder.

The per-worker loop is `train_diffusion` (diffusion.py); it runs through the same Ray launcher as the
segmenters. Everything that can be known before workers start is checked here, so a typo costs a second,
not a Ray start-up.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from lawder_core.config import build_config
from lawder_core.data.h5 import read_info, split_indices
from lawder_core.dist.ray_train import LaunchConfig, launch
from lawder_core.errors import DataError, UsageError
from lawder_core.models.denoiser import PRESETS
from lawder_core.train import diffusion_run as layout
from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion
from lawder_core.train.run_folder import read_metrics

log = logging.getLogger(__name__)

MAX_SIZE = 1024
LAW_STATS = ("w_lesion", "w_background", "w_max", "law_objective", "law_active")


def law_config(config_file: str | Path | None, law_overrides: dict[str, Any] | None = None,
               **overrides: Any) -> DiffusionTrainConfig:
    """Defaults < config file (a `tune` best.yaml works as is) < flags; LAW flags change single nested fields."""
    cfg = build_config(DiffusionTrainConfig, config_file, **overrides)
    given = {k: v for k, v in (law_overrides or {}).items() if v is not None}
    return replace(cfg, law=replace(cfg.law, **given)) if given else cfg


def saved_config(out: str | Path) -> Path | None:
    """The config a run was started with: what `--resume` continues when no --config is given."""
    path = Path(out) / "train_config.json"
    return path if path.exists() else None


def world_size(launch_cfg: LaunchConfig) -> int:
    return launch_cfg.gpus if launch_cfg.gpus > 0 else max(launch_cfg.workers, 1)


def check_size(cfg: DiffusionTrainConfig) -> None:
    if not 8 <= cfg.size <= MAX_SIZE:
        raise UsageError(f"--size {cfg.size} is outside [8, {MAX_SIZE}].", "Typical: 64 on a CPU, 256–512 on a GPU.")
    if cfg.backbone == "unet":
        factor = 2 ** (len(PRESETS[cfg.preset]["block_out_channels"]) - 1)
        if cfg.size % factor:
            raise UsageError(f"--size {cfg.size} must be divisible by {factor} for preset {cfg.preset!r} "
                             "(the UNet halves the resolution at every level).")
    elif cfg.backbone == "controlnet":
        if not cfg.pretrained or not Path(cfg.pretrained).is_dir():
            raise DataError(f"--pretrained {cfg.pretrained or '(none)'} is not a folder.",
                            "Give a local Stable Diffusion 1.5-style folder (vae/, unet/, scheduler/, text_encoder/).")
        if cfg.size % 8:
            raise UsageError(f"--size {cfg.size} must be divisible by 8 (the VAE works at 1/8 resolution).")
    else:
        raise UsageError(f"unknown --backbone {cfg.backbone!r}; expected unet or controlnet.")


def check_law_config(cfg: DiffusionTrainConfig, launch_cfg: LaunchConfig) -> None:
    """Fail before starting workers on what can be known up front: data, split, size, batch, backbone."""
    if not cfg.data:
        raise UsageError("no training data given.", "Pass --data FILE.h5 (see `lawder prepare`).")
    info = read_info(cfg.data)
    n = len(split_indices(cfg.data, cfg.split))
    if n == 0:
        raise DataError(f"{cfg.data} has no samples in split {cfg.split!r}.", "Check the split, or prepare the data.")
    check_size(cfg)
    per_worker = n // world_size(launch_cfg)
    if per_worker < cfg.batch_size:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {per_worker} training samples each of "
                         f"the {world_size(launch_cfg)} worker(s) sees.", "Lower --batch-size or use fewer workers.")
    if cfg.size > max(info.height, info.width):
        log.warning("--size %d is larger than the data (%d×%d): images are upsampled.", cfg.size, info.height,
                    info.width)


def latest_preview(out: Path) -> str | None:
    previews = sorted((out / layout.SAMPLES).glob("step_*.png"))
    return str(previews[-1]) if previews else None


def summarise_law_run(out: str | Path) -> dict[str, Any]:
    """Final step, last loss, LAW's weight statistics, the checkpoint and the newest preview grid."""
    out = Path(out)
    records = read_metrics(out)
    last = records[-1] if records else {}
    checkpoint = layout.find_checkpoint(out)
    config = saved_config(out)
    weighting = None
    if config is not None:
        weighting = build_config(DiffusionTrainConfig, config).weighting
    return {
        "out": str(out),
        "weighting": weighting,
        "step": int(last.get("step", 0)),
        "loss": last.get("loss"),
        "law": {k: last.get(k) for k in LAW_STATS},
        "sec_per_step": last.get("sec_per_step"),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "checkpoint_step": layout.read_progress(checkpoint)["step"] if checkpoint is not None else None,
        "preview": latest_preview(out),
        "metrics": str(out / layout.METRICS),
    }


def run_train_law(cfg: DiffusionTrainConfig, launch_cfg: LaunchConfig) -> dict[str, Any]:
    check_law_config(cfg, launch_cfg)
    launch(train_diffusion, cfg, launch_cfg)
    return summarise_law_run(cfg.out)
