"""Segment CT volumes (NIfTI) slice by slice, exactly as `prepare kits` made the training slices.

Input: a `.nii`/`.nii.gz` file, a KiTS case folder (`case_XXXXX/imaging.nii.gz`), or a folder of volumes (NIfTI
files in it and `*/imaging.nii.gz` case folders). Output, for each volume named CASE (the file name without
`.nii[.gz]`; for `imaging.nii.gz`, its folder's name; made safe and unique by `paths.unique_names`):
`OUT/CASE_seg.nii.gz` and `OUT/overlays/CASE_zNNN.png`, and `OUT/predict_summary.json`.

Geometry. Each volume goes through `prepare_kits`'s own functions: reoriented to RAS+ (`canonical_array`), cut
into axial slices `volume[:, :, z]`, shown in radiological view, windowed to uint8 and fitted onto the
training canvas (`display_shape` with the recorded `--spacing`, `fit_to_size` with the recorded `--size` and
`--resize`). The network's logits on that canvas are cropped to the slice's region, interpolated back to the
slice's native in-plane size and decided there (argmax, or sigmoid > 0.5 for a binary run), mapped back through
the radiological view and the inverse reorientation, and written with the input's shape, affine, qform and
sform: label voxel (i, j, k) belongs to input voxel (i, j, k). Labels are the training data's (KiTS: 0
background, 1 kidney, 2 tumour, 3 cyst), uint8.

Settings come from the training HDF5's `preprocessing` record (the run's `train_config.data`) when that file is
there and was made by `prepare kits`; otherwise the KiTS defaults (window -79,304 HU, 1 channel, pad to the
training size, each case's own spacing). `--window` overrides the window. The log says which were used.

`images.predict_to_folder` loads the run, applies the output-folder rules (no writing into a
non-empty folder without --force, never through a symbolic link: `output.py`) and dispatches here for
NIfTI input. A volume that cannot be read or segmented is skipped; the run then exits 3 after the summary.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import nibabel as nib
import numpy as np

from lawder_core.data.ct_geometry import (
    canonical_array,
    canonical_zooms,
    display_shape,
    fit_to_size,
    from_radiological_view,
    image_on_canvas,
    radiological_view,
    window_to_uint8,
)
from lawder_core.data.h5 import read_info
from lawder_core.data.labels import LabelMap, stored_labels
from lawder_core.data.prepare_kits import IMAGING, KitsOptions, load_header, looks_like_old_kits19
from lawder_core.data.sources import parse_window
from lawder_core.errors import DataError, UsageError
from lawder_core.paths import unique_names, write_safely
from lawder_core.predict import output as rules  # the output folder's rules, shared with images.py
from lawder_core.viz import overlay

if TYPE_CHECKING:
    from lawder_core.models.inference import PredictFn

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
SEG_SUFFIX = "_seg.nii.gz"
OVERLAYS = "overlays"
OVERLAY_SLICES = 3  # the axial slices with the most foreground get an overlay PNG
BATCH = 16  # slices per forward pass
RAS = np.array([[0, 1], [1, 1], [2, 1]])  # the canonical orientation of `canonical_array`


class VolumePredictor(Protocol):
    """What this module needs of `lawder_core.predict.Predictor` (which it cannot import: predict imports it)."""

    @property
    def predict_fn(self) -> PredictFn: ...
    @property
    def size(self) -> int | None: ...
    @property
    def checkpoint(self) -> Path: ...
    @property
    def info(self) -> dict[str, Any]: ...
    @property
    def label_map(self) -> LabelMap | None: ...


@dataclass(frozen=True)
class VolumeSettings:
    """How a volume becomes the slices the segmenter was trained on."""

    window: tuple[float, float]  # HU
    channels: int
    size: int | None  # side of the square canvas (the HDF5's --size); None: native slices, no resize
    resize_mode: str  # pad or stretch, as `prepare --resize`
    spacing: float | None  # mm per pixel in-plane before the resize; None: each case's own
    origin: str  # where these came from, for the log and the result


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def volume_case_name(path: Path) -> str:
    """`case_00012/imaging.nii.gz` -> case_00012; `ct.nii.gz` -> ct."""
    if path.name == IMAGING:
        return path.parent.name
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return path.stem


def find_volumes(source: str | os.PathLike) -> list[tuple[str, Path]]:
    """(case name, file) for a NIfTI file, a case folder holding imaging.nii.gz, or a folder of volumes; sorted."""
    source = Path(source)
    if source.is_file():
        files = [source] if is_nifti(source) else []
    elif (source / IMAGING).is_file():
        files = [source / IMAGING]
    elif source.is_dir():
        files = [p for p in source.iterdir() if p.is_file() and is_nifti(p)]
        files += [p / IMAGING for p in source.iterdir() if p.is_dir() and (p / IMAGING).is_file()]
    else:
        files = []
    named = sorted((volume_case_name(p), p) for p in files)
    names = [name for name, _ in named]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DataError(f"{source} holds several volumes named {', '.join(twice)} (e.g. X.nii and X.nii.gz).",
                        "Each volume's segmentation is named after it: keep one file per name.")
    return named


def is_volume_source(source: str | os.PathLike) -> bool:
    """Whether `lawder predict` reads `source` as CT volumes rather than an HDF5 file or a folder of images."""
    source = Path(source)
    if source.is_file():
        return is_nifti(source)
    return source.is_dir() and bool(find_volumes(source))


def volume_settings(info: dict[str, Any], train_size: int | None,
                    window: tuple[float, float] | str | None = None) -> VolumeSettings:
    """The training data's slice settings (its HDF5 `preprocessing` record), else KiTS defaults; `window`
    (LOW,HIGH in HU) replaces the window either way."""
    data = (info.get("train_config") or {}).get("data") if info else None
    settings = recorded_settings(Path(data)) if data else None
    if settings is None:
        defaults = KitsOptions()
        why = ("the run records no training data" if not data else
               f"the training data {data} is not here" if not Path(data).is_file() else
               f"the training data {data} has no `prepare kits` record")
        settings = VolumeSettings(defaults.window, defaults.channels, train_size, "pad", None, f"KiTS defaults ({why})")
    window = check_window(window)
    if window is not None:
        settings = replace(settings, window=window, origin=f"{settings.origin}; window from --window")
    return settings


def check_window(window: tuple[float, float] | str | None) -> tuple[float, float] | None:
    """`--window LOW,HIGH` (HU) as a pair, refused unless LOW < HIGH."""
    if window is None:
        return None
    low, high = parse_window(window) if isinstance(window, str) else (float(window[0]), float(window[1]))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"--window {low:g},{high:g}: LOW and HIGH must be finite numbers of HU, e.g. -79,304.")
    if not high > low:  # `not >` also refuses NaN
        raise UsageError(f"--window {low:g},{high:g} must have LOW < HIGH (HU), e.g. -79,304.")
    return low, high


def recorded_settings(data: Path) -> VolumeSettings | None:
    """The slice settings `prepare kits` recorded in `data`; None when it is not here or not a KiTS file."""
    if not data.is_file():
        return None
    try:
        h5 = read_info(data)
    except (DataError, OSError) as err:
        log.warning("cannot read the training data %s (%s): using KiTS defaults", data, err)
        return None
    record = h5.preprocessing
    if h5.source != "kits" or "window" not in record:
        log.warning("the run was trained on %s (source %r), not on `prepare kits` CT slices: using KiTS defaults; "
                    "its predictions on CT may mean little", data, h5.source)
        return None
    low, high = (float(v) for v in record["window"])
    spacing = record.get("spacing")
    return VolumeSettings((low, high), int(record.get("channels") or h5.channels), int(record.get("size") or h5.height),
                          str(record.get("resize_mode") or "pad"), None if spacing is None else float(spacing),
                          f"the training data's preprocessing record ({data})")


def canonical_to_stored(canonical: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of `canonical_array`'s reorientation: a RAS+ array back to the stored axis order and signs."""
    stored = nib.orientations.io_orientation(affine)
    return nib.orientations.apply_orientation(canonical, nib.orientations.ornt_transform(RAS, stored))


