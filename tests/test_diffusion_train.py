"""The train-law per-worker loop, called directly (no Ray): run folder, weightings, resume, ControlNet."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lawder_core.errors import UsageError
from lawder_core.models.law import LAWConfig
from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion
from tests.tiny_sd import build_tiny_sd

WEIGHTS = "last/denoiser/unet/diffusion_pytorch_model.safetensors"


SYNTHETIC = {"n": 8}  # images in the module's `data` (conftest)


def tiny_config(data: Path, out: Path, **overrides) -> DiffusionTrainConfig:
    base = DiffusionTrainConfig(data=str(data), out=str(out), size=32, steps=3, batch_size=4, preset="tiny",
                                log_every=1, save_every=0, sample_every=0,
                                law=LAWConfig(warmup_frac=0.34))
    return replace(base, **overrides)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_law_run_writes_the_run_folder_and_reports(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    reported: list[dict] = []
    cfg = tiny_config(data, out, sample_every=3, preview_steps=2, preview_count=2)
    result = train_diffusion(cfg, report=reported.append)
    assert result["step"] == 3 and [r["step"] for r in reported] == [1, 2, 3]
    ckpt = out / "last"
    for name in ("denoiser/lawder_denoiser.json", "denoiser/unet/config.json", "denoiser/scheduler",
                 "denoiser_ema/unet/diffusion_pytorch_model.safetensors", "law.safetensors", "law.json",
                 "training_state.pt", "progress.json"):
        assert (ckpt / name).exists(), name
    assert json.loads((ckpt / "progress.json").read_text())["step"] == 3
    assert (out / "samples" / "step_000003.png").stat().st_size > 1000
    assert (out / "config.json").exists()
    lines = read_metrics(out)
    assert [line["law_active"] for line in lines] == [False, True, True]  # warm-up: first third of the steps
    assert lines[0]["law_objective"] is None and lines[-1]["law_objective"] is not None
    assert lines[-1]["w_lesion"] > lines[-1]["w_background"]  # LAW starts from the lesion/background prior
    # the map is the γ-softened prior times a factor in [w_min, w_max]: never more than w_max / w_min above it
    assert lines[-1]["w_max"] < 5.0 / 0.2 * lines[-1]["w_lesion"]
    assert reported[-1]["checkpoint"] == str(ckpt) and reported[-1]["preview"].endswith(".png")
    assert set(load_file(ckpt / "law.safetensors")) >= {"out.weight", "inp.weight"}
    state = torch.load(ckpt / "training_state.pt", weights_only=True)
    assert {"optimizer", "law_optimizer", "lr_schedule", "scaler"} <= set(state)


@pytest.mark.parametrize("weighting", ["uniform", "ratio"])
def test_baseline_weightings_share_the_loop(data: Path, tmp_path: Path, weighting: str) -> None:
    out = tmp_path / weighting
    train_diffusion(tiny_config(data, out, weighting=weighting, steps=2))
    last = read_metrics(out)[-1]
    assert not (out / "last" / "law.safetensors").exists()
    if weighting == "uniform":
        assert last["w_lesion"] == last["w_background"] == 1.0
    else:
        assert last["w_lesion"] > 1.0 > last["w_background"]


class Interrupted(Exception):
    pass


def interrupt_at(step: int):
    def report(record: dict) -> None:
        if record["step"] == step:
            raise Interrupted

    return report


@pytest.mark.slow
def test_resume_continues_at_the_right_step_and_matches_an_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    train_diffusion(tiny_config(data, straight, steps=4, save_every=2))

    resumed = tmp_path / "resumed"
    with pytest.raises(Interrupted):  # killed right after the step-2 checkpoint, as a preempted job would be
        train_diffusion(tiny_config(data, resumed, steps=4, save_every=2), report=interrupt_at(2))
    with pytest.raises(UsageError):
        train_diffusion(tiny_config(data, resumed, steps=4, save_every=2))  # no silent overwrite without --resume
    reported: list[dict] = []
    train_diffusion(tiny_config(data, resumed, steps=4, save_every=2, resume=True), report=reported.append)

    assert [r["step"] for r in reported] == [3, 4]
    assert [line["step"] for line in read_metrics(resumed)] == [1, 2, 3, 4]
    assert json.loads((resumed / "last" / "progress.json").read_text())["step"] == 4
    a, b = load_file(straight / WEIGHTS), load_file(resumed / WEIGHTS)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    law_a, law_b = load_file(straight / "last/law.safetensors"), load_file(resumed / "last/law.safetensors")
    assert all(torch.allclose(law_a[k], law_b[k], atol=1e-6) for k in law_a)


def test_resume_refuses_a_different_model(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train_diffusion(tiny_config(data, out, steps=1, weighting="uniform"))
    with pytest.raises(UsageError, match="trained with"):
        train_diffusion(tiny_config(data, out, steps=2, weighting="uniform", preset="small", resume=True))


def test_batch_larger_than_the_data_is_a_usage_error(data: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="batch-size"):
        train_diffusion(tiny_config(data, tmp_path / "run", batch_size=64, steps=1))


@pytest.mark.slow
def test_controlnet_backbone_trains_a_step_with_law(data: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    sd = build_tiny_sd(tmp_path / "tiny-sd")
    out = tmp_path / "cn"
    result = train_diffusion(tiny_config(data, out, backbone="controlnet", pretrained=str(sd), prompt="a polyp",
                                         steps=2, batch_size=2, law=LAWConfig(warmup_frac=0.0)))
    assert result["step"] == 2 and result["law_objective"] is not None
    assert (out / "last" / "denoiser_ema" / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    assert not (out / "last" / "denoiser" / "unet").exists()


def test_config_loads_nested_law_options_from_a_file(tmp_path: Path) -> None:
    from lawder_core.config import build_config, to_dict

    path = tmp_path / "law.yaml"
    path.write_text("steps: 50\nweighting: law\nlaw:\n  objective: descent\n  w_min: 0.1\n  w_max: 10\n")
    cfg = build_config(DiffusionTrainConfig, path, batch_size=4, data="d.h5")
    assert cfg.law == LAWConfig(objective="descent", w_min=0.1, w_max=10.0)
    assert (cfg.steps, cfg.batch_size) == (50, 4)
    assert to_dict(cfg)["law"]["objective"] == "descent"
    with pytest.raises(UsageError):
        build_config(DiffusionTrainConfig, None, weighting="focal")


def test_init_from_starts_exactly_at_the_source_runs_ema_denoiser(data: Path, tmp_path: Path) -> None:
    from lawder_core.data.dataset import SegDataset
    from lawder_core.models.denoiser import load_denoiser
    from lawder_core.train.diffusion import build_trainer, denoiser_spec
    from lawder_core.train.runtime import worker_context

    source = tmp_path / "base"
    train_diffusion(tiny_config(data, source, weighting="uniform", steps=3, cond_dropout=1.0))
    cfg = tiny_config(data, tmp_path / "tuned", init_from=str(source), seed=7)
    spec = denoiser_spec(cfg, SegDataset(cfg.data, split=cfg.split, size=cfg.size))
    trainer, start = build_trainer(cfg, worker_context(), spec, checkpoint=None)
    loaded = load_denoiser(source / "last" / "denoiser_ema")
    raw = load_denoiser(source / "last" / "denoiser")
    g = torch.Generator().manual_seed(0)
    noisy, t = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([5, 800])
    masks = torch.zeros(2, 32, 32, dtype=torch.long)
    masks[:, 8:14, 10:20] = 1
    cond, null = loaded.condition(masks), loaded.null_condition(masks)
    with torch.no_grad():
        out = trainer.denoiser(noisy, t, cond)
        # the EMA weights, bit for bit, but for the mask inputs the source never trained (cond_dropout 1): they
        # start at zero, so any mask gives the source's prediction
        assert start == 0 and torch.equal(out, loaded(noisy, t, null))
        assert not torch.equal(loaded(noisy, t, cond), loaded(noisy, t, null))  # random mask weights moved it
        assert not torch.equal(out, raw(noisy, t, null))  # not the last raw iterate
        assert torch.equal(trainer.ema.shadow(torch.cat([noisy, cond], 1), t).sample, out)  # EMA starts there too
    tuned_weights, source_weights = trainer.denoiser.state_dict(), loaded.state_dict()
    differ = [k for k in source_weights if not torch.equal(tuned_weights[k], source_weights[k])]
    assert differ == ["unet.conv_in.weight"] and not tuned_weights[differ[0]][:, 3:].any()
    assert torch.equal(tuned_weights[differ[0]][:, :3], source_weights[differ[0]][:, :3])
    assert trainer.init_record["mask_inputs_zeroed"] is True
    assert trainer.optimizer.state_dict()["state"] == {} and trainer.law is not None
    assert float(trainer.law.out.weight.abs().sum()) == 0.0  # a fresh, zero-initialised LAW
    assert trainer.init_record["step"] == 3 and trainer.init_record["weights"] == "denoiser_ema"

    # the run records where it started, in its config, its progress (what a resume keeps) and its summary
    from lawder_core.train.diffusion import summarise_law_run

    train_diffusion(replace(cfg, steps=2))
    summary = summarise_law_run(tmp_path / "tuned")
    assert summary["init_from"]["run"] == str(source.resolve()) and summary["init_from"]["step"] == 3
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["init_from"] == str(source)
    train_diffusion(replace(cfg, steps=3, resume=True))
    assert summarise_law_run(tmp_path / "tuned")["init_from"]["step"] == 3
    lines = read_metrics(tmp_path / "tuned")
    assert {"law_departure", "grad_norm", "clipped"} <= set(lines[-1]) and lines[-1]["law_departure"] is not None


def test_init_from_a_source_that_saw_masks_keeps_its_mask_inputs(data: Path, tmp_path: Path) -> None:
    from lawder_core.models.denoiser import load_denoiser
    from lawder_core.train.diffusion import load_init_denoiser

    source = tmp_path / "base"
    train_diffusion(tiny_config(data, source, weighting="uniform", steps=1, cond_dropout=0.5))
    loaded = load_denoiser(source / "last" / "denoiser_ema")
    started, record = load_init_denoiser(source, loaded.spec, None)
    assert record["mask_inputs_zeroed"] is False
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in started.state_dict().items())


def test_a_mask_free_run_started_from_one_that_saw_masks_keeps_their_trained_mask_inputs(data: Path,
                                                                                          tmp_path: Path) -> None:
    from lawder_core.models.denoiser import load_denoiser
    from lawder_core.train.diffusion import load_init_denoiser, never_saw_a_mask

    saw = tmp_path / "saw"
    train_diffusion(tiny_config(data, saw, weighting="uniform", steps=1, cond_dropout=0.5))
    unconditional = tmp_path / "unconditional"  # cond_dropout 1, but its mask weights are saw's
    train_diffusion(tiny_config(data, unconditional, weighting="uniform", steps=1, cond_dropout=1.0,
                                init_from=str(saw)))
    scratch = tmp_path / "scratch"
    train_diffusion(tiny_config(data, scratch, weighting="uniform", steps=1, cond_dropout=1.0))
    again = tmp_path / "again"  # a mask-free fine-tune of a mask-free run: still never saw one
    train_diffusion(tiny_config(data, again, weighting="uniform", steps=1, cond_dropout=1.0, init_from=str(scratch)))
    assert not never_saw_a_mask(saw) and not never_saw_a_mask(unconditional)
    assert never_saw_a_mask(scratch) and never_saw_a_mask(again)

    loaded = load_denoiser(unconditional / "last" / "denoiser_ema")
    started, record = load_init_denoiser(unconditional, loaded.spec, None)
    assert record["mask_inputs_zeroed"] is False
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in started.state_dict().items())


def test_init_from_refuses_another_model_or_no_run(data: Path, tmp_path: Path) -> None:
    from lawder_core.errors import DataError
    from lawder_core.train.configs import check_law_config

    source = tmp_path / "base"
    train_diffusion(tiny_config(data, source, weighting="uniform", steps=1))
    with pytest.raises(UsageError, match="--init-from needs a run of the same model"):
        train_diffusion(tiny_config(data, tmp_path / "other", init_from=str(source), size=16))
    with pytest.raises(DataError, match="holds no trained denoiser"):
        check_law_config(tiny_config(data, tmp_path / "x", init_from=str(tmp_path / "nowhere")))
    with pytest.raises(UsageError, match="names the run being trained"):
        check_law_config(tiny_config(data, source, init_from=str(source)))


@pytest.mark.parametrize(("objective", "time_weight"), [("influence", "denoiser"), ("hardness", "layout")])
def test_law_objectives_and_time_weights_train_and_log_the_departure(data: Path, tmp_path: Path, objective: str,
                                                                    time_weight: str) -> None:
    out = tmp_path / "run"
    cfg = tiny_config(data, out, steps=3, law=LAWConfig(warmup_frac=0.0, objective=objective,
                                                        time_weight=time_weight, lr=1e-2))
    train_diffusion(cfg)
    lines = read_metrics(out)
    assert all(line["law_departure"] is not None for line in lines)
    assert lines[0]["law_departure"] == 0.0 or time_weight == "layout"  # step 1: the zero-initialised LAW
    assert lines[-1]["law_departure"] > 0
