"""Where training, sampling and prediction run, tested on the CPU with CUDA pretended where it must be.

`--gpus 0` is the CPU even where PyTorch sees a GPU; a worker told `cuda` takes its local GPU and turns on
the CUDA speed-ups; the autocast type follows the hardware's native bf16 support; `predict --device` is parsed
and honoured.
"""

import json
import os

import pytest
import torch

from lawder_cli.main import app
from lawder_core.distributed.train import LaunchConfig, _ray_worker, launch
from lawder_core.environment import pick_device
from lawder_core.errors import EnvironmentProblem, UsageError
from lawder_core.train.amp import precision
from lawder_core.train.configs import DiffusionTrainConfig
from lawder_core.train.runtime import DEVICE_ENV, on_device, optimizer_options, worker_context
from tests.helpers import runner, synthetic_h5


@pytest.fixture()
def cuda_visible(monkeypatch):
    """PyTorch reports one GPU; setting it as the current device is recorded, not done."""
    current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    return current


@pytest.fixture()
def speedup_flags():
    """The CUDA speed-up switches are global: put them back after the test."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def probe(cfg, report):
    """A training function that only records where it would train."""
    cfg["seen"].append(worker_context().device)
    return {}


def test_gpus_0_trains_on_the_cpu_in_process_even_where_a_gpu_is_visible(cuda_visible, speedup_flags):
    seen: list[torch.device] = []
    launch(probe, {"seen": seen}, LaunchConfig(gpus=0, workers=0))
    assert seen == [torch.device("cpu")] and cuda_visible == []
    assert not torch.backends.cudnn.benchmark  # CPU runs leave the CUDA switches alone
    assert DEVICE_ENV not in os.environ  # the choice ends with the run


def test_a_ray_worker_trains_where_the_launcher_says(cuda_visible, speedup_flags, monkeypatch):
    monkeypatch.setattr("lawder_core.distributed.train.quiet_ray_logs", lambda: None)
    for device, expected in (("cpu", torch.device("cpu")), ("cuda", torch.device("cuda", 0))):
        monkeypatch.setenv(DEVICE_ENV, "auto")  # the worker sets its own; the test's environment comes back
        seen: list[torch.device] = []
        _ray_worker({"fn": probe, "cfg": {"seen": seen}, "device": device})
        assert seen == [expected]
    assert torch.backends.cudnn.benchmark and torch.backends.cuda.matmul.allow_tf32


def test_launch_config_names_each_workers_device():
    assert LaunchConfig(gpus=0, workers=2).device == "cpu"
    assert LaunchConfig(gpus=2).device == "cuda"
    assert LaunchConfig(gpus=1, workers=2).world_size == 2 and LaunchConfig(gpus=3).world_size == 3
    with pytest.raises(UsageError, match="multiple of --gpus"):
        LaunchConfig(gpus=2, workers=3)


def test_two_workers_share_one_gpu_over_gloo():
    from lawder_core.distributed.train import scaling_config

    shared = scaling_config(LaunchConfig(gpus=1, workers=2))
    assert shared.num_workers == 2 and shared.use_gpu and shared.resources_per_worker == {"GPU": 0.5}
    one_each = scaling_config(LaunchConfig(gpus=2))
    assert one_each.num_workers == 2 and one_each.resources_per_worker is None


def test_a_cuda_worker_takes_its_local_gpu(cuda_visible, speedup_flags, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    with on_device("cuda"):
        assert worker_context().device == torch.device("cuda", 1)
    assert cuda_visible == [torch.device("cuda", 1)]


def test_unset_means_a_gpu_when_there_is_one(cuda_visible, speedup_flags):
    assert worker_context().device.type == "cuda"


def test_a_worker_told_cuda_without_one_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with on_device("cuda"), pytest.raises(EnvironmentProblem, match="sees none"):
        worker_context()
    monkeypatch.setenv(DEVICE_ENV, "tpu")
    with pytest.raises(UsageError, match=DEVICE_ENV):
        worker_context()


def test_tune_trials_train_where_their_resources_say(cuda_visible, tmp_path, monkeypatch):
    from lawder_core.distributed.tune import TuneOptions, start_trial, trial_device

    assert trial_device(TuneOptions()) == "cpu" and trial_device(TuneOptions(gpus_per_trial=0.5)) == "cuda"
    monkeypatch.setenv(DEVICE_ENV, "auto")  # restored after the test (start_trial sets it for the trial process)
    start_trial(str(tmp_path), "cpu", None)
    assert worker_context().device == torch.device("cpu")


def test_fused_adamw_on_cuda_only():
    assert optimizer_options(torch.device("cuda", 0)) == {"fused": True}
    assert optimizer_options(torch.device("cpu")) == {}


# ---------------------------------------------------------------- autocast type


@pytest.mark.parametrize(("native", "wanted", "dtype", "scaler"), [
    (True, "auto", torch.bfloat16, False),   # A100/H100: bf16 in hardware
    (False, "auto", torch.float16, True),    # V100/T4: bf16 only emulated, so fp16 with a scaler
    (True, "fp16", torch.float16, True),     # forced
    (False, "bf16", torch.bfloat16, False),  # forced (emulated, but asked for)
])
def test_the_autocast_type_follows_native_bf16_support(monkeypatch, native, wanted, dtype, scaler):
    asked: list[dict] = []

    def bf16_supported(**kwargs):
        asked.append(kwargs)
        return native

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    amp = precision(torch.device("cuda", 0), True, wanted)
    assert amp.enabled and amp.dtype == dtype and amp.needs_scaler == scaler
    if wanted == "auto":
        assert asked == [{"including_emulation": False}]  # emulation must not count as support


def test_no_autocast_on_the_cpu_or_when_switched_off(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert not precision(torch.device("cpu")).enabled
    assert not precision(torch.device("cuda", 0), amp=False).enabled
    assert precision(torch.device("cpu")).name == "fp32"
    with pytest.raises(UsageError, match="amp_dtype"):
        precision(torch.device("cpu"), True, "fp8")


def test_train_law_uses_the_same_choice(monkeypatch):
    from lawder_core.train.diffusion import amp_settings

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **kwargs: False)
    assert amp_settings(DiffusionTrainConfig(), torch.device("cuda", 0)) == (True, torch.float16)
    assert amp_settings(DiffusionTrainConfig(amp_dtype="bf16"), torch.device("cuda", 0)) == (True, torch.bfloat16)
    assert amp_settings(DiffusionTrainConfig(), torch.device("cpu")) == (False, torch.float32)
    with pytest.raises(UsageError, match="amp_dtype"):
        DiffusionTrainConfig(amp_dtype="half")


# ---------------------------------------------------------------- predict --device


def test_pick_device_parses_and_refuses(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="cuda:N"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda") and pick_device(None) == torch.device("cuda")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from lawder_core.train.seg import SegTrainConfig, train_segmenter

    root = tmp_path_factory.mktemp("predict")
    data = synthetic_h5(root / "s.h5", n=12, size=32)
    train_segmenter(SegTrainConfig(data=str(data), out=str(root / "run"), model="mkunet-t", size=32, epochs=1,
                                   batch_size=4, max_steps_per_epoch=1))
    return data, root / "run"


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_predict_runs_on_the_device_asked_for(trained, tmp_path, device):
    data, run = trained
    result = runner.invoke(app, ["predict", str(data), "--split", "train", "--run", str(run), "-o",
                                 str(tmp_path / device), "--device", device, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["device"] == "cpu"  # auto on a machine without a GPU


@pytest.mark.parametrize(("device", "code", "message"), [("gpu", 2, "cuda:N"), ("cuda:x", 2, "cuda:N"),
                                                         ("cuda", 4, "no GPU")])
def test_predict_refuses_a_device_it_cannot_use(trained, tmp_path, monkeypatch, device, code, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data, run = trained
    result = runner.invoke(app, ["predict", str(data), "--run", str(run), "-o", str(tmp_path / "p"),
                                 "--device", device])
    assert result.exit_code == code and message in result.output
    assert not (tmp_path / "p" / "masks").exists()


def test_predict_device_is_documented():
    result = runner.invoke(app, ["predict", "--help"], terminal_width=200)
    assert "--device" in result.output and "auto" in result.output