def segment_volume(predictor: VolumePredictor, hu: np.ndarray, zooms: tuple[float, float, float],
                   settings: VolumeSettings) -> np.ndarray:
    """Canonical (RAS) uint8 labels for a canonical HU volume, one batch of axial slices at a time."""
    import torch

    from lawder_core.models.inference import finite_logits, images_to_tensor, logits_to_labels

    x, y, z_count = hu.shape
    native = (y, x)  # a displayed slice: rows along y, cols along x
    if settings.size is None:
        canvas_side, target, (top, left) = native, native, (0, 0)
    else:
        canvas_side = (settings.size, settings.size)
        target, (top, left) = fit_to_size(display_shape(hu.shape, zooms, settings.spacing), settings.size,
                                          settings.resize_mode)
    whole = tuple(target) == canvas_side  # no padding: the logits cover the slice
    labels = np.zeros(hu.shape, np.uint8)
    with torch.inference_mode():
        for start in range(0, z_count, BATCH):
            zs = range(start, min(start + BATCH, z_count))
            canvas = np.zeros((len(zs), *canvas_side, settings.channels), np.uint8)
            for i, z in enumerate(zs):  # the same canvas as `prepare kits` made for training
                canvas[i] = image_on_canvas(hu[:, :, z], target, (top, left), canvas_side, settings.window)[..., None]
            logits = finite_logits(predictor.predict_fn(images_to_tensor(canvas)))  # at the training size
            if not whole:  # the slice's region of the canvas (logits brought to the canvas size first)
                if tuple(logits.shape[-2:]) != canvas_side:
                    logits = torch.nn.functional.interpolate(logits.float(), size=canvas_side, mode="bilinear",
                                                             align_corners=False)
                logits = logits[..., top:top + target[0], left:left + target[1]]
            classes = logits_to_labels(logits, size=native).cpu().numpy()
            display = stored_labels(predictor.label_map, classes)  # the training data's labels
            for i, z in enumerate(zs):
                labels[:, :, z] = from_radiological_view(display[i])
    return labels


