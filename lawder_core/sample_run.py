"""Driver side of `lawder sample`: masks from an HDF5 split → synthetic pairs HDF5 + PNG grid, with provenance.

Masks are resized (nearest) to the run's size when they differ, planned (one per mask, or cycled with random
flips/rotations under `mask_aug`), sampled in this process or over Ray workers (identical images either way),
and written in the lawder HDF5 schema with the run, step, scheduler, seed, ... as file attributes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core.data.h5 import load_arrays, refuse_overwrite
from lawder_core.data.sampling_masks import MaskPlan, plan_masks, resize_masks
from lawder_core.environment import package_version
from lawder_core.errors import DataError, UsageError
from lawder_core.sample import SCHEDULERS, sample_pairs, write_synthetic_h5
from lawder_core.train.diffusion_run import RunInfo, run_info


@dataclass(frozen=True)
class SampleConfig:
    run: str
    masks: str  # lawder HDF5 file whose masks condition the samples
    out: str
    split: str = "train"
    n: int | None = None  # None: one synthetic image per mask
    mask_aug: bool = False
    steps: int = 50
    scheduler: str = "ddim"
    guidance: float = 1.0
    batch_size: int = 16
    seed: int = 0
    gpus: int = 0  # > 0: spread chunks over N GPU workers
    workers: int = 0  # with gpus == 0: N CPU Ray workers; 0 samples in this process
    ray_address: str | None = None
    force: bool = False

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise UsageError(f"unknown --scheduler {self.scheduler!r}; expected one of {SCHEDULERS}.")
        if self.steps < 1 or self.batch_size < 1:
            raise UsageError("--steps and --batch-size must be at least 1.")
        if self.gpus < 0 or self.workers < 0:
            raise UsageError("--gpus and --workers must be non-negative.")


def run_weighting(run: RunInfo) -> str | None:
    """The weighting the run was trained with, from its train_config.json (None for a bare model folder)."""
    for folder in (run.model_folder.parent.parent, run.model_folder.parent):
        path = folder / "train_config.json"
        if path.exists():
            return json.loads(path.read_text()).get("weighting")
    return None


def load_plan(cfg: SampleConfig, size: int) -> tuple[MaskPlan, tuple[int, int]]:
    """The masks to condition on, and the size they were stored at."""
    if not Path(cfg.masks).exists():
        raise DataError(f"--masks {cfg.masks} does not exist.", "Pass a file written by `lawder prepare`.")
    _, masks, cases = load_arrays(cfg.masks, cfg.split)
    if len(masks) == 0:
        raise DataError(f"{cfg.masks} has no masks in split {cfg.split!r}.", "Choose another --split.")
    stored = (int(masks.shape[1]), int(masks.shape[2]))
    return plan_masks(resize_masks(masks, size), cases, cfg.n, cfg.mask_aug, cfg.seed), stored


def generate_images(cfg: SampleConfig, masks: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
    kwargs: dict[str, Any] = {"steps": cfg.steps, "scheduler": cfg.scheduler, "guidance": cfg.guidance,
                              "batch_size": cfg.batch_size, "seed": cfg.seed}
    if cfg.gpus > 0 or cfg.workers > 0:
        from lawder_core.dist.ray_sample import sample_distributed

        return sample_distributed(cfg.run, masks, gpus=cfg.gpus, workers=cfg.workers, ray_address=cfg.ray_address,
                                  progress=progress, **kwargs)
    return sample_pairs(cfg.run, masks, progress=progress, **kwargs)


def provenance(cfg: SampleConfig, info: RunInfo, plan: MaskPlan, masks_size: tuple[int, int]) -> dict[str, Any]:
    return {
        "run": str(Path(cfg.run).resolve()), "step": info.step, "weighting": run_weighting(info),
        "model": str(info.model_folder.resolve()), "scheduler": cfg.scheduler, "steps": cfg.steps,
        "guidance": cfg.guidance, "seed": cfg.seed, "masks": str(Path(cfg.masks).resolve()), "split": cfg.split,
        "masks_size": list(masks_size), "n": len(plan.masks), "mask_aug": cfg.mask_aug,
        "lawder_version": package_version("lawder"),
    }


def run_sample(cfg: SampleConfig, progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Sample and write; `on_plan(n)` is told the number of images before sampling starts (for a progress bar)."""
    out = Path(cfg.out)
    refuse_overwrite(out, cfg.force)  # before minutes of sampling, not after
    info = run_info(cfg.run)
    plan, masks_size = load_plan(cfg, info.spec.size)
    if on_plan is not None:
        on_plan(len(plan.masks))
    tic = time.perf_counter()
    images = generate_images(cfg, plan.masks, progress)
    seconds = time.perf_counter() - tic
    prov = provenance(cfg, info, plan, masks_size)
    write_synthetic_h5(out, images, plan.masks, plan.case_ids, prov, force=cfg.force,
                       label_names=info.spec.label_names)
    return {"out": str(out), "grid": str(out.with_suffix(".png")), "n": len(images), "size": info.spec.size,
            "seconds": round(seconds, 3), "images_per_s": round(len(images) / max(seconds, 1e-9), 3),
            **prov, "config": asdict(cfg)}
