"""The `lawder` command: a thin Typer layer over lawder_core. Each command lives in its own module."""

from __future__ import annotations

import os

import typer

from lawder_cli import (
    compare,
    env_cmd,
    evaluate,
    export,
    inspect_cmd,
    pipeline,
    predict,
    prepare,
    sample,
    train_law,
    train_order,
    tune,
)
from lawder_core.environment import package_version

app = typer.Typer(
    name="lawder",
    help="Adaptive spatial weighting for medical images: LAW-weighted diffusion and ORDER segmenters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lawder {package_version('lawder')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of an error (or LAWDER_DEBUG=1)."),
) -> None:
    """lawder: prepare → train-law → sample → train-order → evaluate → compare → tune (or `pipeline` for all)."""
    if debug:
        os.environ["LAWDER_DEBUG"] = "1"


app.command("prepare")(prepare.prepare)
app.command("inspect")(inspect_cmd.inspect)
app.command("env")(env_cmd.env)
app.command("train-order")(train_order.train_order)
app.command("predict")(predict.predict)
app.command("tune")(tune.tune)
app.command("evaluate")(evaluate.evaluate)
app.command("compare")(compare.compare)
app.command("pipeline")(pipeline.pipeline)
app.command("train-law")(train_law.train_law)
app.command("sample")(sample.sample)
app.add_typer(export.app, name="export")
