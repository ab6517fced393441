"""Segment new images with a trained run: load the checkpoint on its fastest path, predict, write PNGs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lawder_core.data.h5 import open_h5, read_rows, read_strings, split_indices
from lawder_core.data.images import list_images, read_image
from lawder_core.data.labels import LabelMap, stored_labels
from lawder_core.errors import DataError, UsageError
from lawder_core.models.configs import check_mode
from lawder_core.paths import safe_name, unique_names
from lawder_core.predict_output import (
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
from lawder_core.predict_volume import OVERLAYS, check_window, is_volume_source, predict_volumes
from lawder_core.runs import segmenter_checkpoint
from lawder_core.viz import overlay

# torch and the models load inside the functions that use them: a wrong request is refused before they do
if TYPE_CHECKING:
    from lawder_core.metrics.predict import PredictFn

MASKS = "masks"


@dataclass(frozen=True)
class Predictor:
    """A trained segmenter ready for images of any size: the one way every command loads a run to predict.

    `predict_fn` takes float B×C×H×W batches in [0, 1] at any size (resized to the training size on the way
    in, logits at that size out); `at_training_size` is the bare network on its fastest path.
    """

    predict_fn: PredictFn
    at_training_size: PredictFn
    size: int | None  # the training size, when the run recorded one
    num_classes: int
    checkpoint: Path
    info: dict[str, Any]
    label_map: LabelMap | None = None  # None: a binary run saved before label maps existed

    @property
    def binary(self) -> bool:
        return self.num_classes == 1


def checkpoint_folder(run: str | os.PathLike) -> Path:
    """The checkpoint a run folder selects (best/ unless it was trained with --select last), or a checkpoint
    folder given directly."""
    return segmenter_checkpoint(run)


def load_predictor(run: str | os.PathLike, mode: str = "auto", device: str = "auto") -> Predictor:
    """The run's selected checkpoint on `device` ('auto': the first GPU when there is one); its predict
    functions take batches on any device and move them to the model's."""
    check_mode(mode)
    folder = checkpoint_folder(run)
    from lawder_core.environment import pick_device
    from lawder_core.metrics.predict import at_size, on_device
    from lawder_core.models.factory import load_segmenter, read_segmenter_config
    from lawder_core.models.fast import optimize_for_inference

    dev = pick_device(device)
    model = load_segmenter(folder, map_location=dev)
    config = read_segmenter_config(folder)
    train_cfg = (config.get("extra") or {}).get("train_config") or {}
    network = optimize_for_inference(model, mode=mode)
    fast = on_device(network, dev)
    size = train_cfg.get("size")
    labels = read_label_map(config.get("extra") or {})
    info = {"run": str(run), "checkpoint": str(folder), "model": config["name"],
            "num_classes": int(config["num_classes"]), "train_size": size,
            "inference_mode": getattr(network, "mode", mode), "device": str(dev), "train_config": train_cfg or None,
            "label_map": labels.to_dict() if labels else None}
    return Predictor(predict_fn=at_size(fast, size), at_training_size=fast, size=size,
                     num_classes=int(config["num_classes"]), checkpoint=folder, info=info, label_map=labels)


def read_label_map(extra: dict[str, Any]) -> LabelMap | None:
    """The label map a checkpoint (or an ONNX file's metadata) recorded, if any."""
    recorded = extra.get("label_map")
    return LabelMap.from_dict(recorded) if recorded else None


def predict_images(predictor: Predictor, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Label masks at the images' own size (decided on logits interpolated back to that size), in the training
    data's label values."""
    from lawder_core.metrics.predict import predict_labels

    return stored_labels(predictor.label_map, predict_labels(predictor.predict_fn, images, batch_size=batch_size))


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
    from lawder_core.metrics.predict import NonFiniteOutputs, non_finite_model

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
    into CASE_seg.nii.gz label volumes instead: see `predict_volume.py` (`window` overrides its CT window).

    The output rules (`predict_output.py`): no symbolic link is written through (exit 3, even with `force`); an
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
