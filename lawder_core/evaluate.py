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
from lawder_core.metrics.summary import build_summary, gate_table, summary_path, to_jsonable, write_metric_summary
from lawder_core.models.configs import CHECKPOINT_CONFIG, available_models, check_mode

if TYPE_CHECKING:
    import torch

    from lawder_core.metrics.fid import FidResult, LesionKidResult

FLOP_CONVENTION = (
    "FLOPs of convolutions, matrix multiplies and attention (FlopCounterMode, CPU attention formula registered); "
    "a multiply-accumulate is 2 FLOPs and MACs = FLOPs / 2; element-wise ops and normalisation are not counted"
)


# ---------------------------------------------------------------- the request


@dataclass(frozen=True)
class Metrics:
    """Which metrics to compute (the command's --fid, --kid, --lesion-kid, --dice, --adherence, --profile)."""

    fid: bool = False
    kid: bool = False
    dice: bool = False
    adherence: bool = False
    profile: bool = False
    lesion_kid: bool = False

    def flags(self) -> list[str]:
        return [option(f.name) for f in fields(self) if getattr(self, f.name)]


@dataclass(frozen=True)
class Inputs:
    """What the metrics read; each metric needs only its own (see `check_request`)."""

    real: str | None = None  # FID/KID: an HDF5 file or an image folder; lesion KID, judge-free adherence: HDF5
    real_split: str | None = "train"  # of an HDF5 --real (ignored for a folder); never the test split by default
    synthetic: str | None = None  # FID/KID and adherence: `lawder sample` HDF5 (adherence) or a folder (FID/KID)
    synthetic_split: str | None = None
    fid_weights: str | None = None  # Inception TorchScript file; None: looked up (see metrics/fid.py)
    run: str | None = None  # Dice: a `train-order` run folder ...
    data: str | None = None  # ... scored on this HDF5 file's
    split: str | None = None  # ... split; None: the run's held-out fold for a --folds run, else "test"
    segmenter: str | None = None  # adherence: a segmenter run trained on real data (the judge; --real: judge-free)
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
                "adherence": ("synthetic",), "profile": ("model",), "lesion_kid": ("real", "synthetic")}
RECORDED_INPUTS = ("real", "synthetic", "run", "data", "segmenter", "model")  # in summary["metadata"]["inputs"]


