"""What `lawder evaluate` computes from run folders: segmenter Dice, mask adherence and a model's cost profile.

Run folders are loaded on the fast inference path (`lawder_core.inference.load_predictor`) and wrapped to work
at the data's own size: images are resized to the training size for the network and the logits back to the
image size, so masks are always scored at the resolution they were stored at.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lawder_core.errors import DataError, EnvironmentProblem, UsageError
from lawder_core.inference import checkpoint_folder, load_predictor
from lawder_core.metrics.adherence import adherence_on_h5
from lawder_core.metrics.dice import DiceReport, EmptyPolicy
from lawder_core.metrics.predict import PredictFn, at_size
from lawder_core.metrics.profile import count_flops, count_params, measure_latency
from lawder_core.metrics.seg_eval import segmenter_dice
from lawder_core.models.factory import (
    available_models,
    build_segmenter,
    load_segmenter,
    read_segmenter_config,
    segmenter_spec,
)
from lawder_core.models.fast import MODES, optimize_for_inference

FLOP_CONVENTION = (
    "FLOPs of convolutions, matrix multiplies and attention (FlopCounterMode, CPU attention formula registered); "
    "a multiply-accumulate is 2 FLOPs and MACs = FLOPs / 2; element-wise ops and normalisation are not counted"
)


@dataclass(frozen=True)
class LoadedSegmenter:
    """A trained run ready to predict at any image size, and what identifies it in a summary."""

    predict_fn: PredictFn
    num_classes: int
    info: dict[str, Any]


def resolve_device(device: str) -> str:
    """'auto' is the first GPU when there is one; an unavailable 'cuda' is an error, not a silent CPU run."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {device} was asked for but PyTorch sees no GPU.",
                                 "Use --device cpu (or auto), or install a CUDA build of PyTorch.")
    return device


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UsageError(f"unknown inference mode {mode!r}.", f"Choose one of: {', '.join(MODES)}.")


def load_run_segmenter(run: str | os.PathLike, mode: str = "auto", device: str = "cpu") -> LoadedSegmenter:
    """A `train-order` run folder (or a checkpoint folder) as a predict_fn at the data's size."""
    check_mode(mode)
    predictor = load_predictor(run, mode=mode, device=device)
    config = read_segmenter_config(predictor.checkpoint)
    extra = config.get("extra") or {}
    info = {
        "run": str(run),
        "checkpoint": str(predictor.checkpoint),
        "model": config["name"],
        "num_classes": int(config["num_classes"]),
        "train_size": predictor.size,
        "inference_mode": getattr(predictor.predict_fn, "mode", mode),
        "train_config": extra.get("train_config"),
    }
    return LoadedSegmenter(at_size(predictor.predict_fn, predictor.size), int(config["num_classes"]), info)


def dice_for_run(run: str | os.PathLike, data: str | os.PathLike, split: str | None = "test", *,
                 mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                 empty_policy: EmptyPolicy = "one") -> tuple[DiceReport, dict[str, Any]]:
    """Dice/IoU of a run's best checkpoint on one split of an HDF5 file, and the run's description."""
    segmenter = load_run_segmenter(run, mode, device)
    report = segmenter_dice(segmenter.predict_fn, data, split, num_classes=segmenter.num_classes,
                            batch_size=batch_size, empty_policy=empty_policy, device=device)
    return report, segmenter.info


def adherence_for_run(segmenter_run: str | os.PathLike, synthetic: str | os.PathLike, split: str | None = None, *,
                      mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                      empty_policy: EmptyPolicy = "one") -> dict[str, Any]:
    """Mask adherence of a synthetic HDF5 file, judged by a segmenter run trained on real data."""
    segmenter = load_run_segmenter(segmenter_run, mode, device)
    result = adherence_on_h5(segmenter.predict_fn, synthetic, split, batch_size=batch_size,
                             empty_policy=empty_policy, device=device)
    result["segmenter"] = segmenter.info
    return result


def check_model_ref(model: str) -> None:
    """Fail early on a --model that is neither an existing folder nor a known model name."""
    path = Path(model)
    if path.is_dir() or model in available_models():
        return
    if os.sep in model or path.suffix:
        raise DataError(f"{model} does not exist.", "Give a run folder of `lawder train-order` or a model name.")
    raise UsageError(f"{model!r} is neither a model name nor a run folder.",
                     f"Known models: {', '.join(available_models())}.")


def model_for_profile(model: str) -> tuple[torch.nn.Module, str]:
    """A run/checkpoint folder is loaded with its weights; a model name is built fresh (weights do not matter)."""
    check_model_ref(model)
    if Path(model).is_dir():
        return load_segmenter(checkpoint_folder(model)), model
    return build_segmenter(model), "name"


def profile_model(model: str, size: int = 256, *, batch: int = 1, repeats: int = 5,
                  mode: str = "auto") -> dict[str, Any]:
    """Parameters, FLOPs and MACs of one forward pass at size×size, and CPU latency on the fast inference path."""
    check_mode(mode)
    if size < 8 or batch < 1 or repeats < 1:
        raise UsageError(f"--size {size}, batch {batch} and repeats {repeats} must be at least 8, 1 and 1.")
    net, source = model_for_profile(model)
    net = net.eval()
    spec = segmenter_spec(net)
    cost = count_flops(net, size, spec["in_channels"])
    fast = optimize_for_inference(net, mode=mode)
    timing = measure_latency(fast, size=size, batch=batch, repeats=repeats, in_channels=spec["in_channels"],
                             device="cpu")
    return {
        "model": spec["name"],
        "source": source,
        "num_classes": spec["num_classes"],
        "size": [size, size],
        "params": count_params(net),
        "flops": cost["flops"],
        "macs": cost["macs"],
        "gflops": cost["flops"] / 1e9,
        "gmacs": cost["macs"] / 1e9,
        "counting": FLOP_CONVENTION,
        "latency": {
            "device": "cpu",
            "threads": torch.get_num_threads(),
            "inference_mode": getattr(fast, "mode", mode),
            "batch": batch,
            "repeats": repeats,
            "ms_per_image": timing["ms_per_batch"] / batch,
            "ms_per_batch": timing["ms_per_batch"],
            "ms_per_batch_median": timing["ms_per_batch_median"],
            "img_per_s": timing["img_per_s"],
            "statistic": "best of the repeats (other processes only ever add time)",
        },
    }
