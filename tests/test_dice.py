"""Dice/IoU on constructed masks with hand-computed answers, nested KiTS regions, per-case aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.functional.segmentation import dice_score, mean_iou
from torchmetrics.segmentation import DiceScore

from lawder_core.errors import DataError, UsageError
from lawder_core.metrics.dice import Region, dice_iou, regions_for, segmentation_metrics

KITS23 = ["background", "kidney", "tumor", "cyst"]


def square(size: int = 6, top: int = 0, left: int = 0, side: int = 2, label: int = 1) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    mask[top:top + side, left:left + side] = label
    return mask


def test_binary_dice_and_iou_by_hand():
    reference = square(side=2)  # 4 pixels at (0..1, 0..1)
    prediction = square(side=2, left=1)  # 4 pixels at (0..1, 1..2): overlap 2
    report = segmentation_metrics(reference, prediction)
    scores = report.per_image[0]["metrics"]["foreground"]
    assert (scores["TP"], scores["FP"], scores["FN"], scores["TN"]) == (2, 2, 2, 30)
    assert scores["Dice"] == pytest.approx(2 * 2 / (2 * 2 + 2 + 2))  # 0.5
    assert scores["IoU"] == pytest.approx(2 / 6)
    assert (scores["n_ref"], scores["n_pred"]) == (4, 4)


def test_foreground_is_every_label_above_zero():
    reference = square(side=3, label=255)  # thresholded polyp masks may keep 255
    prediction = square(side=3, label=1)
    scores = segmentation_metrics(reference, prediction).per_image[0]["metrics"]["foreground"]
    assert scores["Dice"] == 1.0 and scores["TP"] == 9


@pytest.mark.parametrize("policy, expected", [("one", 1.0), ("nan", math.nan)])
def test_both_empty_follows_the_policy(policy, expected):
    empty = np.zeros((1, 5, 5), np.uint8)
    report = segmentation_metrics(empty, empty, empty_policy=policy)
    dice = report.per_image[0]["metrics"]["foreground"]["Dice"]
    assert dice == expected or (math.isnan(expected) and math.isnan(dice))
    assert report.settings()["empty_policy"] == policy
    assert "both" in report.settings()["empty_policy_meaning"]


@pytest.mark.parametrize("policy", ["one", "nan"])
def test_one_sided_empty_scores_zero(policy):
    empty, full = np.zeros((6, 6), np.uint8), square(side=3)
    assert segmentation_metrics(empty, full, empty_policy=policy).per_image[0]["metrics"]["foreground"]["Dice"] == 0
    assert segmentation_metrics(full, empty, empty_policy=policy).per_image[0]["metrics"]["foreground"]["IoU"] == 0


def test_nan_policy_leaves_empty_images_out_of_means():
    reference = np.stack([square(side=2), np.zeros((6, 6), np.uint8)])
    prediction = np.stack([square(side=2, left=1), np.zeros((6, 6), np.uint8)])
    with_one = segmentation_metrics(reference, prediction, empty_policy="one")
    with_nan = segmentation_metrics(reference, prediction, empty_policy="nan")
    assert with_one.mean["foreground"]["Dice"] == pytest.approx((0.5 + 1.0) / 2)
    assert with_nan.mean["foreground"]["Dice"] == pytest.approx(0.5)
    assert with_nan.foreground_mean["Dice"] == pytest.approx(0.5)


def test_dice_iou_function():
    assert dice_iou(3, 1, 2) == pytest.approx((6 / 9, 3 / 6))
    assert dice_iou(0, 0, 0, "one") == (1.0, 1.0)
    assert all(math.isnan(v) for v in dice_iou(0, 0, 0, "nan"))


def test_unknown_policy_and_shape_mismatch_are_rejected():
    with pytest.raises(UsageError, match="policy"):
        segmentation_metrics(square(), square(), empty_policy="zero")
    with pytest.raises(DataError, match="shape"):
        segmentation_metrics(square(6), square(5))


def test_region_choice_from_label_names():
    assert regions_for(["background", "polyp"]) == (Region("foreground", None),)
    assert regions_for(KITS23) == (Region("kidney_and_masses", (1, 2, 3)), Region("masses", (2, 3)),
                                   Region("tumor", (2,)))
    assert regions_for(["background", "kidney", "tumour"]) == (Region("kidney_and_masses", (1, 2)),
                                                               Region("tumor", (2,)))
    assert regions_for(["background", "liver", "spleen"]) == (Region("liver", (1,)), Region("spleen", (2,)))


def test_kits_nested_regions_by_hand():
    reference = np.zeros((8, 8), np.uint8)
    reference[0:4, 0:4] = 1  # 16 kidney
    reference[0:2, 0:2] = 2  # 4 of them tumour
    reference[2:4, 2:4] = 3  # 4 of them cyst
    prediction = reference.copy()
    prediction[2:4, 2:4] = 2  # the cyst called tumour
    prediction[0:1, 0:2] = 1  # 2 tumour pixels called kidney
    prediction[6, 6] = 1  # one false kidney pixel
    metrics = segmentation_metrics(reference, prediction, label_names=KITS23).per_image[0]["metrics"]
    # kidney+masses: reference 16 pixels, prediction 17, all 16 found.
    assert metrics["kidney_and_masses"]["Dice"] == pytest.approx(2 * 16 / (32 + 1))
    # masses (tumour or cyst): reference 8, prediction 6 (2 tumour lost to kidney), all inside.
    assert metrics["masses"]["Dice"] == pytest.approx(2 * 6 / (2 * 6 + 0 + 2))
    # tumour: reference 4, prediction 2 (kept) + 4 (cyst) = 6, TP 2.
    assert metrics["tumor"]["Dice"] == pytest.approx(2 * 2 / (2 * 2 + 4 + 2))
    assert metrics["tumor"]["IoU"] == pytest.approx(2 / 8)


def test_per_case_volume_and_image_mean():
    # case A: image 1 perfect (4 px), image 2 misses everything (8 px); case B: one image, half found.
    a1 = square(side=2), square(side=2)
    a2 = square(side=4, label=1), np.zeros((6, 6), np.uint8)
    b1 = square(side=2), square(side=2, top=1)
    reference = np.stack([a1[0], a2[0], b1[0]])
    prediction = np.stack([a1[1], a2[1], b1[1]])
    # a2's reference has 16 px (side 4): volume TP 4, FN 16.
    report = segmentation_metrics(reference, prediction, case_ids=["A", "A", "B"])
    case_a, case_b = report.per_case
    assert (case_a["case"], case_a["n_images"], case_b["n_images"]) == ("A", 2, 1)
    fg_a = case_a["metrics"]["foreground"]
    assert fg_a["Dice"] == pytest.approx(2 * 4 / (2 * 4 + 0 + 16))
    assert fg_a["Dice_image_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert fg_a["n_ref"] == 20 and fg_a["n_pred"] == 4
    fg_b = case_b["metrics"]["foreground"]
    assert fg_b["Dice"] == pytest.approx(0.5)
    assert report.mean["foreground"]["Dice"] == pytest.approx((1 / 3 + 0.5) / 2)
    assert report.image_mean["foreground"]["Dice"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    assert report.foreground_mean["Dice"] == pytest.approx(report.mean["foreground"]["Dice"])
    assert "volume" in report.settings()["aggregation"]


def test_images_are_their_own_cases_without_case_ids():
    masks = np.stack([square(), square(top=2)])
    report = segmentation_metrics(masks, masks)
    assert [c["case"] for c in report.per_case] == ["image_0", "image_1"]


def one_hot(masks: np.ndarray, labels: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(np.isin(masks, labels)[:, None].astype(np.int64))


def test_matches_torchmetrics_on_random_kits_masks():
    rng = np.random.default_rng(0)
    reference = rng.choice(4, size=(6, 16, 16), p=[0.6, 0.2, 0.1, 0.1]).astype(np.uint8)
    prediction = np.where(rng.random(reference.shape) < 0.3, rng.integers(0, 4, reference.shape), reference)
    reference[5] = 0  # one slice without any foreground
    prediction[5] = 0
    report = segmentation_metrics(reference, prediction.astype(np.uint8), label_names=KITS23, empty_policy="nan")
    for region in report.regions:
        preds, target = one_hot(prediction, region.labels), one_hot(reference, region.labels)
        expected_dice = dice_score(preds, target, num_classes=1, average="none", input_format="one-hot")[:, 0]
        expected_iou = mean_iou(preds, target, num_classes=1, per_class=True, input_format="one-hot")[:, 0]
        ours_dice = torch.tensor([im["metrics"][region.name]["Dice"] for im in report.per_image], dtype=torch.float32)
        ours_iou = torch.tensor([im["metrics"][region.name]["IoU"] for im in report.per_image], dtype=torch.float32)
        torch.testing.assert_close(ours_dice, expected_dice.float(), equal_nan=True)
        torch.testing.assert_close(ours_iou[:5], expected_iou[:5].float())
        # The module API with micro averaging over the whole batch equals a one-case volume Dice.
        metric = DiceScore(num_classes=1, average="macro", aggregation_level="global", input_format="one-hot")
        metric.update(preds, target)
        volume = segmentation_metrics(reference, prediction.astype(np.uint8), case_ids=["c"] * 6,
                                      label_names=KITS23, regions=[region]).per_case[0]["metrics"][region.name]
        assert volume["Dice"] == pytest.approx(float(metric.compute()), rel=1e-6)
