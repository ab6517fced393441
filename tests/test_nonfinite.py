"""NaN inside the weights or the data is caught and named, not turned into empty masks or black images."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lawder_cli.main import app
from lawder_core.data.h5 import load_arrays
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_kits import KitsOptions, prepare_kits
from lawder_core.predict.images import predict_to_folder
from lawder_core.predict.output import SkippedInputs
from lawder_core.predictor import load_predictor
from tests.helpers import runner, untrained_checkpoint, write_kits_folder, write_pair_folder

pytestmark = pytest.mark.faults



def poison(weights: Path) -> None:
    """Every floating-point weight in a safetensors file becomes NaN (a diverged or damaged checkpoint)."""
    state = load_file(str(weights))
    save_file({k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}, str(weights),
              metadata={"format": "pt"})


SYNTHETIC = {"n": 12}  # images in the module's `data` (conftest)


@pytest.fixture()
def nan_checkpoint(tmp_path: Path) -> Path:
    checkpoint = untrained_checkpoint(tmp_path / "ck")
    poison(checkpoint / "model.safetensors")
    return checkpoint


def test_onnx_export_refuses_a_model_with_nan_outputs(nan_checkpoint, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    result = runner.invoke(app, ["export", "onnx", "--run", str(nan_checkpoint), "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "NaN or infinite outputs" in result.output and "0.0e+00" not in result.output
    assert not list(tmp_path.glob("m.onnx*"))


def test_the_onnx_check_compares_nan_aware():
    from lawder_core.export.onnx import max_abs_difference

    a = np.array([1.0, np.nan, 3.0])
    assert max_abs_difference(a, np.array([1.0, np.nan, 3.5])) == 0.5  # NaN in both places: equal there
    assert max_abs_difference(a, np.array([1.0, 2.0, 3.0])) == np.inf  # NaN against a number: as far as can be
    assert max_abs_difference(np.full(3, np.nan), np.full(3, np.nan)) == 0.0


def test_predict_refuses_a_model_with_nan_outputs_and_writes_no_mask(nan_checkpoint, data, tmp_path):
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(data), "--run", str(nan_checkpoint), "-o", str(out)])
    assert result.exit_code == 3, result.output
    assert "gives NaN or infinite outputs on the first images" in result.output
    assert not list((out / "masks").glob("*.png"))  # not a folder of empty masks
    summary = json.loads((out / "predict_summary.json").read_text())
    assert summary["complete"] is False and summary["written"] == 0 and "NaN" in summary["error"]


def test_predict_skips_an_input_whose_outputs_turn_non_finite_after_the_first_batch(tmp_path):
    """A model that was fine on the first images is not refused for one input: that input is skipped."""
    predictor = load_predictor(untrained_checkpoint(tmp_path / "ck"))
    calls = {"n": 0}

    def nan_on_the_second_batch(batch: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        logits = predictor.predict_fn(batch)
        return logits * float("nan") if calls["n"] == 2 else logits

    images, _ = write_pair_folder(tmp_path / "in", 4)  # a folder: one image per batch
    with pytest.raises(SkippedInputs):
        predict_to_folder(replace(predictor, predict_fn=nan_on_the_second_batch), images, tmp_path / "pred")
    summary = json.loads((tmp_path / "pred" / "predict_summary.json").read_text())
    assert (summary["images"], summary["written"], summary["skipped"]) == (4, 3, 1)
    assert "NaN" in summary["skipped_inputs"][0]["reason"]


@pytest.fixture()
def nan_law_run(law_run: Path, tmp_path: Path) -> Path:
    run = shutil.copytree(law_run, tmp_path / "law")
    for weights in (run / "last" / "denoiser_ema").rglob("*.safetensors"):
        poison(weights)
    return run


def test_sample_refuses_a_model_that_generates_nan(nan_law_run, data, tmp_path):
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["sample", "--run", str(nan_law_run), "--masks", str(data), "-o", str(out),
                                 "--steps", "2"])
    assert result.exit_code == 3, result.output
    assert "generated NaN or infinite values" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["law"]  # no file of black images


def nan_volume(case: Path) -> int:
    """Replace a case's CT by float32 with a slab of NaN voxels (a broken conversion); returns their count."""
    image = nib.load(case / "imaging.nii.gz")
    hu = np.asarray(image.dataobj).astype(np.float32)
    hu[:, :, 2:4] = np.nan
    nib.save(nib.Nifti1Image(hu, image.affine), case / "imaging.nii.gz")
    return int(np.isnan(hu).sum())


def test_prepare_kits_names_a_volume_with_nan_voxels_and_reads_them_as_air(tmp_path, caplog, recwarn):
    raw = write_kits_folder(tmp_path / "raw", cases=3, shape=(32, 32, 8))
    count = nan_volume(raw / "case_00001")
    with caplog.at_level(logging.WARNING):
        prepare_kits(raw, tmp_path / "k.h5", PrepareOptions(size=32, fractions=(1.0, 0.0, 0.0)),
                     KitsOptions(empty_share=1.0))
    named = [r.getMessage() for r in caplog.records if "case_00001" in r.getMessage()]
    assert len(named) == 1 and f"{count} of" in named[0] and "read as air" in named[0]
    assert not [w for w in recwarn if "invalid value" in str(w.message)]  # no NumPy cast warning instead
    images, _, cases = load_arrays(tmp_path / "k.h5")
    assert images[cases == "case_00001"].min() == 0  # air is black in the window, as a NaN slab was before


def test_predict_names_a_ct_volume_with_nan_voxels(tmp_path, caplog):
    raw = write_kits_folder(tmp_path / "raw", cases=1, shape=(32, 32, 6))
    count = nan_volume(raw / "case_00000")
    volume = tmp_path / "ct.nii.gz"
    shutil.copy(raw / "case_00000" / "imaging.nii.gz", volume)
    checkpoint = untrained_checkpoint(tmp_path / "ck")
    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["predict", str(volume), "--run", str(checkpoint), "-o", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert any(str(volume) in r.getMessage() and f"{count} of" in r.getMessage() and "read as air" in r.getMessage()
               for r in caplog.records)
    assert (tmp_path / "p" / "ct_seg.nii.gz").exists()
