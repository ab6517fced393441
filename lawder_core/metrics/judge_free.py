"""Mask adherence without a learned judge: does a synthetic image show a lesion where its mask says, and none
elsewhere? Measured on the pixels, against what real image/mask pairs of the same data show.

Per pair (image in [0, 1], its conditioning mask's lesion L):
- `contrast`: ‖mean colour inside L − mean colour of a ring around L‖₂ over the channels. The ring starts
  `RING_GAP` pixel outside L (the boundary pixels mix both sides) and is `ring_width(side)` pixels wide
  (3 px at 64 px, side/20). A generator that ignores the mask paints the same texture inside and around it: the
  contrast falls to the noise level of two small means. NaN for a pair without lesion.
- `contrast_rel`: contrast over the median contrast of the real reference pairs (1 = a typical real pair).
- `hit`: 1 when the contrast is at least the real pairs' 10th percentile (`HIT_QUANTILE`), else 0: by
  construction 90 % of the real pairs are hits, so a hit rate far below 0.9 means lesions are missing.
- `spurious_area`: the share of the frame outside L and its ring that looks like lesion. "Looks like lesion" is
  learnt from the real pairs once: Fisher's linear discriminant of lesion against background pixel colours,
  each image's colours taken relative to its own background median (so a global tone shift is no lesion), the
  score map smoothed over 3×3 pixels, and the threshold the median score of the real lesion pixels. The real
  pairs' own spurious area is reported beside it as the floor.
- `lesion_frac`: the lesion's share of the frame; every figure is also reported per size bin (`SIZE_BINS`).

The reference is a set of real pairs of the same data (`lawder evaluate --adherence --real FILE.h5`, its
`--real-split`, train by default; at most `MAX_REFERENCE_PAIRS`, evenly spaced), resized to the synthetic size
(images bilinear, masks nearest) first.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.resize import resize_images, resize_masks
from lawder_core.errors import DataError

# (label, lower, upper) share of the frame covered by the lesion; the upper bound is exclusive.
SIZE_BINS: tuple[tuple[str, float, float], ...] = (
    ("<1%", 0.0, 0.01), ("1-3%", 0.01, 0.03), ("3-10%", 0.03, 0.10), (">=10%", 0.10, 1.0 + 1e-9))
HIT_QUANTILE = 0.10
RING_GAP = 1  # pixels between the lesion and its ring
# A larger real split is thinned to this many evenly spaced pairs: quantiles and the colour model are settled
# long before, and a KiTS train split of thousands of slices would cost minutes for nothing.
MAX_REFERENCE_PAIRS = 1000
SMOOTH = 3  # the lesion-likeness score is averaged over SMOOTH × SMOOTH pixels before the threshold


def ring_width(side: int) -> int:
    return max(2, round(side / 20))


def size_bin(lesion_frac: float) -> str | None:
    """The SIZE_BINS label of a lesion share (None: no lesion)."""
    if not lesion_frac > 0:
        return None
    return next(label for label, low, high in SIZE_BINS if low <= lesion_frac < high)


def distance_outside(lesion: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pixel to the nearest lesion pixel (0 inside)."""
    from scipy import ndimage

    return ndimage.distance_transform_edt(~lesion)


