"""Multi-class segmenters (issue 15): the label map, the loss, ORDER's uncertainty, training and region scoring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lawder_core.data.labels import label_map
from lawder_core.errors import UsageError
from lawder_core.evaluate import dice_for_run
from lawder_core.metrics.dice import regions_for
from lawder_core.models.factory import build_segmenter, read_segmenter_config
from lawder_core.models.order import uncertainty
from lawder_core.predictor import load_predictor, predict_images
from lawder_core.train.losses import multiclass_loss, resize_classes, segmentation_loss
from lawder_core.train.seg import SegTrainConfig, dice_per_image, train_segmenter
from tests.helpers import KITS_LABELS as KITS
from tests.helpers import kits_like_h5


@pytest.fixture(scope="module")
def kits_h5(tmp_path_factory) -> Path:
    return kits_like_h5(tmp_path_factory.mktemp("kits") / "kits.h5")


def test_label_specs_choose_and_merge_by_name_or_number() -> None:
    default = label_map(KITS)
    assert default.groups == ((1,), (2,), (3,)) and default.outputs == 4 and default.is_identity()
    merged = label_map(KITS, "kidney, tumor+cyst")
    assert merged.groups == ((1,), (2, 3)) and merged.names == ("kidney", "tumor+cyst") and merged.outputs == 3
    assert merged.class_lookup()[[0, 1, 2, 3]].tolist() == [0, 1, 2, 2]
    assert merged.label_lookup().tolist() == [0, 1, 2]
    binary = label_map(KITS, "2+3")
    assert binary.binary and binary.outputs == 1 and binary.class_lookup()[1] == 0  # kidney is background now
    assert label_map(("background", "lesion")).binary
    for bad in ("liver", "0", "4", "tumor,tumor+cyst"):
        with pytest.raises(UsageError):
            label_map(KITS, bad)


def test_a_label_map_scores_only_the_regions_it_can_tell_apart() -> None:
    regions = {r.name: r.labels for r in regions_for(KITS)}
    merged = label_map(KITS, "kidney,tumor+cyst")
    assert merged.separates(regions["kidney_and_masses"]) and merged.separates(regions["masses"])
    assert not merged.separates(regions["tumor"])
    assert not label_map(KITS, "tumor").separates(regions["kidney_and_masses"])


def test_multiclass_loss_is_small_for_the_right_classes_and_coarse_targets_keep_small_classes() -> None:
    classes = torch.zeros(2, 16, 16, dtype=torch.long)
    classes[:, 4:12, 4:12] = 1
    classes[:, 6:8, 6:8] = 2
    right = torch.nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float() * 20
    wrong = right.roll(1, dims=1)
    assert multiclass_loss(right, classes) < 0.01 < multiclass_loss(wrong, classes)
    assert resize_classes(classes, (8, 8))[:, 3, 3].tolist() == [2, 2]  # the 2×2 block is one coarse pixel
    aux = [torch.zeros(2, 3, 8, 8, requires_grad=True), torch.zeros(2, 1, 8, 8, requires_grad=True)]
    loss = segmentation_loss(right, aux, classes, aux_weight=0.5)
    loss.backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in aux)


def test_order_uncertainty_for_several_classes_is_one_minus_the_top_two_margin() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, -50.0]]).T.reshape(1, 3, 1, 2)
    u = uncertainty(logits)
    assert u.shape == (1, 1, 1, 2)
    assert u[0, 0, 0, 0] == pytest.approx(0.0, abs=1e-3) and u[0, 0, 0, 1] == pytest.approx(1.0)
    two = torch.randn(1, 2, 4, 4)  # two classes: the same number as the one-channel form on the logit difference
    torch.testing.assert_close(uncertainty(two), uncertainty(two[:, 1:] - two[:, :1]))


@pytest.mark.parametrize("name", ["mkunet-t-order", "unet-r18"])
def test_every_factory_family_builds_a_multiclass_head(name: str) -> None:
    model = build_segmenter(name, num_classes=4, in_channels=1, encoder_weights=None)
    logits, aux = model(torch.rand(2, 1, 64, 64), return_aux=True)
    assert logits.shape == (2, 4, 64, 64) and all(a.shape[1] == 4 for a in aux)


def test_validation_dice_averages_the_foreground_classes() -> None:
    classes = torch.zeros(1, 4, 4, dtype=torch.long)
    classes[0, :2, :2] = 1
    classes[0, 3, 3] = 2
    logits = torch.nn.functional.one_hot(classes, 3).permute(0, 3, 1, 2).float()
    assert dice_per_image(logits, classes).item() == pytest.approx(1.0)
    logits[0, :, 3, 3] = torch.tensor([1.0, 0.0, 0.0])  # the class-2 pixel is missed
    assert dice_per_image(logits, classes).item() == pytest.approx(0.5)


@pytest.fixture(scope="module")
def trained(kits_h5: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "mkunet"
    torch.manual_seed(0)
    train_segmenter(SegTrainConfig(data=str(kits_h5), out=str(out), model="mkunet-t", size=32, epochs=15,
                                   batch_size=4, lr=1e-2, augment=False))
    return out


def test_a_multiclass_run_learns_the_toy_and_records_its_label_map(trained: Path, kits_h5: Path) -> None:
    config = read_segmenter_config(trained / "best")
    assert config["num_classes"] == 4
    assert config["extra"]["label_map"]["groups"] == [[1], [2], [3]]
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert max(m["val_dice"] for m in metrics) > 0.5  # chance for three classes on these sizes is far below
    report, info = dice_for_run(trained, kits_h5, "test")
    assert [r.name for r in report.regions] == ["kidney_and_masses", "masses", "tumor"]
    # predicting every pixel as kidney would score 0.26 on kidney_and_masses
    assert report.mean["kidney_and_masses"]["Dice"] > 0.5


def test_region_dice_equals_numpy_on_the_reassembled_case_volume(trained: Path, kits_h5: Path) -> None:
    from lawder_core.data.h5 import load_arrays

    images, masks, cases = load_arrays(kits_h5, "test")
    predicted = predict_images(load_predictor(trained), images)
    report, _ = dice_for_run(trained, kits_h5, "test")
    for region, labels in (("kidney_and_masses", (1, 2, 3)), ("masses", (2, 3)), ("tumor", (2,))):
        for case in set(cases):
            rows = cases == case
            ref, pred = np.isin(masks[rows], labels), np.isin(predicted[rows], labels)
            expected = 2 * (ref & pred).sum() / (ref.sum() + pred.sum()) if ref.sum() + pred.sum() else 1.0
            got = next(c for c in report.per_case if c["case"] == case)["metrics"][region]["Dice"]
            assert got == pytest.approx(expected)


def test_a_multiclass_order_run_trains_and_scores_the_three_regions(kits_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "order"
    train_segmenter(SegTrainConfig(data=str(kits_h5), out=str(out), model="mkunet-t-order", size=32, epochs=1,
                                   batch_size=8, augment=False))
    assert read_segmenter_config(out / "best")["num_classes"] == 4
    report, _ = dice_for_run(out, kits_h5, "test")
    assert [r.name for r in report.regions] == ["kidney_and_masses", "masses", "tumor"]


def test_merged_labels_train_a_binary_model_that_writes_the_merged_label_back(kits_h5: Path, tmp_path: Path) -> None:
    out = tmp_path / "masses"
    train_segmenter(SegTrainConfig(data=str(kits_h5), out=str(out), model="mkunet-t", size=32, epochs=1,
                                   batch_size=8, labels="tumor+cyst", augment=False))
    predictor = load_predictor(out)
    assert predictor.num_classes == 1 and predictor.label_map.groups == ((2, 3),)
    from lawder_core.data.h5 import load_arrays

    images, _, _ = load_arrays(kits_h5, "test")
    assert set(np.unique(predict_images(predictor, images)).tolist()) <= {0, 2}
    report, _ = dice_for_run(out, kits_h5, "test")
    assert [r.name for r in report.regions] == ["masses"]
