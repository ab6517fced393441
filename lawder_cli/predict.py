"""`lawder predict`: segment an HDF5 split, a folder of images or CT volumes (NIfTI) with a trained run."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, setup_logging
from lawder_cli.options import FORCE, JSON, in_range
from lawder_core import numbers


@handle_errors
def predict(
    input: Path = typer.Argument(None, help="An HDF5 file (with --split), a folder of images, or CT volumes: a "
                                 ".nii/.nii.gz file, a KiTS case folder or a folder of volumes.", show_default=False),
    input_option: Path = typer.Option(None, "--in", help="The same as the INPUT argument.", show_default=False),
    run: Path = typer.Option(None, "--run", help="Run folder of `lawder train-order` (its best/ checkpoint)."),
    onnx: Path = typer.Option(None, "--onnx", help="Instead of --run: a file of `lawder export onnx`, run by "
                              "ONNX Runtime (pip install 'lawder\\[onnx]')."),
    threads: int = typer.Option(0, "--threads", callback=in_range(numbers.WORKERS),
                                help="--onnx: ONNX Runtime threads (0: its default)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder: masks/ and overlays/ PNGs; for CT volumes "
                             "CASE_seg.nii.gz and overlays/."),
    split: str = typer.Option("test", help="HDF5 input: train, val, test or all."),
    window: str = typer.Option(None, "--window", help="CT volumes: window LOW,HIGH in HU (default: the training "
                               "data's, else -79,304).", show_default=False),
    mode: str = typer.Option("auto", help="Inference path: auto, eager, channels_last or compile."),
    device: str = typer.Option("auto", "--device", help="--run: auto (the first GPU when there is one), cpu or "
                               "cuda (cuda:N for another GPU)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help="Input folders: also read symbolic "
                                         "links that lead outside the folder (by default they are left out and "
                                         "listed)."),
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Predict masks; writes masks/NAME.png (255 = lesion; label values for multi-class runs) and overlays/NAME.png.

    CT volumes are segmented axial slice by slice, as `prepare kits` made the training slices, into
    OUT/CASE_seg.nii.gz (uint8 labels on the input's voxel grid: same shape and affine) and overlays/CASE_zNNN.png.
    Names come from the input (file stems; INDEX_CASE for HDF5) with anything outside [A-Za-z0-9._-] replaced
    by _. --force writes into an output folder that is not empty, but never through a symbolic link (exit 3).
    An image or volume that cannot be read or segmented is skipped and the others are written;
    OUT/predict_summary.json lists what was written and skipped (with reasons), and any skip exits 3.
    """
    from lawder_core.environment import check_device_name
    from lawder_core.errors import UsageError
    from lawder_core.predict.images import predict_to_folder
    from lawder_core.predict.output import SUMMARY, SkippedInputs

    if input is None and input_option is None:
        raise UsageError("Missing argument 'INPUT': the images or volumes to segment.",
                         "Give it as the INPUT argument or as --in INPUT.")
    if input is not None and input_option is not None:
        raise UsageError("give the input once: as the INPUT argument or as --in INPUT.")
    if (run is None) == (onnx is None):
        raise UsageError("give exactly one of --run RUN and --onnx FILE.")
    check_device_name(device)
    if onnx is not None and device != "auto":
        raise UsageError("--device applies to --run; --onnx runs on ONNX Runtime's CPU provider.")
    setup_logging()
    if onnx is not None:
        from lawder_core.export.onnx import onnx_predictor

        predictor = onnx_predictor(onnx, threads or None)
    try:
        result = predict_to_folder(predictor if onnx is not None else run, input or input_option, out,
                                   split=split, mode=mode, force=force, window=window,
                                   follow_symlinks=follow_symlinks, device=device)
    except SkippedInputs as partial:  # the summary first (stdout with --json), then the error and exit 3
        report(partial.result, out / SUMMARY, json_out)
        raise
    report(result, out / SUMMARY, json_out)


def report(result: dict, summary: Path, json_out: bool) -> None:
    """The result as JSON on stdout, or one line on stderr."""
    if json_out:
        print_json(result)
        return
    kind = "CT volume(s)" if "volumes" in result else "images"
    total = result.get("volumes", result.get("images", 0))
    line = f"segmented {result['written']} of {total} {kind} with {result['checkpoint']} -> {result['out']}"
    if result.get("skipped"):
        line += f"; {result['skipped']} skipped (see {summary})"
    if result.get("links_not_followed"):
        line += f"; {len(result['links_not_followed'])} link(s) out of the input folder not followed"
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)