def segmentation_image(labels: np.ndarray, like: nib.Nifti1Image, description: str) -> nib.Nifti1Image:
    """A uint8 label image on `like`'s voxel grid: its shape, affine, qform and sform (codes included)."""
    header = like.header.copy()
    image = type(like)(labels.astype(np.uint8), like.affine, header)
    image.set_data_dtype(np.uint8)
    image.set_qform(like.header.get_qform(), int(like.header["qform_code"]))
    image.set_sform(like.header.get_sform(), int(like.header["sform_code"]))
    image.header.set_slope_inter(1.0, 0.0)
    image.header["cal_min"], image.header["cal_max"] = 0, float(labels.max(initial=0))
    image.header.set_intent("label")
    image.header["descrip"] = description[:79].encode()
    return image


def write_segmentation(image: nib.Nifti1Image, path: Path) -> Path:
    """Atomically and never through a link (`paths.write_safely`); the temporary name has no .nii.gz, so the
    bytes are gzipped here."""

    def write(f: BinaryIO) -> None:
        with gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=f) as gz:
            gz.write(image.to_bytes())

    return write_safely(path, write)


def overlay_slices(labels: np.ndarray, count: int = OVERLAY_SLICES) -> list[int]:
    """The `count` axial slices with the most foreground voxels (ascending z); the middle slice if none has any."""
    per_slice = (labels > 0).reshape(-1, labels.shape[2]).sum(axis=0)
    ranked = [int(z) for z in np.argsort(-per_slice, kind="stable")[:count] if per_slice[z] > 0]
    return sorted(ranked) or [labels.shape[2] // 2]


def predict_volumes(predictor: VolumePredictor, source: str | os.PathLike, out: str | os.PathLike,
                    window: tuple[float, float] | str | None = None,
                    follow_symlinks: bool = False) -> dict[str, Any]:
    """Write OUT/CASE_seg.nii.gz and OUT/overlays/CASE_zNNN.png for every volume in `source`, and
    OUT/predict_summary.json; returns the summary.

    CASE is made safe (`paths.safe_name`) and unique in the run. In a folder, links that lead outside it are
    followed only with `follow_symlinks`; a volume that cannot be read or segmented is skipped, and
    `SkippedInputs` (exit 3) reports it after the summary is written (`output.py`). The caller
    (`predict_to_folder`) has already refused a non-empty `out` without --force, and a linked `out`.
    """
    source, out = Path(source), Path(out)
    outcome = rules.Outcome("volumes")
    volumes = find_volumes(source)
    if source.is_dir():
        volumes = rules.keep_inside(source, volumes, follow_symlinks, outcome)
    if not volumes:
        raise rules.nothing_found("NIfTI volumes (.nii, .nii.gz)", source, outcome)
    names = unique_names(name for name, _ in volumes)
    settings = volume_settings(predictor.info, predictor.size, window)
    log.info("CT slices as in training: window %g,%g HU, %d channel(s), %s, spacing %s; from %s",
             *settings.window, settings.channels,
             f"{settings.resize_mode} to {settings.size}" if settings.size else "native size",
             f"{settings.spacing} mm" if settings.spacing else "each case's own", settings.origin)
    rules.refuse_links([out / rules.SUMMARY] + [out / f"{name}{SEG_SUFFIX}" for name in names])
    rules.make_output(out, (OVERLAYS,))
    outcome.total = len(volumes)
    run = predictor.info.get("run") or predictor.info.get("onnx") or predictor.checkpoint
    description = f"lawder predict labels: {Path(str(run)).name}"
    cases: list[dict[str, Any]] = []
    result = {"out": str(out), "checkpoint": str(predictor.checkpoint),
              "preprocessing": {**asdict(settings), "window": list(settings.window)}, "cases": cases}
    with rules.summary_on_abort(out, outcome, result):
        for name, (_, path) in zip(names, volumes, strict=True):
            try:
                image = load_header(path)  # a DataError for an unreadable or non-3D file
                zooms = canonical_zooms(image)
                if looks_like_old_kits19(zooms):
                    log.warning("%s looks like a first-release KiTS19 volume (affine diag(slice thickness, pixel, "
                                "pixel)): its 'axial' slices would be sagittal; check its orientation in a viewer",
                                path)
                hu = canonical_array(image, path)
                labels = segment_volume(predictor, hu, zooms, settings)
                stored = canonical_to_stored(labels, image.affine)
            except Exception as error:
                from lawder_core.models.inference import NonFiniteOutputs, non_finite_model  # torch is loaded

                if isinstance(error, NonFiniteOutputs) and not outcome.written and not outcome.skipped:
                    raise non_finite_model(predictor.checkpoint, error) from error  # the model, not this volume
                if not rules.input_failure(error):
                    raise
                outcome.skip(str(path.relative_to(source)) if source.is_dir() else path.name, error)
                continue
            seg_path = write_segmentation(segmentation_image(stored, image, description), out / f"{name}{SEG_SUFFIX}")
            for z in overlay_slices(labels):
                view = window_to_uint8(radiological_view(hu[:, :, z]), settings.window)
                rules.write_png(overlay(view, radiological_view(labels[:, :, z])),
                                out / OVERLAYS / f"{name}_z{z:03d}.png")
            values, counts = np.unique(stored, return_counts=True)
            cases.append({"case": name, "input": str(path), "segmentation": str(seg_path), "shape": list(stored.shape),
                          "voxels": {int(v): int(c) for v, c in zip(values, counts, strict=True)}})
            outcome.written += 1
            log.info("%s: %d axial slices -> %s", name, labels.shape[2], seg_path)
    return rules.finish(out, outcome, result)
