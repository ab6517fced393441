"""`summary.json` in nnU-Net's shape, plus FID/KID, adherence, profile and run metadata; CI gates on it.

Shape (keys nnU-Net users know first):
  metric_per_case   [{"reference", "prediction", "case", "n_images", "metrics": {region: {Dice, IoU, TP, ...}}}]
  mean              {region: {Dice, IoU, Dice_image_mean, IoU_image_mean, n_ref, n_pred}}  (over cases)
  foreground_mean   {Dice, IoU}  (over regions)
  metric_per_image, image_mean, dice_settings (regions, empty policy, aggregation)
  fid, adherence, profile, metadata, gates (when computed / checked)
NaN (an undefined Dice under the "nan" empty policy) is written as null, so the file is strict JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core.environment import package_version
from lawder_core.errors import UsageError
from lawder_core.files import write_text
from lawder_core.metrics.dice import DiceReport

SUMMARY_FILE = "summary.json"
_VERSIONED = ("lawder", "torch", "clean-fid", "torchmetrics", "numpy")


def run_metadata(extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """When and with what the numbers were made; `extra` (command line, seed, inputs) is merged in."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {name: package_version(name) for name in _VERSIONED},
        **dict(extra or {}),
    }


def build_summary(
    *,
    dice: DiceReport | None = None,
    fid: Any = None,
    adherence: Mapping[str, Any] | None = None,
    profile: Mapping[str, Any] | None = None,
    reference: str = "reference",
    prediction: str = "prediction",
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One JSON-ready result for every metric that was computed; `fid` is a FidResult or its dict.

    reference/prediction name the two sides of the Dice comparison (e.g. "data.h5:test" and the run folder);
    each case's entry gets "<reference>#<case>" and "<prediction>#<case>".
    """
    summary: dict[str, Any] = {"metric_per_case": [], "mean": {}, "foreground_mean": {}}
    if dice is not None:
        summary["metric_per_case"] = [
            {"reference": f"{reference}#{c['case']}", "prediction": f"{prediction}#{c['case']}", **c}
            for c in dice.per_case
        ]
        summary["mean"] = dice.mean
        summary["foreground_mean"] = dice.foreground_mean
        summary["metric_per_image"] = dice.per_image
        summary["image_mean"] = dice.image_mean
        summary["dice_settings"] = dice.settings()
    if fid is not None:
        summary["fid"] = fid.to_dict() if hasattr(fid, "to_dict") else dict(fid)
    if adherence is not None:
        summary["adherence"] = dict(adherence)
    if profile is not None:
        summary["profile"] = dict(profile)
    summary["metadata"] = run_metadata(metadata)
    return to_jsonable(summary)


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy scalars/arrays -> Python, paths and tuples -> str/list."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def summary_path(path: str | os.PathLike) -> Path:
    """Where write_metric_summary puts the file: `path` itself if it ends in .json, else `path/summary.json`."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() != ".json":
        return path / SUMMARY_FILE
    return path


def write_metric_summary(summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically (temporary name, then rename): a killed run never leaves half a summary.json.

    A folder (or any path not ending in .json) gets `summary.json` inside it.
    """
    text = json.dumps(to_jsonable(summary), indent=2, allow_nan=False)
    return write_text(summary_path(path), text + "\n")


# --------------------------------------------------------------------------------------------- gates


@dataclass(frozen=True)
class Gate:
    option: str  # the CLI option, e.g. "--min-dice"
    metric: str  # how the number is named in messages
    path: tuple[str, ...]  # where it sits in the summary
    higher_is_better: bool


GATES = {
    "min_dice": Gate("--min-dice", "Dice (foreground_mean)", ("foreground_mean", "Dice"), True),
    "max_fid": Gate("--max-fid", "FID", ("fid", "fid"), False),
    "max_kid": Gate("--max-kid", "KID", ("fid", "kid"), False),
    "min_adherence": Gate("--min-adherence", "mask adherence Dice", ("adherence", "dice_mean"), True),
}


def _lookup(result: Mapping[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """(present, value): present is False when the metric was not computed at all."""
    node: Any = result
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False, None
        node = node[key]
    return True, node


def gate_table(result: Mapping[str, Any], **thresholds: float | None) -> list[dict[str, Any]]:
    """One row per gate that was set: option, metric, threshold, value, passed, message."""
    unknown = set(thresholds) - set(GATES)
    if unknown:
        raise UsageError(f"unknown gate(s) {sorted(unknown)}; known: {sorted(GATES)}.")
    rows = []
    for key, threshold in thresholds.items():
        if threshold is None:
            continue
        gate = GATES[key]
        present, value = _lookup(result, gate.path)
        if not present:
            raise UsageError(f"{gate.option} {threshold} was given but {gate.metric} was not computed.",
                             "Ask for the metric too (e.g. --dice, --fid, --kid, --adherence) or drop the gate.")
        rows.append(_judge(gate, float(threshold), value))
    return rows


def _judge(gate: Gate, threshold: float, value: Any) -> dict[str, Any]:
    row = {"option": gate.option, "metric": gate.metric, "threshold": threshold, "value": value}
    if value is None or (isinstance(value, float) and math.isnan(value)):
        row.update(passed=False, message=f"{gate.metric} is undefined (NaN/null), so {gate.option} {threshold:g} "
                                         f"cannot hold (e.g. every mask was empty under the 'nan' empty policy).")
        return row
    value = float(value)
    passed = value >= threshold if gate.higher_is_better else value <= threshold
    side = "below" if gate.higher_is_better else "above"
    row.update(passed=passed, message=None if passed else
               f"{gate.metric} {value:.4f} is {side} {gate.option} {threshold:g} by {abs(value - threshold):.4f}")
    return row


def check_gates(result: Mapping[str, Any], min_dice: float | None = None, max_fid: float | None = None,
                max_kid: float | None = None, min_adherence: float | None = None) -> list[str]:
    """Messages for every missed gate (empty: all held); each names the metric, threshold and the margin.

    `result` is a summary from build_summary. A gate on a metric that was not computed raises UsageError.
    """
    rows = gate_table(result, min_dice=min_dice, max_fid=max_fid, max_kid=max_kid, min_adherence=min_adherence)
    return [row["message"] for row in rows if not row["passed"]]
