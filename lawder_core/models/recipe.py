"""The pixel backbone's diffusion recipe: how noise, targets, timesteps and samplers are defined.

Three prediction targets (`DenoiserSpec.prediction`):
- `v` (default for new runs): v = α·ε − σ·x0 on the cosine schedule (`squaredcos_cap_v2`), uniform integer
  timesteps. v stays informative at every noise level, so the model also learns something at SNR ≈ 0.
- `epsilon`: the original DDPM target (and the ControlNet/SD path's, which keeps its checkpoint's schedule).
- `flow`: rectified flow, x_t = (1 − t)·x0 + t·ε with target ε − x0, t ∈ (0, 1) drawn logit-normal (mean 0,
  std 1) and fed to the model as t · num_train_timesteps; sampled by an Euler or Heun ODE solver from t = 1 to 0.

Each training draw carries a per-sample Min-SNR-γ weight (γ = 5): noise levels the model can do little about
(SNR ≈ 0) or that are already easy (large SNR) stop dominating the gradient. It multiplies LAW's spatial map.

Sampling reads the scheduler config the run saved: new v/epsilon runs record trailing timestep spacing (the
first DDIM step starts at the last training timestep, i.e. from pure noise), old runs keep whatever spacing they
recorded, so they sample exactly as before.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor

from lawder_core.errors import UsageError
from lawder_core.models.configs import (
    DIFFUSION_SAMPLERS,
    PREDICTIONS,
    check_prediction,
    check_sampler,
    check_steps,
    default_sampler,
)

# diffusers' names for the two targets its DDPM/DDIM schedulers know.
PREDICTION_TYPES = {"v": "v_prediction", "epsilon": "epsilon"}
MIN_SNR_GAMMA = 5.0
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")  # diffusers' names; older runs saved 'leading'

TrainingScheduler = DDPMScheduler | FlowMatchEulerDiscreteScheduler
ModelFn = Callable[[Tensor, Tensor, Tensor], Tensor]  # (noisy, model timesteps, condition) → model output


def training_scheduler(prediction: str, beta_schedule: str = "squaredcos_cap_v2", num_train_timesteps: int = 1000,
                       timestep_spacing: str = "trailing") -> TrainingScheduler:
    """The scheduler a new pixel run trains with and saves in its run folder.

    flow keeps a `FlowMatchEulerDiscreteScheduler` config (shift 1: exactly our x_t = (1 − t)·x0 + t·ε), so the
    saved folder says what it is; it has no betas, and `beta_schedule` and `timestep_spacing` are ignored (the
    flow sampler walks its own uniform grid). v/epsilon keep a DDPM config that records the spacing sampling will
    use; `clip_sample` clips predicted x0 to the image range [−1, 1]. With beta_schedule='linear' and
    timestep_spacing='leading' an epsilon scheduler is exactly the one older runs saved.
    """
    if check_prediction(prediction) == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=1.0)
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UsageError(f"unknown timestep spacing {timestep_spacing!r}; expected one of {TIMESTEP_SPACINGS}.")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=PREDICTION_TYPES[prediction], clip_sample=True,
                         timestep_spacing=timestep_spacing)


def scheduler_class(prediction: str) -> type[TrainingScheduler]:
    """Which class reads a saved run's scheduler/ folder back."""
    return FlowMatchEulerDiscreteScheduler if check_prediction(prediction) == "flow" else DDPMScheduler


def load_scheduler(folder: str | os.PathLike, prediction: str) -> TrainingScheduler:
    """A scheduler that `save_pretrained` wrote to `folder`, read from its JSON there: never a hub lookup."""
    cls = scheduler_class(prediction)
    return cls.from_config(json.loads((Path(folder) / cls.config_name).read_text()))


# ---------------------------------------------------------------- training side


