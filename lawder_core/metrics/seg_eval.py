"""Score a segmenter on a lawder HDF5 split: predict every image, then Dice/IoU per image and per case."""

from __future__ import annotations

import logging
import os

import torch

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.errors import DataError
from lawder_core.metrics.dice import FOREGROUND, DiceReport, EmptyPolicy, regions_for, segmentation_metrics
from lawder_core.metrics.predict import PredictFn, predict_labels

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
) -> DiceReport:
    """Dice/IoU of `predict_fn` (float B×3×H×W in [0,1] -> logits B×num_classes×H×W) on one split of `data`.

    A one-channel segmenter on multi-label data (e.g. KiTS trained on foreground only) is scored on the
    foreground region (every label > 0), since it cannot tell kidney from tumour; a multi-class one gets the
    data set's regions (nested regions for KiTS). Cases come from the file's case ids.
    """
    info = read_info(data)
    images, masks, cases = load_arrays(data, split, limit)
    if len(images) == 0:
        raise DataError(f"{data} has no images in split {split!r}.", "Check --split (train, val, test or all).")
    regions = regions_for(info.label_names)
    if num_classes == 1 and len(info.label_names) > 2:
        logger.warning("one-channel segmenter on %d labels: scoring the foreground region only",
                       len(info.label_names))
        regions = (FOREGROUND,)
    predicted = predict_labels(predict_fn, images, batch_size=batch_size, threshold=threshold, device=device)
    return segmentation_metrics(masks, predicted, cases, info.label_names, empty_policy=empty_policy,
                                regions=regions)
