"""`lawder evaluate`, and the pipeline's evaluate stage: one request in, one `summary.json` out.

A request names the metrics (FID/KID, Dice, mask adherence, profile), their inputs, the CI gates and how to
compute; `evaluate` checks it, computes, builds the summary (`metrics/summary.py`: nnU-Net's shape plus FID,
adherence, profile and the gates), writes it and returns it. The command line only parses, calls, prints and
turns missed gates into exit code 1; the pipeline calls the same function once per comparison.

Run folders are loaded on the fast inference path (`lawder_core.predict.load_predictor`) and wrapped to work
at the data's own size: images are resized to the training size for the network and the logits back to the
image size, so masks are always scored at the resolution they were stored at.

torch, the models and clean-fid are imported inside the functions that compute, so checking a request (and
reporting a usage error) costs a fraction of a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lawder_core import limits, numbers
from lawder_core.environment import pick_device
from lawder_core.errors import DataError, UsageError
from lawder_core.metrics.dice import EMPTY_POLICIES, DiceReport, EmptyPolicy
from lawder_core.metrics.summary import build_summary, gate_table, summary_path, to_jsonable, write_summary
from lawder_core.models.configs import CHECKPOINT_CONFIG, available_models, check_mode

if TYPE_CHECKING:
    import torch

    from lawder_core.metrics.fid import FidResult

FLOP_CONVENTION = (
    "FLOPs of convolutions, matrix multiplies and attention (FlopCounterMode, CPU attention formula registered); "
    "a multiply-accumulate is 2 FLOPs and MACs = FLOPs / 2; element-wise ops and normalisation are not counted"
)


# ---------------------------------------------------------------- the request


@dataclass(frozen=True)
class Metrics:
    """Which metrics to compute (the command's --fid, --kid, --dice, --adherence, --profile)."""

    fid: bool = False
    kid: bool = False
    dice: bool = False
    adherence: bool = False
    profile: bool = False

    def flags(self) -> list[str]:
        return [f"--{f.name}" for f in fields(self) if getattr(self, f.name)]


@dataclass(frozen=True)
class Inputs:
    """What the metrics read; each metric needs only its own (see `check_request`)."""

    real: str | None = None  # FID/KID: an HDF5 file or an image folder
    real_split: str | None = "train"  # of an HDF5 --real (ignored for a folder); never the test split by default
    synthetic: str | None = None  # FID/KID and adherence: `lawder sample` HDF5 (adherence) or a folder (FID/KID)
    synthetic_split: str | None = None
    fid_weights: str | None = None  # Inception TorchScript file; None: looked up (see metrics/fid.py)
    run: str | None = None  # Dice: a `train-order` run folder ...
    data: str | None = None  # ... scored on this HDF5 file's
    split: str = "test"  # ... split
    segmenter: str | None = None  # adherence: a segmenter run trained on real data
    model: str | None = None  # profile: a model name or a run folder ...
    size: int = 256  # ... at size×size


@dataclass(frozen=True)
class Gates:
    """CI thresholds; None: not checked. A missed gate is exit code 1 on the command line."""

    min_dice: float | None = None
    max_fid: float | None = None
    max_kid: float | None = None
    min_adherence: float | None = None

    def thresholds(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class EvaluateOptions:
    empty_policy: str = "one"  # a region empty in both masks: Dice 1 ("one") or left out ("nan")
    mode: str = "auto"  # segmenter inference path: auto, eager, channels_last, compile
    device: str = "auto"  # FID features, Dice, adherence; the profile's latency is always measured on the CPU
    batch_size: int = 32
    seed: int = 0  # KID's subsets
    repeats: int = 5  # profile: latency is the best of this many timed runs
    allow_download: bool | None = None  # FID weights; None: download unless LAWDER_OFFLINE/HF_HUB_OFFLINE is set
    progress: bool = False  # FID feature extraction progress bars (on a terminal)


@dataclass(frozen=True)
class EvaluateRequest:
    out: str  # summary.json to write, or a folder to write it into
    metrics: Metrics
    inputs: Inputs = field(default_factory=Inputs)
    gates: Gates = field(default_factory=Gates)
    options: EvaluateOptions = field(default_factory=EvaluateOptions)
    metadata: Mapping[str, Any] = field(default_factory=dict)  # merged into summary["metadata"] (command, stage)


# What a gate's threshold can mean: a Dice in [0, 1], an upper bound on a distance (finite, ≥ 0).
GATE_RANGES = {"min_dice": numbers.DICE_GATE, "max_fid": numbers.DISTANCE_GATE, "max_kid": numbers.DISTANCE_GATE,
               "min_adherence": numbers.DICE_GATE}
# Which metric each gate needs, so a gate on a metric nobody asked for fails before any work is done.
GATE_NEEDS = {"min_dice": "dice", "max_fid": "fid", "max_kid": "kid", "min_adherence": "adherence"}
# The inputs each metric needs, named as the command's options.
METRIC_NEEDS = {"fid": ("real", "synthetic"), "kid": ("real", "synthetic"), "dice": ("run", "data"),
                "adherence": ("segmenter", "synthetic"), "profile": ("model",)}
RECORDED_INPUTS = ("real", "synthetic", "run", "data", "segmenter", "model")  # in summary["metadata"]["inputs"]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_request(request: EvaluateRequest) -> None:
    """Every UsageError a request can cause, raised before anything is loaded or computed."""
    metrics, inputs, options = request.metrics, request.inputs, request.options
    if not metrics.flags():
        raise UsageError("Nothing to evaluate.",
                         "Ask for at least one of --fid, --kid, --dice, --adherence or --profile.")
    for metric, needs in METRIC_NEEDS.items():
        missing = [option(name) for name in needs if getattr(inputs, name) is None]
        if getattr(metrics, metric) and missing:
            label = "--fid/--kid" if metric in ("fid", "kid") else option(metric)
            raise UsageError(f"{label} needs {' and '.join(missing)}.", "See `lawder evaluate --help`.")
    for gate, threshold in request.gates.thresholds().items():
        metric = GATE_NEEDS[gate]
        if threshold is not None and not getattr(metrics, metric):
            raise UsageError(f"{option(gate)} {threshold:g} was given without {option(metric)}.",
                             f"Add {option(metric)} or drop {option(gate)}.")
    if options.empty_policy not in EMPTY_POLICIES:
        raise UsageError(f"unknown --empty-policy {options.empty_policy!r}.",
                         f"Choose one of: {', '.join(EMPTY_POLICIES)}.")
    numbers.check_fields(request.gates, GATE_RANGES)
    numbers.check_fields(options, {"batch_size": numbers.BATCH, "repeats": numbers.COUNT, "seed": numbers.SEED})
    if metrics.profile:
        numbers.check_number("--size", inputs.size, numbers.SEG_SIZE)
        check_model_ref(inputs.model)
    check_mode(options.mode)


def check_profile_size(size: int, batch: int = 1, repeats: int = 1) -> None:
    if size < 8 or batch < 1 or repeats < 1:
        raise UsageError(f"--size {size}, batch {batch} and repeats {repeats} must be at least 8, 1 and 1.")


def check_memory(request: EvaluateRequest) -> None:
    """The profile's size and the segmenters' batches against this machine's memory, before anything loads."""
    inputs, batch = request.inputs, request.options.batch_size
    if request.metrics.profile and inputs.model is not None:
        name, _ = recorded_model(inputs.model) if Path(inputs.model).is_dir() else (inputs.model, 0)
        limits.check_inference("evaluate --profile", name, inputs.size, copies=2)  # the model and its fast path
    for flag, run in (("--dice", inputs.run), ("--adherence", inputs.segmenter)):
        if run is not None and getattr(request.metrics, flag[2:]) and Path(run).is_dir():
            name, size = recorded_model(run)
            if size:  # images go through the network at the run's training size
                limits.check_inference_batch(f"evaluate {flag}", name, size, batch)


def recorded_model(run: str | os.PathLike) -> tuple[str, int]:
    """The model name and training size a run's checkpoint records (its config.json; no weights loaded);
    ("", 0) when unreadable, which the loader then reports."""
    from lawder_core.predict import checkpoint_folder

    try:
        config = json.loads((checkpoint_folder(run) / CHECKPOINT_CONFIG).read_text())
        size = ((config.get("extra") or {}).get("train_config") or {}).get("size") or 0
        return str(config.get("name", "")), int(size)
    except (DataError, OSError, ValueError, TypeError, AttributeError):
        return "", 0


def check_model_ref(model: str) -> None:
    """Fail early on a --model that is neither an existing folder nor a known model name."""
    path = Path(model)
    if path.is_dir():
        return
    if os.sep in model or path.suffix:
        raise DataError(f"{model} does not exist.", "Give a run folder of `lawder train-order` or a model name.")
    if model not in available_models():
        raise UsageError(f"{model!r} is neither a model name nor a run folder.",
                         f"Known models: {', '.join(available_models())}.")


# ---------------------------------------------------------------- the one entry point


def evaluate(request: EvaluateRequest, *, real_features: dict[tuple[str, str | None], FidResult] | None = None
             ) -> dict[str, Any]:
    """Check, compute, gate and write `summary.json`; returns the summary (its `gates` rows say what was missed).

    `real_features`, a dict the caller keeps across calls, holds the real side's FID features: one real set
    compared with several synthetic ones (the pipeline's uniform and LAW sets) is read and embedded once.
    """
    check_request(request)
    check_memory(request)
    metrics, inputs, options = request.metrics, request.inputs, request.options
    device = str(pick_device(options.device))
    parts: dict[str, Any] = {}
    metadata: dict[str, Any] = {
        "command": "evaluate", "metrics": metrics.flags(),
        "inputs": {name: str(getattr(inputs, name)) for name in RECORDED_INPUTS if getattr(inputs, name) is not None},
        "device": device, "seed": options.seed, **dict(request.metadata)}
    if metrics.fid or metrics.kid:
        parts["fid"] = fid_kid(inputs, metrics, options, device, real_features)
    seg_options = {"mode": options.mode, "device": device, "batch_size": options.batch_size,
                   "empty_policy": options.empty_policy}
    if metrics.dice:
        assert inputs.run is not None and inputs.data is not None  # check_request
        parts["dice"], metadata["segmenter"] = dice_for_run(inputs.run, inputs.data, inputs.split, **seg_options)
        metadata["inputs"]["split"] = inputs.split
    if metrics.adherence:
        assert inputs.segmenter is not None and inputs.synthetic is not None
        parts["adherence"] = adherence_for_run(inputs.segmenter, inputs.synthetic, inputs.synthetic_split,
                                               **seg_options)
    if metrics.profile:
        assert inputs.model is not None
        parts["profile"] = profile_model(inputs.model, inputs.size, repeats=options.repeats, mode=options.mode)
    summary = build_summary(**parts, reference=f"{inputs.data}:{inputs.split}", prediction=str(inputs.run),
                            metadata=metadata)
    summary["gates"] = to_jsonable(gate_table(summary, **request.gates.thresholds()))
    summary["metadata"]["summary_file"] = str(summary_path(request.out))
    write_summary(summary, request.out)
    return summary


def missed_gates(summary: Mapping[str, Any]) -> list[str]:
    """The message of every gate the summary missed (empty: every gate held, or none was set)."""
    return [row["message"] for row in summary.get("gates", []) if not row["passed"]]


# ---------------------------------------------------------------- the metrics


def fid_kid(inputs: Inputs, metrics: Metrics, options: EvaluateOptions, device: str,
            real_features: dict[tuple[str, str | None], FidResult] | None) -> FidResult:
    from lawder_core.metrics.fid import compute_fid_kid

    assert inputs.real is not None and inputs.synthetic is not None  # check_request
    real_split = None if Path(inputs.real).is_dir() else inputs.real_split
    key = (str(Path(inputs.real).resolve()), real_split)
    earlier = real_features.get(key) if real_features is not None else None
    result = compute_fid_kid(inputs.real, inputs.synthetic, real_split=real_split,
                             synthetic_split=inputs.synthetic_split, fid=metrics.fid, kid=metrics.kid,
                             weights=inputs.fid_weights, device=device, batch_size=options.batch_size,
                             seed=options.seed, allow_download=options.allow_download, progress=options.progress,
                             keep_features=real_features is not None, log_warnings=False, reuse_real=earlier)
    if real_features is not None and earlier is None:
        real_features[key] = result
    return result


def dice_for_run(run: str | os.PathLike, data: str | os.PathLike, split: str | None = "test", *,
                 mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                 empty_policy: EmptyPolicy = "one") -> tuple[DiceReport, dict[str, Any]]:
    """Dice/IoU of a run's best checkpoint on one split of an HDF5 file, and the run's description."""
    from lawder_core.metrics.seg_eval import segmenter_dice
    from lawder_core.predict import load_predictor

    segmenter = load_predictor(run, mode, device)
    report = segmenter_dice(segmenter.predict_fn, data, split, num_classes=segmenter.num_classes,
                            label_map=segmenter.label_map,
                            batch_size=batch_size, empty_policy=empty_policy, device=device)
    return report, segmenter.info


def adherence_for_run(segmenter_run: str | os.PathLike, synthetic: str | os.PathLike, split: str | None = None, *,
                      mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                      empty_policy: EmptyPolicy = "one") -> dict[str, Any]:
    """Mask adherence of a synthetic HDF5 file, judged by a segmenter run trained on real data."""
    from lawder_core.metrics.adherence import adherence_on_h5
    from lawder_core.predict import load_predictor

    segmenter = load_predictor(segmenter_run, mode, device)
    result = adherence_on_h5(segmenter.predict_fn, synthetic, split, batch_size=batch_size,
                             empty_policy=empty_policy, device=device, classes=segmenter.label_map,
                             num_classes=segmenter.num_classes)
    result["segmenter"] = segmenter.info
    return result


def model_for_profile(model: str) -> tuple[torch.nn.Module, str]:
    """A run/checkpoint folder is loaded with its weights; a model name is built fresh (weights do not matter)."""
    from lawder_core.models.factory import build_segmenter, load_segmenter
    from lawder_core.predict import checkpoint_folder

    check_model_ref(model)
    if Path(model).is_dir():
        return load_segmenter(checkpoint_folder(model)), model
    return build_segmenter(model), "name"


def profile_model(model: str, size: int = 256, *, batch: int = 1, repeats: int = 5,
                  mode: str = "auto") -> dict[str, Any]:
    """Parameters, FLOPs and MACs of one forward pass at size×size, and CPU latency on the fast inference path."""
    import torch

    from lawder_core.metrics.profile import count_flops, count_params, measure_latency
    from lawder_core.models.factory import segmenter_spec
    from lawder_core.models.fast import optimize_for_inference

    check_mode(mode)
    check_profile_size(size, batch, repeats)
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