@dataclass(frozen=True)
class NoisedBatch:
    """One training draw: the model sees (noisy, model_timesteps) and is regressed onto target."""

    noisy: Tensor
    target: Tensor
    model_timesteps: Tensor  # (B,) what the model's timestep input gets: ints for v/epsilon, t·T (float) for flow
    time_weight: Tensor  # (B,) Min-SNR-γ weights (ones when switched off)


def min_snr_weight(snr: Tensor, prediction: str, gamma: float | None = MIN_SNR_GAMMA) -> Tensor:
    """Min-SNR-γ (Hang et al. 2023): weight the x0-space error by min(snr, γ), expressed for each target.

    The x0 error follows from the target error, so the weight on the target's MSE is min(snr, γ) times the
    factor that converts one into the other:
      epsilon: x0 = (x_t − σ·ε)/α        → |Δx0|² = |Δε|² / snr       → min(snr, γ) / snr
      v:       x0 = α·x_t − σ·v, σ² = 1/(1 + snr) → |Δx0|² = |Δv|²/(snr + 1) → min(snr, γ) / (snr + 1)
      flow:    x0 = x_t − t·u (u = ε − x0) → |Δx0|² = t²·|Δu|², and with snr = ((1 − t)/t)², t = 1/(1 + √snr)
                                             → min(snr, γ) · t² = min(snr, γ) / (1 + √snr)²
    All three are ≤ 1. γ = None switches the weighting off (all ones).
    """
    if gamma is None:
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "flow":
        return clipped / (1 + snr.sqrt()).pow(2)
    raise UsageError(f"unknown prediction target {prediction!r}; expected one of {PREDICTIONS}.")


def diffusion_snr(scheduler: DDPMScheduler, timesteps: Tensor) -> Tensor:
    """α²/σ² = ᾱ_t / (1 − ᾱ_t) at integer timesteps, float32, on the timesteps' device."""
    alpha_bar = scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps]
    return alpha_bar / (1 - alpha_bar)


def flow_snr(t: Tensor) -> Tensor:
    return ((1 - t) / t).pow(2)


def noised_batch(scheduler: TrainingScheduler, prediction: str, x0: Tensor, noise: Tensor,
                 generator: torch.Generator | None = None, *, snr_gamma: float | None = MIN_SNR_GAMMA,
                 level: float | None = None) -> NoisedBatch:
    """Draw timesteps (with `generator`), noise x0 and build the target and the Min-SNR weights.

    `scheduler` is the denoiser's training scheduler (its config decides T and, for v/epsilon, the betas).
    `level` ∈ [0, 1] puts every row at one noise level instead of drawing (previews): timestep ⌊level·T⌋, or
    t = level for flow.
    """
    b, device = x0.shape[0], x0.device
    num_train = int(scheduler.config.num_train_timesteps)
    if check_prediction(prediction) == "flow":
        if level is None:
            t = torch.sigmoid(torch.randn((b,), generator=generator, device=device))  # logit-normal(0, 1)
        else:
            t = torch.full((b,), float(level), device=device)
        tt = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return NoisedBatch(noisy=(1 - tt) * x0 + tt * noise, target=noise - x0, model_timesteps=t * num_train,
                           time_weight=min_snr_weight(flow_snr(t), prediction, snr_gamma))
    if level is None:
        timesteps = torch.randint(0, num_train, (b,), generator=generator, device=device)
    else:
        timesteps = torch.full((b,), min(int(level * num_train), num_train - 1), device=device, dtype=torch.long)
    target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, timesteps)
    return NoisedBatch(noisy=scheduler.add_noise(x0, noise, timesteps), target=target, model_timesteps=timesteps,
                       time_weight=min_snr_weight(diffusion_snr(scheduler, timesteps), prediction, snr_gamma))


# ---------------------------------------------------------------- sampling side


