"""A joined cluster without the resources asked for: a bounded, explained wait, then exit 4 (issue 16)."""

import time

import pytest

from lawder_cli.main import app
from lawder_core.distributed.session import wait_for_resources
from lawder_core.distributed.train import LaunchConfig
from lawder_core.errors import EnvironmentProblem, UsageError
from tests.helpers import runner

pytestmark = pytest.mark.faults


def test_missing_gpus_end_the_wait_with_what_the_cluster_has(ray_local):
    tic = time.monotonic()
    with pytest.raises(EnvironmentProblem, match=r"has 0 GPU free \(0 GPU in all\); this run needs 1 GPU") as err:
        wait_for_resources("joined-cluster", {"GPU": 1.0}, 1.0)
    assert 1.0 <= time.monotonic() - tic < 10
    assert "--wait-for-resources" in err.value.hint


def test_free_resources_start_at_once(ray_local):
    tic = time.monotonic()
    wait_for_resources("joined-cluster", {"CPU": 1.0}, 60.0)
    assert time.monotonic() - tic < 5


def test_a_local_ray_never_waits():
    wait_for_resources(None, {"GPU": 8.0}, 60.0)  # sized up front by check_resources; Ray is not even imported


def test_what_a_launch_asks_for_and_negative_waits():
    assert LaunchConfig(gpus=2).needs() == {"GPU": 2.0}
    assert LaunchConfig(workers=3, cpus_per_worker=2).needs() == {"CPU": 6.0}
    with pytest.raises(UsageError, match="wait-for-resources"):
        LaunchConfig(wait_for_resources=-1)
    result = runner.invoke(app, ["train-order", "--data", "x.h5", "--out", "o", "--wait-for-resources", "-1"])
    assert result.exit_code == 2
