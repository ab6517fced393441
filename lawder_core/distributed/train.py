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

import atexit
import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawder_core import numbers, runs
from lawder_core.config import with_absolute_paths
from lawder_core.distributed.loopback import loopback_only, loopback_torch_config
from lawder_core.distributed.shared_storage import remove_marker, write_marker
from lawder_core.environment import DEFAULT_WAIT_S
from lawder_core.errors import (
    EnvironmentProblem,
    LawderError,
    TrainingError,
    UsageError,
    causes,
    known_cause,
)
from lawder_core.interrupts import raise_terminated

log = logging.getLogger(__name__)

# Measured on a 2-core machine: these cut a 2-worker CPU fit from ~25 s to ~12 s and send nothing anywhere.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


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


def ensure_ray(address: str | None) -> None:
    """Start (or join) Ray once per process, small, quiet and closed to others (see `start_local_ray`).

    A local Ray listens on loopback only; a joined cluster (`address`) keeps the network set-up of its operator.
    """
    if address is None:
        loopback_only()
    import ray

    os.environ.update({k: os.environ.get(k, v) for k, v in RAY_ENV.items()})
    if ray.is_initialized():
        return
    # ray.init replaces the SIGTERM handler with a bare sys.exit(15); lawder's (stop like Ctrl-C) is put back
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    try:
        if address is None:
            start_local_ray()
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise EnvironmentProblem(f"cannot start or join Ray at {address or 'a local instance'}: {err}",
                                 "Check `ray status` on the head node, or drop --ray-address to run locally.") from err
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def wait_for_resources(address: str | None, needs: dict[str, float], seconds: float) -> None:
    """On a joined cluster, wait (bounded, and saying so) until `needs` is free; a local Ray was sized up front.

    Ray itself would queue the request forever when the cluster cannot meet it (too few GPUs, all taken).
    """
    if address is None:
        return
    import ray

    deadline = time.monotonic() + seconds
    said = False
    while True:
        free = ray.available_resources()
        if all(free.get(name, 0.0) >= amount for name, amount in needs.items()):
            return
        if time.monotonic() >= deadline:
            raise EnvironmentProblem(
                f"the Ray cluster at {address} has {describe(free, needs)} free "
                f"({describe(ray.cluster_resources(), needs)} in all); this run needs {describe(needs, needs)}.",
                "Ask for less (--gpus, --workers, --gpus-per-trial), wait longer with --wait-for-resources SECONDS, "
                "or see what holds the cluster with `ray status`.")
        if not said:
            log.warning("waiting up to %.0f s for %s on the Ray cluster at %s (free now: %s)", seconds,
                        describe(needs, needs), address, describe(free, needs))
            said = True
        time.sleep(max(0.0, min(2.0, deadline - time.monotonic())))


def describe(resources: dict[str, float], names: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(name, 0.0):g} {name}" for name in names)


def start_local_ray() -> None:
    """A Ray for this command only.

    - Listening on loopback only (`loopback_only`, set by `ensure_ray` before Ray is imported): no other machine
      can reach it.
    - Token authentication on, with a random token for this command (unless the user set RAY_AUTH_MODE): it keeps
      other users' processes on this machine out.
    - Its temp tree (sockets, logs, runtime resources) under a fresh folder of mode 0700 — Ray makes its own
      folder world-writable — removed when the command exits; a second command gets its own, so two local
      commands never see each other's sockets.
    """
    import ray

    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
        refresh_ray_config()
    private = Path(tempfile.mkdtemp(prefix="lawder-ray-"))  # 0700; short: Ray's socket paths must fit 107 bytes
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    atexit.register(ray.shutdown)  # runs first (atexit is last-in, first-out)
    # A new Ray even where RAY_ADDRESS is set (a parent lawder's Ray exports it to its children, and Ray's own
    # actors would read it); joining a running cluster is what --ray-address is for.
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=os.cpu_count(), object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=True, _temp_dir=str(private / "r"), configure_logging=False,
             runtime_env={"worker_process_setup_hook": "lawder_core.distributed.train.quiet_ray_logs"})


def refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its C++ config when imported; re-read it, as Ray's own token setup does."""
    try:
        from ray._raylet import Config
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    Config.initialize("")


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def quiet_ray_logs() -> None:
    """Every worker of a local Ray: lawder's INFO lines, Ray's warnings, and not Ray's per-report chatter.

    Without the dashboard (not started locally, to save memory) Ray Train's placement-group cleaner cannot
    reach the state API and warns about it every second for the whole run; it has nothing to clean up
    unless the controller dies, and then Ray's own shutdown removes the group on a local instance.
    """
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # a handler where Ray set none
    logging.getLogger().setLevel(logging.WARNING)  # Ray's workers start with the root logger at INFO
    logging.getLogger("lawder_core").setLevel(logging.INFO)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
    threading.excepthook = quiet_cleaner_crash(threading.excepthook)


