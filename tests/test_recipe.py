"""The pixel backbone's diffusion recipe: targets, timesteps, Min-SNR weights, samplers, legacy runs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from lawder_core.errors import UsageError
from lawder_core.models.recipe import (
    PREDICTIONS,
    default_sampler,
    denoise,
    diffusion_snr,
    flow_snr,
    flow_times,
    initial_noise,
    load_scheduler,
    min_snr_weight,
    noised_batch,
    training_scheduler,
)


def legacy_scheduler() -> DDPMScheduler:
    """What every run of the first build saved: epsilon, linear betas, diffusers' default (leading) spacing."""
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                         clip_sample=True)


@torch.no_grad()
def legacy_generate(model_fn, cond, null, noise, scheduler_config, steps, scheduler="ddim", guidance=1.0):
    """A frozen copy of the first build's sampling loop (lawder_core/sample.py `generate`), without decoding."""
    cls = DDIMScheduler if scheduler == "ddim" else DPMSolverMultistepScheduler
    sched = cls.from_config(scheduler_config)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        tt = t.expand(x.shape[0]).to(x.device)
        if guidance == 1.0:
            eps = model_fn(model_in, tt, cond)
        else:
            both = model_fn(torch.cat([model_in, model_in]), torch.cat([tt, tt]), torch.cat([cond, null]))
            eps_cond, eps_null = both.float().chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
        x = sched.step(eps.float(), t, x).prev_sample
    return x