def lesion_regions(lesion: np.ndarray, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ring, outside): the ring around the lesion, and what lies beyond it. Both empty/everything without lesion."""
    width = ring_width(max(lesion.shape)) if width is None else width
    if not lesion.any():
        return np.zeros_like(lesion, bool), np.ones_like(lesion, bool)
    d = distance_outside(lesion)
    ring = (d > RING_GAP) & (d <= RING_GAP + width)
    return ring, d > RING_GAP + width


def as_float(image: np.ndarray) -> np.ndarray:
    """(H,W[,C]) uint8 or float in [0, 1] → (H,W,C) float64 in [0, 1]."""
    x = image.astype(np.float64)
    if image.dtype == np.uint8:
        x = x / 255.0
    return x[..., None] if x.ndim == 2 else x


def pair_contrast(image: np.ndarray, lesion: np.ndarray, width: int | None = None) -> float:
    """‖mean inside − mean of the ring‖₂ over channels; NaN without a lesion or without a ring."""
    x = as_float(image)
    ring, _ = lesion_regions(lesion, width)
    if not lesion.any() or not ring.any():
        return float("nan")
    return float(np.linalg.norm(x[lesion].mean(0) - x[ring].mean(0)))


@dataclass(frozen=True)
class ColourModel:
    """Fisher's discriminant of lesion against background colours (relative to each image's background median)."""

    direction: np.ndarray  # (C,)
    threshold: float  # the median smoothed score of real lesion pixels

    def score_map(self, image: np.ndarray, background: np.ndarray) -> np.ndarray:
        """The smoothed lesion-likeness of every pixel of one image; `background` marks where its median is taken."""
        from scipy import ndimage

        x = as_float(image)
        reference = np.median(x[background], axis=0) if background.any() else np.median(x.reshape(-1, x.shape[-1]), 0)
        return ndimage.uniform_filter((x - reference) @ self.direction, size=SMOOTH, mode="nearest")

    def spurious_area(self, image: np.ndarray, lesion: np.ndarray, width: int | None = None) -> float:
        """Share of the frame outside the lesion and its ring whose score reaches the threshold."""
        _, outside = lesion_regions(lesion, width)
        return float(((self.score_map(image, outside) >= self.threshold) & outside).sum() / lesion.size)


def fit_colour_model(images: np.ndarray, lesions: np.ndarray) -> ColourModel:
    """Fisher's linear discriminant on the real pairs' pixels: lesion pixels against the pixels beyond the ring.

    The class means and covariances are accumulated image by image (counts, sums, sums of outer products), so a
    large reference set never holds all its pixels at once.
    """
    channels = as_float(images[0]).shape[-1]
    count = {True: 0, False: 0}
    total = {True: np.zeros(channels), False: np.zeros(channels)}
    outer = {True: np.zeros((channels, channels)), False: np.zeros((channels, channels))}
    for image, lesion in zip(images, lesions, strict=True):
        if not lesion.any():
            continue
        _, outside = lesion_regions(lesion)
        x = as_float(image)
        x = x - np.median(x[outside], axis=0)
        for side, where in ((True, lesion), (False, outside)):
            v = x[where]
            count[side] += len(v)
            total[side] += v.sum(0)
            outer[side] += v.T @ v
    if not count[True] or not count[False]:
        raise DataError("the real reference pairs have no lesion pixels: judge-free adherence has nothing to learn "
                        "lesion colours from.", "Pass --real pairs whose masks contain the lesion labels.")
    means = {side: total[side] / count[side] for side in (True, False)}
    # pooled within-class covariance: Σ_side (Σ v vᵀ − n μ μᵀ) / n_all
    pooled = sum(outer[side] - count[side] * np.outer(means[side], means[side]) for side in (True, False))
    pooled = pooled / (count[True] + count[False]) + 1e-6 * np.eye(channels)
    direction = np.linalg.solve(pooled, means[True] - means[False])
    direction /= np.linalg.norm(direction) or 1.0
    model = ColourModel(direction=direction, threshold=0.0)
    scores = [model.score_map(image, lesion_regions(lesion)[1])[lesion]
              for image, lesion in zip(images, lesions, strict=True) if lesion.any()]
    return ColourModel(direction=direction, threshold=float(np.median(np.concatenate(scores))))


@dataclass(frozen=True)
class Reference:
    """What real pairs show: the thresholds synthetic pairs are judged against, and the real pairs' own scores."""

    colour: ColourModel
    median_contrast: float
    hit_threshold: float
    real: list[dict[str, Any]]  # per real pair: lesion_frac, contrast, hit, spurious_area
    size: tuple[int, int] | None = None  # the image size the real pairs were resized to
    lesion_labels: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"median_contrast": self.median_contrast, "hit_threshold": self.hit_threshold,
                "hit_quantile": HIT_QUANTILE, "colour_direction": self.colour.direction.tolist(),
                "colour_threshold": self.colour.threshold, "n_pairs": len(self.real),
                "bins": bin_summary(self.real)}


def fit_reference(images: np.ndarray, lesions: np.ndarray) -> Reference:
    """The judge's stand-in: contrast quantiles and the colour model of real pairs (lesions: (N,H,W) bool)."""
    colour = fit_colour_model(images, lesions)
    contrasts = np.array([pair_contrast(im, le) for im, le in zip(images, lesions, strict=True)])
    scored = contrasts[np.isfinite(contrasts)]
    if len(scored) < 2:
        raise DataError(f"only {len(scored)} real reference pair(s) have a lesion with a ring around it.",
                        "Judge-free adherence needs real pairs with lesions (--real, --real-split).")
    reference = Reference(colour=colour, median_contrast=float(np.median(scored)),
                          hit_threshold=float(np.quantile(scored, HIT_QUANTILE)), real=[])
    return Reference(colour=colour, median_contrast=reference.median_contrast,
                     hit_threshold=reference.hit_threshold, real=score_pairs(images, lesions, reference))


