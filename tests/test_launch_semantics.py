"""What a multi-worker or multi-machine train-order gets right before a GPU ever runs it: optimiser state restored
onto the parameters' device, a global --batch-size, the shared-storage check of a joined cluster, and (Ray) two
gloo ranks training with unused auxiliary heads (aux_weight 0) on a joined cluster."""

import math

import pytest
import torch

from lawder_cli.main import app
from lawder_core.distributed import shared_storage
from lawder_core.distributed.train import LaunchConfig, _ray_worker, launch
from lawder_core.errors import EnvironmentProblem, UsageError
from lawder_core.models.configs import OrderConfig
from lawder_core.runs import read_metrics
from lawder_core.train import seg
from lawder_core.train.configs import check_seg_config, planned_steps_per_epoch, worker_batch_size
from lawder_core.train.runtime import DEVICE_ENV, WorkerContext
from lawder_core.train.seg import SegTrainConfig, build_loaders, train_segmenter
from tests.helpers import quick_seg_config, runner

SYNTHETIC = {"n": 30}  # images in the module's `data` (conftest)


def quick(data, out, **kw):
    return quick_seg_config(data, out, **{"epochs": 1, **kw})


class Restored(Exception):
    """Raised right after `restore`, carrying the model and optimiser it filled."""


@pytest.mark.filterwarnings("ignore:.*meta parameter")  # loading weights into `meta` tensors is a no-op
def test_restored_optimiser_state_lives_on_each_parameters_device(data, tmp_path, monkeypatch):
    """The worker's device here is `meta` (a second device on a CPU-only machine): the model must be on it before
    the optimiser exists, so that the restored moments land beside their parameters (on a GPU, state left on
    the CPU crashes the first step)."""
    out = tmp_path / "run"
    train_segmenter(quick(data, out))
    real_restore = seg.restore

    def restore_then_stop(out_, model, optimizer, scheduler, scaler=None):
        real_restore(out_, model, optimizer, scheduler, scaler)
        raise Restored(model, optimizer)

    monkeypatch.setattr(seg, "worker_context", lambda: WorkerContext(0, 1, torch.device("meta")))
    monkeypatch.setattr(seg, "restore", restore_then_stop)
    with pytest.raises(Restored) as caught:
        train_segmenter(quick(data, out, epochs=2, resume=True))
    model, optimizer = caught.value.args
    assert {p.device.type for p in model.parameters()} == {"meta"}
    moments = [(name, value, param) for param, state in optimizer.state.items() for name, value in state.items()
               if name != "step"]  # AdamW's step counter is a CPU scalar by design (unfused)
    assert moments and all(value.device == param.device for _, value, param in moments)


# ---------------------------------------------------------------- the global batch


def test_batch_size_is_global_and_split_over_the_workers(data, tmp_path):
    assert worker_batch_size(16, 1) == 16 and worker_batch_size(16, 4) == 4
    with pytest.raises(UsageError, match="split evenly"):
        worker_batch_size(6, 4)
    with pytest.raises(UsageError, match="split evenly"):
        check_seg_config(quick(data, tmp_path / "x", batch_size=6), world_size=4)
    cfg = quick(data, tmp_path / "run", batch_size=8, max_steps_per_epoch=None)
    one, two = (build_loaders(cfg, WorkerContext(rank, world, torch.device("cpu")))[0] for rank, world in
                ((0, 1), (1, 2)))
    assert one.batch_size == 8 and two.batch_size == 4
    # the same optimiser steps per epoch (up to rounding) whatever the worker count: the same schedule
    assert (len(one), len(two)) == (planned_steps_per_epoch(cfg, 1), planned_steps_per_epoch(cfg, 2))
    assert abs(len(one) - len(two)) <= 1  # only the uneven shards' rounding differs


def test_help_says_the_batch_is_global():
    for command in ("train-order", "train-law"):
        result = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert "global batch" in result.output, command


# ---------------------------------------------------------------- shared storage


def test_a_worker_that_cannot_see_the_run_folder_refuses_with_exit_4(tmp_path, monkeypatch):
    driver = tmp_path / "driver-side"
    token = shared_storage.write_marker(driver)
    shared_storage.check_marker(driver, token, wait_s=0)  # the same folder: seen
    monkeypatch.setattr(shared_storage, "WAIT_S", 0.0)
    with pytest.raises(EnvironmentProblem, match="not shared") as caught:
        shared_storage.check_marker(tmp_path / "worker-side", token, wait_s=0)  # another machine's copy
    assert caught.value.exit_code == 4 and "NFS" in caught.value.hint
    with pytest.raises(EnvironmentProblem):
        shared_storage.check_marker(driver, "another token", wait_s=0)  # a stale marker from another run
    shared_storage.remove_marker(driver)
    assert not (driver / shared_storage.MARKER).exists()


def test_the_worker_checks_before_it_trains(tmp_path, monkeypatch):
    monkeypatch.setattr("lawder_core.distributed.train.quiet_ray_logs", lambda: None)
    monkeypatch.setenv(DEVICE_ENV, "auto")  # the worker sets it for its process; restored after the test
    monkeypatch.setattr(shared_storage, "WAIT_S", 0.0)
    trained: list[int] = []
    cfg = SegTrainConfig(data="", out=str(tmp_path / "run"))
    with pytest.raises(EnvironmentProblem, match="not shared"):
        _ray_worker({"fn": lambda c, report: trained.append(1), "cfg": cfg, "device": "cpu",
                     "shared_token": "abc"})
    assert trained == []


@pytest.mark.slow  # two Ray worker processes training: ~40 s on a shared 2-core machine
def test_two_gloo_ranks_train_with_unused_aux_heads_on_a_joined_cluster(ray_local, data, tmp_path):
    """`order.aux_weight: 0` leaves ORDER's region heads out of the loss; DDP needs every parameter to take part
    in the backward pass (0 x loss does). Joining the running Ray (`ray_address`) also runs the shared-storage
    check, which this one machine passes."""
    out = tmp_path / "run"
    cfg = quick(data, out, model="mkunet-t-order", epochs=2, order=OrderConfig(aux_weight=0.0))
    from lawder_core.distributed.train import train_order

    summary = train_order(cfg, LaunchConfig(workers=2, ray_address="auto", name="aux0"))
    assert summary["epochs"] == 2 and [r["epoch"] for r in read_metrics(out)] == [0, 1]
    assert all(math.isfinite(r["train_loss"]) for r in read_metrics(out))
    assert not (out / shared_storage.MARKER).exists()  # the check leaves nothing behind


def test_in_process_runs_skip_the_shared_storage_check(data, tmp_path, monkeypatch):
    def refuse(folder):
        raise AssertionError("a local run has nothing to check")

    monkeypatch.setattr("lawder_core.distributed.train.write_marker", refuse)
    launch(train_segmenter, quick(data, tmp_path / "run"), LaunchConfig(workers=0))
    assert read_metrics(tmp_path / "run")
