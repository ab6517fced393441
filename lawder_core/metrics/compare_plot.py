"""The picture of a `lawder compare` result: each comparison's paired difference with its CI, one row each."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lawder_core.files import atomic_save

NOISE_COLOUR = "0.55"
DIFFERENCE_COLOUR = "tab:blue"


def save_difference_plot(result: Mapping[str, Any], path: str | os.PathLike, metric: str | None = None) -> Path:
    """PNG of `metric` (default: the result's gated metric): per comparison, the mean difference, its CI, each
    run pair's mean difference as a dot, 0 as a line, and ±2× the noise floor shaded when a replicate exists."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = metric or result["metric"]
    rows = [r for r in result["comparisons"] if r["metric"] == metric and r["difference"] is not None]
    level = result["settings"]["level"]
    fig, ax = plt.subplots(figsize=(7.5, 1.4 + 0.6 * max(len(rows), 1)))
    floors = [r["noise_floor"] for r in rows if r.get("noise_floor") is not None]
    if floors:
        ax.axvspan(-floors[0], floors[0], color="0.92", zorder=0, label="± noise floor")
    ax.axvline(0.0, color="0.3", linewidth=0.8, zorder=1)
    for y, row in enumerate(reversed(rows)):
        colour = NOISE_COLOUR if row["kind"] == "noise floor" else DIFFERENCE_COLOUR
        ax.plot([row["ci_low"], row["ci_high"]], [y, y], color=colour, linewidth=2.2, zorder=2)
        ax.plot(row["difference"], y, "o", color=colour, markersize=7, zorder=3)
        runs = row["run_differences"]
        ax.plot(runs, [y + 0.22] * len(runs), "|", color=colour, markersize=7, alpha=0.7, zorder=3)
    ax.set_yticks(range(len(rows)), [_label(r) for r in reversed(rows)])
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_title(f"{metric}: paired difference B − A", fontsize=10)
    ax.set_xlabel(f"dot: mean; bar: {level:.0%} hierarchical bootstrap CI; ticks: run pairs", fontsize=9)
    if floors:
        ax.legend(loc="best", fontsize=8, frameon=False)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=120, format="png")

    try:
        return atomic_save(save, path)
    finally:
        plt.close(fig)


def _label(row: Mapping[str, Any]) -> str:
    suffix = " (noise floor)" if row["kind"] == "noise floor" else ""
    return f"{row['b']} − {row['a']}{suffix}\n{row['n_runs']} runs, {row['n_cases']} cases"
