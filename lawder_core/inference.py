"""Segment new images with a trained run: load the checkpoint on its fastest path, predict, write PNGs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lawder_core.data.h5 import load_arrays
from lawder_core.data.prepare_folder import list_images, read_image
from lawder_core.errors import DataError
from lawder_core.metrics.predict import PredictFn, predict_labels
from lawder_core.models.factory import CONFIG_FILE, load_segmenter, read_segmenter_config
from lawder_core.models.fast import optimize_for_inference

OVERLAY_COLOUR = np.array([0, 255, 0], np.float32)


@dataclass(frozen=True)
class Predictor:
    predict_fn: PredictFn
    size: int | None  # the training size, when the run recorded one
    checkpoint: Path


def checkpoint_folder(run: str | os.PathLike) -> Path:
    """A run folder's best/ checkpoint, or a checkpoint folder given directly."""
    run = Path(run)
    for candidate in (run / "best", run):
        if (candidate / CONFIG_FILE).exists():
            return candidate
    raise DataError(f"{run} holds no segmenter checkpoint (expected {run}/best/{CONFIG_FILE}).",
                    "Pass the --out folder of `lawder train-order`.")


def load_predictor(run: str | os.PathLike, mode: str = "auto", device: str = "cpu") -> Predictor:
    folder = checkpoint_folder(run)
    model = load_segmenter(folder, map_location=device)
    train_cfg = (read_segmenter_config(folder).get("extra") or {}).get("train_config") or {}
    fast = optimize_for_inference(model, mode=mode)
    return Predictor(predict_fn=fast, size=train_cfg.get("size"), checkpoint=folder)


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im.squeeze()).resize((size, size), Image.BILINEAR)).reshape(
        size, size, -1) for im in images])


def predict_images(predictor: Predictor, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Label masks at the images' own size; images are resized to the training size for the network."""
    h, w = images.shape[1:3]
    net_input = images if predictor.size in (None, h) and h == w else resize_images(images, predictor.size or h)
    labels = predict_labels(predictor.predict_fn, net_input, batch_size=batch_size)
    if labels.shape[1:] == (h, w):
        return labels
    return np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST)) for m in labels])


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


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    rgb = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image[..., :3]
    out = rgb.astype(np.float32)
    out[mask > 0] = (1 - alpha) * out[mask > 0] + alpha * OVERLAY_COLOUR
    return out.round().astype(np.uint8)


def predict_to_folder(run: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike,
                      split: str | None = "test", mode: str = "auto", force: bool = False) -> dict:
    """Write masks/NAME.png (0 background, 255 lesion) and overlays/NAME.png; returns counts."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise DataError(f"{out} is not empty.", "Choose another -o folder, or pass --force to write into it.")
    predictor = load_predictor(run, mode=mode)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(exist_ok=True)
    count, lesion_pixels = 0, 0
    with torch.inference_mode():
        for names, images in input_batches(source, split):
            masks = predict_images(predictor, images)
            for name, image, mask in zip(names, images, masks, strict=True):
                Image.fromarray((mask > 0).astype(np.uint8) * 255).save(out / "masks" / f"{name}.png")
                Image.fromarray(overlay(image, mask)).save(out / "overlays" / f"{name}.png")
                lesion_pixels += int((mask > 0).sum())
            count += len(names)
    return {"images": count, "out": str(out), "checkpoint": str(predictor.checkpoint),
            "mean_lesion_pixels": lesion_pixels / max(count, 1)}
