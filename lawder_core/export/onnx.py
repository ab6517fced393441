"""`lawder export onnx`: a trained segmenter as one ONNX file for ONNX Runtime, checked against PyTorch.

The export uses PyTorch's dynamo exporter (ORDER's top-k selection, gathers and scatters become TopK,
GatherElements and ScatterElements; the TorchScript exporter cannot trace ORDER's selection count). BatchNorm is
folded into the convolution before it wherever the two sit next to each other in a module (every MK-UNet and
ORDER BatchNorm, the smp decoders'); ONNX Runtime folds any that remain when it loads the file. The batch size is
always dynamic; `dynamic=True` also frees the height and width (multiples of 32) for models whose graph allows
it: ORDER's number of selected pixels and its pooled grid depend on the input size, so an ORDER model keeps the
exported size and says so. The file's metadata records the model, the size and the classes, which is what
`lawder predict --onnx` reads.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core import limits
from lawder_core.data.h5 import refuse_overwrite
from lawder_core.environment import package_version
from lawder_core.errors import DataError, EnvironmentProblem, UsageError
from lawder_core.files import atomic_save
from lawder_core.predictor import Predictor, checkpoint_folder, read_label_map

log = logging.getLogger(__name__)
OPSET = 18
EXTRA = "pip install 'lawder[onnx]'"
METADATA_KEY = "lawder"


def require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise EnvironmentProblem(f"exporting to and running ONNX needs {', '.join(missing)}, not installed.",
                                 f"Install the extra: {EXTRA}")


def export_onnx(run: str | os.PathLike, out: str | os.PathLike, size: int | None = None, dynamic: bool = False,
                force: bool = False, batch: int = 2, seed: int = 0) -> dict[str, Any]:
    """Export the run's best checkpoint to `out`; returns what was written and the check against PyTorch."""
    require_onnx()
    out = Path(out)
    refuse_overwrite(out, force)
    folder = checkpoint_folder(run)  # a wrong --run is refused before PyTorch loads
    import torch

    from lawder_core.models.factory import load_segmenter, read_segmenter_config
    from lawder_core.models.fast import fold_batchnorms

    config = read_segmenter_config(folder)
    size = int(size or ((config.get("extra") or {}).get("train_config") or {}).get("size") or 0)
    if size <= 0 or size % 32:
        raise UsageError(f"--size {size or '(none recorded)'} must be a positive multiple of 32.",
                         "Pass --size N (the U-Nets downsample 5 times); the default is the training size.")
    # the reference, the folded copy and ONNX Runtime each run the batch once
    limits.check_inference("export onnx", config["name"], size, batch=batch, copies=3)
    reference = load_segmenter(folder).eval()
    model = fold_batchnorms(reference)  # a folded copy; the reference stays as trained, to check against
    folded = count_batchnorms(reference) - count_batchnorms(model)
    channels = int(config["in_channels"])
    x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        refuse_non_finite(reference(x).numpy(), f"the checkpoint {folder}")  # before anything is written
    spatial = dynamic and not config["name"].endswith("-order")
    if dynamic and not spatial:
        log.warning("%s: ORDER's selection count and pooled grid depend on the input size, so the height and "
                    "width stay at %d; the batch size is dynamic.", config["name"], size)
    metadata = {"model": config["name"], "size": size, "num_classes": int(config["num_classes"]),
                "in_channels": channels, "dynamic_size": spatial, "checkpoint": str(folder),
                "lawder": package_version("lawder"), "opset": OPSET,
                "label_map": (config.get("extra") or {}).get("label_map")}
    atomic_save(lambda p: write_onnx(model, x, p, spatial, metadata), out)
    try:
        diff = check_against_torch(out, reference, x, size)
    except BaseException:
        out.unlink(missing_ok=True)  # a file that failed its check is not left to be used
        raise
    log.info("wrote %s (opset %d, %d BatchNorms folded); max |ONNX − PyTorch| = %.2e", out, OPSET, folded, diff)
    return {"out": str(out), **metadata, "batchnorms_folded": folded, "max_abs_diff": diff,
            "onnxruntime": package_version("onnxruntime")}


