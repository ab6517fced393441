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

KiTS (an HDF5 from `lawder prepare kits`, source "kits") is exported as CT volumes instead (`.nii.gz`,
`export_volumes`): each case is one 3D NIfTI, `CASE_0000.nii.gz` + `CASE.nii.gz`, its kept slices stacked along
z in increasing canonical z (the HDF5's `slice_index`), each slice turned back from the radiological view into
RAS order (`ct_geometry.from_radiological_view`). The affine is the case's recorded `canvas_affine`
(`prepare_kits.canvas_affine`): world millimetres of the original scanner space, so a test volume (every slice
kept) overlays the original CT exactly; the in-plane voxel size is the native one times the resize factor (with
or without --spacing), z the native slice thickness. Train/val cases keep only kidney slices and some empty
ones, so their volume skips the other slices and the affine is exact only where kept slices are consecutive:
use nnU-Net's 2d configuration. `lawder_slices.json` lists each case's kept canonical z. Files prepared before
the geometry was recorded get a 1 mm placeholder affine and the HDF5's slice order, and the result says so.
Pixels are the HDF5's uint8 (CT windowed to LOW..HIGH HU) with scl_slope/scl_inter such that readers, nnU-Net's
included, see HU inside the window: its "CT" normalisation (clipping to foreground percentiles, which lie inside
the window) then treats these and original KiTS HU volumes alike. Labels are written as they are and declared
as nnU-Net's KiTS23 regions. Synthetic pairs (2D) become single-slice volumes (z = 1) with the median voxel size
of the real training volumes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from lawder_core.data.ct_geometry import from_radiological_view
from lawder_core.data.h5 import (
    SPLITS,
    H5Info,
    load_arrays,
    not_sampled,
    open_h5,
    read_case_geometry,
    read_info,
    read_rows,
    read_strings,
)
from lawder_core.environment import package_version
from lawder_core.errors import DataError, UsageError
from lawder_core.files import write_json
from lawder_core.interrupts import signals_deferred

log = logging.getLogger(__name__)

KITS_LABELS = ("background", "kidney", "tumor", "cyst")
KITS_SOURCE = "kits"  # `prepare_kits` writes its HDF5 with this source
FOLDS = 5
PNG, NIFTI = ".png", ".nii.gz"
SLICES_FILE = "lawder_slices.json"
READER = "NibabelIOWithReorient"  # as nnU-Net's own KiTS23 conversion (Dataset220_KiTS2023.py)


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text)


def nnunet_case_name(prefix: str, case_id: str, index: int) -> str:
    return safe_id(f"{prefix}{case_id}") + f"_{index:05d}"


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
        if (note := not_sampled(other, "--synthetic")) is not None:
            log.warning("%s", note)
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
    try:
        real, fake, ending, volumes, notes = write_dataset_folder(data, info, extra, synthetic or [], partial, name,
                                                                  seed)
        partial.rename(root)
    except BaseException:  # a full disk, a bad input, Ctrl-C or SIGTERM: no half-written folder stays
        shutil.rmtree(partial, ignore_errors=True)
        raise
    result = {"out": str(root), "training": len(real) + len(fake), "real": len(real), "synthetic": len(fake),
              "test": len(list((root / "imagesTs").glob(f"*{ending}"))), "labels": label_spec(info.label_names)[0],
              "file_ending": ending, "verified_by": verify(root)}
    if volumes:
        result["geometry"] = notes["geometry"]
    return result


