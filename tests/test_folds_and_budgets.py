"""k-fold training, step budgets, --select, and a resumed segmenter run that equals an uninterrupted one."""

import json

import numpy as np
import pytest
import torch

from lawder_cli.main import app
from lawder_core.data.h5 import read_case_splits
from lawder_core.data.splits import draw_folds, fold_cases, fold_indices, folds_path
from lawder_core.errors import DataError, UsageError
from lawder_core.evaluate import dice_split
from lawder_core.models.factory import load_segmenter
from lawder_core.runs import read_metrics, segmenter_checkpoint
from lawder_core.train.configs import check_seg_config, planned_steps_per_epoch, training_indices
from lawder_core.train.seg import train_segmenter
from tests.helpers import quick_seg_config, runner

SYNTHETIC = {"n": 30}  # images in the module's `data` (conftest)


def quick(data, out, **kw):
    return quick_seg_config(data, out, **kw)


def test_folds_are_disjoint_cover_every_non_test_case_once_and_are_kept_beside_the_data(data):
    folds = fold_cases(data, 5)
    cases, splits = read_case_splits(data)
    non_test = set(cases[splits != "test"].tolist())
    flat = [c for fold in folds for c in fold]
    assert len(flat) == len(set(flat)) and set(flat) == non_test
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    path = folds_path(data, 5)
    assert path.exists() and json.loads(path.read_text())["folds"] == folds
    assert fold_cases(data, 5) == folds  # read back, not redrawn
    assert draw_folds(non_test, 5) == folds  # the draw is seeded: every arm of a comparison gets these folds


def test_a_fold_run_never_trains_on_its_fold_or_on_the_test_split(data):
    cases, splits = read_case_splits(data)
    for fold in range(3):
        train = training_indices(quick(data, "x", folds=3, fold=fold))
        held_out = fold_indices(data, 3, fold, "val")
        assert not set(cases[train]) & set(cases[held_out])
        assert not (splits[train] == "test").any() and not (splits[held_out] == "test").any()
        assert len(train) + len(held_out) == int((splits != "test").sum())


def test_a_stale_folds_file_is_refused(data, tmp_path):
    copy = tmp_path / "s.h5"
    copy.write_bytes(data.read_bytes())
    fold_cases(copy, 4)
    path = folds_path(copy, 4)
    record = json.loads(path.read_text())
    record["folds"][0] = record["folds"][0][1:]  # a case lost
    path.write_text(json.dumps(record))
    with pytest.raises(DataError, match="disjoint folds"):
        fold_cases(copy, 4)


@pytest.mark.parametrize("kw, message", [({"folds": 5}, "go together"), ({"folds": 3, "fold": 3}, "outside"),
                                         ({"fold": 1}, "go together"), ({"select": "median"}, "--select"),
                                         ({"steps": 0}, "--steps"), ({"freeze_trunk": True}, "--init-from")])
def test_bad_fold_and_budget_requests_are_refused_up_front(data, tmp_path, kw, message):
    with pytest.raises(UsageError, match=message):
        check_seg_config(quick(data, tmp_path / "run", **kw))


def test_a_valid_request_passes_the_up_front_checks_with_their_defaults(data, tmp_path):
    # processes defaults to world_size (one process here); the library call of a benchmark once crashed on None
    check_seg_config(quick(data, tmp_path / "run", folds=2, fold=1))


def test_a_step_budget_trains_exactly_that_many_steps_cutting_the_last_epoch(data, tmp_path):
    cfg = quick(data, tmp_path / "run", steps=5, max_steps_per_epoch=None, batch_size=8)
    per_epoch = planned_steps_per_epoch(cfg)
    result = train_segmenter(cfg)
    records = read_metrics(tmp_path / "run")
    assert [r["steps"] for r in records] == [min(5, per_epoch * (i + 1)) for i in range(len(records))]
    assert records[-1]["steps"] == 5 and result["epochs"] == -(-5 // per_epoch)


def test_select_last_makes_evaluate_and_predict_use_last(data, tmp_path):
    out = tmp_path / "run"
    train_segmenter(quick(data, out, select="last"))
    assert segmenter_checkpoint(out) == out / "last"
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), "select": "best"}))
    assert segmenter_checkpoint(out) == out / "best"
    assert segmenter_checkpoint(out / "last") == out / "last"  # a checkpoint folder given directly


def test_evaluate_scores_a_fold_run_on_its_held_out_fold_by_default(data, tmp_path):
    out = tmp_path / "run"
    train_segmenter(quick(data, out, folds=3, fold=1, epochs=1))
    assert dice_split(out, None) == "fold"
    result = runner.invoke(app, ["evaluate", "--dice", "--run", str(out), "--data", str(data), "-o",
                                      str(tmp_path / "eval"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    cases, _ = read_case_splits(data)
    held_out = set(cases[fold_indices(data, 3, 1, "val")])
    assert {c["case"] for c in summary["metric_per_case"]} == held_out
    assert summary["metadata"]["inputs"]["split"] == "fold"
    plain = tmp_path / "plain"
    train_segmenter(quick(data, plain, epochs=1))
    assert dice_split(plain, None) == "test"
    with pytest.raises(UsageError, match="not trained with --folds"):
        dice_split(plain, "fold")


def test_train_order_cli_takes_the_fold_and_budget_options(data, tmp_path):
    out = tmp_path / "cli"
    result = runner.invoke(app, ["train-order", "--data", str(data), "--out", str(out), "--model", "mkunet-t",
                                      "--size", "32", "--epochs", "3", "--steps", "4", "--batch-size", "8",
                                      "--folds", "3", "--fold", "2", "--select", "last", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4 and summary["select"] == "last" and (summary["folds"], summary["fold"]) == (3, 2)


def train_then_stop(cfg, stop_after: int):
    def stop(metrics):
        if metrics["epoch"] == stop_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(cfg, report=stop)


@pytest.mark.parametrize("model", ["mkunet-t", "mkunet-t-order"])
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(data, tmp_path, model):
    """Augmentation, data order, optimiser, schedule and best-so-far all carry over an interruption."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_segmenter(quick(data, whole, model=model, epochs=3, max_steps_per_epoch=3))
    train_then_stop(quick(data, split, model=model, epochs=3, max_steps_per_epoch=3), stop_after=0)
    train_segmenter(quick(data, split, model=model, epochs=3, max_steps_per_epoch=3, resume=True))
    a, b = (load_segmenter(run / "last").state_dict() for run in (whole, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["val_dice"] for r in read_metrics(whole)] == [r["val_dice"] for r in read_metrics(split)]


def test_augmentation_depends_on_seed_epoch_and_sample_only(data):
    from lawder_core.data.dataset import SegDataset

    one = SegDataset(data, "train", augment=True, seed=3)
    two = SegDataset(data, "train", augment=True, seed=3)
    one[0], one[1]  # draws in another order must not shift what sample 2 gets
    assert torch.equal(one[2][0], two[2][0])
    two.set_epoch(1)
    assert any(not torch.equal(one[i][0], two[i][0]) for i in range(6))
    assert np.array_equal(one.indices, two.indices)
