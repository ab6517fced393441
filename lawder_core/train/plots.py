"""Training-curve PNGs from metrics.jsonl (matplotlib, headless)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from lawder_core.files import atomic_save  # noqa: E402


def plot_curves(metrics_path: Path, out_png: Path, keys: Sequence[str], x_key: str = "epoch") -> None:
    """One panel per metric key; silently draws nothing for keys that were never logged."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r[x_key], r[key]) for r in records if key in r and x_key in r]
        ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None)
        ax.set_xlabel(x_key)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save(lambda p: fig.savefig(p, format="png", dpi=80), out_png)
    plt.close(fig)
