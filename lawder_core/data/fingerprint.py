"""A data set's fingerprint (nnU-Net's idea): counts, sizes, lesion fractions, intensities, in one JSON."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from lawder_core.data.h5 import SPLITS, open_h5, read_info, read_strings

PERCENTILES = (0, 5, 25, 50, 75, 95, 100)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {}
    return {f"p{p}": round(float(np.percentile(values, p)), 6) for p in PERCENTILES}


def compute_fingerprint(path: str | os.PathLike, max_intensity_samples: int = 512) -> dict[str, Any]:
    """Read the whole file once (one chunk per sample) and summarise it."""
    info = read_info(path)
    with open_h5(path) as f:
        splits = read_strings(f, "split")
        cases = read_strings(f, "case_id")
        masks = f["masks"]
        fractions = np.empty(info.n, np.float64)
        labels_seen: set[int] = set()
        for i in range(info.n):
            m = masks[i]
            fractions[i] = float((m > 0).mean())
            labels_seen.update(np.unique(m).tolist())
        step = max(1, info.n // max_intensity_samples)
        pix = np.stack([f["images"][i] for i in range(0, info.n, step)]).astype(np.float64)
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
            "mean_per_channel": [round(float(v), 3) for v in pix.mean(axis=(0, 1, 2))],
            "std_per_channel": [round(float(v), 3) for v in pix.std(axis=(0, 1, 2))],
        },
        "preprocessing": info.preprocessing,
    }
