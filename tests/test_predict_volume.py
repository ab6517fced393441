"""`lawder predict` on CT volumes (issue 15): label volumes on the input's voxel grid, whatever its orientation."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from lawder_cli.main import app
from lawder_core.data.ct_geometry import from_radiological_view, window_to_uint8
from lawder_core.data.h5 import load_arrays
from lawder_core.data.labels import label_map
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_kits import LABEL_NAMES, KitsOptions, prepare_kits
from lawder_core.errors import DataError, UsageError
from lawder_core.models.factory import build_segmenter, save_segmenter
from lawder_core.predict.images import predict_to_folder
from lawder_core.predict.volumes import (
    canonical_to_stored,
    find_volumes,
    is_volume_source,
    volume_settings,
)
from lawder_core.predictor import Predictor, load_predictor, predict_images
from tests.helpers import runner

X, Y, Z = 24, 20, 7  # canonical (RAS) grid: non-square slices, so prepare pads them to SIZE
SPACING = (0.8, 0.8, 2.5)
SIZE = 24  # the HDF5's --size: the longest side, so the slices are padded but not resized
PAD_TOP = (SIZE - Y) // 2
TRAIN_SIZE = 32  # the run's training size: the canvas is resized to it on the way in
WINDOW = (-79.0, 304.0)


def canonical_case() -> tuple[np.ndarray, np.ndarray]:
    """HU (int16) and labels in RAS order; the HU encodes x, y and z, so any orientation error shows."""
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    hu = (-79 + 11 * x + 7 * y + 13 * z).astype(np.int16)
    labels = np.zeros((X, Y, Z), np.uint8)
    labels[14:20, 10:16, 2:5] = 1
    labels[18, 15, 3] = 2
    labels[4:7, 3:6, 2:4] = 3
    return hu, labels


# Each orientation: (stored array from the canonical one, affine). The inverse maps are written out by hand, not
# through nibabel, so they check the module's inverse reorientation independently.
def as_ras(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = [-10.0, 20.0, -300.0]
    return data, affine


def as_lps(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y reversed (DICOM-like LPS): negative x and y spacing."""
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [SPACING[0] * (X - 1), SPACING[1] * (Y - 1), 5.0]
    return data[::-1, ::-1, :], affine


