import os

import pytest

# Offline by construction: no test may reach a hub or download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(items):
    """A test that needs a Ray instance says so by asking for `ray_local`; it is marked `ray` for `-m`."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


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
    """A local Ray for the module's tests (started once per process)."""
    import ray

    from lawder_core.distributed.train import ensure_ray

    ensure_ray(None)
    yield
    # A leaked placement group would make the next Ray call wait forever: all CPUs must be free again.
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources().get("CPU")


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to reach the internet fails the test instead of waiting on a socket."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
