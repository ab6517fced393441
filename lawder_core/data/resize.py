"""The one place images and masks change size: bilinear (antialiased) for images, nearest for labels.

Labels use "nearest-exact" (the pixel whose centre is closest, as PIL's NEAREST does): plain "nearest" in
torch floors the coordinate and shifts masks by up to a pixel against their images.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

MASK_MODE = "nearest-exact"


def resize_image_tensor(image: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """(C,H,W) or (B,C,H,W) image of any dtype; uint8 is resampled in float and rounded back."""
    batch = image if image.ndim == 4 else image[None]
    if tuple(batch.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(batch.float(), size=size, mode="bilinear", align_corners=False, antialias=antialias)
    if image.dtype == torch.uint8:
        out = out.round_().clamp_(0, 255)
    out = out.to(image.dtype)
    return out if image.ndim == 4 else out[0]


def resize_mask_tensor(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(H,W) or (B,H,W) integer labels; labels stay labels."""
    batch = mask if mask.ndim == 3 else mask[None]
    if tuple(batch.shape[-2:]) == tuple(size):
        return mask
    out = F.interpolate(batch[:, None].float(), size=size, mode=MASK_MODE)[:, 0].round().to(mask.dtype)
    return out if mask.ndim == 3 else out[0]


def resize_images(images: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N,H,W,C) or (N,H,W) uint8 → the same layout at `size` (an int means square)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(images) == 0 or tuple(images.shape[1:3]) == hw:
        return images
    t = torch.from_numpy(np.ascontiguousarray(images))
    t = t[..., None] if images.ndim == 3 else t
    out = resize_image_tensor(t.permute(0, 3, 1, 2), hw).permute(0, 2, 3, 1).numpy()  # type: ignore[arg-type]
    return out[..., 0] if images.ndim == 3 else np.ascontiguousarray(out)


def resize_masks(masks: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """(N,H,W) integer label masks → (N,*size)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(masks) == 0 or tuple(masks.shape[1:3]) == hw:
        return masks
    return resize_mask_tensor(torch.from_numpy(np.ascontiguousarray(masks)), hw).numpy()  # type: ignore[arg-type]