def write_dataset_folder(data: str | os.PathLike, info: H5Info, extra: list[H5Info], synthetic: list[str | os.PathLike],
                         partial: Path, name: str, seed: int) -> tuple[list[str], list[str], str, bool, dict[str, Any]]:
    """Everything of the data set into `partial`; returns (real cases, synthetic cases, file ending, volumes?,
    notes)."""
    dirs = {d: partial / d for d in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for d in dirs.values():
        d.mkdir(parents=True)
    volumes = info.source == KITS_SOURCE
    notes: dict[str, Any] = {}
    if volumes:
        real, fake, notes = export_volumes(info, extra, dirs, partial / SLICES_FILE)
        description = notes.pop("description")
    else:
        real, fake = export_slices(data, synthetic, dirs)
    labels, regions = label_spec(info.label_names)
    if volumes:
        channels = {"0": "CT"}
    else:
        channels = {"0": "R", "1": "G", "2": "B"} if info.channels == 3 else {"0": info.source or "image"}
    ending = NIFTI if volumes else PNG
    dataset: dict[str, Any] = {
        "channel_names": channels, "labels": labels, "numTraining": len(real) + len(fake), "file_ending": ending,
        "name": name,
        "lawder": {"data": str(info.path), "synthetic": [str(p) for p in synthetic],
                   "real_training": len(real), "synthetic_cases": len(fake), **notes}}
    if regions is not None:
        dataset["regions_class_order"] = regions
    if volumes:
        dataset["overwrite_image_reader_writer"] = READER
        dataset["description"] = description
    write_json(partial / "dataset.json", dataset)
    write_json(partial / "splits_final.json", folds(real, fake, seed))
    return real, fake, ending, volumes, notes


def export_slices(data: str | os.PathLike, synthetic: list[str | os.PathLike],
                  dirs: dict[str, Path]) -> tuple[list[str], list[str]]:
    """Every sample as one 2D PNG case; returns the real (train + val) and synthetic training case names."""
    real: list[str] = []
    offset = 0
    for split in ("train", "val", "test"):
        images, masks, cases = load_arrays(data, split)
        target = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
        for i, (image, mask, case) in enumerate(zip(images, masks, cases, strict=True)):
            case_id = nnunet_case_name("", str(case), offset + i)
            write_case(image, mask, case_id, dirs[target[0]], dirs[target[1]])
            if split != "test":
                real.append(case_id)
        offset += len(cases)
    fake: list[str] = []
    for k, path in enumerate(synthetic):
        images, masks, cases = load_arrays(path, None)
        for i, (image, mask, case) in enumerate(zip(images, masks, cases, strict=True)):
            case_id = nnunet_case_name(f"synthetic{k}-", str(case), i)
            write_case(image, mask, case_id, dirs["imagesTr"], dirs["labelsTr"])
            fake.append(case_id)
    return real, fake


def intensity_scale(preprocessing: dict[str, Any]) -> tuple[float, float] | None:
    """(scl_slope, scl_inter) taking the uint8 of `window_to_uint8` back to HU; None without a recorded window."""
    window = preprocessing.get("window")
    if not window or len(window) != 2:
        return None
    low, high = (float(v) for v in window)
    return (high - low) / 255.0, low


def write_nnunet_image(array: np.ndarray, affine: np.ndarray, path: Path, scale: tuple[float, float] | None = None,
                label: bool = False) -> None:
    """uint8 voxels as they are; `scale` (slope, intercept) in the header for the reader to apply."""
    image = nib.Nifti1Image(np.ascontiguousarray(array, dtype=np.uint8), affine)
    image.set_data_dtype(np.uint8)
    image.set_qform(affine, code=1)  # scanner coordinates, in both forms: SimpleITK and nibabel agree
    image.set_sform(affine, code=1)
    if scale is not None:
        image.header.set_slope_inter(*scale)
    if label:
        image.header.set_intent("label")
    nib.save(image, path)


def to_volume(slices: np.ndarray) -> np.ndarray:
    """(k, H, W) display slices -> (W, H, k) in RAS order: voxel (i, j, z) = slices[z, H-1-j, W-1-i]."""
    return np.stack([from_radiological_view(s) for s in slices], axis=-1)


def volume_affine(geometry: dict[str, Any] | None, first_slice: int) -> np.ndarray:
    """The recorded canvas affine moved to the first kept slice; a 1 mm placeholder when nothing was recorded."""
    if geometry is None:
        return np.eye(4)
    shift = np.eye(4)
    shift[2, 3] = first_slice
    return np.asarray(geometry["canvas_affine"], dtype=np.float64) @ shift


def voxel_size(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(affine[:3, :3], axis=0)


def export_volumes(info: H5Info, synthetic: list[H5Info], dirs: dict[str, Path],
                   slices_file: Path) -> tuple[list[str], list[str], dict[str, Any]]:
    """Each KiTS case as one NIfTI volume, each synthetic slice as a one-slice volume (module docstring);
    returns the real and synthetic training names and what dataset.json's `lawder` entry says about them."""
    geometry = read_case_geometry(info.path)
    scale = intensity_scale(info.preprocessing)
    real: list[str] = []
    kept: dict[str, Any] = {}
    sizes: list[np.ndarray] = []  # voxel sizes of the real training volumes with recorded geometry
    names: dict[str, str] = {}
    missing = 0  # cases without recorded geometry or slice indices
    with open_h5(info.path) as f:
        case_ids, splits = read_strings(f, "case_id"), read_strings(f, "split")
        index = f["slice_index"][:].astype(np.int64) if "slice_index" in f else None
        for split in SPLITS:
            target = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
            in_split = np.flatnonzero(splits == split)
            for case in dict.fromkeys(case_ids[in_split]):  # first-appearance order
                rows = in_split[case_ids[in_split] == case]
                if index is not None:
                    rows = rows[np.argsort(index[rows], kind="stable")]
                name = safe_id(str(case))
                if name in kept:
                    raise DataError(f"case {names[name]!r} lies in two splits, or cases {names[name]!r} and {case!r} "
                                    f"both become the nnU-Net case {name!r}.",
                                    "A volume needs all its slices in one split: prepare it with `lawder prepare "
                                    "kits`, which splits by case.")
                names[name] = str(case)
                z = index[rows] if index is not None else None
                record = geometry.get(str(case))
                missing += record is None or z is None
                affine = volume_affine(record, int(z[0]) if z is not None else 0)
                image = to_volume(read_rows(f["images"], rows)[..., 0])  # channels > 1 repeat the grey
                write_nnunet_image(image, affine, dirs[target[0]] / f"{name}_0000{NIFTI}", scale)
                write_nnunet_image(to_volume(read_rows(f["masks"], rows)), affine, dirs[target[1]] / f"{name}{NIFTI}",
                            label=True)
                kept[name] = {"case": str(case), "split": split,
                              "slice_index": None if z is None else [int(v) for v in z],
                              "consecutive": None if z is None else bool(np.all(np.diff(z) == 1))}
                if split != "test":
                    real.append(name)
                    if record is not None:
                        sizes.append(voxel_size(affine))
    median = np.median(sizes, axis=0) if sizes else np.ones(3)
    fake: list[str] = []
    for k, other in enumerate(synthetic):
        images, masks, cases = load_arrays(other.path, None)
        spacing = median * [info.width / other.width, info.height / other.height, 1.0]  # same field of view
        affine = np.diag([*spacing, 1.0])
        for i, (image, mask, case) in enumerate(zip(images, masks, cases, strict=True)):
            name = nnunet_case_name(f"synthetic{k}-", str(case), i)
            write_nnunet_image(to_volume(image[None, ..., 0]), affine, dirs["imagesTr"] / f"{name}_0000{NIFTI}", scale)
            write_nnunet_image(to_volume(mask[None]), affine, dirs["labelsTr"] / f"{name}{NIFTI}", label=True)
            fake.append(name)
    write_json(slices_file, kept)
    return real, fake, volume_notes(info, missing, scale, median)


def volume_notes(info: H5Info, missing: int, scale: tuple[float, float] | None,
                 median: np.ndarray) -> dict[str, Any]:
    """dataset.json's description and `lawder` entries for a volume export: how to read pixels and geometry."""
    record = info.preprocessing
    window = record.get("window")
    if scale is None:
        pixels = "uint8 0..255 as in the HDF5 (it records no CT window, so no HU scaling)"
    else:
        pixels = (f"uint8 = CT windowed to {window[0]:g}..{window[1]:g} HU (0 = {window[0]:g}, 255 = "
                  f"{window[1]:g}), as prepared; scl_slope {scale[0]:.6g} and scl_inter {scale[1]:g} make readers "
                  "(nnU-Net included) see HU clipped to the window; nnU-Net's 'CT' normalisation clips to foreground "
                  "percentiles inside the window, so original KiTS HU volumes are normalised the same way")
    if not missing:
        where = ("canvas_affine recorded by prepare kits: scanner world mm; in-plane voxel = native voxel x resize "
                 "factor, z = native slice thickness; exact for consecutive slices (every test case), train/val "
                 f"cases skip empty slices (see {SLICES_FILE}): use the 2d configuration")
    else:
        where = (f"not recorded for {missing} case(s) (HDF5 prepared before lawder recorded slice_index and "
                 "case_geometry): 1 mm placeholder voxels and the HDF5's slice order there; prepare the set again "
                 "for true geometry")
        log.warning("%s: %s", info.path, where)
    synthetic = f"synthetic slices: one-slice volumes with the median real voxel size {np.round(median, 4).tolist()}"
    size = record.get("size") or info.height
    description = (f"lawder export of {info.path.name}: KiTS CT from `lawder prepare kits` (RAS, axial, "
                   f"{size}x{size} canvas); images {pixels}; geometry {where}; {synthetic}.")
    return {"description": description, "images": pixels, "geometry": where, "slices": SLICES_FILE,
            "synthetic_voxel_size": [round(float(v), 6) for v in median], "configuration": "2d"}


def verify(root: Path) -> str | None:
    """nnU-Net's own integrity check when nnunetv2 is installed (lawder[nnunet]); its version, or None.

    The check runs in a freshly spawned process: nnU-Net forks a multiprocessing pool, and a fork of a process
    with live threads (a connected Ray, a notebook's) can hang for ever on the pool's exit.
    """
    if importlib.util.find_spec("nnunetv2") is None:
        return None
    try:
        run_in_child(nnunet_integrity_check, str(root))
    except (AssertionError, RuntimeError, ValueError) as err:
        raise DataError(f"nnU-Net's integrity check rejected {root}: {err}",
                        "This is a lawder bug; please report it with the data set's fingerprint.") from err
    return f"nnunetv2 {package_version('nnunetv2')}"


def run_in_child(fn: Callable[..., None], *args: Any) -> None:
    """`fn(*args)` in a freshly spawned process, its exception raised here.

    The child leads a process group of its own and ignores SIGINT: Ctrl-C and SIGTERM reach this process, which
    then terminates the child's whole group (nnU-Net's pool too) and waits for it, instead of leaving a worker of
    hundreds of MB running after lawder has exited.
    """
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child_main, args=(send, fn, args), name="lawder-nnunet-check")
    try:
        with signals_deferred():  # a child half started reads a torn start-up message and prints a traceback
            child.start()
        send.close()
        try:
            kind, value = receive.recv()
        except EOFError:  # it died without a word (killed, out of memory)
            kind, value = "died", None
        child.join()
    except BaseException:
        stop_child(child)
        raise
    finally:
        receive.close()
    if kind == "error":
        raise value
    if kind == "died":
        raise RuntimeError(f"the check's process ended with exit code {child.exitcode}")


def _child_main(send: Any, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        fn(*args)
        send.send(("ok", None))
    except Exception as err:
        send.send(("error", err))


def stop_child(child: Any, grace: float = 10.0) -> None:
    """SIGTERM to the child's process group, SIGKILL after `grace` seconds; waits for it either way."""
    if child.pid is None:  # never started
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(child.pid, sig)
        except (ProcessLookupError, PermissionError):  # not yet a group leader (or gone): the child alone
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)
        child.join(grace)
        if not child.is_alive():
            return


def nnunet_integrity_check(root: str) -> None:
    """nnU-Net's verify_dataset_integrity, its progress on stderr (stdout is for --json); run by `verify`."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    with contextlib.redirect_stdout(sys.stderr):
        verify_dataset_integrity(root, num_processes=1)
