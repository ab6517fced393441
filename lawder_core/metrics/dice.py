"""Dice and IoU per image and per case, on binary or nnU-Net-style nested regions, with an explicit empty policy.

Everything is computed exactly from per-image confusion matrices (reference label × predicted label pixel
counts), so a region's TP/FP/FN for any set of labels, any image or any case volume is a sum, never a
re-segmentation. tests/test_dice.py checks the numbers against torchmetrics' DiceScore and MeanIoU.

Regions:
  * polyps and other two-label data: one region, `foreground` = every label > 0;
  * KiTS (label names with "kidney" and "tumor"/"tumour"): nnU-Net's nested regions
    kidney_and_masses = {kidney, tumor, cyst}, masses = {tumor, cyst}, tumor = {tumor}
    (KiTS19 has no cyst, so masses equals tumor and is left out);
  * other multi-label data: one region per non-background label.

Empty policy, for a region absent from both reference and prediction (2·TP + FP + FN = 0):
  * "one" (default): Dice = IoU = 1, a correct "nothing here" counts as perfect;
  * "nan": undefined, left out of every mean (nnU-Net's choice).
A region present in only one of the two always scores 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lawder_core.errors import DataError, UsageError

EmptyPolicy = Literal["one", "nan"]
EMPTY_POLICIES: dict[str, str] = {
    "one": "a region empty in both reference and prediction scores Dice = IoU = 1",
    "nan": "a region empty in both reference and prediction is undefined (NaN) and left out of means, as in nnU-Net",
}
AGGREGATION = (
    "per case: Dice/IoU of the case volume (TP, FP, FN summed over all images of the case, as nnU-Net scores a "
    "3D case); Dice_image_mean/IoU_image_mean: mean over the case's images; mean: average over cases (NaN left "
    "out); foreground_mean: average of the region means"
)
KITS_TUMOR_NAMES = ("tumor", "tumour")


@dataclass(frozen=True)
class Region:
    """A named set of labels scored as one binary mask; labels None means every label above 0."""

    name: str
    labels: tuple[int, ...] | None

    def describe(self) -> list[int] | str:
        return ">0" if self.labels is None else list(self.labels)


FOREGROUND = Region("foreground", None)


def regions_for(label_names: Sequence[str]) -> tuple[Region, ...]:
    """The regions to score for a data set, from its HDF5 `label_names` attribute."""
    names = [str(n).lower() for n in label_names]
    if len(names) < 2:
        raise DataError(f"label names {list(label_names)} have no foreground label.")
    if "kidney" in names and any(t in names for t in KITS_TUMOR_NAMES):
        kidney = names.index("kidney")
        tumor = next(names.index(t) for t in KITS_TUMOR_NAMES if t in names)
        cyst = names.index("cyst") if "cyst" in names else None
        masses = (tumor,) if cyst is None else tuple(sorted((tumor, cyst)))
        regions = [Region("kidney_and_masses", tuple(sorted((kidney, *masses))))]
        if cyst is not None:
            regions.append(Region("masses", masses))
        regions.append(Region("tumor", (tumor,)))
        return tuple(regions)
    if len(names) == 2:
        return (FOREGROUND,)
    return tuple(Region(str(label_names[i]), (i,)) for i in range(1, len(names)))


def confusion_matrices(reference: np.ndarray, prediction: np.ndarray, num_labels: int) -> np.ndarray:
    """(N, L, L) int64 pixel counts: [image, reference label, predicted label]."""
    if reference.shape != prediction.shape:
        raise DataError(f"reference masks {reference.shape} and predictions {prediction.shape} differ in shape.")
    out = np.empty((len(reference), num_labels, num_labels), np.int64)
    for i, (ref, pred) in enumerate(zip(reference, prediction, strict=True)):
        pairs = ref.astype(np.int64).ravel() * num_labels + pred.astype(np.int64).ravel()
        out[i] = np.bincount(pairs, minlength=num_labels * num_labels).reshape(num_labels, num_labels)
    return out


def region_counts(confusion: np.ndarray, region: Region) -> dict[str, np.ndarray]:
    """TP, FP, FN, TN of one region for every confusion matrix in (..., L, L)."""
    inside = np.zeros(confusion.shape[-1], bool)
    if region.labels is None:
        inside[1:] = True
    else:
        inside[list(region.labels)] = True
    ref_in, ref_out = confusion[..., inside, :], confusion[..., ~inside, :]
    return {
        "TP": ref_in[..., inside].sum(axis=(-2, -1)),
        "FN": ref_in[..., ~inside].sum(axis=(-2, -1)),
        "FP": ref_out[..., inside].sum(axis=(-2, -1)),
        "TN": ref_out[..., ~inside].sum(axis=(-2, -1)),
    }


def dice_iou(tp: float, fp: float, fn: float, empty_policy: EmptyPolicy = "one") -> tuple[float, float]:
    """Dice = 2TP / (2TP + FP + FN), IoU = TP / (TP + FP + FN), with the empty policy when both are empty."""
    if tp + fp + fn == 0:
        value = 1.0 if empty_policy == "one" else math.nan
        return value, value
    return 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)


def _scores(counts: dict[str, Any], empty_policy: EmptyPolicy) -> dict[str, Any]:
    tp, fp, fn, tn = (int(counts[k]) for k in ("TP", "FP", "FN", "TN"))
    dice, iou = dice_iou(tp, fp, fn, empty_policy)
    return {"Dice": dice, "IoU": iou, "TP": tp, "FP": fp, "FN": fn, "TN": tn, "n_ref": tp + fn, "n_pred": tp + fp}


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


@dataclass
class DiceReport:
    """Per-image and per-case scores, their means, and how they were computed."""

    regions: tuple[Region, ...]
    empty_policy: str
    per_image: list[dict[str, Any]]
    per_case: list[dict[str, Any]]
    mean: dict[str, dict[str, float]]
    foreground_mean: dict[str, float]
    image_mean: dict[str, dict[str, float]]
    aggregation: str = AGGREGATION
    label_names: tuple[str, ...] = field(default=())

    def settings(self) -> dict[str, Any]:
        """What a reader of the numbers must know: regions, label names, empty policy, aggregation."""
        return {
            "regions": {r.name: r.describe() for r in self.regions},
            "label_names": list(self.label_names),
            "empty_policy": self.empty_policy,
            "empty_policy_meaning": EMPTY_POLICIES[self.empty_policy],
            "aggregation": self.aggregation,
            "n_images": len(self.per_image),
            "n_cases": len(self.per_case),
        }


def segmentation_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    case_ids: Sequence[str] | None = None,
    label_names: Sequence[str] = ("background", "lesion"),
    *,
    empty_policy: EmptyPolicy = "one",
    regions: Sequence[Region] | None = None,
) -> DiceReport:
    """Dice and IoU of integer label masks (N,H,W) per image, per case and on average.

    case_ids None treats every image as its own case (polyps); for KiTS pass the HDF5 case ids so a case's
    volume Dice is computed over all of its slices.
    """
    if empty_policy not in EMPTY_POLICIES:
        raise UsageError(f"unknown empty-mask policy {empty_policy!r}; choose one of {sorted(EMPTY_POLICIES)}.")
    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.ndim == 2:
        reference, prediction = reference[None], prediction[None]
    if len(reference) == 0:
        raise DataError("no images to score.")
    regions = tuple(regions) if regions is not None else regions_for(label_names)
    cases = np.asarray([f"image_{i}" for i in range(len(reference))] if case_ids is None else list(case_ids), object)
    if len(cases) != len(reference):
        raise DataError(f"{len(cases)} case ids for {len(reference)} images.")
    top = max(int(reference.max()), int(prediction.max()), *(max(r.labels) for r in regions if r.labels))
    confusion = confusion_matrices(reference, prediction, max(len(label_names), top + 1))
    counts = {r.name: region_counts(confusion, r) for r in regions}

    per_image = [
        {"index": i, "case": str(cases[i]),
         "metrics": {r.name: _scores({k: v[i] for k, v in counts[r.name].items()}, empty_policy) for r in regions}}
        for i in range(len(reference))
    ]
    per_case = [_case_entry(case, np.flatnonzero(cases == case), confusion, per_image, regions, empty_policy)
                for case in dict.fromkeys(cases.tolist())]
    mean = {
        r.name: {key: _nanmean([c["metrics"][r.name][key] for c in per_case])
                 for key in ("Dice", "IoU", "Dice_image_mean", "IoU_image_mean", "n_ref", "n_pred")}
        for r in regions
    }
    image_mean = {r.name: {key: _nanmean([im["metrics"][r.name][key] for im in per_image]) for key in ("Dice", "IoU")}
                  for r in regions}
    foreground_mean = {key: _nanmean([mean[r.name][key] for r in regions]) for key in ("Dice", "IoU")}
    return DiceReport(regions=regions, empty_policy=empty_policy, per_image=per_image, per_case=per_case, mean=mean,
                      foreground_mean=foreground_mean, image_mean=image_mean, label_names=tuple(label_names))


def _case_entry(case: str, rows: np.ndarray, confusion: np.ndarray, per_image: list[dict[str, Any]],
                regions: Sequence[Region], empty_policy: EmptyPolicy) -> dict[str, Any]:
    volume = confusion[rows].sum(axis=0)
    metrics = {}
    for r in regions:
        scores = _scores(region_counts(volume, r), empty_policy)
        scores["Dice_image_mean"] = _nanmean([per_image[i]["metrics"][r.name]["Dice"] for i in rows])
        scores["IoU_image_mean"] = _nanmean([per_image[i]["metrics"][r.name]["IoU"] for i in rows])
        metrics[r.name] = scores
    return {"case": case, "n_images": len(rows), "metrics": metrics}
