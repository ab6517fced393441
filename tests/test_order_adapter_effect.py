"""benchmarks/order_adapter_effect.py: what a two-stage ORDER run changes against the trunk it started from."""

import json

import pytest
import torch

from lawder_core.models.factory import load_segmenter
from lawder_core.train.seg import train_segmenter
from tests.helpers import load_benchmark, quick_seg_config


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("order_adapter_effect")


@pytest.fixture(scope="module")
def work(data, tmp_path_factory):
    """bench_order_folds.py's layout at toy scale: fold 0's T run and the two-stage ORDER run started from it."""
    root = tmp_path_factory.mktemp("folds")
    trunk = root / "runs" / "t" / "fold0"
    train_segmenter(quick_seg_config(data, trunk, select="last"))
    train_segmenter(quick_seg_config(data, root / "runs" / "order-2stage" / "fold0", model="mkunet-t-order",
                                     init_from=str(trunk), freeze_trunk=True, select="last", epochs=2, lr=0.3,
                                     max_steps_per_epoch=2))
    return root


def test_the_effect_equals_a_direct_computation_and_the_trunk_is_found_identical(bench, work, data, tmp_path):
    out = tmp_path / "effect.json"
    result = bench.main(["--work", str(work), "--data", str(data), "--split", "test", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result)) and list(result["folds"]) == ["0"]
    row = result["folds"]["0"]
    assert row["trunk_identical"] is True and result["size"] == 32
    assert any(norm > 0 for norm in row["to_out_norms"])  # trained from its zero start

    images, masks = bench.split_tensors(data, "test", 32)
    trunk = load_segmenter(work / "runs" / "t" / "fold0" / "last").eval()
    order = load_segmenter(work / "runs" / "order-2stage" / "fold0" / "last").eval()
    with torch.no_grad():
        a, b = trunk(images), order(images)
    flips = (a[:, 0] > 0) != (b[:, 0] > 0)
    assert row["images"] == len(images) and row["flipped"] == pytest.approx(float(flips.float().mean()))
    assert row["flipped"] == pytest.approx(row["flipped_to_right"] + row["flipped_to_wrong"])
    assert row["mean_abs_delta_logit"] == pytest.approx(float((b - a).abs().mean()), rel=1e-6)
    assert row["mean_abs_delta_logit"] > 0  # (at toy scale no pixel flips: the hand-made case below does)


def test_flips_are_split_into_right_and_wrong_and_dice_follows_them(bench):
    reference = torch.tensor([[[1, 1], [0, 0]], [[0, 0], [0, 0]]])
    before = torch.tensor([[[2.0, -1.0], [-3.0, 0.5]], [[-1.0, -1.0], [-1.0, -1.0]]])[:, None]
    after = torch.tensor([[[2.5, 1.0], [-3.0, -0.5]], [[-1.0, -1.0], [-1.0, -2.0]]])[:, None]
    change = bench.prediction_change(before, after, reference)
    # image 0: pixel (0,1) becomes lesion (right), pixel (1,1) becomes background (right); image 1 stays empty
    assert change["flipped"] == 2 / 8 and change["flipped_to_right"] == 2 / 8 and change["flipped_to_wrong"] == 0
    assert change["mean_abs_delta_logit"] == pytest.approx((0.5 + 2.0 + 1.0 + 1.0) / 8)
    assert change["dice_trunk"] == (0.5 + 1) / 2 and change["dice_order"] == 1.0
    wrong = bench.prediction_change(after, before, reference)  # the same flips, undone
    assert wrong["flipped_to_wrong"] == 2 / 8 and wrong["flipped_to_right"] == 0
    three_classes = torch.zeros(1, 3, 2, 2)
    three_classes[0, 2, 0, 0] = 1.0  # argmax: class 2 at (0,0), background elsewhere
    assert bench.foreground(three_classes).tolist() == [[[True, False], [False, False]]]


def test_a_trunk_tensor_that_moved_is_found(bench):
    trunk = {"encoder.w": torch.ones(2), "bn.running_mean": torch.zeros(2)}
    order = {**trunk, "order_fusions.0.to_out.weight": torch.ones(3)}
    assert bench.trunk_identical(trunk, order)
    assert not bench.trunk_identical(trunk, {**order, "bn.running_mean": torch.tensor([0.0, 1e-7])})
    assert not bench.trunk_identical(trunk, {k: v for k, v in order.items() if k != "encoder.w"})


def test_a_work_folder_without_finished_pairs_is_refused(bench, tmp_path, data):
    with pytest.raises(SystemExit):
        bench.main(["--work", str(tmp_path), "--data", str(data)])
