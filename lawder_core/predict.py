"""Segment new images with a trained run: load the checkpoint on its fastest path, predict, write PNGs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from lawder_core.data.h5 import load_arrays
from lawder_core.data.images import list_images, read_image
from lawder_core.data.labels import LabelMap
from lawder_core.errors import DataError, UsageError
from lawder_core.models.configs import CHECKPOINT_CONFIG, check_mode
from lawder_core.predict_volume import check_window, is_volume_source, predict_volumes
from lawder_core.viz import overlay

# torch and the models load inside the functions that use them: a wrong request is refused before they do
if TYPE_CHECKING:
    from lawder_core.metrics.predict import PredictFn


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
    label_map: LabelMap | None = None  # None: a binary run from before label maps (issue 15)

    @property
    def binary(self) -> bool:
        return self.num_classes == 1


def checkpoint_folder(run: str | os.PathLike) -> Path:
    """A run folder's best/ checkpoint, or a checkpoint folder given directly."""
    run = Path(run)
    for candidate in (run / "best", run):
        if (candidate / CHECKPOINT_CONFIG).exists():
            return candidate
    raise DataError(f"{run} holds no segmenter checkpoint (expected {run}/best/{CHECKPOINT_CONFIG}).",
                    "Pass the --out folder of `lawder train-order`.")


def load_predictor(run: str | os.PathLike, mode: str = "auto", device: str = "cpu") -> Predictor:
    check_mode(mode)
    folder = checkpoint_folder(run)
    from lawder_core.metrics.predict import at_size
    from lawder_core.models.factory import load_segmenter, read_segmenter_config
    from lawder_core.models.fast import optimize_for_inference

    model = load_segmenter(folder, map_location=device)
    config = read_segmenter_config(folder)
    train_cfg = (config.get("extra") or {}).get("train_config") or {}
    fast = optimize_for_inference(model, mode=mode)
    size = train_cfg.get("size")
    labels = read_label_map(config.get("extra") or {})
    info = {"run": str(run), "checkpoint": str(folder), "model": config["name"],
            "num_classes": int(config["num_classes"]), "train_size": size,
            "inference_mode": getattr(fast, "mode", mode), "train_config": train_cfg or None,
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

    classes = predict_labels(predictor.predict_fn, images, batch_size=batch_size)
    labels = predictor.label_map
    return classes if labels is None or labels.is_identity() else labels.label_lookup()[classes]


def input_batches(source: str | os.PathLike, split: str | None,
                  batch: int = 64) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, images) from an HDF5 split, or one image at a time from a folder (sizes may differ)."""
    source = Path(source)
    if source.suffix in (".h5", ".hdf5"):
        images, _, cases = load_arrays(source, split)
        for start in range(0, len(images), batch):
            names = [f"{i:05d}_{cases[i]}" for i in range(start, min(start + batch, len(images)))]
            yield names, images[start:start + batch]
        return
    files = list_images(source)
    if not files:
        raise DataError(f"no images in {source}.")
    for stem, path in files.items():
        yield [stem], read_image(path, "RGB")[None]


def predict_to_folder(predictor: Predictor | str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike,
                      split: str | None = "test", mode: str = "auto", force: bool = False,
                      window: tuple[float, float] | str | None = None) -> dict:
    """Write masks/NAME.png and overlays/NAME.png; returns counts.

    Binary segmenters write 0 (background) / 255 (lesion); multi-class ones write the training data's label
    values (KiTS: 0 background, 1 kidney, 2 tumour, 3 cyst).

    NIfTI input (a .nii/.nii.gz volume, a KiTS case folder, a folder of volumes) is segmented slice by slice
    into CASE_seg.nii.gz label volumes instead: see `predict_volume.py` (`window` overrides its CT window).

    `predictor` is a run folder (loaded on its fastest PyTorch path, `mode`) or a Predictor, e.g. ONNX Runtime's.
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out} is not empty.", "Choose another -o folder, or pass --force to write into it.")
    if not Path(source).exists():
        raise DataError(f"{source} does not exist.",
                        "Give a lawder HDF5 file, a folder of images, or CT volumes (.nii/.nii.gz).")
    volumes = is_volume_source(source)
    if window is not None and not volumes:
        raise UsageError("--window applies to CT volumes (.nii/.nii.gz) only.")
    window = check_window(window)
    if not isinstance(predictor, Predictor):
        predictor = load_predictor(predictor, mode=mode)
    if volumes:
        return predict_volumes(predictor, source, out, window=window)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    count, lesion_pixels = 0, 0
    import torch

    with torch.inference_mode():
        for names, images in input_batches(source, split):
            masks = predict_images(predictor, images)
            for name, image, mask in zip(names, images, masks, strict=True):
                Image.fromarray(mask_png(mask, predictor.binary)).save(out / "masks" / f"{name}.png")
                Image.fromarray(overlay(image, mask)).save(out / "overlays" / f"{name}.png")
                lesion_pixels += int((mask > 0).sum())
            count += len(names)
    return {"images": count, "out": str(out), "checkpoint": str(predictor.checkpoint),
            "mean_lesion_pixels": lesion_pixels / max(count, 1)}


def mask_png(mask: np.ndarray, binary: bool) -> np.ndarray:
    """What a mask PNG holds: 0/255 for a binary segmenter (visible in any viewer), label values otherwise."""
    return (mask > 0).astype(np.uint8) * 255 if binary else mask.astype(np.uint8)
