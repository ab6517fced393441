"""Batches gathered and augmented whole (`DeviceBatches`) equal what the per-sample DataLoader gives, batch for
batch, and a sample's augmentation depends on its (seed, epoch, index) alone."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from lawder_core.data.batch_augment import augment_batch, draw
from lawder_core.data.dataset import SegDataset, augment_pair, set_dataset_epoch, with_synthetic
from lawder_core.data.device_batches import DeviceBatches, supports
from lawder_core.train.runtime import set_sampler_epoch
from tests.helpers import synthetic_h5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("d")
    return synthetic_h5(root / "real.h5", n=24, size=48), synthetic_h5(root / "syn.h5", n=16, size=48, seed=5)


def test_batch_augmentation_equals_the_per_sample_path():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 40, 40), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, 4, (48, 40, 40), dtype=torch.uint8, generator=generator)
    keys = [(seed, epoch, i) for seed, epoch in ((3, 0), (3, 1), (4, 7)) for i in range(16)]
    before = images.clone()
    draws = draw(keys, 40)
    assert 0 < draws.crop.sum() < len(keys) and set(draws.turns) == {0, 1, 2, 3}  # every kind of transform ran
    out_images, out_masks = augment_batch(images, masks, draws)
    for j, key in enumerate(keys):
        image, mask = augment_pair(images[j], masks[j], np.random.default_rng(list(key)))
        assert torch.equal(out_masks[j], mask) and torch.equal(out_images[j], image)
    assert torch.equal(images, before)  # the inputs are left as they were


def test_a_samples_augmentation_does_not_depend_on_its_batch():
    images = torch.randint(0, 256, (12, 1, 32, 32), dtype=torch.uint8)
    masks = (images[:, 0] > 128).to(torch.uint8)
    keys = [(0, 2, i) for i in range(12)]
    whole = augment_batch(images, masks, draw(keys, 32))
    part = augment_batch(images[7:10], masks[7:10], draw(keys[7:10], 32))
    assert torch.equal(whole[0][7:10], part[0]) and torch.equal(whole[1][7:10], part[1])


def loaders(dataset, batch_size=5, drop_last=True):
    """The DataLoader and DeviceBatches over the same set, each with its own (identically seeded) sampler."""
    samplers = [RandomSampler(dataset, generator=torch.Generator().manual_seed(0)) for _ in range(2)]
    plain = DataLoader(dataset, batch_size=batch_size, sampler=samplers[0], drop_last=drop_last)
    fast = DeviceBatches(dataset, samplers[1], batch_size, drop_last, torch.device("cpu"))
    return (plain, samplers[0]), (fast, samplers[1])


@pytest.mark.parametrize("drop_last", [True, False])
def test_device_batches_serve_the_dataloaders_batches(data, drop_last):
    real, synthetic = data
    # real + a synthetic share, resized from 48 to 32 px, augmented: every path the training set can take
    dataset = with_synthetic(SegDataset(real, "train", size=32, augment=True, seed=1, raw=True), synthetic, 0.5, 32,
                             True, 1)
    assert supports(dataset)
    (plain, plain_sampler), (fast, fast_sampler) = loaders(dataset, drop_last=drop_last)
    assert len(fast) == len(plain)
    for epoch in (0, 1):
        for loader, sampler in ((plain, plain_sampler), (fast, fast_sampler)):
            set_sampler_epoch(sampler, epoch, 1)
            set_dataset_epoch(loader.dataset, epoch)
        batches = list(zip(plain, fast, strict=True))
        for (image, mask), (fast_image, fast_mask) in batches:
            assert fast_image.dtype == torch.uint8
            assert torch.equal(fast_image, image) and torch.equal(fast_mask, mask)


def test_unaugmented_sets_pass_through_unchanged(data):
    dataset = SegDataset(data[0], "train", raw=True)
    (plain, _), (fast, _) = loaders(dataset, drop_last=False)
    for (image, mask), (fast_image, fast_mask) in zip(plain, fast, strict=True):
        assert torch.equal(image, fast_image) and torch.equal(mask, fast_mask)


def test_sets_not_held_in_memory_stay_with_the_dataloader(data):
    assert not supports(SegDataset(data[0], "train", raw=True, cache=False))
    assert not supports(SegDataset(data[0], "train", raw=False))  # float samples: the DataLoader's job
    with pytest.raises(ValueError, match="held in memory"):
        DeviceBatches(SegDataset(data[0], "train", cache=False, raw=True), RandomSampler(range(3)), 2, True,
                      torch.device("cpu"))
