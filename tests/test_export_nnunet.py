"""`lawder export nnunet`: nnU-Net v2's own integrity check passes and the files read back to the HDF5 (issue 17).

2D sets are PNG cases; a `prepare kits` set becomes NIfTI volumes whose affine puts every voxel where the original
CT has it (checked on organ centroids in world millimetres, with the raw volumes stored flipped and shifted).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from lawder_cli.main import app
from lawder_core.data.ct_geometry import canonical_geometry, radiological_view
from lawder_core.data.h5 import H5Writer, load_arrays, open_h5, read_case_geometry, read_info, read_strings
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_kits import KitsOptions, prepare_kits
from lawder_core.export.nnunet import export_nnunet
from tests.helpers import KITS_LABELS, kits_like_h5, runner, synthetic_h5, write_kits_folder


def verify(folder: Path) -> None:
    """nnU-Net's own check, called directly (not through lawder), in a spawned process: nnU-Net forks a pool, and
    a fork of this test worker (which may hold a connected Ray from an earlier test) can hang."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        pool.submit(verify_dataset_integrity, str(folder), 1).result()  # raises on any problem


def kits_like(path: Path, n: int = 10) -> Path:
    """A KiTS file as lawder wrote it before it recorded slice_index and case_geometry (two slices a case)."""
    rng = np.random.default_rng(0)
    with H5Writer(path, height=32, width=32, channels=1, label_names=["background", "kidney", "tumor", "cyst"],
                  source="kits", preprocessing={"window": [-79.0, 304.0], "size": 32}) as writer:
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 1
            mask[10:13, 10:13] = 2 + (i % 2)  # a tumour or a cyst inside the kidney
            image = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
            writer.add(image, mask, f"case_{i // 2:05d}", ["train", "train", "val", "test", "train"][i // 2])
    return path


def test_polyp_set_with_synthetic_pairs_passes_nnunet_and_reads_back(tmp_path, caplog):
    data = synthetic_h5(tmp_path / "real.h5", n=20, size=32)
    syn = synthetic_h5(tmp_path / "syn.h5", n=6, size=32, seed=3)  # a procedural set standing in for sampled pairs
    with caplog.at_level(logging.WARNING, logger="lawder_core.export.nnunet"):
        result = runner.invoke(app, ["export", "nnunet", str(data), "--synthetic", str(syn), "--dataset-id", "501",
                                     "--name", "Polyps", "-o", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    assert f"--synthetic {syn} was not written by `lawder sample`" in caplog.text  # said, and exported all the same
    root = tmp_path / "raw" / "Dataset501_Polyps"
    assert json.loads(result.stdout)["verified_by"].startswith("nnunetv2 ")  # the export ran nnU-Net's check
    verify(root)
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "R", "1": "G", "2": "B"} and dataset["file_ending"] == ".png"
    assert dataset["numTraining"] == len(list((root / "labelsTr").glob("*.png"))) == 20 - 2 + 6
    # the files hold the HDF5's pixels and labels
    images, masks, cases = load_arrays(data, "test")
    tests = sorted((root / "imagesTs").glob("*_0000.png"))
    assert len(tests) == len(cases)
    for image, mask, path in zip(images, masks, tests, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
        label = root / "labelsTs" / (path.name.removesuffix("_0000.png") + ".png")
        np.testing.assert_array_equal(np.asarray(Image.open(label)), mask)
    # synthetic cases are recognisable and never validate
    splits = json.loads((root / "splits_final.json").read_text())
    synthetic = {p.stem for p in (root / "labelsTr").glob("synthetic*.png")}
    assert len(splits) == 5 and len(synthetic) == 6
    assert all(synthetic <= set(f["train"]) and not synthetic & set(f["val"]) for f in splits)
    real = {p.stem for p in (root / "labelsTr").glob("*.png")} - synthetic
    assert set().union(*(f["val"] for f in splits)) == real
    again = runner.invoke(app, ["export", "nnunet", str(data), "--dataset-id", "501", "--name", "Polyps", "-o",
                                str(tmp_path / "raw")])
    assert again.exit_code == 2 and "already exists" in again.output


def test_kits_labels_on_png_cases_are_declared_as_nnunet_regions(tmp_path):
    data = kits_like_h5(tmp_path / "kits.h5", cases=5, slices=2)  # KiTS labels, but 2D slices (source "test")
    export_nnunet(data, tmp_path / "raw", 502, "KiTSlike")
    root = tmp_path / "raw" / "Dataset502_KiTSlike"
    verify(root)
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dataset["regions_class_order"] == [1, 3, 2] and dataset["channel_names"] == {"0": "test"}
    assert dataset["file_ending"] == ".png"
    labels = {int(v) for p in (root / "labelsTr").glob("*.png") for v in np.unique(np.asarray(Image.open(p)))}
    assert labels == {0, 1, 2, 3}


# ---- KiTS volumes -------------------------------------------------------------------------------------------

SHAPE = (36, 28, 10)  # canonical x, y, z of the raw volumes: not square, so the slices are padded and resized
ZOOMS = (0.8, 0.8, 2.5)
SIZE = 24
WINDOW = (-79.0, 304.0)
ORIGIN = (-50.0, 30.0, 100.0)


def flipped_and_shifted(root: Path, zooms: tuple[float, float, float] = ZOOMS) -> Path:
    """Store every case of `root` with x and y reversed (LPS-like), moved off the origin and with `zooms`, so that
    the export has to undo a reorientation to get the world coordinates right."""
    x, y, _ = SHAPE
    shift = np.diag([*zooms, 1.0])
    shift[:3, 3] = ORIGIN
    flip = np.array([[-1, 0, 0, x - 1], [0, -1, 0, y - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    for folder in sorted(root.iterdir()):
        for name in ("imaging.nii.gz", "segmentation.nii.gz"):
            image = nib.load(folder / name)
            data = np.asarray(image.dataobj)[::-1, ::-1, :]
            nib.save(nib.Nifti1Image(np.ascontiguousarray(data), shift @ flip), folder / name)
    return root


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> tuple[Path, Path]:
    """(raw KiTS folder, prepared HDF5): 6 cases, 3 train / 1 val / 2 test, resized 36x28 -> 24x19 on a 24 canvas."""
    tmp = tmp_path_factory.mktemp("kits")
    raw = flipped_and_shifted(write_kits_folder(tmp / "raw", cases=6, shape=SHAPE))
    h5 = tmp / "kits.h5"
    prepare_kits(raw, h5, PrepareOptions(size=SIZE, resize_mode="pad", fractions=(0.5, 0.17, 0.33), seed=0),
                 KitsOptions(window=WINDOW, empty_share=0.1))
    return raw, h5


def kits_synthetic(path: Path, n: int = 3) -> Path:
    """`lawder sample` output for a KiTS set: single 2D slices at the training size."""
    rng = np.random.default_rng(5)
    with H5Writer(path, height=SIZE, width=SIZE, channels=1, label_names=KITS_LABELS, source="lawder sample",
                  preprocessing={"synthetic": True}) as writer:
        for i in range(n):
            mask = np.zeros((SIZE, SIZE), np.uint8)
            mask[6:14, 8:16] = 1
            mask[8:10, 9:11] = 2 + i % 2
            writer.add(rng.integers(0, 256, (SIZE, SIZE, 1), dtype=np.uint8), mask, f"synthetic_{i:05d}", "train")
    return path


def world_centroid(labels: np.ndarray, affine: np.ndarray, z: int | None = None) -> np.ndarray:
    """The centre of the kidney and its masses (label > 0) in world millimetres; of axial slice z when given."""
    if z is None:
        voxels = np.argwhere(labels > 0).mean(axis=0)
    else:
        voxels = np.array([*np.argwhere(labels[:, :, z] > 0).mean(axis=0), z])
    return affine[:3, :3] @ voxels + affine[:3, 3]


def hdf5_cases(h5: Path) -> dict[str, dict[str, np.ndarray]]:
    with open_h5(h5) as f:
        cases, splits, index = read_strings(f, "case_id"), read_strings(f, "split"), f["slice_index"][:]
        images, masks = f["images"][:, :, :, 0], f["masks"][:]
    out = {}
    for case in dict.fromkeys(cases):
        rows = np.flatnonzero(cases == case)
        rows = rows[np.argsort(index[rows])]
        out[str(case)] = {"images": images[rows], "masks": masks[rows], "z": index[rows], "split": splits[rows[0]]}
    return out


def test_prepare_kits_records_slice_index_and_case_geometry(kits):
    raw, h5 = kits
    geometry = read_case_geometry(h5)
    assert sorted(geometry) == sorted(p.name for p in raw.iterdir())
    for case, record in geometry.items():
        image = nib.load(raw / case / "imaging.nii.gz")
        canonical = nib.as_closest_canonical(image)  # reads the voxels; prepare_kits uses the header alone
        assert record["shape"] == list(canonical.shape) == list(SHAPE)
        np.testing.assert_allclose(record["affine"], canonical.affine)
        assert record["target"] == [19, 24] and record["offset"] == [2, 0] and record["size"] == SIZE
    assert "slice_index" in read_info(h5).preprocessing["geometry"]
    for case, rows in hdf5_cases(h5).items():
        labels = np.asarray(nib.as_closest_canonical(nib.load(raw / case / "segmentation.nii.gz")).dataobj)
        kidney = np.flatnonzero(labels.reshape(-1, SHAPE[2]).any(axis=0))
        if rows["split"] == "test":
            assert rows["z"].tolist() == list(range(SHAPE[2]))
        else:
            assert set(kidney) <= set(rows["z"].tolist()) and len(rows["z"]) == len(kidney) + 1  # 0.1 * 8 empty


def test_canonical_geometry_reads_the_header_only_and_matches_nibabel():
    """A KiTS19-style volume (array axes z, y, x; x reversed; oblique by a few degrees) and an LPS one."""
    angle = np.deg2rad(4)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    kits19 = np.array([[0, 0, -0.8, 30.0], [0, 0.7, 0, -12.0], [2.5, 0, 0, 80.0], [0, 0, 0, 1]])
    kits19[:3] = rotation @ kits19[:3]
    lps = np.diag([-0.8, -0.8, 3.0, 1.0])
    for affine, shape in ((kits19, (10, 28, 36)), (lps, (36, 28, 10))):
        image = nib.Nifti1Image(np.zeros(shape, np.int16), affine)
        canonical = nib.as_closest_canonical(image)
        got_shape, got_affine = canonical_geometry(image)
        assert got_shape == canonical.shape == (36, 28, 10)
        np.testing.assert_allclose(got_affine, canonical.affine, atol=1e-12)


def test_kits_set_exports_as_nifti_volumes_that_pass_nnunet_and_overlay_the_ct(kits, tmp_path, capfd):
    raw, h5 = kits
    syn = kits_synthetic(tmp_path / "syn.h5")
    result = runner.invoke(app, ["export", "nnunet", str(h5), "--synthetic", str(syn), "--dataset-id", "503",
                                 "--name", "KiTS", "-o", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified_by"].startswith("nnunetv2 ")  # nnU-Net's integrity check ran and passed
    assert "mismatch" not in "".join(capfd.readouterr())  # ... without its origin/direction/affine warnings
    root = tmp_path / "raw" / "Dataset503_KiTS"
    cases = hdf5_cases(h5)
    train = sorted(c for c, rows in cases.items() if rows["split"] != "test")
    test = sorted(c for c, rows in cases.items() if rows["split"] == "test")
    assert (len(train), len(test)) == (4, 2) and summary["file_ending"] == ".nii.gz" and summary["test"] == 2

    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["channel_names"] == {"0": "CT"} and dataset["file_ending"] == ".nii.gz"
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dataset["regions_class_order"] == [1, 3, 2]
    assert dataset["overwrite_image_reader_writer"] == "NibabelIOWithReorient"  # as nnU-Net's KiTS23 set
    assert dataset["numTraining"] == len(train) + 3 and "HU" in dataset["description"]
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in test]

    slices = json.loads((root / "lawder_slices.json").read_text())
    slope = (WINDOW[1] - WINDOW[0]) / 255
    for case, rows in cases.items():
        images, labels = ("imagesTs", "labelsTs") if rows["split"] == "test" else ("imagesTr", "labelsTr")
        image = nib.load(root / images / f"{case}_0000.nii.gz")
        label = nib.load(root / labels / f"{case}.nii.gz")
        # shape: the canvas in RAS order (x, y) and the kept slices along z
        assert image.shape == label.shape == (SIZE, SIZE, len(rows["z"]))
        assert image.get_data_dtype() == label.get_data_dtype() == np.uint8
        pixels, mask = image.dataobj.get_unscaled(), np.asarray(label.dataobj)
        for k in range(len(rows["z"])):  # slice by slice, the HDF5's pixels and labels
            np.testing.assert_array_equal(radiological_view(pixels[:, :, k]), rows["images"][k])
            np.testing.assert_array_equal(radiological_view(mask[:, :, k]), rows["masks"][k])
        # readers see HU inside the window
        np.testing.assert_allclose(image.get_fdata()[..., 0], WINDOW[0] + slope * pixels[..., 0], atol=1e-3)
        # affine: same for image and label; voxel = native voxel x resize factor (36 -> 24 cols, 28 -> 19 rows)
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(image.header.get_zooms(), (0.8 * 36 / 24, 0.8 * 28 / 19, 2.5), rtol=1e-6)
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        # ... and world coordinates: the kidney lies where it lies in the original CT (within a quarter voxel)
        original = nib.load(raw / case / "segmentation.nii.gz")
        if rows["split"] == "test":  # every slice kept: the whole kidney
            np.testing.assert_allclose(world_centroid(mask, image.affine),
                                       world_centroid(np.asarray(original.dataobj), original.affine), atol=0.3)
        canonical = nib.as_closest_canonical(original)
        truth = np.asarray(canonical.dataobj)
        assert np.all(np.diff(rows["z"]) == 1)  # this phantom's empty slices lie at the ends: no gaps
        checked = 0
        for k, z in enumerate(rows["z"]):  # slice by slice
            if truth[:, :, z].any():
                np.testing.assert_allclose(world_centroid(mask, image.affine, k),
                                           world_centroid(truth, canonical.affine, int(z)), atol=0.3)
                checked += 1
        assert checked == 8
        assert slices[case] == {"case": case, "split": str(rows["split"]), "slice_index": rows["z"].tolist(),
                                "consecutive": bool(np.all(np.diff(rows["z"]) == 1))}

    # synthetic slices: one-slice volumes with the median real voxel size, recognisable, never validating
    synthetic = sorted(p.name for p in (root / "labelsTr").glob("synthetic*"))
    assert synthetic == [f"synthetic0-synthetic_{i:05d}_{i:05d}.nii.gz" for i in range(3)]
    fake_images, fake_masks, _ = load_arrays(syn, None)
    for i, name in enumerate(synthetic):
        image = nib.load(root / "imagesTr" / name.replace(".nii.gz", "_0000.nii.gz"))
        assert image.shape == (SIZE, SIZE, 1)
        np.testing.assert_allclose(image.header.get_zooms(), (1.2, 0.8 * 28 / 19, 2.5), rtol=1e-5)
        np.testing.assert_array_equal(radiological_view(image.dataobj.get_unscaled()[..., 0]), fake_images[i, ..., 0])
        mask = np.asarray(nib.load(root / "labelsTr" / name).dataobj)[..., 0]
        np.testing.assert_array_equal(radiological_view(mask), fake_masks[i])
    splits = json.loads((root / "splits_final.json").read_text())
    names = {n.removesuffix(".nii.gz") for n in synthetic}
    assert len(splits) == 4  # one fold per real training case when there are fewer than 5
    assert all(names <= set(f["train"]) and not names & set(f["val"]) for f in splits)
    assert set().union(*(f["val"] for f in splits)) == set(train)


def test_kits_file_without_recorded_geometry_exports_with_a_placeholder_and_says_so(tmp_path):
    data = kits_like(tmp_path / "old.h5")
    with h5py.File(data, "r") as f:
        assert "slice_index" not in f and "case_geometry" not in f
    result = export_nnunet(data, tmp_path / "raw", 504, "OldKiTS")
    root = tmp_path / "raw" / "Dataset504_OldKiTS"
    assert result["verified_by"].startswith("nnunetv2 ") and "not recorded for 5 case(s)" in result["geometry"]
    dataset = json.loads((root / "dataset.json").read_text())
    assert "placeholder" in dataset["lawder"]["geometry"] and dataset["file_ending"] == ".nii.gz"
    images, masks, _ = load_arrays(data, "test")
    image = nib.load(root / "imagesTs" / "case_00003_0000.nii.gz")
    np.testing.assert_array_equal(image.affine, np.eye(4))  # 1 mm voxels at the origin
    for k in range(2):  # the HDF5's order
        np.testing.assert_array_equal(radiological_view(image.dataobj.get_unscaled()[..., k]), images[k, ..., 0])
    labels = {int(v) for p in (root / "labelsTr").glob("*.nii.gz") for v in np.unique(nib.load(p).dataobj)}
    assert labels == {0, 1, 2, 3}
    assert json.loads((root / "lawder_slices.json").read_text())["case_00003"]["slice_index"] is None


def ramp(world: np.ndarray) -> np.ndarray:
    """HU as a linear function of world position (mm), inside the window over the whole phantom."""
    return 60.0 + 6.0 * (world[0] - ORIGIN[0]) - 5.0 * (world[1] - ORIGIN[1]) + 1.0 * (world[2] - ORIGIN[2])


@pytest.mark.parametrize(("resize", "spacing"), [("pad", None), ("pad", 1.0), ("stretch", None)])
def test_kits_volume_affine_maps_every_voxel_to_its_world_position(tmp_path, monkeypatch, resize, spacing):
    """HU that is a linear function of world position survives the (antialiased, bilinear) resize unchanged
    inside the slice, so each exported voxel must hold the HU of the world point its affine names. Pixels are not
    square (0.8 x 0.7 mm), so --spacing changes the resize (36x28 -> 24x16 instead of 24x19)."""
    monkeypatch.setattr("lawder_core.export.nnunet.verify", lambda root: None)  # checked in the test above
    raw = flipped_and_shifted(write_kits_folder(tmp_path / "raw", cases=2, shape=SHAPE), zooms=(0.8, 0.7, 2.5))
    for folder in raw.iterdir():  # replace the phantom's HU by the ramp, in the stored (flipped) voxel order
        image = nib.load(folder / "imaging.nii.gz")
        grid = np.indices(image.shape).reshape(3, -1)
        world = image.affine[:3, :3] @ grid + image.affine[:3, 3:]
        hu = np.rint(ramp(world)).reshape(image.shape).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, image.affine), folder / "imaging.nii.gz")
    h5 = tmp_path / "kits.h5"
    prepare_kits(raw, h5, PrepareOptions(size=SIZE, resize_mode=resize, fractions=(0.5, 0.0, 0.5), seed=0),
                 KitsOptions(window=WINDOW, spacing=spacing))
    export_nnunet(h5, tmp_path / "out", 505, "Ramp")
    geometry = read_case_geometry(h5)
    for path in (tmp_path / "out" / "Dataset505_Ramp").glob("images*/*_0000.nii.gz"):
        image = nib.load(path)
        record = geometry[path.name.removesuffix("_0000.nii.gz")]
        (rows, cols), (top, left) = record["target"], record["offset"]
        # the slice's interior on the canvas, one pixel in from its edges (where the filter meets the padding),
        # as voxel (i, j) = display (SIZE-1-j, SIZE-1-i)
        i = SIZE - 1 - np.arange(left + 1, left + cols - 1)
        j = SIZE - 1 - np.arange(top + 1, top + rows - 1)
        grid = np.stack(np.meshgrid(i, j, np.arange(image.shape[2]), indexing="ij")).reshape(3, -1)
        world = image.affine[:3, :3] @ grid + image.affine[:3, 3:]
        seen = image.get_fdata()[grid[0], grid[1], grid[2]]
        error = seen - ramp(world)  # a quarter-voxel shift (corner- instead of centre-aligned) averages 1.3 HU
        assert np.abs(error).max() < 2.3  # rounding: int16 HU, the window's uint8 and PIL's 8-bit arithmetic
        assert abs(error.mean()) < 0.3 and grid.shape[1] > 1000
        assert (rows, cols) == {("pad", None): (19, 24), ("pad", 1.0): (16, 24), ("stretch", None): (24, 24)}[
            (resize, spacing)]
