"""`lawder predict`: segment an HDF5 split or a folder of images with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json
from lawder_cli.options import FORCE, JSON


@handle_errors
def predict(
    input: Path = typer.Argument(..., help="An HDF5 file (with --split) or a folder of images."),
    run: Path = typer.Option(None, "--run", help="Run folder of `lawder train-order` (its best/ checkpoint)."),
    onnx: Path = typer.Option(None, "--onnx", help="Instead of --run: a file of `lawder export onnx`, run by "
                              "ONNX Runtime (pip install 'lawder[onnx]')."),
    threads: int = typer.Option(0, "--threads", help="--onnx: ONNX Runtime threads (0: its default)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: masks/ and overlays/ PNGs."),
    split: str = typer.Option("test", help="HDF5 input: train, val, test or all."),
    mode: str = typer.Option("auto", help="Inference path: auto, eager, channels_last or compile."),
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Predict lesion masks; writes masks/NAME.png (255 = lesion) and overlays/NAME.png.

    --force writes into an output folder that is not empty.
    """
    from lawder_core.errors import UsageError
    from lawder_core.predict import predict_to_folder

    if (run is None) == (onnx is None):
        raise UsageError("give exactly one of --run RUN and --onnx FILE.")
    if onnx is not None:
        from lawder_core.export.onnx import onnx_predictor

        predictor = onnx_predictor(onnx, threads or None)
    result = predict_to_folder(predictor if onnx is not None else run, input, out, split=split, mode=mode,
                               force=force)
    if json_out:
        print_json(result)
    else:
        err_console.print(f"segmented {result['images']} images with {result['checkpoint']} -> {out}")