def as_kits19(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KiTS19-style: array axes (z, y, x), x reversed, i.e. permuted and flipped."""
    affine = np.array([[0, 0, -SPACING[0], SPACING[0] * (X - 1)],
                       [0, SPACING[1], 0, 0],
                       [SPACING[2], 0, 0, 0],
                       [0, 0, 0, 1.0]])
    return data[::-1, :, :].transpose(2, 1, 0), affine


def as_oblique_ais(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Array axes (y, z, x) with y reversed, slightly rotated: an oblique, permuted, flipped grid."""
    c, s = np.cos(0.1), np.sin(0.1)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    columns = np.array([[0, -SPACING[1], 0], [0, 0, SPACING[2]], [SPACING[0], 0, 0]]).T  # world axis per array axis
    affine = np.eye(4)
    affine[:3, :3] = rotation @ columns
    affine[:3, 3] = [3.0, -7.0, 11.0]
    return data[:, ::-1, :].transpose(1, 2, 0), affine


ORIENTATIONS = {"ras": as_ras, "lps": as_lps, "kits19": as_kits19, "oblique": as_oblique_ais}
TO_CANONICAL = {  # stored -> canonical, the inverse of each function above
    "ras": lambda a: a,
    "lps": lambda a: a[::-1, ::-1, :],
    "kits19": lambda a: a.transpose(2, 1, 0)[::-1, :, :],
    "oblique": lambda a: a.transpose(2, 0, 1)[:, ::-1, :],
}


def write_volume(path: Path, data: np.ndarray, affine: np.ndarray, qform_code: int = 1, sform_code: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    image.set_qform(affine, qform_code)
    image.set_sform(affine, sform_code)
    nib.save(image, path)
    return path


def write_kits_folder(root: Path) -> Path:
    hu, labels = canonical_case()
    for kind, orient in ORIENTATIONS.items():
        (stored_hu, affine), (stored_labels, _) = orient(hu), orient(labels)
        write_volume(root / f"case_{kind}" / "imaging.nii.gz", stored_hu, affine)
        write_volume(root / f"case_{kind}" / "segmentation.nii.gz", stored_labels, affine)
    return root


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> tuple[Path, Path]:
    """(KiTS folder of the same patient in four orientations, its HDF5: every case in test, so every slice)."""
    root = write_kits_folder(tmp_path_factory.mktemp("kits") / "raw")
    h5 = root.parent / "kits.h5"
    prepare_kits(root, h5, PrepareOptions(size=SIZE, resize_mode="pad", fractions=(0.0, 0.0, 1.0), seed=0),
                 KitsOptions(window=WINDOW))
    return root, h5


@pytest.fixture(scope="module")
def run(kits, tmp_path_factory) -> Path:
    """A randomly initialised 4-class MK-UNet-T saved as a run trained on the KiTS HDF5 (train_config, label map).

    Its BatchNorm statistics are set by one pass over the HDF5's slices: with the initial ones (mean 0, var 1) a
    fresh network's features are nearly constant and it predicts one class everywhere, which would prove nothing.
    """
    from lawder_core.models.inference import images_to_tensor

    _, h5 = kits
    torch.manual_seed(0)
    model = build_segmenter("mkunet-t", num_classes=4, in_channels=1)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the pass
    images = images_to_tensor(load_arrays(h5, "test")[0])
    with torch.no_grad():
        model.train()(torch.nn.functional.interpolate(images, size=TRAIN_SIZE, mode="bilinear"))
    out = tmp_path_factory.mktemp("run") / "kits-order"
    extra = {"train_config": {"data": str(h5), "size": TRAIN_SIZE, "model": "mkunet-t"},
             "label_map": label_map(LABEL_NAMES).to_dict()}
    save_segmenter(model.eval(), out / "best", extra=extra)
    return out


def intensity_predictor(info: dict, labels=None, num_classes: int = 4) -> Predictor:
    """A 'segmenter' that labels each pixel by its grey value (bins of 64): voxel-wise, so its volume labels are
    a function of each input voxel's own HU, and any misplaced voxel shows."""

    def logits(x: torch.Tensor) -> torch.Tensor:
        grey = x[:, :1] * 255.0
        if num_classes == 1:
            return grey - 127.5
        centres = torch.arange(num_classes, dtype=torch.float32).view(1, -1, 1, 1) * 64 + 31.5  # bins grey // 64
        return -(grey - centres) ** 2

    return Predictor(predict_fn=logits, at_training_size=logits, size=None, num_classes=num_classes,
                     checkpoint=Path("intensity"), info=info, label_map=labels)


def expected_from_hdf5(masks: np.ndarray, kind: str) -> np.ndarray:
    """HDF5 display masks of one case (padded, radiological view) -> the label volume in the stored layout."""
    canonical = np.zeros((X, Y, Z), np.uint8)
    for z in range(Z):
        for x in range(X):  # display[PAD_TOP + Y-1-y, X-1-x] = slice[x, y], written out (prepare_kits docstring)
            for y in range(Y):
                canonical[x, y, z] = masks[z, PAD_TOP + Y - 1 - y, X - 1 - x]
    stored = ORIENTATIONS[kind](canonical)[0]
    assert np.array_equal(TO_CANONICAL[kind](stored), canonical)
    return stored


@pytest.mark.parametrize("kind", list(ORIENTATIONS))
def test_labels_match_the_hdf5_path_voxel_for_voxel(kits, run, tmp_path, kind):
    root, h5 = kits
    predictor = load_predictor(run, mode="eager")
    images, _, cases = load_arrays(h5, "test")
    rows = cases == f"case_{kind}"
    assert rows.sum() == Z  # every slice, in increasing z
    expected = expected_from_hdf5(predict_images(predictor, images[rows]), kind)
    assert len(np.unique(expected)) >= 2  # the network is not constant: the comparison means something

    result = predict_to_folder(predictor, root / f"case_{kind}" / "imaging.nii.gz", tmp_path / "out")
    source = nib.load(root / f"case_{kind}" / "imaging.nii.gz")
    seg = nib.load(tmp_path / "out" / f"case_{kind}_seg.nii.gz")
    assert seg.shape == source.shape and np.array_equal(seg.affine, source.affine)
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), expected)
    assert result["preprocessing"]["window"] == list(WINDOW) and result["preprocessing"]["size"] == SIZE
    assert "preprocessing record" in result["preprocessing"]["origin"]


