"""One launcher for every training command: a plain per-worker function run by Ray Train's TorchTrainer.

`--gpus N` gives N GPU workers (NCCL); `--gpus 0` runs on the CPU with `--workers N` gloo workers.
`--gpus 0 --workers 0` (the default) runs the same function inside this process: no Ray, no ports, no start-up.
`--gpus G --workers N` (N a multiple of G) puts N/G workers on each GPU, over gloo (NCCL refuses two ranks on one
GPU): a way to exercise DDP on a single GPU. Every worker is told its device (`runtime.on_device`): `--gpus 0`
trains on the CPU even where a GPU is visible. `--batch-size` is the global batch, split evenly over the workers.
The training function must live in the installed package (workers import it by name) and take
`(config, report)`; it writes its own run folder, which must be on storage every worker can reach
(an NFS path) when the run spans several machines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawder_core import numbers, runs
from lawder_core.config import with_absolute_paths
from lawder_core.distributed.loopback import loopback_torch_config
from lawder_core.distributed.session import (
    check_local_gpus,
    ensure_ray,
    find_lawder_error,
    fit_interruptibly,
    quiet_ray_logs,
    wait_for_resources,
)
from lawder_core.distributed.shared_storage import remove_marker, write_marker
from lawder_core.environment import DEFAULT_WAIT_S
from lawder_core.errors import (
    LawderError,
    TrainingError,
    UsageError,
    known_cause,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchConfig:
    gpus: int = 0
    workers: int = 0  # CPU workers when gpus == 0 (0 = run in this process); with gpus > 0, workers sharing them
    ray_address: str | None = None  # None: start a local Ray sized to this machine; "auto" or host:port: join
    storage: str | None = None  # Ray's storage_path (shared for multi-node: NFS path or s3://)
    name: str = "lawder"
    cpus_per_worker: float | None = None  # None: a local CPU run shares this machine's cores among its workers
    wait_for_resources: float = DEFAULT_WAIT_S  # a joined cluster: how long to wait for free GPUs/CPUs

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"gpus": numbers.GPUS, "workers": numbers.WORKERS,
                                    "cpus_per_worker": numbers.CPUS, "wait_for_resources": numbers.WAIT_S})
        if self.gpus > 0 and self.workers > 0 and (self.workers < self.gpus or self.workers % self.gpus):
            raise UsageError(f"--workers {self.workers} with --gpus {self.gpus}: the workers share the GPUs evenly, "
                             "so --workers must be a multiple of --gpus.",
                             f"Use --workers {self.gpus * max(1, self.workers // self.gpus)}, or drop --workers "
                             "for one worker per GPU.")

    @property
    def device(self) -> str:
        """Where every worker trains: 'cuda' with --gpus, else 'cpu' (even where a GPU is visible)."""
        return "cuda" if self.gpus > 0 else "cpu"

    @property
    def world_size(self) -> int:
        return max(self.workers, self.gpus, 1)

    def needs(self) -> dict[str, float]:
        """What the worker group asks the cluster for."""
        if self.gpus > 0:
            return {"GPU": float(self.gpus)}
        return {"CPU": float(max(self.workers, 1)) * (self.cpus_per_worker or 1.0)}


def _ray_worker(config: dict[str, Any]) -> None:
    """What each Ray Train worker runs: the plain training function with Ray's reporter, on the device the
    launcher chose, after checking (on a joined cluster) that it sees the driver's run folder."""
    import ray.train

    from lawder_core.train.runtime import DEVICE_ENV

    quiet_ray_logs()
    os.environ[DEVICE_ENV] = config.get("device", "auto")  # this worker process exists for this training only
    if config.get("shared_token"):
        from lawder_core.distributed.shared_storage import check_marker

        check_marker(config["cfg"].out, config["shared_token"])

    def report(metrics: dict[str, Any]) -> None:
        ray.train.report({k: v for k, v in metrics.items() if isinstance(v, int | float | str | bool)})

    config["fn"](config["cfg"], report=report)


def scaling_config(launch: LaunchConfig) -> Any:
    from ray.train import ScalingConfig

    if launch.gpus < 0 or launch.workers < 0:
        raise UsageError("--gpus and --workers must be non-negative.")
    if launch.gpus > 0:
        if launch.workers > launch.gpus:  # several workers on each GPU: a share of it each
            return ScalingConfig(num_workers=launch.workers, use_gpu=True,
                                 resources_per_worker={"GPU": launch.gpus / launch.workers})
        return ScalingConfig(num_workers=launch.gpus, use_gpu=True)
    cpus = launch.cpus_per_worker or local_cpus_per_worker(launch)
    resources = {"CPU": cpus} if cpus else None
    return ScalingConfig(num_workers=launch.workers, use_gpu=False, resources_per_worker=resources)


