"""`lawder tune law-clamp|law-reg|order`: Ray Tune sweeps with ASHA; writes results and best.yaml."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

import typer
from rich.table import Table

from lawder_cli.common import err_console, handle_errors, print_json, quiet_stdout, setup_logging
from lawder_cli.options import (
    CONFIG,
    FORCE,
    JSON,
    LESION_LABELS,
    RAY_ADDRESS,
    RESUME,
    SEED,
    WAIT_FOR_RESOURCES,
    in_range,
)
from lawder_core import numbers


class SweepKind(str, Enum):
    law_clamp = "law-clamp"
    law_reg = "law-reg"
    order = "order"


@handle_errors
def tune(
    kind: SweepKind = typer.Argument(..., help="law-clamp | law-reg | order"),
    data: str = typer.Option(..., "--data", help="Prepared HDF5 file (train split trains, val split scores)."),
    out: Path = typer.Option(..., "--out", help="Experiment folder (an existing one needs --resume or --force)."),
    trials: int = typer.Option(8, "--trials", callback=in_range(numbers.TRIALS),
                               help="Number of trials (grid spaces: trials per grid point)."),
    budget: int = typer.Option(10, "--budget", callback=in_range(numbers.EPOCHS),
                               help="Per trial: epochs (order) or evaluation rounds (law)."),
    gpus_per_trial: float = typer.Option(0, "--gpus-per-trial", callback=in_range(numbers.GPUS)),
    cpus_per_trial: float = typer.Option(1, "--cpus-per-trial", callback=in_range(numbers.CPUS)),
    scheduler: str = typer.Option("asha", "--scheduler", help="asha (stop bad trials early) or none."),
    search: str = typer.Option("random", "--search", help="random or grid (choices become grids)."),
    space: Path = typer.Option(None, "--space", help="YAML search space replacing the built-in one."),
    segmenter: str = typer.Option(None, "--segmenter", help="law sweeps: a real-data run for mask adherence."),
    fid_weights: str = typer.Option(None, "--fid-weights", help="law sweeps: FID Inception weights for KID."),
    lesion_labels: str = LESION_LABELS,
    seed: int = SEED,
    ray_address: str = RAY_ADDRESS,
    wait_for_resources: float = WAIT_FOR_RESOURCES,
    config: Path = CONFIG,
    resume: bool = RESUME,
    force: bool = FORCE,
    json_out: bool = JSON,
) -> None:
    """Sweep LAW's clamp range or regularisation, or ORDER's knobs, and write the best config.

    --resume continues the sweep in --out (finished trials are kept); --force deletes it and starts over.
    """
    from lawder_core.distributed.tune import TuneOptions, run_tune
    from lawder_core.sweeps import load_sweep_space, sweep_base_config

    setup_logging()
    opts = TuneOptions(trials=trials, budget=budget, gpus_per_trial=gpus_per_trial, cpus_per_trial=cpus_per_trial,
                       scheduler=scheduler, search=search, seed=seed or 0, ray_address=ray_address,
                       wait_for_resources=wait_for_resources)
    base = sweep_base_config(kind.value, config, data=data, out=str(out), budget=budget, seed=seed,
                             segmenter=segmenter, fid_weights=fid_weights, lesion_labels=lesion_labels)
    with quiet_stdout():
        result = run_tune(kind.value, base, load_sweep_space(kind.value, space), out, opts, resume=resume, force=force)
    if json_out:
        print_json(result)
        return
    show_results(result)


def show_results(result: dict) -> None:
    rows = result["rows"]
    table = Table(title=f"lawder tune {result['kind']}: {result['trials']} trials, best first")
    for key in rows[0]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()))
    err_console.print(table)
    err_console.print(f"best {result['metric']}: {result['best']}  ->  {result['out']}/best.yaml")
