"""A torch Dataset over one split of a lawder HDF5 file, opened lazily in each DataLoader worker."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset

from lawder_core.data.h5 import read_info, split_indices
from lawder_core.errors import DataError


class SegDataset(Dataset):
    """Serves (image float32 C×H×W in [0, 1], mask int64 H×W labels) for one split.

    The h5py handle is opened on first access, in whichever process reads: an open file cannot be pickled,
    so DataLoader workers, spawn and Ray all get the path and open their own handle.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = "train", size: int | None = None,
                 augment: bool = False, seed: int = 0) -> None:
        self.path = Path(path)
        self.info = read_info(self.path)
        self.indices = split_indices(self.path, split)
        self.split = split
        self.size = size
        self.augment = augment
        self.seed = seed
        self._file: h5py.File | None = None
        self._calls = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state.pop("_handles", None)
        return state

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._handles = (self._file["images"], self._file["masks"])
        return self._handles

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        j = int(self.indices[i])
        images, masks = self._datasets()
        image = torch.from_numpy(images[j]).permute(2, 0, 1).float().div_(255)
        mask = torch.from_numpy(masks[j].astype(np.int64))
        if self.size is not None and image.shape[-1] != self.size:
            image, mask = resize(image, mask, self.size)
        if self.augment:
            image, mask = augment_pair(image, mask, self._rng(i))
        return image, mask

    def _rng(self, i: int) -> np.random.Generator:
        # Fresh randomness per call, reproducible per (seed, worker, call).
        self._calls += 1
        worker = torch.utils.data.get_worker_info()
        wid = worker.id if worker is not None else 0
        return np.random.default_rng([self.seed, wid, self._calls, i])


def resize(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    image = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False,
                          antialias=True)[0]
    mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].long()
    return image, mask


def augment_pair(image: torch.Tensor, mask: torch.Tensor,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips, 90° rotations and a random scale/crop, applied identically to image and mask."""
    if rng.random() < 0.5:
        image, mask = image.flip(-1), mask.flip(-1)
    if rng.random() < 0.5:
        image, mask = image.flip(-2), mask.flip(-2)
    k = int(rng.integers(0, 4))
    if k:
        image, mask = torch.rot90(image, k, (-2, -1)), torch.rot90(mask, k, (-2, -1))
    if rng.random() < 0.5:
        h, w = mask.shape
        scale = rng.uniform(0.75, 1.0)
        ch, cw = max(1, int(h * scale)), max(1, int(w * scale))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        image = F.interpolate(image[None, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear",
                              align_corners=False)[0]
        mask = F.interpolate(mask[None, None, top:top + ch, left:left + cw].float(), size=(h, w),
                             mode="nearest")[0, 0].long()
    return image.contiguous(), mask.contiguous()


def with_synthetic(real: Dataset, synthetic_path: str | os.PathLike | None, ratio: float, size: int | None,
                   augment: bool, seed: int) -> Dataset:
    """Real data plus `ratio` synthetic samples per real one (all synthetic splits are training data)."""
    if synthetic_path is None or ratio <= 0:
        return real
    synthetic = SegDataset(synthetic_path, split=None, size=size, augment=augment, seed=seed + 1)
    if real.info.channels != synthetic.info.channels:  # type: ignore[attr-defined]
        raise DataError(f"the synthetic set {synthetic_path} has {synthetic.info.channels} channels, the real set "
                        f"{real.info.channels}.")  # type: ignore[attr-defined]
    want = min(len(synthetic), int(round(ratio * len(real))))  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(len(synthetic))[:want]
    return ConcatDataset([real, Subset(synthetic, order.tolist())])