def option(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_request(request: EvaluateRequest) -> None:
    """Every UsageError a request can cause, raised before anything is loaded or computed."""
    metrics, inputs, options = request.metrics, request.inputs, request.options
    if not metrics.flags():
        raise UsageError("Nothing to evaluate.",
                         "Ask for at least one of --fid, --kid, --lesion-kid, --dice, --adherence or --profile.")
    for metric, needs in METRIC_NEEDS.items():
        missing = [option(name) for name in needs if getattr(inputs, name) is None]
        if getattr(metrics, metric) and missing:
            label = "--fid/--kid" if metric in ("fid", "kid") else option(metric)
            raise UsageError(f"{label} needs {' and '.join(missing)}.", "See `lawder evaluate --help`.")
    check_adherence_inputs(metrics, inputs, request.gates)
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


def real_is_h5(inputs: Inputs) -> bool:
    return inputs.real is not None and not Path(inputs.real).is_dir()


def check_adherence_inputs(metrics: Metrics, inputs: Inputs, gates: Gates) -> None:
    """Adherence is judged by --segmenter, judge-free against --real pairs (HDF5), or both; the lesion-crop KID
    needs the masks of both sides."""
    if metrics.adherence and inputs.segmenter is None and inputs.real is None:
        raise UsageError("--adherence needs --segmenter (a judge trained on real data), --real (real pairs of an "
                         "HDF5 file, for the judge-free scores), or both.", "See `lawder evaluate --help`.")
    if metrics.adherence and inputs.segmenter is None and not real_is_h5(inputs):
        raise UsageError(f"judge-free adherence needs the real pairs' masks: --real {inputs.real} is a folder.",
                         "Pass a lawder HDF5 file as --real, or a --segmenter to judge with.")
    if metrics.lesion_kid and inputs.real is not None and not real_is_h5(inputs):
        raise UsageError(f"--lesion-kid needs the real pairs' masks: --real {inputs.real} is a folder.",
                         "Pass a lawder HDF5 file as --real.")
    if gates.min_adherence is not None and inputs.segmenter is None:
        raise UsageError("--min-adherence gates the judge's Dice: it needs --segmenter.",
                         "Add --segmenter RUN, or drop --min-adherence.")


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
    from lawder_core.predictor import checkpoint_folder

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


def evaluate(request: EvaluateRequest, *, real_features: dict[tuple, Any] | None = None) -> dict[str, Any]:
    """Check, compute, gate and write `summary.json`; returns the summary (its `gates` rows say what was missed).

    `real_features`, a dict the caller keeps across calls, holds what is computed from the real side (FID
    features, lesion-crop features, the judge-free reference): one real set compared with several synthetic
    ones (the pipeline's uniform and LAW sets, a benchmark's arms) is read and embedded once.
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
    split = inputs.split
    if metrics.dice:
        assert inputs.run is not None and inputs.data is not None  # check_request
        split = dice_split(inputs.run, inputs.split)
        parts["dice"], metadata["segmenter"] = dice_for_run(inputs.run, inputs.data, split, **seg_options)
        metadata["inputs"]["split"] = split
    if metrics.adherence:
        parts["adherence"] = adherence(inputs, seg_options, real_features)
    if metrics.profile:
        assert inputs.model is not None
        parts["profile"] = profile_model(inputs.model, inputs.size, repeats=options.repeats, mode=options.mode)
    summary = build_summary(**parts, reference=f"{inputs.data}:{split}", prediction=str(inputs.run),
                            metadata=metadata)
    if metrics.lesion_kid:
        summary["lesion_kid"] = lesion_kid(inputs, options, device, real_features).to_dict()
    summary["gates"] = to_jsonable(gate_table(summary, **request.gates.thresholds()))
    summary["metadata"]["summary_file"] = str(summary_path(request.out))
    write_metric_summary(summary, request.out)
    return summary


def missed_gates(summary: Mapping[str, Any]) -> list[str]:
    """The message of every gate the summary missed (empty: every gate held, or none was set)."""
    return [row["message"] for row in summary.get("gates", []) if not row["passed"]]


# ---------------------------------------------------------------- the metrics


def fid_kid(inputs: Inputs, metrics: Metrics, options: EvaluateOptions, device: str,
            real_features: dict[tuple, Any] | None) -> FidResult:
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


FOLD_SPLIT = "fold"  # --split fold: the cases a cross-validation run held out


def dice_split(run: str | os.PathLike, split: str | None) -> str:
    """The split to score a run on: as asked, else its held-out fold for a --folds run, else the test split."""
    folds = run_folds(run)
    if split is None:
        return FOLD_SPLIT if folds else "test"
    if split == FOLD_SPLIT and not folds:
        raise UsageError(f"--split fold: {run} was not trained with --folds.", "Use --split test (or val, train).")
    return split


def run_folds(run: str | os.PathLike) -> tuple[int, int] | None:
    """(K, I) of a run trained with --folds K --fold I; None otherwise (or for a bare checkpoint folder)."""
    from lawder_core import runs

    if runs.config_path(run) is None:
        return None
    config = runs.read_config(run)
    if not config.get("folds"):
        return None
    return int(config["folds"]), int(config["fold"])


def dice_for_run(run: str | os.PathLike, data: str | os.PathLike, split: str | None = "test", *,
                 mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                 empty_policy: EmptyPolicy = "one") -> tuple[DiceReport, dict[str, Any]]:
    """Dice/IoU of a run's selected checkpoint on one split of an HDF5 file (`fold`: the cases a --folds run held
    out), and the run's description."""
    from lawder_core.data.splits import fold_indices
    from lawder_core.metrics.seg_eval import segmenter_dice
    from lawder_core.predictor import load_predictor

    indices = None
    if split == FOLD_SPLIT:
        folds = run_folds(run)
        if folds is None:
            raise UsageError(f"--split fold: {run} was not trained with --folds.", "Use --split test.")
        indices = fold_indices(data, folds[0], folds[1], "val")
    segmenter = load_predictor(run, mode, device)
    report = segmenter_dice(segmenter.predict_fn, data, split, num_classes=segmenter.num_classes,
                            label_map=segmenter.label_map, batch_size=batch_size, empty_policy=empty_policy,
                            device=device, indices=indices)
    return report, segmenter.info


