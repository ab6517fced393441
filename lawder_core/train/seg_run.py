"""Driver side of segmenter training: validate the request, launch the workers, summarise the run folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lawder_core.data.h5 import read_info
from lawder_core.dist.ray_train import LaunchConfig, launch
from lawder_core.errors import UsageError
from lawder_core.models.factory import available_models
from lawder_core.train.run_folder import read_metrics
from lawder_core.train.seg import SegTrainConfig, train_segmenter


def check_seg_config(cfg: SegTrainConfig) -> None:
    """Fail before starting workers on what can be known up front."""
    if cfg.model not in available_models():
        raise UsageError(f"unknown model {cfg.model!r}.", f"Available: {', '.join(available_models())}.")
    if cfg.size % 32:
        raise UsageError(f"--size {cfg.size} must be divisible by 32 (the U-Nets downsample 5 times).")
    read_info(cfg.data)
    if cfg.synthetic:
        read_info(cfg.synthetic)


def summarise_run(out: str | Path) -> dict[str, Any]:
    records = read_metrics(out)
    if not records:
        return {"out": str(out), "epochs": 0, "best_dice": None, "best_epoch": None}
    best = max(records, key=lambda r: r.get("val_dice", -1))
    return {"out": str(out), "epochs": records[-1]["epoch"] + 1, "best_dice": best.get("val_dice"),
            "best_epoch": best["epoch"], "last": records[-1]}


def run_train_order(cfg: SegTrainConfig, launch_cfg: LaunchConfig) -> dict[str, Any]:
    check_seg_config(cfg)
    launch(train_segmenter, cfg, launch_cfg)
    return summarise_run(cfg.out)
