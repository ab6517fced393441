"""`lawder prepare kits` on tiny synthetic NIfTI volumes written with nibabel."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest

from lawder_core.data.ct_geometry import window_to_uint8
from lawder_core.data.h5 import read_info, read_strings
from lawder_core.data.prepare import PrepareOptions, side_paths
from lawder_core.data.prepare_kits import KitsOptions, prepare_kits
from lawder_core.errors import DataError, UsageError

X, Y, Z = 24, 20, 10  # canonical (RAS) voxel grid of every test case
SPACING = (0.8, 0.8, 2.5)
KIDNEY_SLICES = (3, 4, 5, 6)
SIZE = 24  # pad 24x20 -> 24x24 and no resize, so pixels can be checked exactly
PAD_TOP = (X - Y) // 2


def canonical_case() -> tuple[np.ndarray, np.ndarray]:
    """HU (int16) and labels (uint8) in RAS order; the HU encodes position so orientation errors show."""
    x, y = np.meshgrid(np.arange(X), np.arange(Y), indexing="ij")
    hu = np.repeat((-79 + 10 * x + 5 * y)[..., None], Z, axis=2).astype(np.int16)
    hu[0, 0, :] = 304  # the top of the window
    hu[1, 0, :] = -1000  # below the window
    hu[0, 1, :] = -79  # the bottom of the window
    labels = np.zeros((X, Y, Z), np.uint8)
    for z in KIDNEY_SLICES:
        labels[16:22, 12:18, z] = 1  # kidney: patient's right, anterior
        labels[21, 17, z] = 2  # tumour: the most right and most anterior voxel
        labels[5:8, 3:6, z] = 3  # cyst: left, posterior
    return hu, labels


def expected_display(volume: np.ndarray) -> np.ndarray:
    """Radiological view padded to SIZE: display[PAD_TOP + Y-1-y, X-1-x] = volume[x, y]."""
    out = np.zeros((SIZE, SIZE), volume.dtype)
    for x in range(X):
        for y in range(Y):
            out[PAD_TOP + Y - 1 - y, X - 1 - x] = volume[x, y]
    return out


def canonical_affine() -> np.ndarray:
    return np.diag([*SPACING, 1.0])


def lps_version(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same patient stored with x and y reversed (LPS-like): negative x and y spacing."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [SPACING[0] * (X - 1), SPACING[1] * (Y - 1), 0]
    return data[::-1, ::-1, :], affine


def kits19_version(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same patient stored KiTS19-style: array axes (z, y, x), x reversed."""
    stored = data[::-1, :, :].transpose(2, 1, 0)  # stored[i, j, k] = data[X-1-k, j, i]
    affine = np.array([[0, 0, -SPACING[0], SPACING[0] * (X - 1)],
                       [0, SPACING[1], 0, 0],
                       [SPACING[2], 0, 0, 0],
                       [0, 0, 0, 1.0]])
    return stored, affine


def write_case(root: Path, case_id: str, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray,
               seg_affine: np.ndarray | None = None) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.ascontiguousarray(hu), affine), folder / "imaging.nii.gz")
    seg_affine = affine if seg_affine is None else seg_affine
    nib.save(nib.Nifti1Image(np.ascontiguousarray(labels), seg_affine), folder / "segmentation.nii.gz")
    return folder


def write_dataset_folder(root: Path, n: int = 4) -> Path:
    """n cases of the same patient, each stored in a different orientation (cycling)."""
    hu, labels = canonical_case()
    for i in range(n):
        kind = i % 3
        if kind == 0:
            write_case(root, f"case_{i:05d}", hu, labels, canonical_affine())
        else:
            version = lps_version if kind == 1 else kits19_version
            (h, affine), (m, _) = version(hu), version(labels)
            write_case(root, f"case_{i:05d}", h, m, affine)
    return root


def options(**kw) -> PrepareOptions:
    base = dict(size=SIZE, resize_mode="pad", fractions=(0.5, 0.25, 0.25), seed=0)
    base.update(kw)
    return PrepareOptions(**base)


