"""`prepare kits`, issue 15: area-priority label downsampling, whole test volumes, --spacing, old-KiTS19 check."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lawder_cli.main import app
from lawder_core.data.ct_geometry import canonical_zooms, radiological_view
from lawder_core.data.h5 import read_info
from lawder_core.data.prepare import side_paths
from lawder_core.data.prepare_kits import KitsOptions, looks_like_old_kits19, prepare_kits
from lawder_core.data.resize import resize_mask, resize_mask_priority
from lawder_core.errors import UsageError
from tests.helpers import runner
from tests.test_prepare_kits import (
    KIDNEY_SLICES,
    Z,
    canonical_case,
    lps_version,
    options,
    read_all,
    write_case,
    write_dataset_folder,
)

KITS_PRIORITY = (2, 3, 1)
LOGGER = "lawder_core.data.prepare_kits"


def kits19_stored(data: np.ndarray, zooms: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """`data` (canonical x, y, z) stored as the current KiTS19 release does: array (z, y, x), permuted affine."""
    stored = data[::-1, :, :].transpose(2, 1, 0)
    affine = np.array([[0, 0, -zooms[0], zooms[0] * (data.shape[0] - 1)],
                       [0, zooms[1], 0, 0],
                       [zooms[2], 0, 0, 0],
                       [0, 0, 0, 1.0]])
    return np.ascontiguousarray(stored), affine


def tiny_tumour_case(n: int = 128, depth: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """HU and labels: kidney around a 3-voxel L-shaped tumour that straddles a 4×4 block corner."""
    hu = np.full((n, n, depth), 40, np.int16)
    labels = np.zeros((n, n, depth), np.uint8)
    c = n // 2
    labels[c - 10:c + 10, c - 10:c + 10, :] = 1
    for x, y in ((c - 1, c), (c, c - 1), (c, c)):  # one voxel in each of three blocks, at every factor 2^k
        labels[x, y, :] = 2
    return hu, labels


def test_a_3_voxel_tumour_survives_128_to_32(tmp_path):
    hu, labels = tiny_tumour_case()
    (h, affine), (m, _) = kits19_stored(hu, (0.7, 0.7, 3.0)), kits19_stored(labels, (0.7, 0.7, 3.0))
    write_case(tmp_path / "kits", "case_00000", h, m, affine)
    out = tmp_path / "kits.h5"
    prepare_kits(tmp_path / "kits", out, options(size=32, fractions=(1.0, 0.0, 0.0)), KitsOptions(empty_share=0.0))
    masks = read_all(out)["masks"]
    assert masks.shape == (3, 32, 32)
    assert [(mask == 2).sum() for mask in masks] == [3, 3, 3]  # one output pixel per tumour voxel
    assert ((masks == 1).sum(axis=(1, 2)) > 0).all()
    display = radiological_view(labels[:, :, 0])
    assert (resize_mask(display, 32) == 2).sum() == 0  # what nearest neighbour made of it


def test_a_3_voxel_tumour_survives_512_to_64():
    _, labels = tiny_tumour_case(n=512, depth=1)
    out = resize_mask_priority(radiological_view(labels[:, :, 0]), 64, KITS_PRIORITY)
    assert (out == 2).sum() == 3 and (out == 1).sum() > 0


def blockwise_priority(mask: np.ndarray, fh: int, fw: int) -> np.ndarray:
    """The rule by plain counting over fh×fw blocks (fh·fw ≥ 2 voxels): half a voxel is then ≤ 1/4 of a block, so
    a priority label takes a block when it has at least one voxel in it; else the most frequent label wins."""
    h, w = mask.shape[0] // fh, mask.shape[1] // fw
    blocks = mask.reshape(h, fh, w, fw)
    counts = np.stack([(blocks == label).sum(axis=(1, 3)) for label in range(4)])
    out = counts.argmax(axis=0)
    for label in (1, 3, 2):  # kidney, then cyst, then tumour on top
        out[counts[label] >= 1] = label
    return out.astype(np.uint8)


@pytest.mark.parametrize("shape,size", [((96, 96), (32, 32)), ((96, 64), (48, 16)), ((60, 60), (15, 15))])
def test_area_priority_matches_blockwise_counting(shape, size):
    rng = np.random.default_rng(7)
    mask = rng.choice(4, size=shape, p=[0.8, 0.12, 0.04, 0.04]).astype(np.uint8)
    expected = blockwise_priority(mask, shape[0] // size[0], shape[1] // size[1])
    np.testing.assert_array_equal(resize_mask_priority(mask, size, KITS_PRIORITY), expected)


def test_area_priority_at_a_fractional_factor_matches_supersampled_counting():
    """5 -> 4 pixels per axis: each output pixel covers 1.25 × 1.25 voxels, so a voxel is split between pixels.
    On a ×4 supersampled grid every output pixel is exactly a 5×5 block, and half a voxel (0.32 of the pixel) is
    above the 1/4 cap: a priority label needs ≥ 1/4 of the pixel, i.e. ≥ 6.25 of its 25 sub-cells."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.choice(4, size=(20, 20), p=[0.6, 0.2, 0.1, 0.1]).astype(np.uint8)
        fine = np.repeat(np.repeat(mask, 4, axis=0), 4, axis=1).reshape(16, 5, 16, 5)
        counts = np.stack([(fine == label).sum(axis=(1, 3)) for label in range(4)])
        expected = counts.argmax(axis=0)
        for label in (1, 3, 2):
            expected[counts[label] >= 6.25] = label
        np.testing.assert_array_equal(resize_mask_priority(mask, 16, KITS_PRIORITY), expected)


