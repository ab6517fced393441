"""Options several commands share, defined once (Typer reuses an Option object as a default)."""

from __future__ import annotations

from pathlib import Path

import typer

from lawder_core.dist.ray_train import LaunchConfig

GPUS = typer.Option(0, "--gpus", help="GPU workers (NCCL). 0 trains on the CPU.")
WORKERS = typer.Option(1, "--workers", help="CPU workers (gloo) when --gpus 0; 0 runs inside this process.")
RAY_ADDRESS = typer.Option(None, "--ray-address",
                           help="Join a Ray cluster ('auto' or host:port); default: start a local Ray.")
STORAGE = typer.Option(None, "--storage", help="Ray storage path (shared for multi-node: NFS or s3://).")
CONFIG = typer.Option(None, "--config", help="YAML/TOML/JSON config; command-line options win over it.")
RESUME = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint.")
FORCE = typer.Option(False, "--force", help="Delete an existing run in --out and start over.")
SEED = typer.Option(None, "--seed", help="Random seed.")
JSON = typer.Option(False, "--json", help="Print only the result as JSON on stdout (logs go to stderr).")


def launch_config(gpus: int, workers: int, ray_address: str | None, storage: str | None, out: Path) -> LaunchConfig:
    return LaunchConfig(gpus=gpus, workers=workers, ray_address=ray_address, storage=storage,
                        name=out.resolve().name)
