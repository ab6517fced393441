"""Mask adherence: how well synthetic images keep the lesion layout they were generated from.

A segmenter trained on real data segments the synthetic images; Dice between its prediction and the
conditioning mask measures layout drift directly (a generator that moved or dropped the lesion scores low,
whatever its FID). Binary: foreground = the lesion labels (`lesion_labels`: those LAW treated as lesion, which
`lawder sample` records in the synthetic file; KiTS tumour and cyst) in the mask and in the prediction, read as
stored labels through the segmenter's label map; without lesion labels (files from before they were recorded)
every mask label above 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.labels import LabelMap, label_map, lesion_names
from lawder_core.errors import DataError, UsageError
from lawder_core.metrics.dice import EMPTY_POLICIES, EmptyPolicy, segmentation_metrics
from lawder_core.models.inference import PredictFn, predict_labels


def mask_adherence(
    predict_fn: PredictFn,
    images: np.ndarray,
    masks: np.ndarray,
    *,
    batch_size: int = 16,
    threshold: float = 0.5,
    empty_policy: EmptyPolicy = "one",
    device: str | torch.device = "cpu",
    lesion_labels: Sequence[int] | None = None,
    classes: LabelMap | None = None,
) -> dict[str, Any]:
    """Dice (mean, sd, per image) of the segmenter's lesion on `images` against the conditioning `masks`' lesion.

    predict_fn maps a float B×3×H×W batch in [0,1] to logits B×1×H×W (sigmoid > threshold is class 1) or
    B×C×H×W (argmax). With `lesion_labels` (stored label values) the lesion is those labels: in the masks
    directly, in the prediction after `classes` (the segmenter's label map, see `segmenter_classes`; None: class
    k is label k) turns classes into stored labels. Without, every label > 0 on both sides.
    """
    if len(images) != len(masks) or images.shape[1:3] != masks.shape[1:3]:
        raise DataError(f"{images.shape} images do not match {masks.shape} conditioning masks.")
    if len(images) == 0:
        raise DataError("no synthetic images to check adherence on.")
    predicted = predict_labels(predict_fn, images, batch_size=batch_size, threshold=threshold, device=device)
    truth, guess = lesion_masks(masks, predicted, lesion_labels, classes)
    report = segmentation_metrics(truth, guess, empty_policy=empty_policy)
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
        "lesion_labels": None if lesion_labels is None else [int(k) for k in lesion_labels],
        "n_scored": len(scored),
        "threshold": threshold,
        "empty_policy": empty_policy,
        "empty_policy_meaning": EMPTY_POLICIES[empty_policy],
        "sd": "sample standard deviation (ddof=1) over scored images",
    }


def segmenter_classes(recorded: LabelMap | None, num_classes: int, stored_names: Sequence[str]) -> LabelMap:
    """A segmenter's classes as stored labels: its recorded label map, or for a run from before label maps the
    binary 'every label > 0' (one output) or class k = label k (several)."""
    if recorded is not None:
        return recorded
    foreground = "+".join(str(k) for k in range(1, len(stored_names)))
    return label_map(stored_names, foreground if num_classes == 1 else None)


def lesion_masks(masks: np.ndarray, predicted: np.ndarray, lesion_labels: Sequence[int] | None,
                 classes: LabelMap | None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 lesion indicators of the conditioning masks and of the predicted classes."""
    if lesion_labels is None:
        return (masks > 0).astype(np.uint8), (predicted > 0).astype(np.uint8)
    if classes is not None:
        if not classes.separates(lesion_labels):
            raise UsageError(f"the segmenter's classes ({', '.join(classes.names)}) cannot tell the lesion "
                             f"({lesion_names(classes.stored_names, lesion_labels)}) from the rest of the mask.",
                             "Judge adherence with a segmenter trained with --labels that keep the lesion labels "
                             "apart (KiTS: the default kidney,tumor,cyst), or pass matching --lesion-labels.")
        predicted = classes.to_stored(predicted)
    wanted = np.asarray(list(lesion_labels))
    return np.isin(masks, wanted).astype(np.uint8), np.isin(predicted, wanted).astype(np.uint8)


def _mean_sd(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample standard deviation; NaN for no values, sd 0 for one."""
    if len(values) == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def adherence_on_h5(predict_fn: PredictFn, synthetic: str | os.PathLike, split: str | None = None, *,
                    limit: int | None = None, classes: LabelMap | None = None, num_classes: int = 1,
                    **options: Any) -> dict[str, Any]:
    """mask_adherence on a synthetic HDF5 file (from `lawder sample`): its images against its masks.

    The lesion is the file's recorded `lesion_labels` (none recorded: every label > 0); `classes` and
    `num_classes` describe the segmenter (`segmenter_classes`).
    """
    info = read_info(synthetic)
    recorded = info.attrs.get("lesion_labels")
    if recorded is not None and "lesion_labels" not in options:
        options["lesion_labels"] = [int(k) for k in recorded]
        options["classes"] = segmenter_classes(classes, num_classes, info.label_names)
    images, masks, _ = load_arrays(synthetic, split, limit)
    result = mask_adherence(predict_fn, images, masks, **options)
    result["synthetic"] = str(synthetic) + (f":{split}" if split not in (None, "all") else "")
    return result
