"""summary.json shape (nnU-Net's keys), strict JSON written atomically, and CI gates."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lawder_core.errors import UsageError
from lawder_core.metrics.dice import segmentation_metrics
from lawder_core.metrics.summary import SUMMARY_FILE, build_summary, check_gates, gate_table, write_metric_summary


def square(top: int, side: int, label: int = 1, size: int = 8) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top:top + side, :side] = label
    return mask


@pytest.fixture
def summary() -> dict:
    reference = np.stack([square(0, 4), square(0, 2), np.zeros((8, 8), np.uint8)])
    prediction = np.stack([square(0, 4), square(1, 2), np.zeros((8, 8), np.uint8)])
    dice = segmentation_metrics(reference, prediction, case_ids=["a", "a", "b"], empty_policy="nan")
    fid = {"fid": 65.6, "kid": 0.012, "feature_extractor": "custom:x", "n_real": 3, "n_synthetic": 3}
    adherence = {"dice_mean": 0.81, "dice_sd": 0.1, "dice_per_image": [0.71, 0.91]}
    return build_summary(dice=dice, fid=fid, adherence=adherence, profile={"params": 42_000},
                         reference="data.h5:test", prediction="runs/seg", metadata={"command": "lawder evaluate"})


def test_summary_has_nnunet_shape(summary):
    assert list(summary)[:3] == ["metric_per_case", "mean", "foreground_mean"]
    first = summary["metric_per_case"][0]
    assert first["reference"] == "data.h5:test#a" and first["prediction"] == "runs/seg#a"
    assert first["case"] == "a" and first["n_images"] == 2
    fg = first["metrics"]["foreground"]
    assert {"Dice", "IoU", "TP", "FP", "FN", "TN", "n_ref", "n_pred"} <= set(fg)
    # case a volume: TP 16 + 2, FP 2, FN 2 -> Dice 36/40
    assert fg["Dice"] == pytest.approx(36 / 40)
    # case b is empty everywhere: undefined under the 'nan' policy -> null, and left out of the mean
    assert summary["metric_per_case"][1]["metrics"]["foreground"]["Dice"] is None
    assert summary["mean"]["foreground"]["Dice"] == pytest.approx(36 / 40)
    assert summary["foreground_mean"]["Dice"] == pytest.approx(36 / 40)
    assert summary["dice_settings"]["empty_policy"] == "nan"
    assert summary["fid"]["fid"] == 65.6 and summary["profile"]["params"] == 42_000
    assert summary["metadata"]["command"] == "lawder evaluate" and "versions" in summary["metadata"]
    assert len(summary["metric_per_image"]) == 3


def test_written_atomically_as_strict_json(summary, tmp_path):
    path = write_metric_summary(summary, tmp_path / "run")
    assert path == tmp_path / "run" / SUMMARY_FILE
    assert not list((tmp_path / "run").glob("*.partial"))

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    loaded = json.loads(path.read_text(), parse_constant=refuse)
    assert loaded["mean"] == summary["mean"]
    write_metric_summary({"mean": {"x": float("nan")}}, path)  # overwriting replaces the whole file
    assert json.loads(path.read_text()) == {"mean": {"x": None}}


def test_gates_that_hold_return_nothing(summary):
    assert check_gates(summary) == []
    assert check_gates(summary, min_dice=0.9, max_fid=65.6, max_kid=0.02, min_adherence=0.8) == []


def test_missed_gates_name_metric_threshold_and_margin(summary):
    missed = check_gates(summary, min_dice=0.95, max_fid=60, max_kid=0.01, min_adherence=0.9)
    assert len(missed) == 4
    dice, fid, kid, adherence = missed
    assert "Dice" in dice and "--min-dice 0.95" in dice and "below" in dice and "0.0500" in dice
    assert "FID 65.6000 is above --max-fid 60 by 5.6000" == fid
    assert "KID" in kid and "--max-kid 0.01" in kid and "0.0020" in kid
    assert "adherence" in adherence and "--min-adherence 0.9" in adherence and "0.0900" in adherence
    rows = gate_table(summary, max_fid=60)
    assert rows[0]["passed"] is False and rows[0]["value"] == 65.6


def test_undefined_metric_misses_its_gate(summary):
    summary["foreground_mean"]["Dice"] = None
    (message,) = check_gates(summary, min_dice=0.5)
    assert "undefined" in message and "--min-dice 0.5" in message


def test_gate_on_a_metric_not_computed_is_a_usage_error():
    bare = build_summary()
    assert bare["metric_per_case"] == [] and "fid" not in bare
    with pytest.raises(UsageError, match="--max-fid"):
        check_gates(bare, max_fid=50)
    with pytest.raises(UsageError, match="--min-dice"):
        check_gates(bare, min_dice=0.5)