@pytest.mark.parametrize("kind", list(ORIENTATIONS))
def test_a_voxelwise_segmenter_labels_every_voxel_from_its_own_hu(tmp_path, kind):
    hu, _ = canonical_case()
    stored, affine = ORIENTATIONS[kind](hu)
    path = write_volume(tmp_path / "ct.nii.gz", stored, affine)
    # no training record: KiTS defaults, native slices (the intensity predictor has no training size)
    result = predict_to_folder(intensity_predictor({}), path, tmp_path / "out")
    seg = nib.load(tmp_path / "out" / "ct_seg.nii.gz")
    expected = window_to_uint8(stored, WINDOW) // 64
    assert len(np.unique(expected)) == 4
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), expected)
    assert "KiTS defaults" in result["preprocessing"]["origin"]


def test_header_geometry_is_copied_and_labels_are_plain_uint8(tmp_path):
    hu, _ = canonical_case()
    stored, affine = as_lps(hu)
    image = nib.Nifti1Image(stored.astype(np.float32), affine)
    image.set_data_dtype(np.uint8)  # negative HU in uint8: saved with scl_slope/scl_inter, which labels must not get
    image.set_qform(affine, 1)
    image.set_sform(np.diag([0.5, 0.5, 2.0, 1.0]) @ affine, 4)  # a different sform, with its own code
    image.header["cal_min"], image.header["cal_max"] = -1024, 3071
    path = tmp_path / "scaled.nii"
    nib.save(image, path)
    predict_to_folder(intensity_predictor({}), path, tmp_path / "out")
    source, seg = nib.load(path), nib.load(tmp_path / "out" / "scaled_seg.nii.gz")
    assert source.dataobj.slope != 1.0  # the input really is scaled; the labels are not
    assert (seg.dataobj.slope, seg.dataobj.inter) == (1.0, 0.0) and seg.header["cal_max"] <= 3
    assert seg.shape == source.shape and np.array_equal(seg.affine, source.affine)
    for form in ("qform", "sform"):
        got, code = getattr(seg, f"get_{form}")(coded=True)
        want, want_code = getattr(source, f"get_{form}")(coded=True)
        assert code == want_code and np.allclose(got, want)
    np.testing.assert_array_equal(np.asanyarray(seg.dataobj), window_to_uint8(source.get_fdata(), WINDOW) // 64)


def test_inverse_reorientation_and_view_undo_the_forward_ones():
    from lawder_core.data.ct_geometry import radiological_view

    data = np.arange(X * Y * Z).reshape(X, Y, Z)
    for kind, orient in ORIENTATIONS.items():
        stored, affine = orient(data)
        canonical = np.asanyarray(nib.as_closest_canonical(nib.Nifti1Image(stored.astype(np.int32), affine)).dataobj)
        np.testing.assert_array_equal(canonical, data, err_msg=kind)
        np.testing.assert_array_equal(canonical_to_stored(canonical, affine), stored, err_msg=kind)
    np.testing.assert_array_equal(from_radiological_view(radiological_view(data[:, :, 0])), data[:, :, 0])


def test_label_maps_write_the_training_labels(tmp_path):
    hu, _ = canonical_case()
    path = write_volume(tmp_path / "ct.nii.gz", *as_ras(hu))
    masses = label_map(LABEL_NAMES, "tumor+cyst")  # binary: class 1 is written back as label 2
    predict_to_folder(intensity_predictor({}, masses, num_classes=1), path, tmp_path / "out")
    seg = np.asanyarray(nib.load(tmp_path / "out" / "ct_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg, np.where(window_to_uint8(hu, WINDOW) > 127, 2, 0))


def test_case_folders_and_folders_of_volumes(kits, tmp_path):
    root, _ = kits
    flat = tmp_path / "flat"
    hu, _ = canonical_case()
    write_volume(flat / "a.nii.gz", *as_ras(hu))
    write_volume(flat / "b.nii", *as_lps(hu))
    (flat / "notes.txt").write_text("not a volume")
    assert [name for name, _ in find_volumes(flat)] == ["a", "b"]
    assert [name for name, _ in find_volumes(root)] == [f"case_{k}" for k in sorted(ORIENTATIONS)]
    assert [name for name, _ in find_volumes(root / "case_lps")] == ["case_lps"]
    assert is_volume_source(flat) and is_volume_source(root) and not is_volume_source(tmp_path / "missing")
    result = predict_to_folder(intensity_predictor({}), flat, tmp_path / "out")
    assert result["volumes"] == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]
    overlays = sorted(p.name for p in (tmp_path / "out" / "overlays").glob("*.png"))
    assert len(overlays) == 6 and overlays[0].startswith("a_z")
    write_volume(flat / "a.nii", *as_ras(hu))
    with pytest.raises(DataError, match="several volumes named a"):
        find_volumes(flat)


def test_settings_come_from_the_training_record_else_kits_defaults(kits, tmp_path):
    _, h5 = kits
    recorded = volume_settings({"train_config": {"data": str(h5), "size": TRAIN_SIZE}}, TRAIN_SIZE)
    assert (recorded.window, recorded.channels, recorded.size, recorded.resize_mode) == (WINDOW, 1, SIZE, "pad")
    missing = volume_settings({"train_config": {"data": str(tmp_path / "gone.h5")}}, TRAIN_SIZE, "-100,200")
    assert missing.window == (-100.0, 200.0) and missing.size == TRAIN_SIZE and missing.channels == 1
    assert "not here" in missing.origin and "--window" in missing.origin
    with pytest.raises(UsageError):
        volume_settings({}, None, "300,-100")


def test_refusals_are_clear(tmp_path):
    hu, _ = canonical_case()
    path = write_volume(tmp_path / "ct.nii.gz", *as_ras(hu))
    predictor = intensity_predictor({})
    predict_to_folder(predictor, path, tmp_path / "out")
    with pytest.raises(UsageError, match="not empty"):
        predict_to_folder(predictor, path, tmp_path / "out")
    predict_to_folder(predictor, path, tmp_path / "out", force=True)
    assert not list((tmp_path / "out").glob("*.partial"))
    flat = write_volume(tmp_path / "flat.nii.gz", hu[:, :, 0], np.eye(4))
    with pytest.raises(DataError, match="3D"):
        predict_to_folder(predictor, flat, tmp_path / "out2")
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match="broken.nii.gz"):
        predict_to_folder(predictor, broken, tmp_path / "out3")
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(pngs / "a.png")
    with pytest.raises(UsageError, match="--window"):
        predict_to_folder(predictor, pngs, tmp_path / "out4", window="-79,304")


def test_cli_predicts_a_case_and_refuses_a_2d_nifti(kits, run, tmp_path, caplog):
    root, _ = kits
    case = root / "case_kits19" / "imaging.nii.gz"
    out = tmp_path / "pred"
    with caplog.at_level(logging.INFO, logger="lawder_core.predict.volumes"):
        result = runner.invoke(app, ["predict", "--run", str(run), "--in", str(case), "-o", str(out)])
    assert result.exit_code == 0, result.output
    seg = nib.load(out / "case_kits19_seg.nii.gz")
    source = nib.load(case)
    assert seg.shape == source.shape and np.array_equal(seg.affine, source.affine)
    assert set(np.unique(np.asanyarray(seg.dataobj))) <= {0, 1, 2, 3}
    assert 1 <= len(list((out / "overlays").glob("case_kits19_z*.png"))) <= 3
    assert "window -79,304 HU" in caplog.text and "preprocessing record" in caplog.text  # which settings
    again = runner.invoke(app, ["predict", "--run", str(run), "--in", str(case), "-o", str(out)])
    assert again.exit_code == 2
    flat = write_volume(tmp_path / "flat.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
    result = runner.invoke(app, ["predict", "--run", str(run), "--in", str(flat), "-o", str(tmp_path / "p2")])
    assert result.exit_code == 3 and "3D" in result.output and "Traceback" not in result.output
    both = runner.invoke(app, ["predict", str(case), "--run", str(run), "--in", str(case), "-o", str(tmp_path / "p3")])
    assert both.exit_code == 2 and "--in" in both.output
