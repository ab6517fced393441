import os
from pathlib import Path

import pytest

# Offline by construction: no test may reach a hub or download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


# Under pytest-xdist (`make test` runs one worker per core) each worker gets its share of the cores, so two
# workers do not each start a thread per core; the commands a test starts as subprocesses (and their Ray workers)
# inherit the same share through OMP_NUM_THREADS instead of spinning one thread per core against the other worker.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    import torch

    CORE_SHARE = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(CORE_SHARE))
    torch.set_num_threads(CORE_SHARE)

# Tests that share a costly once-per-process fixture: on one worker, so it is built once.
SHARED_FIXTURE_GROUPS = {"order_files": "onnx-order"}


@pytest.hookimpl(tryfirst=True)  # xdist's worker reads the groups in this same hook: ours must run before it
def pytest_collection_modifyitems(items):
    """A test that needs a Ray instance says so by asking for `ray_local`; it is marked `ray` for `-m`.

    xdist groups (`--dist loadgroup`): every Ray test runs on one worker, one after another (one local Ray per
    process, never two at once), and tests sharing a costly fixture run together; every other test goes to
    whichever worker is free (module fixtures here cost seconds, so spreading beats keeping a module together).
    """
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "ray_local" in fixtures:
            item.add_marker(pytest.mark.ray)
        if item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.xdist_group("ray"))
        for fixture, group in SHARED_FIXTURE_GROUPS.items():
            if fixture in fixtures:
                item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(autouse=True)
def ray_only_where_asked(request, monkeypatch):
    """Starting Ray from a test that did not ask for `ray_local` is a test bug: `make test-fast` must start none."""
    if "ray_local" in request.fixturenames:
        return
    import lawder_core.distributed.sample
    import lawder_core.distributed.train
    import lawder_core.distributed.tune

    def refuse(address):
        raise AssertionError("this test starts Ray: request the ray_local fixture (and so the `ray` marker)")

    for module in (lawder_core.distributed.train, lawder_core.distributed.sample, lawder_core.distributed.tune):
        monkeypatch.setattr(module, "ensure_ray", refuse)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module's tests (started once per process), as a command starts it."""
    from lawder_core.distributed.session import ensure_ray

    ensure_ray(None)  # before `import ray`: lawder's loopback mode is read at import
    import ray

    yield
    # A leaked placement group would make the next Ray call wait forever: all CPUs must be free again. Ray Train
    # removes a finished run's group asynchronously, so a loaded machine gets a bounded wait for it.
    import time

    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU", 0) != ray.cluster_resources().get("CPU") and time.monotonic() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU")


@pytest.fixture(scope="module")
def data(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic HDF5 file for the module's tests (its folds and side files stay with the module). A module
    sets its size with `SYNTHETIC = {"n": 10}` (defaults: 24 images of 32 px)."""
    from tests.helpers import synthetic_h5

    spec = {"n": 24, "size": 32, **getattr(request.module, "SYNTHETIC", {})}
    return synthetic_h5(tmp_path_factory.mktemp("data") / "s.h5", **spec)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to reach the internet fails the test instead of waiting on a socket."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture(scope="session")
def law_run(tmp_path_factory):
    """A tiny `train-law` run (trained once per session) for the tests that sample from one; their own data sets
    of the synthetic kind condition it."""
    from tests.helpers import synthetic_h5, tiny_law_run

    root = tmp_path_factory.mktemp("law")
    return tiny_law_run(synthetic_h5(root / "s.h5", n=8, size=32), root / "run")
