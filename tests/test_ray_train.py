"""Ray integration: the launcher, the CLI on top of it, and a real 2-worker gloo run (slow)."""

import json

import pytest

from lawder_cli.main import app
from lawder_core.distributed.train import LaunchConfig, launch
from lawder_core.errors import DataError, UsageError
from lawder_core.models.factory import load_segmenter
from lawder_core.runs import read_metrics
from lawder_core.train.seg import train_segmenter
from tests.helpers import quick_seg_config, runner


def cfg(data, out, **kw):
    return quick_seg_config(data, out, **{"epochs": 1, **kw})


def test_in_process_launch_reports_metrics(data, tmp_path):
    metrics = launch(train_segmenter, cfg(data, tmp_path / "run"), LaunchConfig(workers=0, name="t0"))
    assert metrics["epoch"] == 0 and 0 <= metrics["val_dice"] <= 1
    assert load_segmenter(tmp_path / "run" / "best") is not None


def test_worker_errors_come_back_as_lawder_errors(data, tmp_path):
    bad = cfg(data, tmp_path / "run", synthetic=str(tmp_path / "missing.h5"))
    with pytest.raises(DataError, match="does not exist"):
        launch(train_segmenter, bad, LaunchConfig(workers=0, name="t1"))


def test_cli_train_order_json_and_refusal_to_clobber(data, tmp_path):
    out = tmp_path / "run"
    args = ["train-order", "--data", str(data), "--out", str(out), "--model", "mkunet-t", "--size", "32",
            "--epochs", "1", "--batch-size", "4", "--workers", "0", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--resume" in again.output
    bad = runner.invoke(app, [*args[:-1], "--force", "--model", "nope"])
    assert bad.exit_code == 2 and "mkunet-t-order" in bad.output


@pytest.mark.slow
def test_two_gloo_workers_write_a_loadable_checkpoint(ray_local, data, tmp_path):
    out = tmp_path / "run"
    launch(train_segmenter, cfg(data, out, model="mkunet-t-order"), LaunchConfig(workers=2, name="t2"))
    assert [r["epoch"] for r in read_metrics(out)] == [0]
    load_segmenter(out / "last")


def test_local_cpu_workers_share_the_machines_cores(monkeypatch):
    from lawder_core.distributed.train import scaling_config

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert scaling_config(LaunchConfig(workers=1)).resources_per_worker == {"CPU": 8}
    assert scaling_config(LaunchConfig(workers=3)).resources_per_worker == {"CPU": 2}
    assert scaling_config(LaunchConfig(workers=8)).resources_per_worker == {"CPU": 1}
    with pytest.raises(UsageError, match="needs 9 CPUs"):
        scaling_config(LaunchConfig(workers=9))
    assert scaling_config(LaunchConfig(workers=2, cpus_per_worker=3)).resources_per_worker == {"CPU": 3}
    # a joined cluster keeps Ray's default (the user's `ray start` resources decide)
    assert scaling_config(LaunchConfig(workers=1, ray_address="auto")).resources_per_worker is None


def test_worker_logging_keeps_lawder_info_and_drops_ray_chatter():
    import logging

    from ray.train.v2._internal.execution import context  # logs "Reporting training result ..." per report
    from ray.train.v2._internal.execution.scaling_policy import autoscaling_coordinator_client as client

    from lawder_core.distributed.session import (
        AUTOSCALING_CLIENT_LOGGER,
        PLACEMENT_GROUP_CLEANER_LOGGER,
        quiet_ray_logs,
    )

    root = logging.getLogger()
    touched = [root, logging.getLogger("lawder_core"), logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER),
               logging.getLogger(AUTOSCALING_CLIENT_LOGGER)]
    levels, handler = [lg.level for lg in touched], logging.NullHandler()
    root.addHandler(handler)  # what a Ray worker starts with: root handlers, root at INFO
    root.setLevel(logging.INFO)
    try:
        quiet_ray_logs()
        assert logging.getLogger("lawder_core.train.seg").isEnabledFor(logging.INFO)
        assert not context.logger.isEnabledFor(logging.INFO)
        assert not logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).isEnabledFor(logging.WARNING)
        assert client.logger.name == AUTOSCALING_CLIENT_LOGGER and not client.logger.isEnabledFor(logging.WARNING)
        # the controller then configures `ray.train` with dictConfig, which resets its children's levels (as here)
        # and keeps their filters
        client.logger.setLevel(logging.NOTSET)
        warning = logging.LogRecord(client.logger.name, logging.WARNING, __file__, 1, "timed out", None, None)
        assert not client.logger.filter(warning)
        assert client.logger.filter(logging.makeLogRecord({**vars(warning), "levelno": logging.ERROR}))
    finally:  # later tests see the logging set-up they had before
        root.removeHandler(handler)
        for lg, level in zip(touched, levels, strict=True):
            lg.setLevel(level)
            lg.filters.clear()


@pytest.mark.parametrize("command", ["train-order", "train-law"])
def test_more_gpus_than_the_machine_has_exit_4_before_ray_starts(command, data, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "run"
    result = runner.invoke(app, [command, "--data", str(data), "--out", str(out), "--gpus", "4", "--batch-size", "4"])
    assert result.exit_code == 4, result.output
    assert "this machine has 1" in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()  # refused before the run folder was opened (and before Ray: the fixture refuses it)
