"""The segmenter's augmentation applied to a whole batch at once, on whatever device holds it.

The same transforms as `dataset.augment_pair`, drawn from the same generator per (seed, epoch, sample), in the
same order: a left-right flip, an up-down flip, k quarter turns, then (half the time) a crop of 75-100 % of the
side scaled back to full size, bilinear for the image and nearest-exact for the mask. The flips and turns of the
whole batch are at most 8 group operations (one per symmetry of the square drawn); each crop is scaled by the
per-sample path's own resize. So a sample's result depends on its key alone, never on the batch it lands in,
and equals what the per-sample path gives it, bit for bit.

Images are uint8 (C×S×S, square: quarter turns must keep the shape) and stay uint8, as the per-sample path
rounds them; `to_model_input` makes floats of them on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lawder_core.data.resize import resize_image_tensor, resize_mask_tensor

SCALE_RANGE = (0.75, 1.0)


@dataclass(frozen=True)
class AugmentDraws:
    """What each sample of a batch drew (arrays of length B)."""

    hflip: np.ndarray  # bool
    vflip: np.ndarray  # bool
    turns: np.ndarray  # int, quarter turns 0..3
    crop: np.ndarray  # bool
    top: np.ndarray  # int, the crop's corner and size (valid where crop)
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray


def draw(keys: Sequence[tuple[int, int, int]], side: int) -> AugmentDraws:
    """Each sample's transforms from `np.random.default_rng([seed, epoch, index])`, in `augment_pair`'s order."""
    n = len(keys)
    hflip, vflip, crop = np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    turns, top, left = np.zeros(n, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    height, width = np.full(n, side, np.int64), np.full(n, side, np.int64)
    for j, key in enumerate(keys):
        rng = np.random.default_rng(list(key))
        hflip[j] = rng.random() < 0.5
        vflip[j] = rng.random() < 0.5
        turns[j] = int(rng.integers(0, 4))
        if rng.random() < 0.5:
            scale = rng.uniform(*SCALE_RANGE)
            ch, cw = max(1, int(side * scale)), max(1, int(side * scale))
            crop[j], height[j], width[j] = True, ch, cw
            top[j], left[j] = int(rng.integers(0, side - ch + 1)), int(rng.integers(0, side - cw + 1))
    return AugmentDraws(hflip, vflip, turns, crop, top, left, height, width)


def augment_batch(images: torch.Tensor, masks: torch.Tensor,
                  draws: AugmentDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B,C,S,S) and masks (B,S,S) on any device → their augmented copies on the same device."""
    images, masks = dihedral(images, masks, draws)
    for j in np.flatnonzero(draws.crop):
        top, left, height, width = (int(v[j]) for v in (draws.top, draws.left, draws.height, draws.width))
        images[j], masks[j] = crop_and_scale(images[j], masks[j], top, left, height, width)
    return images, masks


def dihedral(images: torch.Tensor, masks: torch.Tensor, draws: AugmentDraws) -> tuple[torch.Tensor, torch.Tensor]:
    """The flips and quarter turns, as at most 8 group operations: a left-right flip, then an up-down one, then
    k turns is one of the 8 symmetries of the square, `mirror` (left-right) followed by `turns` quarter turns
    (an up-down flip is a left-right flip and a half turn; both flips are a half turn)."""
    mirror = draws.hflip ^ draws.vflip
    turns = (draws.turns + 2 * draws.vflip) % 4
    out_images, out_masks = torch.empty_like(images), torch.empty_like(masks)
    for flip in (False, True):
        for k in range(4):
            chosen = np.flatnonzero((mirror == flip) & (turns == k))
            if not len(chosen):
                continue
            index = torch.as_tensor(chosen, device=images.device)
            image, mask = images.index_select(0, index), masks.index_select(0, index)
            if flip:
                image, mask = image.flip(-1), mask.flip(-1)
            if k:
                image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
            out_images.index_copy_(0, index, image)
            out_masks.index_copy_(0, index, mask)
    return out_images, out_masks


def crop_and_scale(image: torch.Tensor, mask: torch.Tensor, top: int, left: int, height: int,
                   width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One sample's crop scaled back to full size, by `augment_pair`'s own calls (one pair of small kernels per
    cropped sample: fast on a CPU, and a fraction of a millisecond of launches per batch on a GPU)."""
    side = tuple(mask.shape)
    return (resize_image_tensor(image[:, top:top + height, left:left + width], side, antialias=False),
            resize_mask_tensor(mask[top:top + height, left:left + width], side))


