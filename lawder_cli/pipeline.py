"""`lawder pipeline`: the whole loop in one command, resumable, ending in report.md / report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, quiet_stdout, setup_logging
from lawder_cli.options import FORCE, GPUS, JSON, RAY_ADDRESS, RESUME, SEED, WORKERS


@handle_errors
def pipeline(
    out: Path = typer.Option(Path("runs/pipeline"), "--out", help="Pipeline folder (every stage's output)."),
    data: str = typer.Option(None, "--data", help="A prepared HDF5 file; default: the built-in synthetic set."),
    source: str = typer.Option(None, "--source", help="Prepare raw data first: kvasir | cvc | kits | synthetic."),
    in_dir: Path = typer.Option(None, "--in", help="With --source: the raw data folder."),
    preset: str = typer.Option("cpu-small", "--preset",
                               help="Budgets: tiny | cpu-small | gpu-claims | gpu-paper (give the GPU ones --gpus)."),
    seed: int = SEED,
    gpus: int = GPUS,
    workers: int = WORKERS,
    fid_weights: str = typer.Option(None, "--fid-weights", help="FID Inception weights (see `lawder evaluate`)."),
    ray_address: str = RAY_ADDRESS,
    resume: bool = RESUME,
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """prepare → train-law (uniform, LAW) → sample → train-order ×6 → evaluate → report.

    Every stage runs what its command runs; each evaluation is a summary.json under --out/evaluate/.
    """
    from lawder_core.pipeline import PipelineConfig, run_pipeline

    setup_logging()
    cfg = PipelineConfig(out=str(out), preset=preset, data=data, source=source,
                         in_dir=None if in_dir is None else str(in_dir), seed=seed or 0, fid_weights=fid_weights,
                         gpus=gpus, workers=workers, ray_address=ray_address)
    with quiet_stdout():
        result = run_pipeline(cfg, progress=lambda msg: err_console.print(f"[bold]lawder pipeline[/]: {msg}"),
                              resume=resume, force=force)
    if json_out:
        print_json(result)
    else:
        err_console.print(f"report: {result['report']} (and report.html beside it)")
