"""`lawder pipeline`: the whole loop in one command, resumable, ending in report.md / report.html."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_cli.common import err_console, handle_errors, print_json, quiet_stdout, setup_logging
from lawder_cli.options import JSON, RAY_ADDRESS
from lawder_core.pipeline import PipelineConfig, run_pipeline
from lawder_core.runs import open_run


@handle_errors
def pipeline(
    out: Path = typer.Option(Path("runs/pipeline"), "--out", help="Pipeline folder (every stage's output)."),
    data: str = typer.Option(None, "--data", help="A prepared HDF5 file; default: the built-in synthetic set."),
    source: str = typer.Option(None, "--source", help="Prepare first: kvasir | cvc | kits | synthetic."),
    in_dir: Path = typer.Option(None, "--in", help="With --source: the raw data folder."),
    preset: str = typer.Option("cpu-small", "--preset", help="tiny | cpu-small | gpu-paper."),
    seed: int = typer.Option(0, "--seed"),
    gpus: int = typer.Option(None, "--gpus", help="GPU workers per training (default: the preset's)."),
    workers: int = typer.Option(None, "--workers", help="CPU workers per training (default: the preset's)."),
    fid_weights: str = typer.Option(None, "--fid-weights", help="FID Inception weights (see `lawder evaluate`)."),
    ray_address: str = RAY_ADDRESS,
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted pipeline in --out."),
    force: bool = typer.Option(False, "--force", help="Delete --out and start over."),
    json_out: bool = JSON,
) -> None:
    """prepare → train-law (uniform, LAW) → sample → train-order ×6 → evaluate → report."""
    setup_logging()
    open_run(out, resume=resume, force=force)
    if source is not None and data is None:
        data = str(prepare_source(source, in_dir, out, seed, preset))
    cfg = PipelineConfig(out=str(out), preset=preset, data=data, seed=seed, fid_weights=fid_weights, gpus=gpus,
                         workers=workers, ray_address=ray_address)
    with quiet_stdout():
        result = run_pipeline(cfg, progress=lambda msg: err_console.print(f"[bold]lawder pipeline[/]: {msg}"))
    if json_out:
        print_json(result)
    else:
        err_console.print(f"report: {result['report']} (and report.html beside it)")


def prepare_source(source: str, in_dir: Path | None, out: Path, seed: int, preset: str) -> Path:
    """Prepare raw data at the preset's size, once (the file is reused on --resume)."""
    from lawder_cli.prepare import Source, run_prepare
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.pipeline import PRESETS

    target = out / "data" / f"{source}.h5"
    if not target.exists():
        options = PrepareOptions(seed=seed, size=PRESETS[preset].size)
        run_prepare(Source(source), in_dir, target, options, images=None, masks=None, n=240, window="-79,304",
                    empty_share=0.1, jobs=1)
    return target