def count_batchnorms(model: Any) -> int:
    from torch import nn

    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def write_onnx(model: Any, x: Any, path: Path, spatial: bool, metadata: dict[str, Any]) -> None:
    import onnx
    import torch
    from torch.export import Dim

    shapes: dict[int, Any] = {0: Dim("batch", min=1, max=4096)}
    if spatial:
        shapes.update({2: 32 * Dim("h32", min=1, max=128), 3: 32 * Dim("w32", min=1, max=128)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
        # optimize=False: ONNX Runtime folds and fuses the graph itself when it loads it; the exporter's own
        # optimiser doubled the export time and its graph ran no faster (MK-UNet-T 33 vs 18 ms, ORDER 101 vs
        # 91 ms per batch of 8 at 128 px, one thread).
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=OPSET, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes={"x": shapes}, optimize=False,
                                    verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {METADATA_KEY: json.dumps(metadata)})
    onnx.save(proto, str(path))


def check_against_torch(path: Path, reference: Any, x: Any, size: int) -> float:
    """Largest absolute logit difference between ONNX Runtime and PyTorch, on the export batch and one more."""
    import torch

    session = onnx_session(path)
    batches = [x, torch.rand(1, *x.shape[1:], generator=torch.Generator().manual_seed(1))]
    diff = 0.0
    for batch in batches:
        got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
        with torch.no_grad():
            expected = reference(batch).numpy()
        refuse_non_finite(expected, "the checkpoint")
        refuse_non_finite(got, f"ONNX Runtime's run of {path}")
        diff = max(diff, max_abs_difference(got, expected))
    return diff


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b|, NaN-aware: NaN where the other is not counts as infinitely far (a plain max over NaN is NaN,
    and Python's max(0.0, nan) is 0.0, which reported an all-NaN model as a perfect export)."""
    gap = np.abs(a.astype(np.float64) - b.astype(np.float64))
    gap[np.isnan(a) & np.isnan(b)] = 0.0
    gap[np.isnan(gap)] = np.inf
    return float(gap.max()) if gap.size else 0.0


def refuse_non_finite(outputs: np.ndarray, what: str) -> None:
    bad = int((~np.isfinite(outputs)).sum())
    if bad:
        raise DataError(f"{what} gives NaN or infinite outputs ({bad} of {outputs.size} values on a test batch): "
                        "its weights are damaged, or its training diverged; nothing was exported.",
                        "Use another checkpoint of the run (e.g. its last/), or train it again.")


def onnx_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    require_onnx()
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for unreadable files
        raise DataError(f"cannot load {path} with ONNX Runtime: {err}",
                        "Point --onnx at a file written by `lawder export onnx`.") from err


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    session = onnx_session(path)
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise DataError(f"{path} was not written by `lawder export onnx` (no '{METADATA_KEY}' metadata).",
                        "Export it with: lawder export onnx --run RUN -o model.onnx")
    return json.loads(raw)


def onnx_predictor(path: str | os.PathLike, threads: int | None = None) -> Predictor:
    """The same Predictor that `load_predictor` gives, backed by ONNX Runtime instead of PyTorch."""
    import torch

    from lawder_core.models.inference import at_size

    session = onnx_session(path, threads)
    meta = read_metadata(path)
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().float().contiguous().numpy()})[0])

    info = {"onnx": str(path), "model": meta["model"], "num_classes": int(meta["num_classes"]),
            "train_size": meta["size"], "inference_mode": "onnxruntime", "checkpoint": meta.get("checkpoint")}
    # Like load_predictor: images go in at the size the model was trained (and exported) at.
    return Predictor(predict_fn=at_size(run, int(meta["size"])), at_training_size=run,
                     size=int(meta["size"]), num_classes=int(meta["num_classes"]), checkpoint=Path(path), info=info,
                     label_map=read_label_map(meta))