def toy_model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for a denoiser: depends on the input, the timestep and the condition."""
    return torch.tanh(0.5 * x + cond.mean(1, keepdim=True) * 0.3 + t.float().reshape(-1, 1, 1, 1) / 1000)


def batch(b: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, 8, 8, generator=g) * 1.6 - 0.8  # inside [−1, 1], as pixel-space images are
    noise = torch.randn(b, 3, 8, 8, generator=g)
    cond = torch.where(torch.rand(b, 1, 8, 8, generator=g) > 0.7, 1.0, -1.0)
    return x0, noise, cond, torch.zeros_like(cond)


# ---------------------------------------------------------------- training side


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_diffusion_targets_follow_the_scheduler_definition(prediction: str) -> None:
    sched = training_scheduler(prediction)
    x0, noise, _, _ = batch(64)
    nb = noised_batch(sched, prediction, x0, noise, torch.Generator().manual_seed(1))
    t = nb.model_timesteps
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) < 1000
    assert torch.equal(nb.noisy, sched.add_noise(x0, noise, t))
    expected = noise if prediction == "epsilon" else sched.get_velocity(x0, noise, t)
    assert torch.equal(nb.target, expected)
    if prediction == "v":  # and diffusers' v is α·ε − σ·x0
        a = sched.alphas_cumprod[t].sqrt().reshape(-1, 1, 1, 1)
        assert torch.allclose(nb.target, a * noise - (1 - a**2).sqrt() * x0, atol=1e-6)


def test_flow_target_recovers_x0_and_t_is_logit_normal() -> None:
    sched = training_scheduler("flow")
    x0, noise, _, _ = batch(3)
    nb = noised_batch(sched, "flow", x0, noise, torch.Generator().manual_seed(2))
    t = (nb.model_timesteps / 1000).reshape(-1, 1, 1, 1)
    assert torch.allclose(nb.target, noise - x0)
    assert torch.allclose(nb.noisy - t * nb.target, x0, atol=1e-6)  # x0 = x_t − t·(ε − x0)
    assert torch.allclose(nb.noisy + (1 - t) * nb.target, noise, atol=1e-6)  # and ε = x_t + (1 − t)·(ε − x0)
    draws = noised_batch(sched, "flow", torch.zeros(20_000, 1, 1, 1), torch.zeros(20_000, 1, 1, 1),
                         torch.Generator().manual_seed(3)).model_timesteps / 1000
    assert 0 < float(draws.min()) and float(draws.max()) < 1
    logit = torch.log(draws / (1 - draws))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03


def test_level_puts_every_row_at_one_noise_level() -> None:
    x0, noise, _, _ = batch(2)
    nb = noised_batch(training_scheduler("v"), "v", x0, noise, level=0.5)
    assert nb.model_timesteps.tolist() == [500, 500]
    flow = noised_batch(training_scheduler("flow"), "flow", x0, noise, level=0.5)
    assert torch.allclose(flow.noisy, (x0 + noise) / 2)


def test_min_snr_weights_match_the_formulas_and_stay_at_most_one() -> None:
    snr = torch.tensor([1e-4, 0.5, 1.0, 5.0, 20.0, 1e4])
    gamma = 5.0
    assert torch.allclose(min_snr_weight(snr, "epsilon", gamma), torch.minimum(snr, torch.tensor(gamma)) / snr)
    assert torch.allclose(min_snr_weight(snr, "v", gamma), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    t = torch.tensor([0.01, 0.3, 0.5, 0.7, 0.99])
    # flow: the x0-space weight min(snr, γ) carried over to the velocity's error, |Δx0| = t·|Δu|.
    expected = torch.minimum(flow_snr(t), torch.tensor(gamma)) * t**2
    assert torch.allclose(min_snr_weight(flow_snr(t), "flow", gamma), expected)
    for p in PREDICTIONS:
        assert float(min_snr_weight(snr, p, gamma).max()) <= 1 + 1e-6
    assert torch.equal(min_snr_weight(snr[:3], "epsilon", gamma), torch.ones(3))  # ε is untouched below γ
    assert torch.equal(min_snr_weight(snr, "v", None), torch.ones_like(snr))


def test_training_draw_carries_the_min_snr_weight_of_its_timesteps() -> None:
    sched = training_scheduler("v")
    x0, noise, _, _ = batch(16)
    nb = noised_batch(sched, "v", x0, noise, torch.Generator().manual_seed(4))
    assert torch.allclose(nb.time_weight, min_snr_weight(diffusion_snr(sched, nb.model_timesteps), "v"))
    off = noised_batch(sched, "v", x0, noise, torch.Generator().manual_seed(4), snr_gamma=None)
    assert torch.equal(off.time_weight, torch.ones(16)) and torch.equal(off.noisy, nb.noisy)


def test_training_schedulers_record_the_recipe_and_read_back(tmp_path) -> None:
    v = training_scheduler("v")
    assert (v.config.prediction_type, v.config.beta_schedule, v.config.timestep_spacing) == (
        "v_prediction", "squaredcos_cap_v2", "trailing")
    flow = training_scheduler("flow")
    assert isinstance(flow, FlowMatchEulerDiscreteScheduler) and flow.config.shift == 1.0
    for prediction, sched in (("v", v), ("flow", flow)):
        sched.save_pretrained(tmp_path / prediction)
        back = load_scheduler(tmp_path / prediction, prediction)
        public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
        assert type(back) is type(sched) and public(back.config) == public(sched.config)


# ---------------------------------------------------------------- sampling side


def oracle(prediction: str, x0: torch.Tensor, sched=None):
    """A perfect model: the true target for the known x0 at whatever (x_t, t) it is asked about."""

    def model_fn(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if prediction == "flow":
            return (x - x0) / (t / 1000).reshape(-1, 1, 1, 1)  # u = ε − x0 with ε = (x_t − (1 − t)·x0)/t
        a_bar = sched.alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
        a, s = a_bar.sqrt(), (1 - a_bar).sqrt()
        eps = (x.double() - a * x0.double()) / s
        return (eps if prediction == "epsilon" else a * eps - s * x0.double()).float()

    return model_fn


@pytest.mark.parametrize("prediction,sampler,steps", [("v", "ddim", 10), ("epsilon", "ddim", 10), ("v", "dpm", 10),
                                                      ("flow", "euler", 8), ("flow", "heun", 4)])
def test_each_sampler_returns_x0_from_a_perfect_model(prediction: str, sampler: str, steps: int) -> None:
    sched = training_scheduler(prediction)
    x0, noise, cond, null = batch()
    out = denoise(oracle(prediction, x0, sched), cond, null, noise, scheduler_config=sched.config,
                   prediction=prediction, steps=steps, sampler=sampler)
    assert torch.allclose(out, x0, atol=2e-3), float((out - x0).abs().max())


def test_new_runs_start_ddim_from_the_last_training_timestep() -> None:
    ddim = DDIMScheduler.from_config(training_scheduler("v").config)
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert flow_times(4).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.parametrize("sampler,guidance", [("ddim", 1.0), ("ddim", 3.0), ("dpm", 1.0), ("dpm", 2.0)])
def test_a_legacy_run_samples_exactly_as_the_first_build(sampler: str, guidance: float) -> None:
    config = legacy_scheduler().config
    public = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    assert public(training_scheduler("epsilon", "linear", 1000, "leading").config) == public(config)
    ddim = DDIMScheduler.from_config(config)
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]  # leading, as recorded
    x0, noise, cond, null = batch()
    ours = denoise(toy_model, cond, null, noise, scheduler_config=config, prediction="epsilon", steps=10,
                    sampler=sampler, guidance=guidance)
    before = legacy_generate(toy_model, cond, null, noise, config, 10, sampler, guidance)
    assert torch.equal(ours, before)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_guidance_one_is_the_unguided_conditional_output(prediction: str) -> None:
    sched = training_scheduler(prediction)
    x0, noise, cond, null = batch()
    kwargs = {"scheduler_config": sched.config, "prediction": prediction, "steps": 4}
    unguided = denoise(toy_model, cond, None, noise, **kwargs)
    assert torch.equal(denoise(toy_model, cond, null, noise, guidance=1.0, **kwargs), unguided)
    guided = denoise(toy_model, cond, null, noise, guidance=3.0, **kwargs)
    assert not torch.allclose(guided, unguided)
    # a model that ignores its condition is unaffected by guidance: out_∅ + g·(out − out_∅) = out
    blind = lambda x, t, c: toy_model(x, t, torch.zeros_like(c))  # noqa: E731
    assert torch.allclose(denoise(blind, cond, null, noise, guidance=3.0, **kwargs),
                          denoise(blind, cond, null, noise, **kwargs), atol=1e-6)


def test_samplers_must_fit_the_prediction() -> None:
    assert default_sampler("flow") == "euler" and default_sampler("v") == "ddim"
    x0, noise, cond, _ = batch(1)
    with pytest.raises(UsageError):
        denoise(toy_model, cond, None, noise, scheduler_config=training_scheduler("flow").config,
                 prediction="flow", sampler="ddim")
    with pytest.raises(UsageError):
        denoise(toy_model, cond, None, noise, scheduler_config=training_scheduler("v").config, prediction="v",
                 sampler="heun")
    with pytest.raises(ValueError):  # a v config handed over as epsilon: a wiring mistake, caught
        denoise(toy_model, cond, None, noise, scheduler_config=training_scheduler("v").config,
                 prediction="epsilon")
    with pytest.raises(UsageError):
        noised_batch(training_scheduler("v"), "x0", x0, noise)


def test_initial_noise_depends_only_on_seed_and_index() -> None:
    whole = initial_noise((3, 4, 4), 7, range(5))
    assert torch.equal(initial_noise((3, 4, 4), 7, [3, 4]), whole[3:])
    assert not torch.equal(initial_noise((3, 4, 4), 8, [3]), whole[3:4])
