import h5py
import numpy as np
import pytest

from lawder_core.data.h5 import SAMPLED, H5Writer, load_arrays, not_sampled, open_h5, read_info, split_indices
from lawder_core.errors import DataError, UsageError


def write_small(path, n=4, force=False):
    with H5Writer(path, height=8, width=6, channels=3, label_names=["background", "lesion"], source="test",
                  preprocessing={"size": 8}, force=force) as w:
        for i in range(n):
            w.add(np.full((8, 6, 3), i, np.uint8), np.eye(8, 6, dtype=np.uint8) * (i % 2), f"c{i}",
                  "train" if i < n - 1 else "test")


def test_round_trip_schema_and_attributes(tmp_path):
    path = tmp_path / "d.h5"
    write_small(path)
    info = read_info(path)
    assert (info.n, info.height, info.width, info.channels) == (4, 8, 6, 3)
    assert info.label_names == ("background", "lesion")
    assert info.preprocessing == {"size": 8}
    images, masks, cases = load_arrays(path, "train")
    assert images.shape == (3, 8, 6, 3) and masks.shape == (3, 8, 6)
    assert list(cases) == ["c0", "c1", "c2"]
    assert images[2].max() == 2 and masks[1].sum() == 6
    assert split_indices(path, "test").tolist() == [3]
    with h5py.File(path) as f:
        assert f["images"].chunks == (1, 8, 6, 3)
        assert f["images"].compression == "lzf"


def test_a_file_given_as_synthetic_pairs_that_lawder_sample_did_not_write_is_named(tmp_path):
    real = tmp_path / "real.h5"
    write_small(real)
    note = not_sampled(read_info(real), "--synthetic")
    assert note.startswith(f"--synthetic {real} was not written by `lawder sample` (its source: 'test')")
    sampled = tmp_path / "syn.h5"
    with H5Writer(sampled, height=8, width=6, channels=3, label_names=["background", "lesion"], source=SAMPLED,
                  preprocessing={"synthetic": True}) as w:
        w.add(np.zeros((8, 6, 3), np.uint8), np.zeros((8, 6), np.uint8), "s0", "train")
    assert not_sampled(read_info(sampled), "--synthetic") is None


def test_refuses_overwrite_without_force_and_replaces_with_force(tmp_path):
    path = tmp_path / "d.h5"
    write_small(path, n=2)
    with pytest.raises(UsageError, match="--force"):
        write_small(path, n=3)
    assert read_info(path).n == 2
    write_small(path, n=3, force=True)
    assert read_info(path).n == 3


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "d.h5"
    with pytest.raises(RuntimeError):
        with H5Writer(path, height=4, width=4, channels=1, label_names=["bg"], source="t") as w:
            w.add(np.zeros((4, 4, 1), np.uint8), np.zeros((4, 4), np.uint8), "a", "train")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_shape_mismatch_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="mask"):
        with H5Writer(tmp_path / "d.h5", height=4, width=4, channels=1, label_names=["bg"], source="t") as w:
            w.add(np.zeros((4, 4, 1), np.uint8), np.zeros((5, 4), np.uint8), "a", "train")
    assert not (tmp_path / "d.h5").exists()


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    path = tmp_path / "d.h5"
    write_small(path)
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_info(truncated)
    foreign = tmp_path / "f.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="not a lawder data file"):
        with open_h5(foreign):
            pass
    with pytest.raises(DataError, match="does not exist"):
        read_info(tmp_path / "missing.h5")
