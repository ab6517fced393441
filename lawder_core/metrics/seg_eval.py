"""Score a segmenter on a lawder HDF5 split: predict every image, then Dice/IoU per image and per case."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.labels import LabelMap, stored_labels
from lawder_core.errors import DataError
from lawder_core.metrics.dice import FOREGROUND, DiceReport, EmptyPolicy, Region, regions_for, segmentation_metrics
from lawder_core.models.inference import PredictFn, predict_labels

logger = logging.getLogger(__name__)


def segmenter_dice(
    predict_fn: PredictFn,
    data: str | os.PathLike,
    split: str | None = "test",
    *,
    num_classes: int = 1,
    batch_size: int = 16,
    threshold: float = 0.5,
    empty_policy: EmptyPolicy = "one",
    device: str | torch.device = "cpu",
    limit: int | None = None,
    label_map: LabelMap | None = None,
    indices: np.ndarray | None = None,
) -> DiceReport:
    """Dice/IoU of `predict_fn` (float B×3×H×W in [0,1] -> logits B×num_classes×H×W) on one split of `data`.

    Predicted classes become stored labels through the checkpoint's `label_map`; the data set's regions (nested
    regions for KiTS) are scored where the map can tell them apart (a model that merged tumour and cyst is not
    scored on tumour). A one-channel segmenter saved without a label map (an older run) on multi-label data
    is scored on the foreground region only. Cases come from the file's case ids. `indices` (a cross-validation
    fold's samples) replaces the split.
    """
    info = read_info(data)
    images, masks, cases = load_arrays(data, split, limit, indices=indices)
    if len(images) == 0:
        raise DataError(f"{data} has no images in split {split!r}.", "Check --split (train, val, test or all).")
    regions = scored_regions(info.label_names, num_classes, label_map)
    predicted = predict_labels(predict_fn, images, batch_size=batch_size, threshold=threshold, device=device)
    return segmentation_metrics(masks, stored_labels(label_map, predicted), cases, info.label_names,
                                empty_policy=empty_policy, regions=regions)


def scored_regions(label_names: tuple[str, ...], num_classes: int, label_map: LabelMap | None) -> tuple[Region, ...]:
    """The data set's regions that a segmenter's predictions can score."""
    regions = regions_for(label_names)
    if label_map is None:
        if num_classes == 1 and len(label_names) > 2:
            logger.warning("one-channel segmenter on %d labels: scoring the foreground region only",
                           len(label_names))
            return (FOREGROUND,)
        return regions
    kept = tuple(r for r in regions if label_map.separates(r.labels))
    return kept or tuple(Region(name, group) for name, group in zip(label_map.names, label_map.groups, strict=True))
