"""Run a segmenter over uint8 images in batches and turn its logits into integer label masks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from lawder_core.errors import DataError

PredictFn = Callable[[torch.Tensor], torch.Tensor]


class NonFiniteOutputs(DataError):
    """The segmenter's logits hold NaN or infinity (its masks would be empty or arbitrary, without a word)."""


def finite_logits(logits: torch.Tensor) -> torch.Tensor:
    """`logits`, refused when any value is NaN or infinite: sigmoid and argmax would turn them into plausible-looking
    empty masks."""
    if isinstance(logits, torch.Tensor) and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise NonFiniteOutputs(f"the segmenter's outputs hold {bad} NaN or infinite value(s) of {logits.numel()}")
    return logits


def non_finite_model(checkpoint: object, error: NonFiniteOutputs) -> DataError:
    """What `predict` says when the first images already give non-finite outputs: the model, not an input."""
    return DataError(f"the model {checkpoint} gives NaN or infinite outputs on the first images ({error.message}): "
                     "its weights are damaged, or its training diverged.",
                     "Use another checkpoint of the run (e.g. its last/), or train it again.")


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N,H,W[,C]) uint8 -> (N,3,H,W) float in [0,1], grey repeated to RGB as the segmenters expect."""
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(f"images have shape {images.shape} {images.dtype}; expected (N,H,W[,C]) uint8.")
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x[:, :3]


def logits_to_labels(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """B×1 logits -> sigmoid > threshold; B×C logits -> argmax. Resized to `size` first if they differ."""
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        raise DataError(f"the segmenter returned {type(logits).__name__} "
                        f"{tuple(getattr(logits, 'shape', ()))}; expected logits B×C×H×W.")
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits[:, 0]) > threshold).to(torch.uint8)
    return logits.argmax(dim=1).to(torch.uint8)


def on_device(predict_fn: PredictFn, device: torch.device) -> PredictFn:
    """A predict_fn for a model on `device` that takes batches from anywhere (the callers build them on the CPU)."""
    if device.type == "cpu":
        return predict_fn

    def predict(batch: torch.Tensor) -> torch.Tensor:
        return predict_fn(batch.to(device, non_blocking=True))

    return predict


def at_size(predict_fn: PredictFn, size: int | None) -> PredictFn:
    """A predict_fn for images of any size, for a network trained at `size`×`size`.

    Batches are resized (bilinear, antialiased) to the training size on the way in; the logits come back at
    that size and `logits_to_labels` resizes them to the image size before thresholding, so labels are
    decided on interpolated logits rather than by nearest-neighbour upsampling of coarse labels.
    """
    if size is None:
        return predict_fn

    def predict(batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[-2:]) == (size, size):
            return predict_fn(batch)
        resized = F.interpolate(batch, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return predict_fn(resized)

    return predict


@torch.inference_mode()
def predict_labels(predict_fn: PredictFn, images: np.ndarray, *, batch_size: int = 16, threshold: float = 0.5,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """(N,H,W) uint8 label masks predicted for (N,H,W[,C]) uint8 images."""
    device = torch.device(device)
    out = np.empty(images.shape[:3], np.uint8)
    for start in range(0, len(images), batch_size):
        batch = images_to_tensor(images[start:start + batch_size]).to(device)
        labels = logits_to_labels(finite_logits(predict_fn(batch)), size=images.shape[1:3], threshold=threshold)
        out[start:start + len(batch)] = labels.cpu().numpy()
    return out
