"""A data set's fingerprint (nnU-Net's idea): counts, sizes, lesion fractions, intensities, in one JSON."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lawder_core.data.h5 import SPLITS, open_h5, read_info, read_splits, read_strings

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)), 6) for p in PERCENTILES}


def _blocks(n: int, sample_bytes: int, budget: int = 64 << 20) -> list[slice]:
    """Contiguous slices of about `budget` bytes: one h5py read per block instead of one per sample."""
    step = max(1, budget // max(1, sample_bytes))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def compute_fingerprint(path: str | os.PathLike, max_intensity_samples: int = 512) -> dict[str, Any]:
    """Read every mask once, in blocks, and an evenly spaced subset of the images, and summarise them."""
    info = read_info(path)
    with open_h5(path) as f:
        splits = read_splits(f)
        cases = read_strings(f, "case_id")
        masks = f["masks"]
        fractions = np.empty(info.n, np.float64)
        labels_seen: set[int] = set()
        for block in _blocks(info.n, int(np.prod(masks.shape[1:])) * masks.dtype.itemsize):
            m = masks[block]
            fractions[block] = (m > 0).reshape(len(m), -1).mean(axis=1)
            labels_seen.update(np.unique(m).tolist())
        step = max(1, info.n // max_intensity_samples)
        pix = f["images"][0:info.n:step]
    per_split = {
        s: {"samples": int((splits == s).sum()), "cases": len(set(cases[splits == s]))} for s in SPLITS
    }
    return {
        "path": str(info.path),
        "source": info.source,
        "samples": info.n,
        "cases": len(set(cases)),
        "image_shape": [info.height, info.width, info.channels],
        "label_names": list(info.label_names),
        "labels_present": sorted(int(v) for v in labels_seen),
        "splits": per_split,
        "lesion_fraction": {
            **_percentiles(fractions),
            "mean": round(float(fractions.mean()), 6) if info.n else 0.0,
            "empty_masks": int((fractions == 0).sum()),
        },
        "intensity": {
            "mean_per_channel": [round(float(v), 3) for v in pix.mean(axis=(0, 1, 2), dtype=np.float64)],
            "std_per_channel": [round(float(v), 3) for v in pix.std(axis=(0, 1, 2), dtype=np.float64)],
        },
        "preprocessing": info.preprocessing,
    }
