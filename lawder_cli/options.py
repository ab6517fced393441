"""Options several commands share, defined once with one default each (Typer reuses an Option object as a default).

Nothing heavy is imported here: every command module imports this one, and `lawder --help` imports them all.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from lawder_core import numbers
from lawder_core.environment import DEFAULT_WAIT_S

if TYPE_CHECKING:
    from lawder_core.distributed.train import LaunchConfig


def default(config: type, name: str) -> str:
    """A config field's default as help text shows it, read from the dataclass (`law.w_min`: a nested field), so
    the help cannot drift from what a run uses."""
    owner, _, leaf = name.rpartition(".")
    value: Any = field_default(config, owner) if owner else None
    value = getattr(value, leaf) if owner else field_default(config, leaf)
    return f"{value:g}" if isinstance(value, float) else str(value)


def field_default(config: type, name: str) -> Any:
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default  # type: ignore[misc]


def in_range(allowed: numbers.Range) -> Callable[[Any], Any]:
    """An option callback: a value outside `allowed` (NaN and ±inf included) is refused while the options are
    parsed, before anything is imported or read (exit 2, "Invalid value for '--lr': nan is not a finite number")."""

    def check(value: Any) -> Any:
        if value is not None:
            problem = allowed.problem(value)
            if problem is not None:
                raise typer.BadParameter(problem)
        return value

    check.allowed = allowed  # type: ignore[attr-defined]  # what tests read back for every numeric option
    return check


JSON = typer.Option(False, "--json", help="Print only the result as JSON on stdout (logs go to stderr).")
# None means 0, unless a --config file or the run being resumed has a seed of its own: a flag default of 0 would
# silently replace that seed.
SEED = typer.Option(None, "--seed", callback=in_range(numbers.SEED),
                    help="Random seed (default 0; --config or a resumed run keeps its own). "
                         "The same seed and inputs give the same result.")
LABELS = typer.Option(None, "--labels", help="Classes to learn, by name or number: ',' between classes, '+' merges "
                      "labels into one (KiTS default kidney,tumor,cyst; 'tumor+cyst' trains one binary class). "
                      "Default: every foreground label of the data set.")
LESION_LABELS = typer.Option(None, "--lesion-labels",
                             help="Labels LAW treats as lesion, by name or number, '+'-separated (KiTS default "
                                  "tumor+cyst; other data: every label > 0). The model is conditioned on every label.")
FORCE = typer.Option(False, "--force", help="Replace what --out already holds (a run, a sweep, a file) and start over.")
RESUME = typer.Option(False, "--resume", help="Continue what --out already holds from where it stopped.")
# A negative count is refused by the option parser, before anything is imported or started.
GPUS = typer.Option(0, "--gpus", callback=in_range(numbers.GPUS), help="GPU workers (Ray); 0 runs on the CPU.")
WORKERS = typer.Option(0, "--workers", callback=in_range(numbers.WORKERS),
                       help="With --gpus 0: 0 runs in this process; N starts N Ray CPU workers (gloo). With "
                            "--gpus G: N workers share the G GPUs (a multiple of G; gloo), e.g. DDP on one GPU.")
RAY_ADDRESS = typer.Option(None, "--ray-address",
                           help="Join a Ray cluster ('auto' or host:port); default: start a local Ray when needed.")
WAIT_FOR_RESOURCES = typer.Option(DEFAULT_WAIT_S, "--wait-for-resources", callback=in_range(numbers.WAIT_S),
                                  metavar="SECONDS",
                                  help="With --ray-address: how long to wait for the cluster to have the GPUs/CPUs "
                                       "asked for before giving up (exit 4).")
STORAGE = typer.Option(None, "--storage", help="Ray storage path (shared for multi-node: NFS or s3://).")
CONFIG = typer.Option(None, "--config", help="YAML/TOML/JSON config; command-line options win over it.")


def launch_config(gpus: int, workers: int, ray_address: str | None, storage: str | None, out: Path,
                  wait_for_resources: float) -> LaunchConfig:
    """Where a training runs (the launcher is imported only when a command runs, never for --help)."""
    from lawder_core.distributed.train import LaunchConfig

    return LaunchConfig(gpus=gpus, workers=workers, ray_address=ray_address, storage=storage,
                        name=out.resolve().name, wait_for_resources=wait_for_resources)
