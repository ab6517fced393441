"""Mask adherence: a segmenter callable segments synthetic images; Dice against their conditioning masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lawder_core.errors import DataError
from lawder_core.metrics.adherence import mask_adherence
from lawder_core.models.inference import predict_labels


def bright_pixels(images: torch.Tensor) -> torch.Tensor:
    """A perfect 'segmenter' of bright lesions: logit > 0 where the red channel is above 0.5."""
    assert images.dtype == torch.float32 and images.shape[1] == 3 and float(images.max()) <= 1.0
    return (images[:, :1] - 0.5) * 20


def make_pair(shift: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Mask: a 4×4 lesion at (4, 4); image: the same lesion drawn `shift` pixels to the right."""
    mask = np.zeros((size, size), np.uint8)
    mask[4:8, 4:8] = 1
    image = np.full((size, size, 3), 40, np.uint8)
    image[4:8, 4 + shift:8 + shift] = 220
    return image, mask


def test_adherence_by_hand():
    pairs = [make_pair(0), make_pair(0), make_pair(0), make_pair(2)]
    images, masks = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    result = mask_adherence(bright_pixels, images, masks, batch_size=3)
    expected = np.array([1.0, 1.0, 1.0, 2 * 8 / (16 + 16)])  # a 2-pixel shift keeps 8 of 16 pixels
    assert result["dice_per_image"] == pytest.approx(expected.tolist())
    assert result["dice_mean"] == pytest.approx(expected.mean())
    assert result["dice_sd"] == pytest.approx(expected.std(ddof=1))
    assert result["iou_mean"] == pytest.approx((3 + 8 / 24) / 4)
    assert result["n_images"] == 4 and result["empty_policy"] == "one"


def test_batches_multiclass_logits_and_resizing():
    images, masks = (np.stack(x) for x in zip(*[make_pair(0) for _ in range(5)], strict=True))
    calls = []

    def three_class_low_res(batch: torch.Tensor) -> torch.Tensor:
        calls.append(len(batch))
        fg = bright_pixels(batch)
        logits = torch.cat([-fg, fg, fg - 1], dim=1)  # background, lesion, a weaker second class
        return F.avg_pool2d(logits, 2)  # the segmenter works at half resolution

    result = mask_adherence(three_class_low_res, images, masks, batch_size=2)
    assert calls == [2, 2, 1]
    assert result["dice_mean"] > 0.8
    labels = predict_labels(three_class_low_res, images[:1])
    assert labels.shape == (1, 16, 16) and labels.dtype == np.uint8


def test_empty_masks_follow_the_policy():
    image = np.full((1, 8, 8, 3), 10, np.uint8)
    mask = np.zeros((1, 8, 8), np.uint8)
    assert mask_adherence(bright_pixels, image, mask)["dice_mean"] == 1.0
    nan = mask_adherence(bright_pixels, image, mask, empty_policy="nan")
    assert np.isnan(nan["dice_mean"]) and nan["n_scored"] == 0


def test_grey_images_are_repeated_to_rgb():
    image, mask = make_pair(0)
    result = mask_adherence(bright_pixels, image[None, ..., 0], mask[None])
    assert result["dice_mean"] == 1.0


def test_bad_inputs_are_data_errors():
    image, mask = make_pair(0)
    with pytest.raises(DataError, match="do not match"):
        mask_adherence(bright_pixels, image[None], mask[None, :8])
    with pytest.raises(DataError, match="expected logits"):
        mask_adherence(lambda x: (bright_pixels(x),), image[None], mask[None])
