"""`lawder export nnunet` and `lawder export onnx`: hand results to nnU-Net and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json
from lawder_cli.options import FORCE, JSON, in_range
from lawder_core import numbers

app = typer.Typer(help="Export results to the tools the field uses.", no_args_is_help=True)


@app.command("onnx")
@handle_errors
def onnx(
    run: Path = typer.Option(..., "--run", help="Run folder of `lawder train-order` (its best/ checkpoint)."),
    out: Path = typer.Option(..., "-o", "--out", help="The .onnx file to write."),
    size: int = typer.Option(0, "--size", callback=in_range(numbers.EXPORT_SIZE),
                             help="Input height and width (default: the training size)."),
    dynamic: bool = typer.Option(False, "--dynamic", help="Also free height and width (not ORDER: its "
                                 "selection depends on the input size). The batch size is always dynamic."),
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Export the best checkpoint to ONNX (BatchNorm folded, opset 18) and check it against PyTorch.

    Needs the onnx extra: pip install 'lawder\\[onnx]'. Run it with `lawder predict --onnx FILE`.
    """
    from lawder_core.export.onnx import export_onnx

    result = export_onnx(run, out, size=size or None, dynamic=dynamic, force=force)
    if json_out:
        print_json(result)
    else:
        err_console.print(f"wrote {result['out']}: {result['model']} at {result['size']} px, opset {result['opset']}, "
                          f"{result['batchnorms_folded']} BatchNorms folded, max |ONNX − PyTorch| "
                          f"{result['max_abs_diff']:.1e}", markup=False)


@app.command("nnunet")
@handle_errors
def nnunet(
    data: Path = typer.Argument(..., help="A lawder HDF5 file (real data; its test split becomes imagesTs)."),
    out: Path = typer.Option(..., "-o", "--out", help="nnU-Net's raw folder (nnUNet_raw)."),
    dataset_id: int = typer.Option(..., "--dataset-id", callback=in_range(numbers.DATASET_ID),
                                   help="NNN of DatasetNNN_NAME (1-999)."),
    name: str = typer.Option(..., "--name", help="NAME of DatasetNNN_NAME."),
    synthetic: list[Path] = typer.Option(None, "--synthetic", help="`lawder sample` output to add to the "
                                         "training cases (repeatable); never in a validation fold."),
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Write an nnU-Net v2 raw data set: imagesTr/labelsTr (real + synthetic), imagesTs/labelsTs, dataset.json
    and splits_final.json (copy it to nnUNet_preprocessed/DatasetNNN_NAME/ after planning).

    2D sets become one PNG per sample. A `prepare kits` set becomes one NIfTI
    volume per case (its kept slices, scanner geometry, HU scaling in the
    header; synthetic slices as one-slice volumes): train nnU-Net's 2d
    configuration, as train/val cases keep only kidney and a few empty slices."""
    from lawder_core.export.nnunet import export_nnunet

    result = export_nnunet(data, out, dataset_id, name, synthetic=[str(p) for p in synthetic or []], force=force)
    if json_out:
        print_json(result)
    else:
        checked = result["verified_by"] or "not verified (pip install 'lawder[nnunet]' runs nnU-Net's own check)"
        err_console.print(f"wrote {result['out']}: {result['real']} real + {result['synthetic']} synthetic training "
                          f"cases, {result['test']} test cases ({result['file_ending']}); {checked}", markup=False)
        if "geometry" in result:
            err_console.print(f"geometry: {result['geometry']}", markup=False)
