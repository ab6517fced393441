"""Structure loss and its deep-supervision sum."""

from __future__ import annotations

import pytest
import torch

from lawder_core.train.losses import (
    boundary_kernel,
    boundary_weight,
    resize_target,
    segmentation_loss,
    structure_loss,
)


def square_mask(size: int = 64) -> torch.Tensor:
    mask = torch.zeros(2, 1, size, size)
    mask[:, :, size // 4 : size // 2, size // 4 : size // 2] = 1
    return mask


def test_perfect_prediction_beats_poor_prediction() -> None:
    mask = square_mask()
    perfect = (mask * 2 - 1) * 20
    inverted = -perfect
    blank = torch.zeros_like(mask)
    assert structure_loss(perfect, mask) < 0.01
    assert structure_loss(perfect, mask) < structure_loss(blank, mask) < structure_loss(inverted, mask)


def test_boundary_pixels_weigh_more() -> None:
    weight = boundary_weight(square_mask())
    assert weight[0, 0, 63, 63] == pytest.approx(1.0)  # no boundary within 15 pixels
    assert weight[0, 0, 15, 24] > 2.0  # just outside the square's edge
    assert weight[0, 0, 24, 24] > weight[0, 0, 15, 24]  # inside the small lesion, most of the window differs
    assert weight.max() <= 6.0


def test_integer_labels_become_one_hot_for_several_classes() -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 8:16, 8:16] = 1
    labels[:, 20:28, 20:28] = 2
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 40 - 20
    assert structure_loss(logits, labels) < 0.01


def test_resize_target_keeps_a_binary_mask() -> None:
    small = resize_target(square_mask(), (16, 16))
    assert small.shape == (2, 1, 16, 16)
    assert set(small.unique().tolist()) <= {0.0, 1.0}
    assert small.sum() == 2 * 4 * 4


def test_aux_outputs_add_weighted_losses_at_their_resolution() -> None:
    mask = square_mask()
    logits = torch.zeros(2, 1, 64, 64)
    aux = [torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 32, 32)]
    main = segmentation_loss(logits, [], mask)
    assert segmentation_loss(logits, aux, mask, aux_weight=0.0) == main
    with_aux = segmentation_loss(logits, aux, mask, aux_weight=0.5)
    # each coarser head's boundary window covers the share of the image that 31 px covers at 64 px: 3 and 15 px
    expected = main + 0.5 * (structure_loss(aux[0], resize_target(mask, (8, 8)), 3)
                             + structure_loss(aux[1], resize_target(mask, (32, 32)), 15))
    torch.testing.assert_close(with_aux, expected)
    per_output = segmentation_loss(logits, aux, mask, aux_weight=[0.5, 0.0])
    assert main < per_output < with_aux
    with pytest.raises(ValueError):
        segmentation_loss(logits, aux, mask, aux_weight=[0.5])


def test_one_channel_region_heads_of_a_multiclass_model_see_any_lesion() -> None:
    labels = torch.zeros(1, 32, 32, dtype=torch.long)
    labels[:, 4:12, 4:12] = 1
    labels[:, 20:28, 20:28] = 2
    logits = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 40 - 20
    region = ((labels > 0).float().unsqueeze(1) * 40 - 20)[:, :, ::2, ::2]
    assert segmentation_loss(logits, [region], labels, aux_weight=1.0) < 0.02


def test_boundary_window_scales_with_the_training_size() -> None:
    assert boundary_kernel(352) == 31
    assert boundary_kernel(128) == 11
    assert boundary_kernel(64) == 7  # round(5.6) = 6, made odd
    assert boundary_kernel(256) == 23
    assert boundary_kernel(32) == 3
    assert all(boundary_kernel(s) % 2 == 1 for s in range(8, 1025, 8))
