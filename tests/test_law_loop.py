"""train-law's loop as a GPU needs it: no host sync inside a training step, one DataLoader for the whole run,
a diverged run stopped at its log line before a checkpoint, and the EMA in multi-tensor kernels."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lawder_core.errors import TrainingError
from lawder_core.models.ema import EMA
from lawder_core.models.law import LAWConfig
from lawder_core.train import diffusion
from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion

SYNTHETIC = {"n": 10}  # images in the module's `data` (conftest)


def tiny_config(data: Path, out: Path, **overrides) -> DiffusionTrainConfig:
    base = DiffusionTrainConfig(data=str(data), out=str(out), size=32, steps=4, batch_size=2, preset="tiny",
                                log_every=2, save_every=0, sample_every=0, law=LAWConfig(warmup_frac=0.25))
    return replace(base, **overrides)


SYNCING = ("__float__", "__int__", "__bool__", "item", "tolist")


def test_a_training_step_never_waits_for_the_device(data: Path, tmp_path: Path, monkeypatch) -> None:
    """Reading a tensor's value on the host (float(), .item(), `if tensor`) stalls a GPU step; the loop reads its
    numbers at log lines only."""
    inside = [False]
    reads: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            # AdamW's step counters are CPU scalars by design (a GPU run's fused AdamW keeps them on the device)
            if inside[0] and f"torch{os.sep}optim" not in caller:
                reads.append(f"{_name} in {caller}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    step = diffusion.training_step

    def watched(*args, **kwargs):
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(diffusion, "training_step", watched)
    result = train_diffusion(tiny_config(data, tmp_path / "run"))
    assert result["step"] == 4 and result["loss"] is not None  # the log lines still read every number
    assert reads == []


def test_one_dataloader_serves_every_epoch(data: Path, tmp_path: Path, monkeypatch) -> None:
    built: list[object] = []
    real = diffusion.DataLoader

    def counting(*args, **kwargs):
        built.append(kwargs.get("sampler"))
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusion, "DataLoader", counting)
    train_diffusion(tiny_config(data, tmp_path / "run", steps=9, log_every=9))  # 3 steps per epoch: 3 epochs
    assert len(built) == 1


def test_a_diverged_run_stops_at_its_log_line_before_a_checkpoint(data: Path, tmp_path: Path, monkeypatch) -> None:
    real = diffusion.weighted_diffusion_loss

    def diverging(*args, **kwargs):
        terms = real(*args, **kwargs)
        return replace(terms, loss=terms.loss * float("nan"))

    monkeypatch.setattr(diffusion, "weighted_diffusion_loss", diverging)
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match="nan at step 2"):
        train_diffusion(tiny_config(data, out, save_every=2))
    assert not (out / "last").exists() and not (out / "metrics.jsonl").exists()


def test_the_multi_tensor_ema_equals_the_per_tensor_one() -> None:
    torch.manual_seed(0)
    live = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2))
    ema = EMA(live, decay=0.9)
    reference = copy.deepcopy(live).requires_grad_(False)
    for update in range(5):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
            live[1].running_mean.add_(1.0)
        ema.update(live)
        weight = 1 - min(0.9, (2 + update) / (11 + update))  # after the update counter moved on
        for shadow, param in zip(reference.parameters(), live.parameters(), strict=True):
            shadow.lerp_(param, weight)
        for shadow, buffer in zip(reference.buffers(), live.buffers(), strict=True):
            shadow.copy_(buffer)
    for mine, theirs in zip(ema.shadow.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="parameters"):
        ema.update(torch.nn.Linear(2, 2))