def read_all(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {"images": f["images"][:], "masks": f["masks"][:],
                "case_id": read_strings(f, "case_id"), "split": read_strings(f, "split")}


def assert_no_output(out: Path) -> None:
    leftovers = [p.name for p in out.parent.iterdir() if p.is_file() and p.name.startswith(out.stem)]
    assert leftovers == []


def test_every_orientation_gives_the_same_radiological_slices(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=3)
    out = tmp_path / "kits.h5"
    # all train: test cases keep every slice, and this test counts the kidney slices
    prepare_kits(root, out, options(fractions=(1.0, 0.0, 0.0)), KitsOptions(empty_share=0.0))
    data = read_all(out)
    hu, labels = canonical_case()
    expected_images = {z: window_to_uint8(expected_display(hu[:, :, z]), (-79.0, 304.0)) for z in KIDNEY_SLICES}
    for case in ("case_00000", "case_00001", "case_00002"):
        rows = np.flatnonzero(data["case_id"] == case)
        assert len(rows) == len(KIDNEY_SLICES)
        for row, z in zip(rows, KIDNEY_SLICES, strict=True):  # kept in increasing z
            np.testing.assert_array_equal(data["masks"][row], expected_display(labels[:, :, z]))
            expected = expected_images[z]
            expected[:PAD_TOP] = expected[PAD_TOP + Y:] = 0  # padding stays black, not window-mapped
            np.testing.assert_array_equal(data["images"][row, :, :, 0], expected)
    first = data["masks"][0]
    assert first[PAD_TOP + Y - 1 - 17, X - 1 - 21] == first[PAD_TOP + 2, 2] == 2  # tumour: upper left of the image
    assert first[PAD_TOP + Y - 1 - 4, X - 1 - 6] == 3  # cyst: lower right of the image
    assert data["images"].shape == (12, SIZE, SIZE, 1)


def test_window_maps_low_to_0_and_high_to_255(tmp_path):
    hu = np.array([-1000.0, -79.0, 112.5, 304.0, 3000.0])
    assert window_to_uint8(hu, (-79.0, 304.0)).tolist() == [0, 0, 128, 255, 255]
    root = write_dataset_folder(tmp_path / "kits", n=1)
    out = tmp_path / "kits.h5"
    prepare_kits(root, out, options(fractions=(1.0, 0.0, 0.0)), KitsOptions(empty_share=0.0))
    image = read_all(out)["images"][0, :, :, 0]
    bottom, right = PAD_TOP + Y - 1, X - 1  # canonical (x, y) = (0, 0): posterior, patient's left
    assert image[bottom, right] == 255  # 304 HU
    assert image[bottom, right - 1] == 0  # -1000 HU
    assert image[bottom - 1, right] == 0  # -79 HU
    assert image[bottom - 2, right] == round(10 * 255 / 383)  # -69 HU


def test_labels_and_names_are_kept(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=2)
    out = tmp_path / "kits.h5"
    prepare_kits(root, out, options(), KitsOptions(empty_share=0.0))
    info = read_info(out)
    assert info.label_names == ("background", "kidney", "tumor", "cyst")
    assert info.source == "kits"
    assert info.preprocessing["window"] == [-79.0, 304.0]
    assert set(np.unique(read_all(out)["masks"]).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("share,expected_empty", [(0.0, 0), (0.5, 2), (10.0, Z - len(KIDNEY_SLICES))])
def test_kidney_slices_plus_a_share_of_empty_ones(tmp_path, share, expected_empty):
    root = write_dataset_folder(tmp_path / "kits", n=2)
    out = tmp_path / "kits.h5"
    prepare_kits(root, out, options(fractions=(0.5, 0.5, 0.0)), KitsOptions(empty_share=share))
    data = read_all(out)
    for case in ("case_00000", "case_00001"):
        masks = data["masks"][data["case_id"] == case]
        with_kidney = masks.reshape(len(masks), -1).any(axis=1)
        assert with_kidney.sum() == len(KIDNEY_SLICES)
        assert (~with_kidney).sum() == expected_empty


def test_split_is_by_case_and_listed_beside_the_file(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=4)
    out = tmp_path / "kits.h5"
    fingerprint = prepare_kits(root, out, options(), KitsOptions(empty_share=0.5))
    data = read_all(out)
    for case in set(data["case_id"]):
        assert len(set(data["split"][data["case_id"] == case])) == 1
    fingerprint_path, splits_path = side_paths(out)
    listed = json.loads(splits_path.read_text())
    all_listed = [c for split in ("train", "val", "test") for c in listed[split]]
    assert sorted(all_listed) == [f"case_{i:05d}" for i in range(4)]
    assert [len(listed[s]) for s in ("train", "val", "test")] == [2, 1, 1]
    for split, cases in listed.items():
        for case in cases:
            assert set(data["split"][data["case_id"] == case]) == {split}
    assert fingerprint_path.exists() and fingerprint["path"] == str(out)


def test_jobs_2_writes_the_same_file_as_jobs_1(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=4)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    prepare_kits(root, one, options(), KitsOptions(empty_share=0.5, jobs=1))
    prepare_kits(root, two, options(), KitsOptions(empty_share=0.5, jobs=2))
    a, b = read_all(one), read_all(two)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert read_info(one).preprocessing == read_info(two).preprocessing


def test_three_channels_repeat_the_grey_image(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=1)
    out = tmp_path / "kits.h5"
    prepare_kits(root, out, options(fractions=(1.0, 0.0, 0.0)), KitsOptions(channels=3, empty_share=0.0))
    images = read_all(out)["images"]
    assert images.shape[-1] == 3
    np.testing.assert_array_equal(images[..., 0], images[..., 2])


def test_kits19_data_subfolder_is_found(tmp_path):
    root = write_dataset_folder(tmp_path / "kits19" / "data", n=2)
    out = tmp_path / "kits.h5"
    prepare_kits(root.parent, out, options(fractions=(0.5, 0.5, 0.0)), KitsOptions(empty_share=0.0))
    assert sorted(set(read_all(out)["case_id"])) == ["case_00000", "case_00001"]


def test_missing_segmentation_is_listed_or_skipped(tmp_path):
    root = write_dataset_folder(tmp_path / "kits", n=3)
    (root / "case_00001" / "segmentation.nii.gz").unlink()
    out = tmp_path / "kits.h5"
    with pytest.raises(DataError, match=r"case_00001 \(no segmentation.nii.gz\)") as err:
        prepare_kits(root, out, options())
    assert "--skip-incomplete" in str(err.value)
    assert_no_output(out)
    prepare_kits(root, out, options(fractions=(0.5, 0.5, 0.0)), KitsOptions(skip_incomplete=True))
    assert "case_00001" not in set(read_all(out)["case_id"])
    assert read_info(out).preprocessing["skipped_cases"] == ["case_00001"]


def test_mismatched_shape_or_affine_names_the_case(tmp_path):
    hu, labels = canonical_case()
    write_case(tmp_path / "shape", "case_00007", hu, labels[:, :, :-1], canonical_affine())
    write_case(tmp_path / "affine", "case_00008", hu, labels, canonical_affine(), lps_version(labels)[1])
    out = tmp_path / "kits.h5"
    with pytest.raises(DataError, match="case_00007.*shape"):
        prepare_kits(tmp_path / "shape", out, options())
    with pytest.raises(DataError, match="case_00008.*affine"):
        prepare_kits(tmp_path / "affine", out, options())
    assert_no_output(out)


@pytest.mark.parametrize("jobs", [1, 2])
def test_truncated_volume_names_the_file_and_leaves_nothing(tmp_path, jobs):
    root = write_dataset_folder(tmp_path / "kits", n=3)
    broken = root / "case_00002" / "imaging.nii.gz"
    blob = broken.read_bytes()
    broken.write_bytes(blob[: len(blob) // 2])  # the header still parses; the data does not
    out = tmp_path / "kits.h5"
    with pytest.raises(DataError, match="case_00002/imaging.nii.gz"):
        prepare_kits(root, out, options(), KitsOptions(jobs=jobs))
    assert_no_output(out)
    broken.write_bytes(blob[:20])  # not even a header
    with pytest.raises(DataError, match="case_00002/imaging.nii.gz"):
        prepare_kits(root, out, options())
    assert_no_output(out)


def test_unknown_label_is_a_data_error(tmp_path):
    hu, labels = canonical_case()
    labels[0, 0, 0] = 7
    write_case(tmp_path / "kits", "case_00000", hu, labels, canonical_affine())
    with pytest.raises(DataError, match="labels 0..7"):
        prepare_kits(tmp_path / "kits", tmp_path / "kits.h5", options())


def test_bad_input_folder_and_options(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_kits(tmp_path / "nowhere", tmp_path / "kits.h5", options())
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no KiTS case folders"):
        prepare_kits(tmp_path / "empty", tmp_path / "kits.h5", options())
    with pytest.raises(UsageError, match="--size"):
        prepare_kits(tmp_path / "empty", tmp_path / "kits.h5", options(size=None))
    with pytest.raises(UsageError, match="window"):
        prepare_kits(tmp_path / "empty", tmp_path / "kits.h5", options(), KitsOptions(window=(304.0, -79.0)))
