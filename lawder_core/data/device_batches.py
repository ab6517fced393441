"""Training batches for a GPU that must not wait: the split held as uint8, batches gathered and augmented whole.

A DataLoader augments sample by sample in the training process (about 0.5 ms per 256 px sample on one CPU
thread: 17 ms for a batch of 32), while MK-UNet-T's training step on a current GPU takes a few ms. Here the
uint8 split (with any synthetic share) is held once, on the training device when it fits, and each batch is one
gather of its samples plus `batch_augment.augment_batch` on that device: the CPU only draws each sample's
transforms. Order (the sampler), batch size, `drop_last`, keys (seed, epoch, sample) and hence every
augmentation are those the DataLoader would give (`benchmarks/bench_loader.py --pipeline` measures both).

Used when every part of the training set is held in memory and square; otherwise the DataLoader serves.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset, Sampler, Subset

from lawder_core.data.batch_augment import augment_batch, draw
from lawder_core.data.dataset import SegDataset, resize

log = logging.getLogger(__name__)

DEVICE_SHARE = 0.25  # the split goes onto the GPU when it takes at most this share of its free memory
RESIZE_BLOCK = 64


@dataclass(frozen=True)
class Part:
    """One SegDataset's samples in the training set, in the set's order: `local` are the indices its
    `__getitem__` (and so its augmentation key) would get."""

    dataset: SegDataset
    local: np.ndarray


def parts_of(dataset: Dataset) -> list[Part] | None:
    """The SegDatasets behind `dataset` (itself, a ConcatDataset of them, Subsets of them), or None if something
    else is in there."""
    if isinstance(dataset, SegDataset):
        return [Part(dataset, np.arange(len(dataset)))]
    if isinstance(dataset, Subset):
        inner = parts_of(dataset.dataset)
        if inner is None or len(inner) != 1:
            return None
        return [Part(inner[0].dataset, inner[0].local[np.asarray(dataset.indices, dtype=np.int64)])]
    if isinstance(dataset, ConcatDataset):
        parts: list[Part] = []
        for child in dataset.datasets:
            found = parts_of(child)
            if found is None:
                return None
            parts.extend(found)
        return parts
    return None


def supports(dataset: Dataset) -> bool:
    """Whether `DeviceBatches` can serve `dataset`: every part held in memory, square at the training size."""
    parts = parts_of(dataset)
    if not parts:
        return False
    for part in parts:
        ds = part.dataset
        height, width = (ds.size, ds.size) if ds.size is not None else (ds.info.height, ds.info.width)
        if not ds.cache or not ds.raw or height != width:
            return False
    sizes = {ds.size or ds.info.height for ds in (p.dataset for p in parts)}
    return len(sizes) == 1


class DeviceBatches:
    """An iterable of (uint8 images B×C×S×S, uint8 masks B×S×S) on `device`, one epoch per iteration, like a
    DataLoader over `dataset` with `sampler` (whose epoch `set_sampler_epoch` sets) and `batch_size`.

    `dataset` stays reachable as `.dataset`, so `set_dataset_epoch` reaches its SegDatasets as before."""

    def __init__(self, dataset: Dataset, sampler: Sampler, batch_size: int, drop_last: bool,
                 device: torch.device) -> None:
        parts = parts_of(dataset)
        if parts is None or not supports(dataset):
            raise ValueError("DeviceBatches needs SegDatasets held in memory (raw uint8, square)")
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.parts = parts
        self.device = device
        self.part_of = np.concatenate([np.full(len(p.local), k) for k, p in enumerate(parts)])
        self.local = np.concatenate([p.local for p in parts])
        images, masks = gather_split(parts)
        self.images, self.masks, self.storage = place(images, masks, device)
        self.side = int(self.images.shape[-1])

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = np.fromiter(iter(self.sampler), dtype=np.int64)
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        for start in range(0, stop, self.batch_size):
            yield self.batch(order[start:start + self.batch_size])

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `rows` of the training set, augmented as their datasets would augment them now."""
        index = torch.from_numpy(rows).to(self.images.device)
        images = self.images.index_select(0, index)
        masks = self.masks.index_select(0, index)
        if images.device != self.device:  # held in (pinned) host memory: only the batch crosses
            images = images.to(self.device, non_blocking=True)
            masks = masks.to(self.device, non_blocking=True)
        augmented = [k for k, p in enumerate(self.parts) if p.dataset.augment]
        if not augmented:
            return images, masks
        keep = np.isin(self.part_of[rows], augmented)
        keys = [(self.parts[self.part_of[r]].dataset.seed, self.parts[self.part_of[r]].dataset.epoch,
                 int(self.local[r])) for r in rows[keep]]
        if keep.all():
            return augment_batch(images, masks, draw(keys, self.side))
        chosen = torch.from_numpy(np.flatnonzero(keep)).to(self.device)
        images[chosen], masks[chosen] = augment_batch(images[chosen], masks[chosen], draw(keys, self.side))
        return images, masks


def gather_split(parts: list[Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """The training set's samples as uint8 tensors, in its order, at its size (resized once, as each sample
    would be on every access)."""
    images, masks = [], []
    for part in parts:
        ds = part.dataset
        held = ds.held_split()
        if len(part.local) == len(held[0]) and np.array_equal(part.local, np.arange(len(part.local))):
            im, mk = held  # the whole split in its own order: no copy
        else:
            index = torch.from_numpy(part.local)
            im, mk = held[0].index_select(0, index), held[1].index_select(0, index)
        if ds.size is not None and im.shape[-1] != ds.size:
            blocks = [resize(im[s:s + RESIZE_BLOCK], mk[s:s + RESIZE_BLOCK], ds.size)
                      for s in range(0, len(im), RESIZE_BLOCK)]
            im, mk = torch.cat([b[0] for b in blocks]), torch.cat([b[1] for b in blocks])
        images.append(im)
        masks.append(mk)
    if len(images) == 1:
        return images[0], masks[0]
    return torch.cat(images), torch.cat(masks)


def place(images: torch.Tensor, masks: torch.Tensor, device: torch.device
          ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """On a GPU: the whole split on it if it fits `DEVICE_SHARE` of its free memory, else in pinned host memory.
    On the CPU: where it is."""
    if device.type != "cuda":
        return images, masks, "host"
    need = images.numel() + masks.numel()
    free, _ = torch.cuda.mem_get_info(device)
    if need <= DEVICE_SHARE * free:
        return images.to(device), masks.to(device), "device"
    log.info("the training split (%.1f GiB) stays in host memory: batches are copied to the GPU one by one",
             need / 2**30)
    return images.pin_memory(), masks.pin_memory(), "pinned host"
