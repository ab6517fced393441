"""A torch Dataset over one split of a lawder HDF5 file, opened lazily in each DataLoader worker."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Subset

from lawder_core.data.h5 import read_info, read_rows, split_indices
from lawder_core.data.resize import resize_image_tensor, resize_mask_tensor
from lawder_core.errors import DataError

CACHE_LIMIT_BYTES = 2 * 1024**3  # splits up to this size (and 1/8 of the RAM) are held in memory by default
READ_BLOCK = 256  # samples read (and transposed to channels-first) at a time when a split is loaded


class SegDataset(Dataset):
    """Serves (image float32 C×H×W in [0, 1], mask int64 H×W labels) for one split.

    `raw=True` serves the stored uint8 instead (image C×H×W, mask H×W): a quarter of the bytes through
    DataLoader workers' shared memory and to the GPU; `to_model_input` converts on the device.

    A split that fits `cache_limit()` is read once, in contiguous runs, into uint8 tensors
    (`cache=None` decides, True/False
    force it): every later access is a slice instead of an HDF5 read and decompression, and DataLoader workers
    forked after construction share those pages. Otherwise the h5py handle is opened on first access, in
    whichever process reads: an open file cannot be pickled, so DataLoader workers, spawn and Ray all get the
    path and open their own handle.
    """

    def __init__(self, path: str | os.PathLike, split: str | None = "train", size: int | None = None,
                 augment: bool = False, seed: int = 0, cache: bool | None = None, raw: bool = False,
                 indices: np.ndarray | None = None) -> None:
        self.path = Path(path)
        self.info = read_info(self.path)
        # `indices` (e.g. a cross-validation fold's samples) replaces the split's
        self.indices = split_indices(self.path, split) if indices is None else np.asarray(indices, dtype=np.int64)
        self.split = split
        self.size = size
        self.augment = augment
        self.seed = seed
        self.raw = raw
        self.epoch = 0
        self._file: h5py.File | None = None
        self.cache = split_bytes(self.info.height, self.info.width, self.info.channels,
                                 len(self.indices)) <= cache_limit() if cache is None else cache
        self._cached: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.cache:
            self._cached = self._read_split()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_cached"] = None  # the receiving process reads the split itself rather than unpickling it
        state.pop("_handles", None)
        return state

    def _read_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split as uint8 N×C×H×W images and N×H×W masks.

        Held channels-first, so that serving a sample is a view and a batch one copy; transposed block by block
        so that reading never needs a second copy of the whole split.
        """
        info, n = self.info, len(self.indices)
        images = torch.empty((n, info.channels, info.height, info.width), dtype=torch.uint8)
        masks = torch.empty((n, info.height, info.width), dtype=torch.uint8)
        # A handle of its own, closed at once: no open HDF5 file is inherited by forked loader workers.
        with h5py.File(self.path, "r") as f:
            for start in range(0, n, READ_BLOCK):
                block = self.indices[start:start + READ_BLOCK]
                images[start:start + len(block)] = torch.from_numpy(read_rows(f["images"], block)).permute(0, 3, 1, 2)
                masks[start:start + len(block)] = torch.from_numpy(read_rows(f["masks"], block))
        return images, masks

    def held_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The split held in memory (uint8 N×C×H×W images, N×H×W masks, as stored), read now if it was not yet."""
        if self._cached is None:
            self._cached = self._read_split()
        return self._cached

    def _raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample i of the split as stored, channels first: uint8 C×H×W image and H×W labels."""
        if self.cache:
            if self._cached is None:
                self._cached = self._read_split()
            return self._cached[0][i], self._cached[1][i]
        j = int(self.indices[i])
        images, masks = self._datasets()
        return torch.from_numpy(images[j]).permute(2, 0, 1), torch.from_numpy(masks[j])

    def _datasets(self) -> tuple[h5py.Dataset, h5py.Dataset]:
        if self._file is None:
            self._file = h5py.File(self.path, "r")
            self._handles = (self._file["images"], self._file["masks"])
        return self._handles

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self._raw(i)
        if not self.raw:
            image, mask = image.float().div_(255), mask.long()
        if self.size is not None and image.shape[-1] != self.size:
            image, mask = resize(image, mask, self.size)
        if self.augment:
            image, mask = augment_pair(image, mask, self._rng(i))
        return image.contiguous(), mask.contiguous()

    def _rng(self, i: int) -> np.random.Generator:
        # Keyed on (seed, epoch, sample) only: the same augmentation whichever loader worker serves the sample,
        # and a resumed run (whose counters would restart) draws exactly what the uninterrupted run drew.
        return np.random.default_rng([self.seed, self.epoch, i])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


def set_dataset_epoch(dataset: Dataset, epoch: int) -> None:
    """Tell every SegDataset inside `dataset` (a ConcatDataset of real and synthetic, a Subset) the epoch."""
    if isinstance(dataset, SegDataset):
        dataset.set_epoch(epoch)
    elif isinstance(dataset, ConcatDataset):
        for part in dataset.datasets:
            set_dataset_epoch(part, epoch)
    elif isinstance(dataset, Subset):
        set_dataset_epoch(dataset.dataset, epoch)


def split_bytes(height: int, width: int, channels: int, n: int) -> int:
    return n * height * width * (channels + 1)


def cache_limit() -> int:
    """Bytes one split may take in memory: LAWDER_CACHE_BYTES, else 2 GiB capped at 1/8 of the RAM."""
    if "LAWDER_CACHE_BYTES" in os.environ:
        return int(os.environ["LAWDER_CACHE_BYTES"])
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = 16 * 1024**3
    return min(CACHE_LIMIT_BYTES, ram // 8)


def to_model_input(image: torch.Tensor, mask: torch.Tensor,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on `device`: uint8 images (from `raw=True`) become float in [0, 1] there, after the copy."""
    image = image.to(device, non_blocking=True)
    if image.dtype == torch.uint8:
        image = image.float().div_(255)
    return image, mask.to(device, non_blocking=True)


def resize(image: torch.Tensor, mask: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return resize_image_tensor(image, (size, size)), resize_mask_tensor(mask, (size, size))


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
        image = resize_image_tensor(image[:, top:top + ch, left:left + cw], (h, w), antialias=False)
        mask = resize_mask_tensor(mask[top:top + ch, left:left + cw], (h, w))
    return image.contiguous(), mask.contiguous()


def with_synthetic(real: Dataset, synthetic_path: str | os.PathLike | None, ratio: float, size: int | None,
                   augment: bool, seed: int) -> Dataset:
    """Real data plus `ratio` synthetic samples per real one (all synthetic splits are training data)."""
    if synthetic_path is None or ratio <= 0:
        return real
    synthetic = SegDataset(synthetic_path, split=None, size=size, augment=augment, seed=seed + 1,
                           raw=getattr(real, "raw", False))
    if real.info.channels != synthetic.info.channels:  # type: ignore[attr-defined]
        raise DataError(f"the synthetic set {synthetic_path} has {synthetic.info.channels} channels, the real set "
                        f"{real.info.channels}.")  # type: ignore[attr-defined]
    want = min(len(synthetic), int(round(ratio * len(real))))  # type: ignore[arg-type]
    order = np.random.default_rng(seed).permutation(len(synthetic))[:want]
    return ConcatDataset([real, Subset(synthetic, order.tolist())])
