import os

import pytest

# Offline by construction: no test may reach a hub or download weights.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for the module's tests (started once per process)."""
    import ray

    from lawder_core.dist.ray_train import ensure_ray

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
