"""segmenter_dice on an HDF5 split (KiTS-like labels, per-case volumes) and adherence_on_h5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lawder_core.data.h5 import H5Writer
from lawder_core.metrics.adherence import adherence_on_h5
from lawder_core.metrics.seg_eval import segmenter_dice

KITS23 = ["background", "kidney", "tumor", "cyst"]


def write_kits_like(path, n_cases: int = 2, slices: int = 3):
    """Images encode their labels: channel value 60 × label, so a 'segmenter' can read the truth back."""
    rng = np.random.default_rng(0)
    with H5Writer(path, height=8, width=8, channels=3, label_names=KITS23, source="test") as writer:
        for case in range(n_cases):
            for _ in range(slices):
                mask = rng.choice(4, size=(8, 8), p=[0.5, 0.3, 0.1, 0.1]).astype(np.uint8)
                image = np.repeat((mask * 60)[..., None], 3, axis=2).astype(np.uint8)
                writer.add(image, mask, f"case_{case}", "test" if case == 0 else "train")
    return path


def oracle(num_classes: int):
    def predict(batch: torch.Tensor) -> torch.Tensor:
        labels = torch.round(batch[:, 0] * 255 / 60).long()
        if num_classes == 1:
            return (labels[:, None] > 0).float() * 20 - 10
        return torch.nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).float() * 10

    return predict


def test_multiclass_segmenter_gets_nested_regions(tmp_path):
    data = write_kits_like(tmp_path / "kits.h5")
    report = segmenter_dice(oracle(4), data, "test", num_classes=4)
    assert [r.name for r in report.regions] == ["kidney_and_masses", "masses", "tumor"]
    assert [c["case"] for c in report.per_case] == ["case_0"] and report.per_case[0]["n_images"] == 3
    assert all(report.mean[r]["Dice"] == pytest.approx(1.0) for r in ("kidney_and_masses", "masses", "tumor"))


def test_one_channel_segmenter_on_kits_is_scored_on_foreground(tmp_path):
    data = write_kits_like(tmp_path / "kits.h5")
    report = segmenter_dice(oracle(1), data, "all", num_classes=1)
    assert [r.name for r in report.regions] == ["foreground"]
    assert len(report.per_case) == 2 and report.foreground_mean["Dice"] == pytest.approx(1.0)


def test_adherence_on_h5(tmp_path):
    data = write_kits_like(tmp_path / "syn.h5")
    result = adherence_on_h5(oracle(1), data, "train")
    assert result["n_images"] == 3 and result["dice_mean"] == pytest.approx(1.0)
    assert result["synthetic"].endswith("syn.h5:train")


def test_at_size_runs_the_network_at_its_training_size_and_labels_at_the_image_size():
    from lawder_core.models.inference import at_size, predict_labels

    seen = []

    def network(batch: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(batch.shape[-2:]))
        return (batch[:, :1] > 0.5).float() * 20 - 10  # bright pixels are lesion

    images = np.zeros((2, 64, 48, 3), np.uint8)
    images[:, 16:48, 12:36] = 255
    labels = predict_labels(at_size(network, 32), images, batch_size=2)
    assert seen == [(32, 32)] and labels.shape == (2, 64, 48)
    expected = (images[..., 0] > 0).astype(np.uint8)
    assert (labels == expected).mean() > 0.97  # only the rectangle's edges may move by the round trip
    assert at_size(network, None) is network
