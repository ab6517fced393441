"""The Ray session every distributed command shares: a private local Ray (or a joined cluster), its logs kept
quiet, resources waited for with a bound, lawder's own errors dug out of Ray's wrappers, and Ctrl-C or SIGTERM
stopping a `fit` the documented way.

The launcher (`train.py`), distributed sampling (`sample.py`) and sweeps (`tune.py`) start Ray through here only.
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
from pathlib import Path
from typing import Any

from lawder_core.distributed.loopback import loopback_only
from lawder_core.errors import EnvironmentProblem, LawderError, causes
from lawder_core.interrupts import raise_terminated

log = logging.getLogger(__name__)

# Measured on a 2-core machine: these cut a 2-worker CPU fit from ~25 s to ~12 s and send nothing anywhere.
RAY_ENV = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}


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
             runtime_env={"worker_process_setup_hook": "lawder_core.distributed.session.quiet_ray_logs"})


def refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE into its C++ config when imported; re-read it, as Ray's own token setup does."""
    try:
        from ray._raylet import Config
    except ImportError:  # pragma: no cover - a Ray without token authentication
        return
    Config.initialize("")


PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# On a loaded machine the controller's 5 s call to the autoscaling coordinator can time out; it warns with a full
# traceback and sends the request again on its next poll. A local Ray has no autoscaler to ask.
AUTOSCALING_CLIENT_LOGGER = "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client"


def quiet_ray_logs() -> None:
    """Every worker of a local Ray: lawder's INFO lines, Ray's warnings, and not Ray's per-report chatter.

    Without the dashboard (not started locally, to save memory) Ray Train's placement-group cleaner cannot
    reach the state API and warns about it every second for the whole run; it has nothing to clean up
    unless the controller dies, and then Ray's own shutdown removes the group on a local instance.
    """
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")  # a handler where Ray set none
    logging.getLogger().setLevel(logging.WARNING)  # Ray's workers start with the root logger at INFO
    logging.getLogger("lawder_core").setLevel(logging.INFO)
    for name in (PLACEMENT_GROUP_CLEANER_LOGGER, AUTOSCALING_CLIENT_LOGGER):
        quiet_below_error(logging.getLogger(name))
    threading.excepthook = quiet_cleaner_crash(threading.excepthook)


def errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_below_error(logger: logging.Logger) -> None:
    """ERROR and above only, by level and by a filter: Ray Train's controller configures `ray.train` with
    `dictConfig` after this hook has run, which resets its child loggers' levels but keeps their filters."""
    logger.setLevel(logging.ERROR)
    if errors_only not in logger.filters:
        logger.addFilter(errors_only)


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


def find_lawder_error(error: BaseException) -> LawderError | None:
    """Dig the user-facing error out of Ray's wrappers (worker failures, causes, RayTaskError)."""
    return next((err for err in causes(error) if isinstance(err, LawderError)), None)


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
