"""Segment new 2-D images (a folder, or a split of an HDF5 file) with a trained run and write PNG masks."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core.data.h5 import open_h5, read_rows, read_strings, split_indices
from lawder_core.data.images import list_images, read_image
from lawder_core.errors import DataError, UsageError
from lawder_core.paths import safe_name, unique_names
from lawder_core.predict.output import (
    SUMMARY,
    Outcome,
    check_output,
    finish,
    input_failure,
    keep_inside,
    make_output,
    nothing_found,
    refuse_links,
    summary_on_abort,
    write_png,
)
from lawder_core.predict.volumes import OVERLAYS, check_window, is_volume_source, predict_volumes
from lawder_core.predictor import Predictor, load_predictor, predict_images
from lawder_core.viz import overlay

MASKS = "masks"


@dataclass(frozen=True)
class InputItem:
    """One image to segment."""

    name: str  # its output file name without .png: `paths.safe_name`d, unique in this run
    label: str  # how the user knows it: the file's name in the folder, or "sample 3 (case ID)" of an HDF5 split
    where: Path | int  # the file, or the row of the HDF5 file


def is_h5(source: Path) -> bool:
    return source.suffix in (".h5", ".hdf5")


def list_inputs(source: str | os.PathLike, split: str | None, follow_symlinks: bool = False,
                outcome: Outcome | None = None) -> list[InputItem]:
    """The images of an HDF5 split (named INDEX_CASE) or of a folder (named by file stem), with safe output names.

    In a folder, a symbolic link that resolves outside it is left out (logged, and in `outcome`) unless
    `follow_symlinks`.
    """
    source = Path(source)
    outcome = outcome if outcome is not None else Outcome("images")
    if is_h5(source):
        rows = split_indices(source, split)
        with open_h5(source) as f:
            cases = read_strings(f, "case_id")[rows]
        names = unique_names(f"{i:05d}_{safe_name(case)}" for i, case in enumerate(cases))
        return [InputItem(name, f"sample {i} (case {case!r})", int(row))
                for i, (name, case, row) in enumerate(zip(names, cases, rows, strict=True))]
    files = keep_inside(source, list(list_images(source).items()), follow_symlinks, outcome)
    if not files:
        raise nothing_found("images", source, outcome)
    names = unique_names(stem for stem, _ in files)
    return [InputItem(name, path.name, path) for name, (_, path) in zip(names, files, strict=True)]


def read_batches(source: str | os.PathLike, items: list[InputItem], outcome: Outcome,
                 batch: int = 64) -> Iterator[tuple[list[InputItem], np.ndarray]]:
    """(items, images): batches of HDF5 rows, or one image at a time from a folder (sizes may differ). An input
    that cannot be read is skipped (`outcome.skip`); a batch of HDF5 rows that fails is read again row by row."""
    source = Path(source)
    if not is_h5(source):
        for item in items:
            try:
                image = read_image(item.where, "RGB")
            except Exception as error:
                if not input_failure(error):
                    raise
                outcome.skip(item.label, error)
                continue
            yield [item], image[None]
        return
    with open_h5(source) as f:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            try:
                images = read_rows(f["images"], np.array([item.where for item in chunk]))
            except Exception as error:
                if not input_failure(error):
                    raise
                images = None
            if images is not None:
                yield chunk, images
                continue
            for item in chunk:  # find the rows that fail
                try:
                    image = read_rows(f["images"], np.array([item.where]))
                except Exception as error:
                    if not input_failure(error):
                        raise
                    outcome.skip(item.label, error)
                    continue
                yield [item], image


def predict_each(predictor: Predictor, items: list[InputItem], images: np.ndarray,
                 outcome: Outcome, first: bool = False) -> list[tuple[InputItem, np.ndarray, np.ndarray]]:
    """(item, image, mask) for a batch; when the batch fails, image by image, skipping the ones that fail.

    NaN or infinite outputs on the `first` batch refuse the model (exit 3) instead of skipping every input.
    """
    from lawder_core.models.inference import NonFiniteOutputs, non_finite_model

    try:
        return list(zip(items, images, predict_images(predictor, images), strict=True))
    except Exception as error:
        if first and isinstance(error, NonFiniteOutputs):
            raise non_finite_model(predictor.checkpoint, error) from error
        if not input_failure(error):
            raise
        if len(items) == 1:
            outcome.skip(items[0].label, error)
            return []
    done = []
    for item, image in zip(items, images, strict=True):
        done += predict_each(predictor, [item], image[None], outcome)
    return done


def predict_to_folder(predictor: Predictor | str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike,
                      split: str | None = "test", mode: str = "auto", force: bool = False,
                      window: tuple[float, float] | str | None = None, follow_symlinks: bool = False,
                      device: str = "auto") -> dict:
    """Write masks/NAME.png and overlays/NAME.png and OUT/predict_summary.json; returns the summary.

    Binary segmenters write 0 (background) / 255 (lesion); multi-class ones write the training data's label
    values (KiTS: 0 background, 1 kidney, 2 tumour, 3 cyst). NAME is the image's file stem, or INDEX_CASE for an
    HDF5 split, made safe (`paths.safe_name`: [A-Za-z0-9._-] only) and unique in the run.

    NIfTI input (a .nii/.nii.gz volume, a KiTS case folder, a folder of volumes) is segmented slice by slice
    into CASE_seg.nii.gz label volumes instead: see `volumes.py` (`window` overrides its CT window).

    The output rules (`output.py`): no symbolic link is written through (exit 3, even with `force`); an
    input folder's links that lead outside it are followed only with `follow_symlinks`; an input that cannot be
    read or segmented is skipped, and after the summary is written `SkippedInputs` (exit 3) reports it.

    `predictor` is a run folder (loaded on its fastest PyTorch path, `mode`, on `device`) or a Predictor, e.g.
    ONNX Runtime's.
    """
    out = Path(out)
    if not Path(source).exists():
        raise DataError(f"{source} does not exist.",
                        "Give a lawder HDF5 file, a folder of images, or CT volumes (.nii/.nii.gz).")
    volumes = is_volume_source(source)
    check_output(out, force, (OVERLAYS,) if volumes else (MASKS, OVERLAYS))
    if window is not None and not volumes:
        raise UsageError("--window applies to CT volumes (.nii/.nii.gz) only.")
    window = check_window(window)
    outcome = Outcome("images")
    items = None if volumes else list_inputs(source, split, follow_symlinks, outcome)
    if not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor, mode=mode, device=device)
    if volumes:
        return predict_volumes(predictor, source, out, window=window, follow_symlinks=follow_symlinks)
    refuse_links([out / SUMMARY] + [out / folder / f"{item.name}.png" for item in items
                                    for folder in (MASKS, OVERLAYS)])
    make_output(out, (MASKS, OVERLAYS))
    outcome.total = len(items)
    lesion_pixels = 0
    result: dict[str, Any] = {"out": str(out), "checkpoint": str(predictor.checkpoint),
                              "device": predictor.info.get("device", "cpu"), "mean_lesion_pixels": 0.0}
    import torch

    with summary_on_abort(out, outcome, result), torch.inference_mode():
        for number, (batch_items, images) in enumerate(read_batches(source, items, outcome)):
            for item, image, mask in predict_each(predictor, batch_items, images, outcome, first=number == 0):
                write_png(mask_png(mask, predictor.binary), out / MASKS / f"{item.name}.png")
                write_png(overlay(image, mask), out / OVERLAYS / f"{item.name}.png")
                lesion_pixels += int((mask > 0).sum())
                outcome.written += 1
            result["mean_lesion_pixels"] = lesion_pixels / max(outcome.written, 1)
    return finish(out, outcome, result)


def mask_png(mask: np.ndarray, binary: bool) -> np.ndarray:
    """What a mask PNG holds: 0/255 for a binary segmenter (visible in any viewer), label values otherwise."""
    return (mask > 0).astype(np.uint8) * 255 if binary else mask.astype(np.uint8)
