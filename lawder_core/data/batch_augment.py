"""The segmenter's augmentation applied to a whole batch at once, on whatever device holds it.

The same transforms as `dataset.augment_pair`, drawn from the same generator per (seed, epoch, sample), in the
same order: a left-right flip, an up-down flip, k quarter turns, then (half the time) a crop of 75-100 % of the
side scaled back to full size, bilinear for the image and nearest-exact for the mask. Only the arithmetic is
batched: flips and turns are index operations on the samples that drew them, and the crop is a separable
bilinear resampling (x first, then y, with PyTorch's own source coordinates and weights) done with gathers.
So a sample's result depends on its key alone, never on the batch it lands in, and equals what the per-sample
path gives it (masks exactly; image values up to a rounding step, where float sums in another order land on
the other side of .5).

Images are uint8 (C×S×S, square: quarter turns must keep the shape) and stay uint8, as the per-sample path
rounds them; `to_model_input` makes floats of them on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

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
    images, masks = images.clone(), masks.clone()
    device = images.device
    for flag, dim in ((draws.hflip, -1), (draws.vflip, -2)):
        chosen = _where(flag, device)
        if len(chosen):
            images[chosen] = images[chosen].flip(dim)
            masks[chosen] = masks[chosen].flip(dim)
    for k in (1, 2, 3):
        chosen = _where(draws.turns == k, device)
        if len(chosen):
            images[chosen] = torch.rot90(images[chosen], k, (-2, -1))
            masks[chosen] = torch.rot90(masks[chosen], k, (-2, -1))
    chosen = np.flatnonzero(draws.crop)
    if len(chosen):
        index = torch.as_tensor(chosen, device=device)
        side = images.shape[-1]
        rows = [crop_axis(int(t), int(h), side, device) for t, h in zip(draws.top[chosen], draws.height[chosen],
                                                                         strict=True)]
        cols = [crop_axis(int(t), int(w), side, device) for t, w in zip(draws.left[chosen], draws.width[chosen],
                                                                        strict=True)]
        images[index] = resample_images(images[index], rows, cols)
        masks[index] = resample_masks(masks[index], rows, cols)
    return images, masks


@dataclass(frozen=True)
class AxisMap:
    """Where one axis of a cropped-and-scaled sample reads from: two neighbours and their bilinear weights (as
    `F.interpolate(mode="bilinear", align_corners=False)` computes them), and the nearest-exact source."""

    low: torch.Tensor  # (S,) int64
    high: torch.Tensor
    w_low: torch.Tensor  # (S,) float32
    w_high: torch.Tensor
    nearest: torch.Tensor  # (S,) int64


def crop_axis(start: int, length: int, side: int, device: torch.device) -> AxisMap:
    """The crop [start, start + length) of one axis scaled to `side` pixels."""
    scale = torch.tensor(length / side, dtype=torch.float32)  # PyTorch's float32 input/output ratio
    dst = torch.arange(side, dtype=torch.float32)
    src = ((dst + 0.5) * scale - 0.5).clamp_min(0.0)
    low = src.to(torch.int64)
    high = torch.where(low < length - 1, low + 1, low)
    w_high = src - low.to(torch.float32)
    w_low = 1.0 - w_high
    nearest = torch.floor((dst + 0.5) * scale).to(torch.int64).clamp_max(length - 1)
    return AxisMap(*(t.to(device) for t in (low + start, high + start, w_low, w_high, nearest + start)))


def resample_images(images: torch.Tensor, rows: list[AxisMap], cols: list[AxisMap]) -> torch.Tensor:
    """Bilinear crop-and-scale of uint8 (b,C,S,S), one crop per sample: x first, then y; rounded back to uint8."""
    stack = lambda maps, field: torch.stack([getattr(m, field) for m in maps])  # noqa: E731
    b, c, s, _ = images.shape
    x = images.float()
    # along x: (b,C,S,S) columns of each sample's crop
    x_low, x_high = stack(cols, "low")[:, None, None, :].expand(b, c, s, s), stack(cols, "high")[:, None, None,
                                                                                               :].expand(b, c, s, s)
    wx_low, wx_high = stack(cols, "w_low")[:, None, None, :], stack(cols, "w_high")[:, None, None, :]
    x = x.gather(3, x_low) * wx_low + x.gather(3, x_high) * wx_high
    # along y
    y_low, y_high = stack(rows, "low")[:, None, :, None].expand(b, c, s, s), stack(rows, "high")[:, None, :,
                                                                                               None].expand(b, c, s, s)
    wy_low, wy_high = stack(rows, "w_low")[:, None, :, None], stack(rows, "w_high")[:, None, :, None]
    x = x.gather(2, y_low) * wy_low + x.gather(2, y_high) * wy_high
    return x.round_().clamp_(0, 255).to(torch.uint8)


def resample_masks(masks: torch.Tensor, rows: list[AxisMap], cols: list[AxisMap]) -> torch.Tensor:
    """Nearest-exact crop-and-scale of (b,S,S) labels: labels stay labels."""
    b, s, _ = masks.shape
    cols_index = torch.stack([m.nearest for m in cols])[:, None, :].expand(b, s, s)
    rows_index = torch.stack([m.nearest for m in rows])[:, :, None].expand(b, s, s)
    return masks.gather(2, cols_index).gather(1, rows_index)


def _where(flags: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(flags), device=device)
