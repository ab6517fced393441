"""Mask adherence: how well synthetic images keep the lesion layout they were generated from.

A segmenter trained on real data segments the synthetic images; Dice between its prediction and the
conditioning mask measures layout drift directly (a generator that moved or dropped the lesion scores low,
whatever its FID). Binary: foreground = every mask label above 0.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from lawder_core.data.h5 import load_arrays
from lawder_core.errors import DataError
from lawder_core.metrics.dice import EMPTY_POLICIES, EmptyPolicy, segmentation_metrics
from lawder_core.metrics.predict import PredictFn, predict_labels


def mask_adherence(
    predict_fn: PredictFn,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int = 16,
    threshold: float = 0.5,
    empty_policy: EmptyPolicy = "one",
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Dice (mean, sd, per image) of the segmenter's foreground on `images` against the conditioning `masks`.

    predict_fn maps a float B×3×H×W batch in [0,1] to logits B×1×H×W (sigmoid > threshold is foreground) or
    B×C×H×W (argmax > 0 is foreground).
    """
    if len(images) != len(masks) or images.shape[1:3] != masks.shape[1:3]:
        raise DataError(f"{images.shape} images do not match {masks.shape} conditioning masks.")
    if len(images) == 0:
        raise DataError("no synthetic images to check adherence on.")
    predicted = predict_labels(predict_fn, images, batch_size=batch_size, threshold=threshold, device=device)
    report = segmentation_metrics((masks > 0).astype(np.uint8), (predicted > 0).astype(np.uint8),
                                  empty_policy=empty_policy)
    dice = np.array([im["metrics"]["foreground"]["Dice"] for im in report.per_image], np.float64)
    iou = np.array([im["metrics"]["foreground"]["IoU"] for im in report.per_image], np.float64)
    scored = dice[~np.isnan(dice)]
    mean, sd = _mean_sd(scored)
    return {
        "dice_mean": mean,
        "dice_sd": sd,
        "iou_mean": _mean_sd(iou[~np.isnan(iou)])[0],
        "dice_per_image": dice.tolist(),
        "n_images": len(images),
        "n_scored": len(scored),
        "threshold": threshold,
        "empty_policy": empty_policy,
        "empty_policy_meaning": EMPTY_POLICIES[empty_policy],
        "sd": "sample standard deviation (ddof=1) over scored images",
    }


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation; NaN for no values, sd 0 for one."""
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def adherence_on_h5(predict_fn: PredictFn, synthetic: str | os.PathLike, split: str | None = None, *,
                    limit: int | None = None, **options: Any) -> dict[str, Any]:
    """mask_adherence on a synthetic HDF5 file (from `lawder sample`): its images against its masks."""
    images, masks, _ = load_arrays(synthetic, split, limit)
    result = mask_adherence(predict_fn, images, masks, **options)
    result["synthetic"] = str(synthetic) + (f":{split}" if split not in (None, "all") else "")
    return result