def quiet_cleaner_crash(default: Callable[[Any], None]) -> Callable[[Any], None]:
    """The cleaner's monitor thread dies with a traceback when Ray shuts down under it (an interrupted run): the
    state API it polls is gone. Nothing is lost (a local Ray's shutdown removes the group), so that one thread's
    death is logged at DEBUG; every other thread keeps Python's default report."""

    def hook(args: Any) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if any(frame.filename.endswith("placement_group_cleaner.py") for frame in frames):
            logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).debug("cleaner thread ended: %r", args.exc_value)
            return
        default(args)

    return hook


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


def find_lawder_error(error: BaseException) -> LawderError | None:
    """Dig the user-facing error out of Ray's wrappers (worker failures, causes, RayTaskError)."""
    return next((err for err in causes(error) if isinstance(err, LawderError)), None)


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


def check_local_gpus(gpus: int | float, ray_address: str | None) -> None:
    """A local Ray cannot give more GPUs than this machine has: it would wait for them forever."""
    if ray_address is not None or gpus <= 0:
        return
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus > have:
        raise EnvironmentProblem(
            f"--gpus {gpus:g} asks for {gpus:g} GPU(s); this machine has {have}.",
            (f"Use --gpus {have} or fewer, " if have else "Use --gpus 0 (CPU), ")
            + "or join a cluster that has them with --ray-address.")


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


def fit_interruptibly(trainer: Any, stop: threading.Event | None = None, grace_s: float = 60.0) -> Any:
    """`trainer.fit()`, with Ctrl-C and SIGTERM ending the command the documented way (exit 130;
    143 for SIGTERM).

    Ray Train installs its own SIGINT handler when `fit` runs in the main thread, and after it the driver exits 1
    without a word. In a helper thread it installs none, so the signal reaches lawder here: Ray is shut down (its
    workers stop; checkpoints are committed atomically, so `last/` is the last complete epoch) and
    KeyboardInterrupt goes up to the CLI's error boundary. Off the main thread (Ray Tune trials, tests) there is
    no signal to handle and `fit` runs as it is.

    `stop`, when given, is an event `fit` watches (a Tune stopper): it is set first and `fit` gets `grace_s` to end
    by itself, because a `fit` thread that touches Ray after `ray.shutdown()` makes Ray's core worker end the
    whole process with exit 1.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the main thread below
            outcome["error"] = err

    thread = threading.Thread(target=fit, name="lawder-fit", daemon=True)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
    except KeyboardInterrupt:
        log.warning("stopping the Ray workers; the last complete checkpoint stays")
        import ray

        stop_forwarding_worker_logs()
        if stop is not None:
            stop.set()
            wait_ignoring_signals(thread, grace_s)
        no_auto_init()
        ray.shutdown()
        thread.join(30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def wait_ignoring_signals(thread: threading.Thread, seconds: float) -> None:
    """Join `thread` for up to `seconds`; a second Ctrl-C or SIGTERM meanwhile cuts the wait short."""
    deadline = time.monotonic() + seconds
    try:
        while thread.is_alive() and time.monotonic() < deadline:
            thread.join(0.2)
    except KeyboardInterrupt:
        pass


def stop_forwarding_worker_logs() -> None:
    """After Ctrl-C, Ray's actors (Ray Train's placement-group cleaner among them) print tracebacks about the
    shutdown itself to this terminal; the user asked to stop and gets one line. Ray's own shutdown removes the
    same handler a moment later."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher

        global_worker_stdstream_dispatcher.remove_handler("ray_print_logs")
    except (ImportError, AttributeError, KeyError, ValueError):  # another Ray version: the tracebacks stay
        pass


def no_auto_init() -> None:
    """After the interrupt's `ray.shutdown`, the fit thread still calls Ray's API on its way out (Tune's
    controller does), and Ray would start a fresh local instance for the first such call (its auto-init): seconds
    of start-up, in a thread, for nothing. Turned off for this process, which is ending."""
    try:
        from ray._private import auto_init_hook

        auto_init_hook.enable_auto_connect = False
    except (ImportError, AttributeError):  # another Ray version: it may start one, which exit shuts down
        pass


def interrupt(signum: int, frame: Any) -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends a training like Ctrl-C does (exit 143 instead of 130)."""
    raise_terminated(signum, frame)


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
