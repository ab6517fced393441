import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from lawder_core.data.dataset import SegDataset, augment_pair, with_synthetic
from lawder_core.data.h5 import load_arrays
from lawder_core.data.synthetic import MAX_FRACTION, synthetic_sample
from tests.helpers import synthetic_h5


def test_synthetic_is_deterministic_and_lesions_cover_1_to_20_percent():
    a, ma = synthetic_sample(3, 7, 64)
    b, mb = synthetic_sample(3, 7, 64)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    fractions = [synthetic_sample(0, i, 64)[1].mean() for i in range(30)]
    assert 0.005 <= min(fractions) and max(fractions) <= MAX_FRACTION + 0.03
    image, mask = synthetic_sample(0, 1, 64)
    # lesions differ in colour from the background: a segmenter has something to learn
    assert abs(image[mask == 1, 1].mean() - image[mask == 0, 1].mean()) > 10


def test_dataset_serves_one_split_and_works_in_worker_processes(tmp_path):
    path = synthetic_h5(tmp_path / "s.h5", n=20, size=32)
    ds = SegDataset(path, "train")
    assert len(ds) == 16
    image, mask = ds[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    assert mask.dtype == torch.int64 and mask.shape == (32, 32)
    images, masks, _ = load_arrays(path, "train")
    assert torch.allclose(image, torch.from_numpy(images[0]).permute(2, 0, 1).float() / 255)
    loader = DataLoader(ds, batch_size=4, num_workers=2)
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == 16
    resized = SegDataset(path, "val", size=16)
    assert resized[0][0].shape == (3, 16, 16)


def test_augmentation_moves_image_and_mask_together():
    # smooth blocks, so that resampling a crop keeps each pixel on its side of 0.5
    image = torch.rand(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)
    mask = (image[0] > 0.5).long()
    for seed in range(10):
        im, m = augment_pair(image, mask, np.random.default_rng(seed))
        assert im.shape == image.shape and m.shape == mask.shape
        # the mask still marks the pixels that were > 0.5 in channel 0 (up to crop interpolation)
        agreement = ((im[0] > 0.5).long() == m).float().mean()
        assert agreement > 0.9


def test_with_synthetic_adds_ratio_times_real(tmp_path):
    real = SegDataset(synthetic_h5(tmp_path / "r.h5", n=10, size=16), "train")
    synth = synthetic_h5(tmp_path / "s.h5", n=30, size=16, seed=5)
    mixed = with_synthetic(real, synth, 0.5, None, False, 0)
    assert len(mixed) == len(real) + 4
    assert len(with_synthetic(real, None, 1.0, None, False, 0)) == len(real)


def test_cached_split_serves_exactly_what_the_file_holds(tmp_path, monkeypatch):
    import h5py

    import lawder_core.data.dataset as dataset_module

    path = synthetic_h5(tmp_path / "s.h5", n=20, size=16)
    monkeypatch.setattr(dataset_module, "READ_BLOCK", 3)  # the split is loaded in several blocks
    cached, lazy = SegDataset(path, "train", cache=True), SegDataset(path, "train", cache=False)
    raw = SegDataset(path, "train", cache=True, raw=True)
    assert cached._cached is not None and lazy._cached is None
    with h5py.File(path, "r") as f:
        for i, j in enumerate(cached.indices):
            assert torch.equal(raw[i][0], torch.from_numpy(f["images"][j]).permute(2, 0, 1))
            assert torch.equal(raw[i][1], torch.from_numpy(f["masks"][j]))
    for i in range(len(lazy)):
        assert torch.equal(cached[i][0], lazy[i][0]) and torch.equal(cached[i][1], lazy[i][1])
    # workers started by spawn get the path, not the pixels, and read the split themselves
    state = cached.__getstate__()
    assert state["_cached"] is None
    clone = SegDataset.__new__(SegDataset)
    clone.__dict__.update(state)
    assert torch.equal(clone[3][0], lazy[3][0])
    # the default decides by size: nothing is held when the split exceeds the limit
    monkeypatch.setenv("LAWDER_CACHE_BYTES", "100")
    assert not SegDataset(path, "train").cache
    monkeypatch.setenv("LAWDER_CACHE_BYTES", str(10**9))
    assert SegDataset(path, "train").cache


def test_read_rows_equals_reading_one_row_at_a_time(tmp_path):
    import h5py

    from lawder_core.data.h5 import read_rows

    path = synthetic_h5(tmp_path / "s.h5", n=20, size=16)
    with h5py.File(path, "r") as f:
        for idx in ([5, 1, 2, 3, 19, 0], [7], [], list(range(20))[::-1]):
            expected = np.array([f["masks"][i] for i in idx]).reshape(len(idx), 16, 16)
            assert np.array_equal(read_rows(f["masks"], np.array(idx, dtype=np.int64)), expected)


def test_raw_batches_are_uint8_and_convert_to_the_float_batches(tmp_path):
    from lawder_core.data.dataset import to_model_input

    path = synthetic_h5(tmp_path / "s.h5", n=20, size=32)
    raw, plain = SegDataset(path, "train", raw=True), SegDataset(path, "train")
    image, mask = next(iter(DataLoader(raw, batch_size=4)))
    assert image.dtype == torch.uint8 and image.shape == (4, 3, 32, 32) and mask.dtype == torch.uint8
    f_image, f_mask = to_model_input(image, mask, torch.device("cpu"))
    expected = next(iter(DataLoader(plain, batch_size=4)))
    assert torch.equal(f_image, expected[0]) and torch.equal(f_mask.long(), expected[1])
    # resizing and augmenting uint8 stays within one grey level of doing it in float
    small_raw, small = SegDataset(path, "train", size=16, raw=True), SegDataset(path, "train", size=16)
    assert (small_raw[2][0].float() / 255 - small[2][0]).abs().max() <= 0.5 / 255 + 1e-6
    aug_raw = SegDataset(path, "train", augment=True, raw=True, seed=3)
    aug = SegDataset(path, "train", augment=True, seed=3)
    for i in range(6):
        (ri, rm), (fi, fm) = aug_raw[i], aug[i]
        assert ri.dtype == torch.uint8 and (ri.float() / 255 - fi).abs().max() <= 0.5 / 255 + 1e-6
        assert torch.equal(rm.long(), fm)


def test_small_lesion_option_draws_one_blob_in_the_asked_range(tmp_path):
    from scipy import ndimage

    from lawder_core.data.h5 import read_info

    fractions = []
    for i in range(40):
        _, mask = synthetic_sample(0, i, 64, lesion_frac=(0.003, 0.03), blobs=1)
        fractions.append(mask.mean())
        assert ndimage.label(mask)[1] == 1
    assert 0.002 <= min(fractions) and max(fractions) <= 0.035
    assert np.mean(fractions) < 0.025  # the default set's mean share is about 10 %
    path = tmp_path / "small.h5"
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    prepare_synthetic(path, n=6, size=32, seed=0, options=PrepareOptions(), lesion_frac=(0.01, 0.02), blobs=2)
    assert read_info(path).preprocessing["lesion_frac"] == [0.01, 0.02]
    assert read_info(path).preprocessing["blobs"] == 2


@pytest.mark.parametrize(("source", "frac", "blobs", "needle"), [
    ("synthetic", "0.03,0.003", None, "LOW <= HIGH"),
    ("synthetic", "0,0.1", None, "0 < LOW"),
    ("synthetic", "0.1,0.9", None, "HIGH <= 0.5"),
    ("synthetic", "small", None, "LOW,HIGH"),
    ("synthetic", None, 0, "--blobs 0"),
    ("kvasir", "0.01,0.02", None, "belong to `prepare synthetic`"),
])
def test_lesion_options_are_validated_before_anything_is_read(source, frac, blobs, needle):
    from lawder_core.data.sources import SourceOptions, check_source
    from lawder_core.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(needle)):
        check_source(source, "in", SourceOptions(lesion_frac=frac, blobs=blobs))