def test_one_axis_up_one_axis_down():
    """Rows 10 -> 20 take the centre's row (each row twice); columns 40 -> 10 count blocks of 4."""
    mask = np.random.default_rng(5).choice(4, size=(10, 40), p=[0.7, 0.2, 0.05, 0.05]).astype(np.uint8)
    expected = blockwise_priority(np.repeat(mask, 2, axis=0), 1, 4)
    np.testing.assert_array_equal(resize_mask_priority(mask, (20, 10), KITS_PRIORITY), expected)


def test_upsampling_stays_nearest_exact():
    mask = np.random.default_rng(0).integers(0, 4, (10, 12)).astype(np.uint8)
    np.testing.assert_array_equal(resize_mask_priority(mask, (30, 24), KITS_PRIORITY), resize_mask(mask, (30, 24)))


@pytest.mark.parametrize("split_file", [False, True])
def test_test_cases_keep_every_slice_train_and_val_follow_empty_share(tmp_path, split_file):
    root = write_dataset_folder(tmp_path / "kits", n=4)  # canonical, LPS and KiTS19-style affines
    out = tmp_path / "kits.h5"
    opts = options()  # 0.5/0.25/0.25 of 4 cases: one test case
    if split_file:  # a reused split decides the test case as well
        listed = {"train": ["case_00000", "case_00003"], "val": ["case_00002"], "test": ["case_00001"]}
        (tmp_path / "given.json").write_text(json.dumps(listed))
        opts = options(split_file=str(tmp_path / "given.json"))
    prepare_kits(root, out, opts, KitsOptions(empty_share=0.5))
    data = read_all(out)
    splits = json.loads(side_paths(out)[1].read_text())
    assert len(splits["test"]) == 1
    for split, cases in splits.items():
        for case in cases:
            masks = data["masks"][data["case_id"] == case]
            labelled = masks.reshape(len(masks), -1).any(axis=1).sum()
            assert labelled == len(KIDNEY_SLICES)
            assert len(masks) == (Z if split == "test" else len(KIDNEY_SLICES) + 2)  # round(0.5 * 4) empty
    record = read_info(out).preprocessing
    assert record["test_cases_keep_all_slices"] is True
    assert "test cases: every axial slice" in record["kept_slices"]
    assert "priority tumour > cyst > kidney" in record["mask_resize"]
    assert record["spacing"] is None


def spacing_case(tmp_path: Path, zooms: tuple[float, float, float]) -> Path:
    """One 24 (x) × 20 (y) × 4 case, HU all inside the window (no black pixel but the padding), stored KiTS19-style;
    kidney: 8 voxels along x, 5 along y, on every slice."""
    hu = np.full((24, 20, 4), 100, np.int16)
    labels = np.zeros((24, 20, 4), np.uint8)
    labels[8:16, 5:10, :] = 1
    (h, affine), (m, _) = kits19_stored(hu, zooms), kits19_stored(labels, zooms)
    write_case(tmp_path / "kits", "case_00000", h, m, affine)
    return tmp_path / "kits"


def content_shape(image: np.ndarray) -> tuple[int, int]:
    """(rows, cols) of the non-padded region."""
    return int(image.any(axis=1).sum()), int(image.any(axis=0).sum())


