"""The one place images and masks change size: bilinear (antialiased) for images, nearest for labels.

Labels take the pixel whose centre is closest ("nearest-exact" in torch, NEAREST in PIL): plain "nearest" in
torch floors the coordinate and shifts masks by up to a pixel against their images. `resize_mask_priority` is
the exception for label maps whose small classes must survive downsampling (KiTS tumours): area coverage with
a class priority, see its docstring. Arrays (what `prepare`,
`sample`, `predict`, `tune` and FID handle) are resized with PIL, which needs no torch; tensors (the training
batches of `data/dataset.py`) with torch, by the same rules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H,W), (H,W,1) or (H,W,3) uint8 → the same layout at `size` (an int means square); bilinear, antialiased."""
    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return image
    grey = image.ndim == 3 and image.shape[2] == 1
    out = np.asarray(Image.fromarray(image[..., 0] if grey else image).resize((w, h), Image.BILINEAR))
    return out[..., None] if grey else out


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(H,W) integer labels → `size`; labels stay labels."""
    h, w = as_hw(size)
    if mask.shape == (h, w):
        return mask
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))


def area_priority_threshold(factor_h: float, factor_w: float) -> float:
    """The covered fraction at which a priority label takes an output pixel: half an input voxel, at most 1/4.

    Half a voxel, not a fixed share of the pixel, so one voxel survives at every integer factor ≥ 2 (voxels are
    never split there) and a 3-voxel object at any factor > 2 (one of its voxels is cut along one axis at most,
    so some output pixel gets at least half a voxel of it). The 1/4 cap keeps the priority when the factor is
    close to 1, where half a voxel would be half the pixel, i.e. a majority vote.
    """
    voxels_per_pixel = max(factor_h, 1.0) * max(factor_w, 1.0)
    return min(0.25, 0.5 / voxels_per_pixel)


def _resample_axis(values: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """`values` along `axis` -> n_out cells (float32): the mean over each cell's exact input interval when
    downsampling; the value under the cell's centre when not (nearest-exact, as `resize_mask`).

    An output cell [lo, hi) touches at most ceil(n_in / n_out) + 1 input cells, so it is a sum of that many
    gathered rows, each weighted by its overlap: O(pixels). (A dense weight-matrix product is O(pixels × n_out),
    and NumPy's cumsum and reduceat along a middle axis are slow: each took ~0.1 s per 512² slice.)
    """
    n_in = values.shape[axis]
    if n_out >= n_in:
        source = np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)
        return np.take(values, source, axis=axis).astype(np.float32)
    edges = np.arange(n_out + 1) * n_in / n_out  # exact at integer factors and at the last edge
    low, high = edges[:-1], edges[1:]
    first = np.floor(low).astype(np.int64)
    shape = [-1 if a == axis else 1 for a in range(values.ndim)]
    out = np.zeros([n_out if a == axis else n for a, n in enumerate(values.shape)], np.float32)
    for step in range(int(np.ceil(n_in / n_out)) + 1):
        cell = first + step
        overlap = np.clip(np.minimum(high, cell + 1) - np.maximum(low, cell), 0.0, None) * (cell < n_in)
        out += np.take(values, np.minimum(cell, n_in - 1), axis=axis) * overlap.reshape(shape).astype(np.float32)
    return out * np.float32(n_out / n_in)


def _block_counts(mask: np.ndarray, labels: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """(L, H/fh, W/fw): how many pixels of each label every fh×fw block holds.

    Sums of strided views (fh + fw adds): several times faster than summing a (h, fh, w, fw) reshape.
    """
    onehot = (mask[None] == np.asarray(labels)[:, None, None]).view(np.uint8)
    rows = np.zeros((len(labels), mask.shape[0] // fh, mask.shape[1]), np.int32)
    for offset in range(fh):
        rows += onehot[:, offset::fh, :]
    counts = np.zeros((len(labels), rows.shape[1], mask.shape[1] // fw), np.int32)
    for offset in range(fw):
        counts += rows[:, :, offset::fw]
    return counts


def label_fractions(mask: np.ndarray, size: int | tuple[int, int], labels: np.ndarray) -> np.ndarray:
    """(L, h, w): the area share of each output pixel that each of `labels` covers in `mask` (H, W)."""
    h, w = as_hw(size)
    in_h, in_w = mask.shape
    if in_h % h == 0 and in_w % w == 0:  # integer factors (512 -> 256, 128, 64): plain block counts, faster
        return _block_counts(mask, labels, in_h // h, in_w // w) / ((in_h // h) * (in_w // w))
    onehot = (mask[None] == np.asarray(labels)[:, None, None]).view(np.uint8)
    return _resample_axis(_resample_axis(onehot, h, axis=1), w, axis=2)


def resize_mask_priority(mask: np.ndarray, size: int | tuple[int, int], priority: tuple[int, ...]) -> np.ndarray:
    """(H,W) integer labels → `size`, by area with a label priority, so small lesions survive downsampling.

    Each output pixel gets the first label of `priority` (highest first) that covers at least
    `area_priority_threshold` of its area, else the label covering the most area (background included; ties
    go to the lower label value). Coverage is exact area overlap along a downsampled axis and the centre's
    pixel along an upsampled one; a pure upsampling is `resize_mask` (nearest-exact), unchanged.
    """
    h, w = as_hw(size)
    in_h, in_w = mask.shape
    if (h, w) == (in_h, in_w):
        return mask
    if h >= in_h and w >= in_w:
        return resize_mask(mask, size)
    labels = np.flatnonzero(np.bincount(mask.ravel()))  # the labels present (faster than np.unique)
    fractions = label_fractions(mask, (h, w), labels)
    out = labels[fractions.argmax(axis=0)]
    threshold = area_priority_threshold(in_h / h, in_w / w) - 1e-6  # float32 sums of exact shares
    for label in reversed(priority):  # lowest priority first, so the highest is painted last and wins
        index = np.searchsorted(labels, label)
        if index < len(labels) and labels[index] == label:
            out[fractions[index] >= threshold] = label
    return out.astype(mask.dtype)


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N,H,W[,C]) uint8 → (N,*size[,C])."""
    if len(images) == 0 or images.shape[1:3] == as_hw(size):
        return images
    return np.stack([resize_image(im, size) for im in images])


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N,H,W) integer label masks → (N,*size)."""
    if len(masks) == 0 or masks.shape[1:3] == as_hw(size):
        return masks
    return np.stack([resize_mask(m, size) for m in masks])


def resize_image_tensor(image: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """(C,H,W) or (B,C,H,W) image of any dtype; uint8 is resampled in float and rounded back."""
    import torch.nn.functional as F

    batch = image if image.ndim == 4 else image[None]
    if tuple(batch.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)
    if image.dtype.is_floating_point is False:
        out = out.round_().clamp_(0, 255)
    out = out.to(image.dtype)
    return out if image.ndim == 4 else out[0]


def resize_mask_tensor(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H,W) or (B,H,W) integer labels; labels stay labels."""
    import torch.nn.functional as F

    batch = mask if mask.ndim == 3 else mask[None]
    if tuple(batch.shape[-2:]) == tuple(size):
        return mask
    out = F.interpolate(batch[:, None].float(), size=size, mode="nearest-exact")[:, 0].round().to(mask.dtype)
    return out if mask.ndim == 3 else out[0]