def adherence_for_run(segmenter_run: str | os.PathLike, synthetic: str | os.PathLike, split: str | None = None, *,
                      mode: str = "auto", device: str = "cpu", batch_size: int = 16,
                      empty_policy: EmptyPolicy = "one") -> dict[str, Any]:
    """Mask adherence of a synthetic HDF5 file, judged by a segmenter run trained on real data."""
    from lawder_core.metrics.adherence import adherence_on_h5
    from lawder_core.predictor import load_predictor

    segmenter = load_predictor(segmenter_run, mode, device)
    result = adherence_on_h5(segmenter.predict_fn, synthetic, split, batch_size=batch_size,
                             empty_policy=empty_policy, device=device, classes=segmenter.label_map,
                             num_classes=segmenter.num_classes)
    result["segmenter"] = segmenter.info
    return result


def lesion_kid(inputs: Inputs, options: EvaluateOptions, device: str,
               real_features: dict[tuple, Any] | None) -> LesionKidResult:
    """KID on lesion-centred crops (`metrics/fid.py: lesion_crop_kid`), the real crops' features kept for reuse."""
    from lawder_core.metrics.fid import lesion_crop_kid

    assert inputs.real is not None and inputs.synthetic is not None  # check_request
    key = ("lesion-kid", str(Path(inputs.real).resolve()), inputs.real_split)
    earlier = real_features.get(key) if real_features is not None else None
    result = lesion_crop_kid(inputs.real, inputs.synthetic, real_split=inputs.real_split,
                             synthetic_split=inputs.synthetic_split, weights=inputs.fid_weights, device=device,
                             batch_size=options.batch_size, seed=options.seed,
                             allow_download=options.allow_download, reuse_real=earlier)
    if real_features is not None:
        real_features[key] = result
    return result


def adherence(inputs: Inputs, seg_options: dict[str, Any], real_features: dict[tuple, Any] | None
              ) -> dict[str, Any]:
    """The judge's Dice (--segmenter) and the judge-free scores (--real HDF5), joined per synthetic pair.

    `per_case` has one row per synthetic pair, keyed `case` = `<case id>@<index>` (stable across arms sampled
    from the same masks), with the judge's `dice` and the judge-free fields; `bins` averages them per lesion
    size bin.
    """
    from lawder_core.metrics.judge_free import bin_summary, judge_free_on_h5

    assert inputs.synthetic is not None  # check_request
    result: dict[str, Any] = {}
    rows: list[dict[str, Any]] | None = None
    if real_is_h5(inputs):
        assert inputs.real is not None
        key = ("judge-free", str(Path(inputs.real).resolve()), inputs.real_split)
        free = judge_free_on_h5(inputs.synthetic, inputs.real, inputs.synthetic_split, inputs.real_split,
                                reference=real_features.get(key) if real_features is not None else None)
        reference = free.pop("_reference")
        if real_features is not None:
            real_features[key] = reference
        rows = free.pop("per_case")
        free.pop("bins")
        result["judge_free"] = free
    if inputs.segmenter is not None:
        judged = adherence_for_run(inputs.segmenter, inputs.synthetic, inputs.synthetic_split, **seg_options)
        result.update(judged)
        if rows is None:
            rows = judge_rows(inputs.synthetic, inputs.synthetic_split)
        for row, dice in zip(rows, judged["dice_per_image"], strict=True):
            row["dice"] = dice
    assert rows is not None  # check_request: a judge, real pairs or both
    result["bins"] = bin_summary(rows)
    result["per_case"] = rows
    return result


def judge_rows(synthetic: str, split: str | None) -> list[dict[str, Any]]:
    """Per-pair rows without judge-free scores: case, lesion share and size bin."""
    from lawder_core.data.h5 import load_arrays
    from lawder_core.metrics.judge_free import lesion_of, recorded_lesion_labels, size_bin

    _, masks, cases = load_arrays(synthetic, split)
    lesions = lesion_of(masks, recorded_lesion_labels(synthetic))
    return [{"case": f"{case}@{i}", "lesion_frac": float(lesion.mean()),
             "size_bin": size_bin(float(lesion.mean()))} for i, (case, lesion) in enumerate(zip(cases, lesions,
                                                                                               strict=True))]


def model_for_profile(model: str) -> tuple[torch.nn.Module, str]:
    """A run/checkpoint folder is loaded with its weights; a model name is built fresh (weights do not matter)."""
    from lawder_core.models.factory import build_segmenter, load_segmenter
    from lawder_core.predictor import checkpoint_folder

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