@pytest.mark.parametrize("spacing,size,content,kidney", [
    (None, 24, (20, 24), 40),  # own spacing: 20 rows of 1.6 mm, 24 cols of 0.8 mm, as stored
    (0.8, 40, (40, 24), 80),  # rows 20 × 1.6 / 0.8 = 40: the kidney doubles in height (nearest, exact)
    (1.6, 20, (20, 12), 20),  # cols 24 × 0.8 / 1.6 = 12: the kidney halves in width (8 -> 4 blocks of 2)
])
def test_spacing_resamples_by_the_header_voxel_size(tmp_path, spacing, size, content, kidney):
    root = spacing_case(tmp_path, (0.8, 1.6, 3.0))
    out = tmp_path / "kits.h5"
    prepare_kits(root, out, options(size=size, fractions=(1.0, 0.0, 0.0)), KitsOptions(empty_share=0.0,
                                                                                      spacing=spacing))
    data = read_all(out)
    assert content_shape(data["images"][0, :, :, 0]) == content
    assert (data["masks"][0] == 1).sum() == kidney
    assert read_info(out).preprocessing["spacing"] == spacing


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan")])
def test_spacing_must_be_positive(tmp_path, bad):
    with pytest.raises(UsageError, match="--spacing"):
        prepare_kits(tmp_path, tmp_path / "kits.h5", options(), KitsOptions(spacing=bad))


def test_spacing_refuses_stretch(tmp_path):
    with pytest.raises(UsageError, match="stretch"):
        prepare_kits(tmp_path, tmp_path / "kits.h5", options(resize_mode="stretch"), KitsOptions(spacing=1.0))


def test_cli_spacing(tmp_path):
    root = spacing_case(tmp_path, (0.8, 1.6, 3.0))
    base = ["prepare", "kits", str(root), "-o", str(tmp_path / "kits.h5"), "--split", "1,0,0", "--empty-share", "0"]
    bad = runner.invoke(app, [*base, "--size", "20", "--spacing", "0"])
    assert bad.exit_code == 2 and "--spacing" in bad.output
    good = runner.invoke(app, [*base, "--size", "20", "--spacing", "1.6"])
    assert good.exit_code == 0, good.output
    assert read_info(tmp_path / "kits.h5").preprocessing["spacing"] == 1.6


def test_canonical_zooms_are_the_reoriented_header_zooms():
    hu, _ = canonical_case()
    for data, affine in (lps_version(hu), kits19_stored(hu, (0.8, 0.9, 2.5))):
        image = nib.Nifti1Image(data, affine)
        expected = nib.as_closest_canonical(image).header.get_zooms()
        assert canonical_zooms(image) == pytest.approx(expected)


def test_old_kits19_release_warns_and_current_layouts_do_not(tmp_path, caplog):
    hu, labels = canonical_case()
    (h, _), (m, _) = kits19_stored(hu, (0.8, 0.8, 2.5)), kits19_stored(labels, (0.8, 0.8, 2.5))
    old_affine = np.diag([2.5, 0.8, 0.8, 1.0])  # first KiTS19 release: the same array, diag(thickness, px, px)
    write_case(tmp_path / "old", "case_00000", h, m, old_affine)
    assert looks_like_old_kits19(canonical_zooms(nib.load(tmp_path / "old" / "case_00000" / "imaging.nii.gz")))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_kits(tmp_path / "old", tmp_path / "old.h5", options(fractions=(1.0, 0.0, 0.0)))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == LOGGER]
    assert len(warnings) == 1
    assert "case_00000" in warnings[0].getMessage() and "Re-download the current KiTS19" in warnings[0].getMessage()
    assert read_info(tmp_path / "old.h5").preprocessing["old_kits19_suspects"] == ["case_00000"]
    caplog.clear()
    root = write_dataset_folder(tmp_path / "normal", n=3)  # canonical, LPS and current-KiTS19 affines
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        prepare_kits(root, tmp_path / "normal.h5", options())
    assert not [r for r in caplog.records if r.name == LOGGER]
    assert read_info(tmp_path / "normal.h5").preprocessing["old_kits19_suspects"] == []


@pytest.mark.parametrize("zooms,old", [
    ((0.78, 0.78, 5.0), False), ((0.7, 0.7, 0.5), False), ((1.0, 1.0, 1.0), False),  # correct volumes
    ((5.0, 0.78, 0.78), True), ((0.5, 0.78, 0.78), True),  # diag(thickness, px, px) after reorientation
])
def test_old_kits19_heuristic(zooms, old):
    assert looks_like_old_kits19(zooms) is old
