"""The conditioning masks of `lawder sample`: resized to the model's size, and optionally augmented.

With `augment`, mask j's k-th use gets the k-th of the 8 dihedral transforms (flips and 90° rotations) in a
seeded order of its own, so up to 8 uses of one mask are 8 different layouts, and N may exceed the mask count.
Case ids record the origin: `syn_<case>`, or `syn_<case>_r<use>_t<transform>` with augmentation.
Without it, N may not exceed the mask count: the field's default is one synthetic image per training mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lawder_core.errors import UsageError

DIHEDRAL = 8  # 4 rotations × {plain, flipped}


def resize_masks(masks: np.ndarray, size: int) -> np.ndarray:
    """(N,H,W) label masks → (N,size,size) by nearest neighbour (labels stay labels)."""
    if masks.shape[1:] == (size, size) or len(masks) == 0:
        return masks
    t = torch.from_numpy(masks.astype(np.uint8))[:, None].float()
    return F.interpolate(t, size=(size, size), mode="nearest-exact")[:, 0].round().to(torch.uint8).numpy()


def dihedral(mask: np.ndarray, k: int) -> np.ndarray:
    """Transform k in 0..7 of a square mask: k % 4 quarter turns, then a left-right flip when k >= 4."""
    out = np.rot90(mask, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


@dataclass(frozen=True)
class MaskPlan:
    """Which mask (and transform) each synthetic sample is conditioned on."""

    masks: np.ndarray  # (N,size,size) uint8, transforms applied
    source_index: np.ndarray  # (N,) index into the loaded masks
    transform: np.ndarray  # (N,) dihedral transform id; 0 = as stored
    case_ids: list[str]


def transform_order(seed: int, index: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).permutation(DIHEDRAL)


def plan_masks(masks: np.ndarray, case_ids: np.ndarray, n: int | None, augment: bool, seed: int) -> MaskPlan:
    """N samples (default: one per mask) cycling over the masks; see the module docstring for `augment`."""
    m = len(masks)
    if m == 0:
        raise UsageError("no masks to condition on.", "Check --masks and --split.")
    n = m if n is None else n
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}.")
    if n > m and not augment:
        raise UsageError(f"--n {n} is more than the {m} masks available.",
                         "Pass --mask-aug to reuse masks with random flips and rotations, or lower --n.")
    index = np.arange(n) % m
    use = np.arange(n) // m
    if augment:
        transform = np.array([transform_order(seed, int(j))[u % DIHEDRAL] for j, u in zip(index, use, strict=True)])
    else:
        transform = np.zeros(n, dtype=np.int64)
    out = np.stack([dihedral(masks[j], int(k)) for j, k in zip(index, transform, strict=True)])
    names = [f"syn_{case_ids[j]}" + (f"_r{u}_t{k}" if augment else "")
             for j, u, k in zip(index, use, transform, strict=True)]
    return MaskPlan(masks=out.astype(np.uint8), source_index=index, transform=transform, case_ids=names)
