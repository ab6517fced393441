"""`lawder export nnunet`: a lawder HDF5 file (plus synthetic pairs) as an nnU-Net v2 raw data set.

    OUT/DatasetNNN_NAME/imagesTr/CASE_0000.png   real training + validation images, then synthetic ones
                        labelsTr/CASE.png        labels 0..K (one PNG per image)
                        imagesTs/, labelsTs/     the test split
                        dataset.json             channel_names, labels, numTraining, file_ending
                        splits_final.json        5 folds over the real cases; synthetic cases only ever train

Every sample is one 2D case (nnU-Net's natural-image reader, `.png`): RGB images are one 3-channel file
(channel_names R, G, B), grey images one channel. Case names are the HDF5 case id and the sample's index,
reduced to letters, digits, `-` and `_`; synthetic ones start with `synthetic` and their file's number so they
are recognisable. KiTS label maps (background, kidney, tumor, cyst) are written as they are and declared in
nnU-Net's region form (kidney+masses, masses, tumor) with `regions_class_order`, as nnU-Net's own KiTS23 set does.
`splits_final.json` goes to `nnUNet_preprocessed/DatasetNNN_NAME/` after `nnUNetv2_plan_and_preprocess`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.environment import package_version
from lawder_core.errors import DataError, UsageError
from lawder_core.files import write_json

KITS_LABELS = ("background", "kidney", "tumor", "cyst")
FOLDS = 5


def case_name(prefix: str, case_id: str, index: int) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"{prefix}{case_id}") + f"_{index:05d}"


def label_spec(label_names: tuple[str, ...]) -> tuple[dict[str, Any], list[int] | None]:
    """dataset.json's labels (and regions_class_order): KiTS as nnU-Net's regions, anything else as classes."""
    if tuple(label_names) == KITS_LABELS:
        return {"background": 0, "kidney": [1, 2, 3], "masses": [2, 3], "tumor": 2}, [1, 3, 2]
    return {name: i for i, name in enumerate(label_names)}, None


def write_case(image: np.ndarray, label: np.ndarray, name: str, images: Path, labels: Path) -> None:
    picture = image[..., 0] if image.shape[-1] == 1 else image
    Image.fromarray(picture).save(images / f"{name}_0000.png")
    Image.fromarray(label.astype(np.uint8)).save(labels / f"{name}.png")


def folds(names: list[str], synthetic: list[str], seed: int) -> list[dict[str, list[str]]]:
    """nnU-Net's 5 folds over the real cases; every synthetic case is in every fold's training part only."""
    order = np.random.default_rng(seed).permutation(len(names))
    parts = np.array_split(order, min(FOLDS, max(1, len(names))))
    result = []
    for k, val in enumerate(parts):
        train = [names[i] for j, part in enumerate(parts) if j != k for i in part]
        result.append({"train": sorted(train) + list(synthetic), "val": sorted(names[i] for i in val)})
    return result


def export_nnunet(data: str | os.PathLike, out: str | os.PathLike, dataset_id: int, name: str,
                  synthetic: list[str | os.PathLike] | None = None, force: bool = False,
                  seed: int = 0) -> dict[str, Any]:
    if not 1 <= dataset_id <= 999:
        raise UsageError(f"--dataset-id {dataset_id} must be between 1 and 999 (nnU-Net's DatasetNNN).")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise UsageError(f"--name {name!r} may hold only letters, digits, '-' and '_'.")
    info = read_info(data)
    extra = [read_info(p) for p in synthetic or []]
    for other in extra:
        if (other.channels, tuple(other.label_names)) != (info.channels, tuple(info.label_names)):
            raise UsageError(f"{other.path} has {other.channels} channel(s) and labels {other.label_names}; "
                             f"{info.path} has {info.channels} and {info.label_names}.",
                             "Synthetic pairs must come from a model trained on this data set.")
    root = Path(out) / f"Dataset{dataset_id:03d}_{name}"
    if root.exists():
        if not force:
            raise UsageError(f"{root} already exists.", "Choose another --dataset-id/--name, or pass --force.")
        shutil.rmtree(root)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    dirs = {d: partial / d for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    real: list[str] = []
    offset = 0
    for split in ("train", "val", "test"):
        images, masks, cases = load_arrays(data, split)
        target = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        for i, (image, mask, case) in enumerate(zip(images, masks, cases, strict=True)):
            case_id = case_name("", str(case), offset + i)
            write_case(image, mask, case_id, dirs[target[0]], dirs[target[1]])
            if split != "test":
                real.append(case_id)
        offset += len(cases)
    fake: list[str] = []
    for k, path in enumerate(synthetic or []):
        images, masks, cases = load_arrays(path, None)
        for i, (image, mask, case) in enumerate(zip(images, masks, cases, strict=True)):
            case_id = case_name(f"synthetic{k}-", str(case), i)
            write_case(image, mask, case_id, dirs["imagesTr"], dirs["labelsTr"])
            fake.append(case_id)
    labels, regions = label_spec(info.label_names)
    channels = {"0": "R", "1": "G", "2": "B"} if info.channels == 3 else {"0": info.source or "image"}
    dataset = {"channel_names": channels, "labels": labels, "numTraining": len(real) + len(fake),
               "file_ending": ".png", "name": name, "lawder": {"data": str(info.path),
                                                              "synthetic": [str(p) for p in synthetic or []],
                                                              "real_training": len(real), "synthetic_cases": len(fake)}}
    if regions is not None:
        dataset["regions_class_order"] = regions
    write_json(partial / "dataset.json", dataset)
    write_json(partial / "splits_final.json", folds(real, fake, seed))
    partial.rename(root)
    return {"out": str(root), "training": len(real) + len(fake), "real": len(real), "synthetic": len(fake),
            "test": len(list((root / "imagesTs").glob("*.png"))), "labels": labels, "verified_by": verify(root)}


def verify(root: Path) -> str | None:
    """nnU-Net's own integrity check when nnunetv2 is installed (lawder[nnunet]); its version, or None."""
    if importlib.util.find_spec("nnunetv2") is None:
        return None
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    try:
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its progress; stdout is for --json
            verify_dataset_integrity(str(root), num_processes=1)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise DataError(f"nnU-Net's integrity check rejected {root}: {err}",
                        "This is a lawder bug; please report it with the data set's fingerprint.") from err
    return f"nnunetv2 {package_version('nnunetv2')}"