def score_pairs(images: np.ndarray, lesions: np.ndarray, reference: Reference,
                cases: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Per pair: case (`<case id>@<index>`), lesion_frac, size_bin, contrast, contrast_rel, hit, spurious_area
    (hit and contrast None without a lesion)."""
    rows = []
    for i, (image, lesion) in enumerate(zip(images, lesions, strict=True)):
        contrast = pair_contrast(image, lesion)
        has = bool(np.isfinite(contrast))
        frac = float(lesion.mean())
        rows.append({
            "case": f"{cases[i]}@{i}" if cases is not None else str(i), "lesion_frac": frac,
            "size_bin": size_bin(frac), "contrast": contrast if has else None,
            "contrast_rel": contrast / reference.median_contrast if has and reference.median_contrast > 0 else None,
            "hit": float(contrast >= reference.hit_threshold) if has else None,
            "spurious_area": reference.colour.spurious_area(image, lesion),
        })
    return rows


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def bin_summary(rows: list[dict[str, Any]], keys: Sequence[str] = ("contrast", "contrast_rel", "hit",
                                                                     "spurious_area", "dice")
                ) -> dict[str, dict[str, Any]]:
    """Means per SIZE_BINS label and over all pairs ('all'); 'hit' becomes `hit_rate`. Bins without pairs are
    left out."""
    out: dict[str, dict[str, Any]] = {}
    for label in [b[0] for b in SIZE_BINS] + ["all"]:
        members = rows if label == "all" else [r for r in rows if r.get("size_bin") == label]
        if not members:
            continue
        entry: dict[str, Any] = {"n": len(members)}
        for key in keys:
            if any(key in r for r in members):
                entry["hit_rate" if key == "hit" else key] = _mean(members, key)
        out[label] = entry
    return out


def judge_free_adherence(images: np.ndarray, lesions: np.ndarray, reference: Reference,
                         cases: Sequence[str] | None = None) -> dict[str, Any]:
    """Score synthetic pairs against a real reference: per pair and per size bin, with the reference beside."""
    if len(images) != len(lesions) or images.shape[1:3] != lesions.shape[1:3]:
        raise DataError(f"{images.shape} images do not match {lesions.shape} masks.")
    rows = score_pairs(images, lesions, reference, cases)
    return {"per_case": rows, "bins": bin_summary(rows), "reference": reference.to_dict(),
            "definition": "contrast = |mean colour inside the mask - mean colour of a ring around it|; hit = contrast "
                          f">= the real pairs' {HIT_QUANTILE:.0%} quantile; spurious_area = share of the frame beyond "
                          "the ring that a colour discriminant fitted on the real pairs calls lesion"}


def lesion_of(masks: np.ndarray, lesion_labels: Sequence[int] | None) -> np.ndarray:
    """(N,H,W) bool: the lesion labels (None: every label > 0)."""
    if lesion_labels is None:
        return masks > 0
    return np.isin(masks, np.asarray(list(lesion_labels)))


def recorded_lesion_labels(path: str | os.PathLike) -> list[int] | None:
    """The lesion labels a `lawder sample` file records (None: not recorded, every label > 0)."""
    recorded = read_info(path).attrs.get("lesion_labels")
    return None if recorded is None else [int(k) for k in recorded]


def real_reference(real: str | os.PathLike, real_split: str | None, size: tuple[int, int],
                   lesion_labels: Sequence[int] | None) -> Reference:
    """The reference from real pairs in an HDF5 file, resized to the synthetic images' size."""
    images, masks, _ = load_arrays(real, real_split)
    if len(images) == 0:
        raise DataError(f"{real} has no pairs in split {real_split!r} to judge adherence against.",
                        "Choose another --real-split.")
    if len(images) > MAX_REFERENCE_PAIRS:
        keep = np.linspace(0, len(images) - 1, MAX_REFERENCE_PAIRS).round().astype(int)
        images, masks = images[keep], masks[keep]
    fitted = fit_reference(resize_images(images, size), lesion_of(resize_masks(masks, size), lesion_labels))
    return replace(fitted, size=size, lesion_labels=None if lesion_labels is None else list(lesion_labels))


def judge_free_on_h5(synthetic: str | os.PathLike, real: str | os.PathLike, split: str | None = None,
                     real_split: str | None = "train", reference: Reference | None = None) -> dict[str, Any]:
    """judge_free_adherence of a synthetic HDF5 file (`lawder sample`) against real pairs of an HDF5 file.

    The lesion is what the synthetic file records (`lesion_labels`), on both sides. `reference`, from an
    earlier call on the same real pairs (the result's `_reference`), skips fitting it again when it was fitted
    at the same size with the same lesion labels.
    """
    images, masks, cases = load_arrays(synthetic, split)
    if len(images) == 0:
        raise DataError(f"{synthetic} has no synthetic pairs to check adherence on.")
    labels = recorded_lesion_labels(synthetic)
    size = (int(images.shape[1]), int(images.shape[2]))
    if reference is None or (reference.size, reference.lesion_labels) != (size, labels):
        reference = real_reference(real, real_split, size, labels)
    result = judge_free_adherence(images, lesion_of(masks, labels), reference, [str(c) for c in cases])
    result["real"] = str(real) + (f":{real_split}" if real_split not in (None, "all") else "")
    result["lesion_labels"] = labels
    result["_reference"] = reference
    return result
