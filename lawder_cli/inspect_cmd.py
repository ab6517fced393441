"""`lawder inspect FILE`: counts per split, sizes, labels, lesion-fraction percentiles."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lawder_cli.common import err_console, handle_errors, print_json
from lawder_cli.options import JSON


@handle_errors
def inspect(
    path: Path = typer.Argument(..., help="A lawder HDF5 file."),
    json_out: bool = JSON,
) -> None:
    """Describe a prepared (or synthetic) HDF5 file."""
    from lawder_core.data.fingerprint import compute_fingerprint

    fp = compute_fingerprint(path)
    if json_out:
        print_json(fp)
        return
    table = Table(title=f"{path} ({fp['source']})")
    table.add_column("split")
    table.add_column("samples", justify="right")
    table.add_column("cases", justify="right")
    for split, counts in fp["splits"].items():
        table.add_row(split, str(counts["samples"]), str(counts["cases"]))
    err_console.print(table)
    lf = fp["lesion_fraction"]
    err_console.print(f"shape {fp['image_shape']}  labels {fp['label_names']} (present {fp['labels_present']})")
    err_console.print("lesion fraction: " + "  ".join(f"{k} {v}" for k, v in lf.items()))
