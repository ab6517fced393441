"""The one place images and masks change size: bilinear (antialiased) for images, nearest for labels.

Labels take the pixel whose centre is closest ("nearest-exact" in torch, NEAREST in PIL): plain "nearest" in
torch floors the coordinate and shifts masks by up to a pixel against their images. Arrays (what `prepare`,
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