def local_cpus_per_worker(launch: LaunchConfig) -> int | None:
    """On a local Ray, give each CPU worker its share of the cores (Ray's default is one CPU, hence one thread).

    Ray sets a worker's OMP_NUM_THREADS to the CPUs it holds; a single worker on 2 cores trains a LAW diffusion
    step in ~0.45 s with both instead of 0.75 s with one (measured on a 2-core machine). On a joined cluster the user's
    resources decide.
    """
    if launch.ray_address is not None or launch.workers < 1:
        return None
    cores = os.cpu_count() or 1
    if launch.workers > cores:  # Ray would wait forever for CPUs a local instance does not have
        raise UsageError(f"--workers {launch.workers} needs {launch.workers} CPUs; this machine has {cores}.",
                         f"Use --workers {cores} or fewer, or join a larger cluster with --ray-address.")
    return max(1, cores // launch.workers)


def launch(fn: Callable[..., dict[str, Any]], cfg: Any, launch: LaunchConfig) -> dict[str, Any]:
    """Run `fn(cfg, report)` on the requested workers; returns the metrics Ray kept (may be empty).

    The run folder is the record of the run (Train V2 workers cannot hand return values to the driver,
    and it keeps metrics only beside checkpoints): read results from there.
    """
    if launch.gpus == 0 and launch.workers == 0:
        return run_here(fn, with_absolute_paths(cfg), launch.device)
    ensure_ray(launch.ray_address)  # first: a local Ray's loopback mode is set before Ray is imported
    from ray.train import RunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    backend = "nccl" if launch.gpus > 0 and launch.workers <= launch.gpus else "gloo"
    # a local Ray: the ranks' rendezvous store listens on loopback too (distributed/loopback.py)
    torch_config = TorchConfig(backend=backend) if launch.ray_address else loopback_torch_config(backend)
    wait_for_resources(launch.ray_address, launch.needs(), launch.wait_for_resources)
    cfg = with_absolute_paths(cfg)
    storage = launch.storage or str(Path(getattr(cfg, "out", ".")).resolve() / "ray")
    # on a joined cluster every worker must see the run folder the driver reads (distributed/shared_storage.py)
    token = write_marker(cfg.out) if launch.ray_address is not None and getattr(cfg, "out", None) else None
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"fn": fn, "cfg": cfg, "device": launch.device, "shared_token": token},
        torch_config=torch_config,
        scaling_config=scaling_config(launch),
        run_config=RunConfig(storage_path=storage, name=launch.name),
    )
    try:
        fit = fit_interruptibly(trainer)
    except Exception as err:  # Ray wraps worker errors; surface ours, explain the rest
        found = find_lawder_error(err) or known_cause(err, writing=getattr(cfg, "out", None))
        if found is not None:
            raise found from None
        raise TrainingError(f"distributed training failed: {err}",
                            "See the worker log above.") from err
    return dict(fit.metrics or {})


def run_here(fn: Callable[..., dict[str, Any]], cfg: Any, device: str = "cpu") -> dict[str, Any]:
    """One worker, this process, on `device`: the CPU default, and what --workers 0 promises. Returns the last
    report, as Ray's `fit.metrics` would."""
    from lawder_core.train.runtime import on_device

    last: dict[str, Any] = {}

    def keep_last(metrics: dict[str, Any]) -> None:
        last.clear()
        last.update(metrics)

    try:
        with on_device(device):
            fn(cfg, report=keep_last)
        return last
    except LawderError:
        raise
    except Exception as err:
        # a full disk or no memory is the machine's (exit 4), not the training's
        known = known_cause(err, writing=getattr(cfg, "out", None))
        if known is not None:
            raise known from err
        raise TrainingError(f"training failed: {err}",
                            "--debug shows the traceback."
                            ) from err


def memory_shape(launch: LaunchConfig) -> tuple[int, bool]:
    """How many training processes hold a batch in this machine's memory (0: a joined cluster's, elsewhere), and
    whether their activations are on GPUs instead."""
    if launch.ray_address is not None:
        return 0, launch.gpus > 0
    return world_size(launch), launch.gpus > 0


def world_size(launch: LaunchConfig) -> int:
    return launch.world_size


def check_resources(launch_cfg: LaunchConfig) -> None:
    """Refuse what this machine cannot give before Ray starts: a usage error costs a second, not a Ray start-up."""
    local_cpus_per_worker(launch_cfg)
    check_local_gpus(launch_cfg.gpus, launch_cfg.ray_address)


def run_and_summarise(fn: Callable[..., dict[str, Any]], summarise: Callable[[Any], dict[str, Any]], cfg: Any,
                      launch_cfg: LaunchConfig, force: bool) -> dict[str, Any]:
    """Open the run folder (refuse, resume or force), train on the workers, write summary.json."""
    runs.open_run(cfg.out, resume=cfg.resume, force=force)
    try:
        launch(fn, cfg, launch_cfg)
    except BaseException as err:
        runs.remove_partial_checkpoints(cfg.out)  # a checkpoint cut short (full disk, Ctrl-C) is not kept
        if isinstance(err, LawderError):
            raise runs.with_resume_advice(err, cfg.out) from err.__cause__
        raise
    remove_marker(cfg.out)
    summary = summarise(cfg.out)
    runs.write_summary(cfg.out, summary)
    return summary


def train_order(cfg: Any, launch_cfg: LaunchConfig, *, force: bool = False) -> dict[str, Any]:
    """`lawder train-order`: validate, open the run folder, train on the workers, write summary.json."""
    from lawder_core.train.configs import check_seg_config

    check_seg_config(cfg, world_size(launch_cfg), *memory_shape(launch_cfg))
    check_resources(launch_cfg)
    from lawder_core.train.seg import summarise_run, train_segmenter

    return run_and_summarise(train_segmenter, summarise_run, cfg, launch_cfg, force)


def train_law(cfg: Any, launch_cfg: LaunchConfig, *, force: bool = False) -> dict[str, Any]:
    """`lawder train-law`: validate, open the run folder, train on the workers, write summary.json."""
    from lawder_core.train.configs import check_law_config

    check_law_config(cfg, world_size(launch_cfg), *memory_shape(launch_cfg))
    check_resources(launch_cfg)
    from lawder_core.train.diffusion import summarise_law_run, train_diffusion

    return run_and_summarise(train_diffusion, summarise_law_run, cfg, launch_cfg, force)
