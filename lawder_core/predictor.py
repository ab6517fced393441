"""A trained segmenter loaded from its run folder, ready for images of any size: the one way `predict`,
`evaluate`, `tune` and `export` load a run to segment with."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lawder_core.data.labels import LabelMap, stored_labels
from lawder_core.models.configs import check_mode
from lawder_core.runs import segmenter_checkpoint

# torch and the models load inside the functions that use them: a wrong request is refused before they do
if TYPE_CHECKING:
    from lawder_core.models.inference import PredictFn


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
    from lawder_core.models.factory import load_segmenter, read_segmenter_config
    from lawder_core.models.fast import optimize_for_inference
    from lawder_core.models.inference import at_size, on_device

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
    from lawder_core.models.inference import predict_labels

    return stored_labels(predictor.label_map, predict_labels(predictor.predict_fn, images, batch_size=batch_size))
