"""`lawder compare`: paired differences between arms of runs, with hierarchical bootstrap CIs, and CI gates."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lawder_cli.common import err_console, handle_errors, number
from lawder_cli.options import JSON, SEED, in_range
from lawder_core import numbers
from lawder_core.errors import EXIT_GATE_FAILED, UsageError
from lawder_core.metrics.arms import METRIC_NAMES  # arms.py imports only the standard library at module level

TABLE_WIDTH = 140


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def _noise(row: dict[str, Any]) -> str:
    if row["kind"] == "noise floor":
        return "(this row)"
    if row["exceeds_noise_floor"] is None:
        return "none"
    return f"{'>' if row['exceeds_noise_floor'] else '≤'} {row['noise_floor']:.2g}"


def render(result: dict[str, Any]) -> None:
    """The human view on stderr: one row per metric and comparison, the KID spreads, notes, then the gates."""
    level = f"{result['settings']['level']:.0%}"
    table = Table(title="lawder compare", box=box.SIMPLE_HEAD,
                  caption="sign: run pairs whose mean difference has the overall sign; "
                          "n: run pairs / distinct cases (− values left out)")
    for column in ("metric", "B − A", "mean A", "mean B", f"difference [{level} CI]", "Wilcoxon p", "sign", "n",
                   "noise floor", "verdict"):
        table.add_column(column, overflow="fold")
    previous = None
    for row in result["comparisons"]:
        runs, diff = row["run_differences"], row["difference"]
        agree = sum(d != 0 and (d > 0) == (diff > 0) for d in runs) if diff else 0
        ci = "" if row["ci_low"] is None else f" [{number(row['ci_low'])}, {number(row['ci_high'])}]"
        left_out = f" (−{row['n_left_out']})" if row["n_left_out"] else ""
        table.add_row(escape(row["metric"]) if row["metric"] != previous else "", escape(f"{row['b']} − {row['a']}"),
                      number(row["mean_a"]), number(row["mean_b"]), f"{number(diff, signed=True)}{ci}",
                      _p(row["p_wilcoxon"]), f"{agree}/{len(runs)}", f"{row['n_runs']} / {row['n_cases']}{left_out}",
                      _noise(row), escape(row["verdict"] or ""))
        previous = row["metric"]
    # a log file has no width to keep: give the table the width it needs there; a terminal keeps its own
    wide = err_console if err_console.is_terminal else Console(stderr=True, width=max(err_console.width, TABLE_WIDTH))
    wide.print(table)
    for name, kid in result["kid"].items():
        err_console.print(f"KID {name}: mean {kid['mean']:.4g}, sd {kid['sd']:.3g} over {kid['n_values']} subsets "
                          f"of {kid['n_runs']} run(s) (not paired: no CI)", markup=False, highlight=False)
    for replicate, info in result["replicates"].items():
        err_console.print(f"replicate: {replicate} repeats {info['original']} ({info['how']}): its difference is the "
                          "noise floor", markup=False, highlight=False)
    for note in result["notes"]:
        err_console.print(f"note: {note}", markup=False, highlight=False)
    for gate in result["gates"]:
        status = "[green]held[/]" if gate["passed"] else "[bold red]missed[/]"
        detail = gate["message"] or (f"the {level} CI of {gate['comparison']} [{number(gate['ci'][0])}, "
                                     f"{number(gate['ci'][1])}] clears the margin {gate['margin']:g}")
        err_console.print(f"gate '{escape(gate['expect'])}' on {gate['metric']}: {status} ({escape(detail)})",
                          highlight=False)


@handle_errors
def compare(
    arms: list[str] = typer.Argument(None, metavar="NAME=GLOB...",
                                     help="An arm: its name and the summary.json files of its runs (a glob in quotes, "
                                          "or a folder holding summary.json); repeat a NAME to add more globs."),
    arms_file: Path = typer.Option(None, "--arms", help="YAML {arms: {NAME: [GLOB, ...]}, replicates: {REPLICATE: "
                                                        "ORIGINAL}}; relative globs start from the file's folder."),
    replicate: list[str] = typer.Option(None, "--replicate", metavar="NAME=ORIGINAL",
                                        help="Arm NAME repeats arm ORIGINAL with another seed: its difference is the "
                                             "noise floor. Found by itself when both arms' run folders have equal "
                                             "config.json except seed/out/resume."),
    pair: list[str] = typer.Option(None, "--pair", metavar="'B-A'",
                                   help="Report B − A (repeatable); default: every arm against the first."),
    metric: str = typer.Option(None, "--metric",
                               help=f"The metric --expect gates and --plot draws: {METRIC_NAMES}. Default: Dice."),
    expect: list[str] = typer.Option(None, "--expect", metavar="'B > A'",
                                     help="Gate: exit 1 unless the CI of B − A lies above --margin ('B < A': below "
                                          "−margin); repeatable."),
    margin: float = typer.Option(0.0, "--margin", callback=in_range(numbers.NON_NEGATIVE),
                                 help="How far the CI bound must clear 0 for --expect, in the "
                                                       "metric's units (0.01 = one Dice point)."),
    resamples: int = typer.Option(10_000, "--resamples", callback=in_range(numbers.RESAMPLES),
                                  help="Bootstrap resamples."),
    seed: int = SEED,
    out: Path = typer.Option(None, "-o", "--out", help="Write the result JSON to this file."),
    plot: Path = typer.Option(None, "--plot", help="PNG of the paired differences of --metric with their CIs."),
    json_out: bool = JSON,
) -> None:
    """Does one arm beat another? Paired differences per metric, with hierarchical bootstrap 95 % CIs.

    Each arm is one or more summary.json files of `lawder evaluate` (one run per seed or fold).
    Runs of two arms pair when they scored the same cases; B − A is the mean of the per-case differences.
    Its CI resamples run pairs, then cases; the Wilcoxon signed-rank p tests the per-case differences.
    "every run": whether each run pair's mean difference has the overall sign.
    A replicate arm (same config, another seed) is the noise floor; a verdict needs a CI that excludes 0,
    every run pair agreeing and, with a replicate, a difference above the noise floor (the largest |bound| of
    the replicate's CI).

    Example: lawder compare T='runs/t/fold*/eval/summary.json' ORDER='runs/order/fold*/eval/summary.json'
    --expect 'ORDER > T' --margin 0.01 --plot diff.png

    Exit codes:
      0  compared, every --expect gate held;
      1  an --expect gate was missed;
      2  usage: no or one arm, a bad option, an unknown arm or metric;
      3  data: a missing or unreadable summary, or arms whose runs do not score the same cases.
    """
    from lawder_core.metrics.arms import parse_replicates, specs_from_args, specs_from_yaml
    from lawder_core.metrics.compare import CompareRequest, missed_gates
    from lawder_core.metrics.compare import compare as compare_arms

    specs = specs_from_args(arms or [])
    replicates = parse_replicates(replicate or [])
    if arms_file is not None:
        file_specs, file_replicates = specs_from_yaml(arms_file)
        specs = file_specs + specs
        replicates = {**file_replicates, **replicates}
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the JSON file to write.")
    request = CompareRequest(arms=tuple(specs), replicates=tuple(replicates.items()), pairs=tuple(pair or ()),
                             expect=tuple(expect or ()), metric=metric, margin=margin, resamples=resamples,
                             seed=seed or 0)
    result = compare_arms(request)
    render(result)
    text = json.dumps(result, indent=1, allow_nan=False)
    if out is not None:
        from lawder_core.files import write_text

        written = write_text(out, text + "\n")
        err_console.print(f"wrote {written}", highlight=False)
    if plot is not None:
        from lawder_core.metrics.compare_plot import save_difference_plot

        err_console.print(f"wrote {save_difference_plot(result, plot)}", highlight=False)
    if json_out:
        sys.stdout.write(text + "\n")
    missed = missed_gates(result)
    if missed:
        err_console.print(f"[bold red]{len(missed)} of {len(result['gates'])} gate(s) missed[/]", highlight=False)
        raise typer.Exit(EXIT_GATE_FAILED)
