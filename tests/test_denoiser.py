"""Mask-conditioned denoisers: the pixel UNet presets and ControlNet on a tiny local SD-style folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from lawder_core.errors import EnvironmentProblem, LawderError, UsageError
from lawder_core.models.denoiser import (
    SPEC_FILE,
    ControlNetDenoiser,
    DenoiserSpec,
    PixelDenoiser,
    build_denoiser,
    load_denoiser,
)
from lawder_core.models.law import LAW, FeatureGrabber, lesion_at, weighted_diffusion_loss
from lawder_core.models.recipe import denoise
from tests.test_recipe import legacy_generate, legacy_scheduler
from tests.tiny_sd import build_tiny_sd


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd")


def masks_batch(b: int = 2, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(b, size, size, dtype=torch.long)
    masks[:, 8:16, 10:20] = 1
    return masks


def test_pixel_denoiser_takes_image_and_mask_and_predicts_image_noise() -> None:
    torch.manual_seed(0)
    d = PixelDenoiser(DenoiserSpec(preset="tiny", size=32))
    assert d.unet.config.in_channels == 4 and d.unet.config.out_channels == 3
    assert sum(p.numel() for p in d.parameters()) < 200_000
    x0 = d.encode(torch.rand(2, 3, 32, 32))
    assert x0.min() >= -1 and x0.max() <= 1
    eps = d(x0, torch.tensor([10, 900]), d.condition(masks_batch()))
    assert eps.shape == (2, 3, 32, 32) and d.loss_shape() == (3, 32, 32)
    assert d.scheduler.config.prediction_type == "epsilon"


def test_condition_is_plus_minus_one_per_label_and_zero_when_dropped() -> None:
    d = PixelDenoiser(DenoiserSpec(preset="tiny", size=16, label_names=("background", "kidney", "tumour")))
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, :4] = 1
    masks[:, 4:6] = 2
    cond = d.condition(masks, drop=torch.tensor([False, True]))
    assert cond.shape == (2, 2, 16, 16) and d.unet.config.in_channels == 5
    assert torch.equal(cond[0, 0] > 0, masks[0] == 1) and torch.equal(cond[0, 1] > 0, masks[0] == 2)
    assert set(cond[0].unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(cond[1], torch.zeros_like(cond[1]))  # the null condition for guidance


def test_feature_hook_sees_last_decoder_block_at_full_resolution() -> None:
    d = PixelDenoiser(DenoiserSpec(preset="tiny", size=16))
    grabber = FeatureGrabber(d.feature_module())
    d(torch.randn(1, 3, 16, 16), torch.tensor([5]), d.condition(torch.zeros(1, 16, 16, dtype=torch.long)))
    features = grabber.take((16, 16))
    assert features.shape == (1, d.feature_channels, 16, 16) and not features.requires_grad
    with pytest.raises(RuntimeError):
        grabber.take((16, 16))  # each forward's features are used once


def test_pixel_denoiser_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    d = PixelDenoiser(DenoiserSpec(preset="tiny", size=16))
    d.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()
    back = load_denoiser(tmp_path / "model")
    assert back.spec == d.spec
    x, t, c = torch.randn(1, 3, 16, 16), torch.tensor([3]), d.condition(torch.ones(1, 16, 16, dtype=torch.long))
    assert torch.allclose(d(x, t, c), back(x, t, c), atol=1e-6)


def test_an_old_run_folder_loads_as_epsilon_on_linear_betas_and_samples_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old = PixelDenoiser(DenoiserSpec(preset="tiny", size=16), scheduler=legacy_scheduler())
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    # the default spec still builds the first build's scheduler, field for field
    assert public(PixelDenoiser(DenoiserSpec(preset="tiny", size=16)).scheduler.config) == public(old.scheduler.config)
    old.save_pretrained(tmp_path / "model")
    spec = json.loads((tmp_path / "model" / SPEC_FILE).read_text())
    del spec["prediction"]  # the first build's specs had no such field
    (tmp_path / "model" / SPEC_FILE).write_text(json.dumps(spec))
    back = load_denoiser(tmp_path / "model")
    assert (back.spec.prediction, back.spec.beta_schedule) == ("epsilon", "linear")
    assert isinstance(back.scheduler, DDPMScheduler) and back.scheduler.config.timestep_spacing == "leading"
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:9, 5:10] = 1
    cond, null, noise = back.condition(masks), back.null_condition(masks), torch.randn(2, 3, 16, 16)
    for guidance in (1.0, 2.0):
        ours = denoise(back, cond, null, noise, scheduler_config=back.scheduler.config,
                        prediction=back.spec.prediction, steps=4, guidance=guidance)
        assert torch.equal(ours, legacy_generate(back, cond, null, noise, back.scheduler.config, 4, "ddim", guidance))


@pytest.mark.parametrize("prediction", ["v", "flow"])
def test_new_recipes_record_their_scheduler_and_read_it_back(prediction: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    d = PixelDenoiser(DenoiserSpec(preset="tiny", size=16, prediction=prediction, beta_schedule="squaredcos_cap_v2",
                                   timestep_spacing="trailing"))
    if prediction == "v":
        assert isinstance(d.scheduler, DDPMScheduler)
        assert (d.scheduler.config.prediction_type, d.scheduler.config.timestep_spacing) == ("v_prediction", "trailing")
    else:
        assert isinstance(d.scheduler, FlowMatchEulerDiscreteScheduler)
    d.save_pretrained(tmp_path / "model")
    back = load_denoiser(tmp_path / "model")
    assert back.spec == d.spec and type(back.scheduler) is type(d.scheduler)
    x, t, c = torch.randn(1, 3, 16, 16), torch.tensor([250.0]), d.condition(torch.ones(1, 16, 16, dtype=torch.long))
    weights, read = d.state_dict(), back.state_dict()
    assert weights.keys() == read.keys() and all(torch.equal(weights[k], read[k]) for k in weights)
    # equal weights in two module objects may take different SIMD paths: the outputs agree to float32 rounding
    assert torch.allclose(d(x, t, c), back(x, t, c), rtol=1e-5, atol=1e-5)  # flow feeds float timesteps t·1000


@pytest.mark.parametrize("kwargs", [{"preset": "huge"}, {"backbone": "dit"}, {"backbone": "controlnet"},
                                    {"label_names": ("background",)}, {"prediction": "x0"}, {"timestep_spacing": "x"},
                                    {"backbone": "controlnet", "pretrained": "sd", "prediction": "v"}])
def test_spec_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(LawderError):
        DenoiserSpec(**kwargs)


def test_size_must_fit_the_unet_depth() -> None:
    with pytest.raises(UsageError):
        build_denoiser(DenoiserSpec(preset="small", size=36))


def test_controlnet_trains_only_the_controlnet_in_latent_space(sd_folder: Path) -> None:
    torch.manual_seed(0)
    d = build_denoiser(DenoiserSpec(backbone="controlnet", size=32, pretrained=str(sd_folder), prompt="a polyp"))
    assert isinstance(d, ControlNetDenoiser)
    trainable = {n for n, p in d.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("controlnet.") for n in trainable)
    assert d.loss_shape() == (4, 16, 16)
    assert not torch.equal(d.prompt_embeds, d.null_prompt_embeds)

    masks = masks_batch()
    x0 = d.encode(torch.rand(2, 3, 32, 32))
    assert x0.shape == (2, 4, 16, 16)
    grabber = FeatureGrabber(d.feature_module())
    law = LAW(d.feature_channels)
    noise, t = torch.randn_like(x0), torch.tensor([50, 600])
    d.train()
    assert not d.unet.training and not d.vae.training
    pred = d(d.scheduler.add_noise(x0, noise, t), t, d.condition(masks))
    features = grabber.take((16, 16))
    assert features.shape == (2, d.feature_channels, 16, 16)
    terms = weighted_diffusion_loss(pred, noise, weighting="law", lesion=lesion_at(masks, (16, 16)), law=law,
                                    features=features, timesteps=t)
    assert terms.weights.shape == (2, 1, 16, 16)  # LAW's map lives at latent resolution
    terms.total.backward()
    assert all(p.grad is None for p in d.unet.parameters()) and all(p.grad is None for p in d.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.controlnet.parameters())
    assert law.out.weight.grad is not None


def test_controlnet_save_and_load_round_trip(sd_folder: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    d = build_denoiser(DenoiserSpec(backbone="controlnet", size=32, pretrained=str(sd_folder)))
    with torch.no_grad():
        for p in d.controlnet.parameters():
            p.add_(0.01)  # move off the zero-initialised output convs so the ControlNet matters
    d.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "controlnet" / "config.json").exists()
    assert not (tmp_path / "model" / "unet").exists()  # the frozen SD weights are referenced, not copied
    back = load_denoiser(tmp_path / "model")
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([7])
    cond = d.condition(masks_batch(1))
    assert torch.allclose(d(x, t, cond), back(x, t, cond), atol=1e-6)
    null = d.null_condition(masks_batch(1))
    assert not torch.allclose(d(x, t, cond), d(x, t, null))


def test_controlnet_without_text_encoder_uses_empty_prompt_only(tmp_path: Path) -> None:
    folder = build_tiny_sd(tmp_path / "sd-notext", with_text=False)
    d = build_denoiser(DenoiserSpec(backbone="controlnet", size=32, pretrained=str(folder)))
    assert torch.equal(d.prompt_embeds, torch.zeros(1, 77, 16))
    with pytest.raises(UsageError):
        build_denoiser(DenoiserSpec(backbone="controlnet", size=32, pretrained=str(folder), prompt="a polyp"))


def test_controlnet_missing_folder_is_an_environment_problem(tmp_path: Path) -> None:
    with pytest.raises(EnvironmentProblem):
        build_denoiser(DenoiserSpec(backbone="controlnet", size=32, pretrained=str(tmp_path / "nope")))
