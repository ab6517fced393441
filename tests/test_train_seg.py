import json

import pytest
import torch

import lawder_core.train.seg as seg
from lawder_core.data.labels import label_map
from lawder_core.errors import TrainingError
from lawder_core.models.factory import load_segmenter
from lawder_core.runs import read_metrics
from lawder_core.train.seg import SegTrainConfig, class_target, dice_per_image, model_target, train_segmenter
from tests.helpers import quick_seg_config


def quick(data, out, **kw):
    return quick_seg_config(data, out, **kw)


def test_training_writes_loadable_best_and_last(data, tmp_path):
    result = train_segmenter(quick(data, tmp_path / "run", model="mkunet-t-order"))
    assert result["epochs"] == 2
    records = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in records] == [0, 1]
    assert all(0 <= r["val_dice"] <= 1 for r in records)
    model = load_segmenter(tmp_path / "run" / "best").eval()
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 1, 32, 32)
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"] == "mkunet-t-order"


def test_interrupted_run_resumes_at_the_next_epoch(data, tmp_path):
    out = tmp_path / "run"

    def killed_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_segmenter(quick(data, out, epochs=4), report=killed_after_first_epoch)
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    before = load_segmenter(out / "last").state_dict()
    result = train_segmenter(quick(data, out, epochs=4, resume=True))
    assert result["epochs"] == 4
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1, 2, 3]
    after = load_segmenter(out / "last").state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_nan_loss_stops_with_a_training_error(data, tmp_path, monkeypatch):
    monkeypatch.setattr(seg, "segmentation_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="nan"):
        train_segmenter(quick(data, tmp_path / "run"))


def test_dice_and_binary_target_by_hand():
    mask = torch.tensor([[[0, 1], [2, 0]]])
    names = ("background", "kidney", "tumor")
    every = torch.from_numpy(label_map(names, "kidney+tumor").class_lookup())
    tumour = torch.from_numpy(label_map(names, "tumor").class_lookup())
    assert model_target(class_target(mask, every), 1).sum() == 2
    assert model_target(class_target(mask, tumour), 1).sum() == 1
    target = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    logits = torch.tensor([[[[5.0, -5.0], [5.0, -5.0]]]])
    assert dice_per_image(logits, target).item() == pytest.approx(2 * 1 / 4)
    empty = torch.zeros(1, 1, 2, 2)
    assert dice_per_image(-torch.ones(1, 1, 2, 2), empty).item() == 1.0
    assert dice_per_image(torch.ones(1, 1, 2, 2), empty).item() == 0.0


def test_relative_paths_are_resolved_for_ray_workers(tmp_path, monkeypatch):
    from lawder_core.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = with_absolute_paths(SegTrainConfig(data="in/s.h5", out="runs/x", synthetic="s3://bucket/syn.h5"))
    assert cfg.data == str(tmp_path / "in" / "s.h5") and cfg.out == str(tmp_path / "runs" / "x")
    assert cfg.synthetic == "s3://bucket/syn.h5"
