"""`lawder export nnunet`: nnU-Net v2's own integrity check passes and the files read back to the HDF5 (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from lawder_cli.main import app
from lawder_core.data.h5 import H5Writer, load_arrays
from lawder_core.export.nnunet import export_nnunet
from tests.helpers import synthetic_h5

runner = CliRunner()


def verify(folder: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(str(folder), num_processes=1)  # raises on any problem


def kits_like(path: Path, n: int = 10) -> Path:
    rng = np.random.default_rng(0)
    with H5Writer(path, height=32, width=32, channels=1, label_names=["background", "kidney", "tumor", "cyst"],
                  source="kits") as writer:
        for i in range(n):
            mask = np.zeros((32, 32), np.uint8)
            mask[8:20, 8:20] = 1
            mask[10:13, 10:13] = 2 + (i % 2)  # a tumour or a cyst inside the kidney
            image = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
            writer.add(image, mask, f"case_{i // 2:05d}", ["train", "train", "val", "test", "train"][i % 5])
    return path


def test_polyp_set_with_synthetic_pairs_passes_nnunet_and_reads_back(tmp_path):
    data = synthetic_h5(tmp_path / "real.h5", n=20, size=32)
    syn = synthetic_h5(tmp_path / "syn.h5", n=6, size=32, seed=3)
    result = runner.invoke(app, ["export", "nnunet", str(data), "--synthetic", str(syn), "--dataset-id", "501",
                                 "--name", "Polyps", "-o", str(tmp_path / "raw"), "--json"])
    assert result.exit_code == 0, result.output
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


def test_kits_labels_are_declared_as_nnunet_regions(tmp_path):
    data = kits_like(tmp_path / "kits.h5")
    export_nnunet(data, tmp_path / "raw", 502, "KiTSlike")
    root = tmp_path / "raw" / "Dataset502_KiTSlike"
    verify(root)
    dataset = json.loads((root / "dataset.json").read_text())
    assert dataset["labels"] == {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}
    assert dataset["regions_class_order"] == [1, 3, 2] and dataset["channel_names"] == {"0": "kits"}
    labels = {int(v) for p in (root / "labelsTr").glob("*.png") for v in np.unique(np.asarray(Image.open(p)))}
    assert labels == {0, 1, 2, 3}