def initial_noise(shape: tuple[int, int, int], seed: int, indices: Sequence[int]) -> Tensor:
    """One independent noise tensor per global sample index (CPU generator: identical on every device), so image i
    depends only on (seed, i) however the masks are split across workers and batches."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


def sampling_scheduler(scheduler_config: Mapping[str, Any],
                       sampler: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh DDIM or DPM-Solver from the saved training config (a multistep solver keeps state: never reuse one).

    The timestep spacing is the config's own: trailing for new runs, whatever an old run recorded otherwise.
    """
    if sampler == "ddim":
        return DDIMScheduler.from_config(scheduler_config)
    if sampler == "dpm":
        return DPMSolverMultistepScheduler.from_config(scheduler_config)
    raise UsageError(f"unknown sampler {sampler!r}; expected one of {DIFFUSION_SAMPLERS}.")


def guided(model_fn: ModelFn, x: Tensor, timesteps: Tensor, cond: Tensor, null: Tensor | None,
           guidance: float) -> Tensor:
    """Classifier-free guidance on the model output: out_∅ + g · (out_cond − out_∅), float32.

    The combination is linear in the output, so it is the same rule for ε, v and the flow velocity.
    """
    if guidance == 1.0:
        return model_fn(x, timesteps, cond).float()
    if null is None:
        raise ValueError("guidance != 1 needs the null condition")
    both = model_fn(torch.cat([x, x]), torch.cat([timesteps, timesteps]), torch.cat([cond, null]))
    out_cond, out_null = both.float().chunk(2)
    return out_null + guidance * (out_cond - out_null)


@torch.no_grad()
def denoise(model_fn: ModelFn, cond: Tensor, null: Tensor | None, noise: Tensor, *,
             scheduler_config: Mapping[str, Any], prediction: str, steps: int = 50, sampler: str | None = None,
             guidance: float = 1.0) -> Tensor:
    """Initial noise (B,C,h,w) → loss-space samples x0 (the caller decodes them).

    `scheduler_config` is the denoiser's saved training scheduler config, `prediction` its spec's target;
    `sampler` defaults to DDIM for v/epsilon and Euler for flow; guidance 1 runs the conditional branch only.
    """
    check_steps(prediction, steps, int(scheduler_config["num_train_timesteps"]))
    sampler = sampler or default_sampler(prediction)
    check_sampler(prediction, sampler)
    if prediction == "flow":
        num_train = int(scheduler_config["num_train_timesteps"])
        return flow_ode(model_fn, cond, null, noise, num_train=num_train, steps=steps, heun=sampler == "heun",
                        guidance=guidance)
    wanted = PREDICTION_TYPES[prediction]
    if scheduler_config.get("prediction_type", "epsilon") != wanted:
        raise ValueError(f"the scheduler config predicts {scheduler_config.get('prediction_type')!r}, the spec "
                         f"says {prediction!r}")
    sched = sampling_scheduler(scheduler_config, sampler)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        out = guided(model_fn, model_in, t.expand(x.shape[0]).to(x.device), cond, null, guidance)
        x = sched.step(out, t, x).prev_sample
    return x


def flow_times(steps: int) -> Tensor:
    """Uniform grid t = 1 → 0 (steps + 1 points): the straight path needs no schedule tricks."""
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)


def flow_ode(model_fn: ModelFn, cond: Tensor, null: Tensor | None, noise: Tensor, *, num_train: int, steps: int,
             heun: bool = False, guidance: float = 1.0) -> Tensor:
    """Integrate dx/dt = u(x, t) from x(1) = ε to x(0) with Euler, or Heun (2nd order, 2 model calls a step;
    the last step, into t = 0, is an Euler step as in Karras et al.)."""
    x = noise.float()

    def velocity(x: Tensor, t: float) -> Tensor:
        timesteps = torch.full((x.shape[0],), t * num_train, device=x.device, dtype=torch.float32)
        return guided(model_fn, x, timesteps, cond, null, guidance)

    times = flow_times(steps).tolist()
    for t, t_next in zip(times[:-1], times[1:], strict=True):
        u = velocity(x, t)
        x_next = x + (t_next - t) * u
        if heun and t_next > 0:
            x_next = x + (t_next - t) * 0.5 * (u + velocity(x_next, t_next))
        x = x_next
    return x
