"""Small builders shared by tests: folders of image/mask files and prepared HDF5 sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.synthetic import prepare_synthetic


def write_pair_folder(root: Path, n: int, size: tuple[int, int] = (40, 30), suffix: str = ".png",
                      mask_suffix: str = ".png") -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i:02d}{suffix}")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2 + i % 3] = 255
        Image.fromarray(mask).save(masks / f"img{i:02d}{mask_suffix}")
    return images, masks


def synthetic_h5(path: Path, n: int = 20, size: int = 32, seed: int = 0) -> Path:
    prepare_synthetic(path, n=n, size=size, seed=seed, options=PrepareOptions(seed=seed))
    return path


class PooledColours(torch.nn.Module):
    """A stand-in FID feature network: 4×4 average-pooled colours (48-d), fast and weight-free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def tiny_fid_weights(path: Path) -> Path:
    """A TorchScript file usable as `--fid-weights`, created by the test (nothing downloaded)."""
    torch.jit.script(PooledColours().eval()).save(str(path))
    return path


KITS_LABELS = ("background", "kidney", "tumor", "cyst")


def kits_like_h5(path: Path, cases: int = 6, slices: int = 6, size: int = 32, seed: int = 0) -> Path:
    """A small KiTS stand-in (the idea of tests/test_multiclass.py's builder): a bright kidney disc with a darker
    tumour and a brighter cyst inside it; the last two cases validate and test, the others train. Some slices
    have no tumour or no cyst."""
    from lawder_core.data.h5 import H5Writer

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    writer = H5Writer(path, height=size, width=size, channels=1, label_names=KITS_LABELS, source="test")
    for case in range(cases):
        split = "train" if case < cases - 2 else ("val" if case == cases - 2 else "test")
        for z in range(slices):
            cy, cx = rng.integers(10, size - 10, 2)
            mask = np.zeros((size, size), np.uint8)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 49] = 1
            if z % 3:
                mask[(yy - cy) ** 2 + (xx - cx + 2) ** 2 <= 4] = 2
            if z % 2:
                mask[(yy - cy - 3) ** 2 + (xx - cx - 2) ** 2 <= 2] = 3
            image = np.choose(mask, [40, 150, 90, 230]).astype(np.float64) + rng.normal(0, 12, (size, size))
            writer.add(np.clip(image, 0, 255).astype(np.uint8), mask, f"case_{case:05d}", split)
    writer.close()
    return path
