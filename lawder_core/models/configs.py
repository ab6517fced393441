"""What the models are, as plain data: names, sizes and the frozen configs of LAW and ORDER.

No torch here: the CLI validates a request (an unknown model, a bad LAW range) against these before it pays for
importing PyTorch, and the model modules build from the same definitions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lawder_core import numbers
from lawder_core.errors import UsageError

# ---------------------------------------------------------------- segmenters

MKUNET_CHANNELS: dict[str, tuple[int, int, int, int, int]] = {
    "t": (4, 8, 16, 24, 32),
    "s": (8, 16, 32, 48, 80),
    "base": (16, 32, 64, 96, 160),
    "m": (32, 64, 128, 192, 320),
    "l": (64, 128, 256, 384, 512),
    # Not published: MK-UNet-T widened to mkunet-t-order's parameter count (42,554 vs 42,953), ORDER's fair control.
    "t-wide": (6, 12, 22, 32, 40),
}

SMP_MODELS: dict[str, tuple[str, str]] = {
    "unet-r34": ("Unet", "resnet34"),
    "unet-r18": ("Unet", "resnet18"),
    "unet-mbv2": ("Unet", "mobilenet_v2"),
    "unetpp-r34": ("UnetPlusPlus", "resnet34"),
}
MKUNET_MODELS = {f"mkunet-{v}": v for v in MKUNET_CHANNELS}
ORDER_MODELS = {f"mkunet-{v}-order": v for v in ("t", "s", "base")}


def available_models() -> list[str]:
    return [*MKUNET_MODELS, *ORDER_MODELS, *SMP_MODELS]

CHECKPOINT_CONFIG = "config.json"  # a segmenter checkpoint folder: this + model.safetensors
# inference paths of `models/fast.py`
MODES = ("auto", "eager", "channels_last", "compile")


def check_model_name(name: str) -> str:
    if name not in available_models():
        raise UsageError(f"unknown model {name!r}.", f"Available: {', '.join(available_models())}.")
    return name


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UsageError(f"unknown inference mode {mode!r}.", f"Choose one of: {', '.join(MODES)}.")
    return mode


SKIP_FUSIONS = 4  # MK-UNet fuses t4, t3, t2, t1 after decoder stages 1-4 (H/16, H/8, H/4, H/2)


@dataclass(frozen=True)
class OrderConfig:
    """Knobs of the ORDER adapter; all of them are reachable from `lawder tune order`."""

    rho: float = 0.25  # share of positions that become queries (sweep 0.1-0.5)
    kv_grid: int = 16  # keys/values: the other stream pooled to kv_grid × kv_grid, plus the query's 3×3 window
    token_dim: int = 24  # both streams are projected to this width before LayerNorm (16-32; H/2 has 4 channels)
    attn_dim: int = 24  # query/key/value width (sweep 16-32)
    heads: int = 1  # one head: on the CPU the softmax over (queries × (grid² + 9)) scores dominates, per head
    late_stages: int = 3  # how many of the last skip fusions ORDER replaces: 3 = H/8, H/4, H/2
    aux_weight: float = 0.2  # weight of the region heads' losses in training (ORDER's own; not MK-UNet's heads)
    # The region heads (and so the uncertainty that selects queries) read the decoder through a stop-gradient:
    # their losses train the heads, never the trunk, so the trunk's gradient at step 0 is MK-UNet-T's.
    detach_heads: bool = True

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"aux_weight": numbers.Range(0, 1000)}, prefix="ORDER ")
        if not 0.0 < self.rho <= 1.0:
            raise UsageError(f"ORDER rho must lie in (0, 1], got {self.rho}.", "Typical values are 0.1-0.5.")
        if self.kv_grid < 1:
            raise UsageError(f"ORDER kv_grid must be at least 1, got {self.kv_grid}.")
        if self.token_dim < 1:
            raise UsageError(f"ORDER token_dim must be at least 1, got {self.token_dim}.")
        if self.heads < 1 or self.attn_dim < 1 or self.attn_dim % self.heads:
            raise UsageError(
                f"ORDER attn_dim ({self.attn_dim}) must be a positive multiple of heads ({self.heads})."
            )
        if not 1 <= self.late_stages <= SKIP_FUSIONS:
            raise UsageError(
                f"ORDER late_stages must be between 1 and {SKIP_FUSIONS}, got {self.late_stages}.",
                "The design replaces the last 2 or 3 fusions (H/4, H/2 or H/8, H/4, H/2).",
            )
        if self.aux_weight < 0:
            raise UsageError(f"ORDER aux_weight must be non-negative, got {self.aux_weight}.")


# ---------------------------------------------------------------- diffusion

BACKBONES = ("unet", "controlnet")
SPEC_FILE = "lawder_denoiser.json"  # beside a saved denoiser's weights: what it is and how it was trained
PREDICTIONS = ("v", "flow", "epsilon")
SAMPLERS = ("ddim", "dpm", "euler", "heun")
FLOW_SAMPLERS = ("euler", "heun")
DIFFUSION_SAMPLERS = ("ddim", "dpm")
PRESETS: dict[str, dict[str, Any]] = {
    # 0.16M parameters: unit tests at 32 px.
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "attention": (False, False),
             "norm_num_groups": 8},
    # 3.1M parameters: about 0.35 s per step at batch 8, 64 px, on a 2-core CPU.
    "small": {"block_out_channels": (32, 64, 64, 128), "layers_per_block": 1,
              "attention": (False, False, False, True), "norm_num_groups": 32},
    # 27M parameters: GPU runs.
    "base": {"block_out_channels": (64, 128, 256, 256), "layers_per_block": 2,
             "attention": (False, False, True, True), "norm_num_groups": 32},
}


def check_prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise UsageError(f"unknown prediction target {prediction!r}; expected one of {PREDICTIONS}.")
    return prediction


def default_sampler(prediction: str) -> str:
    return "euler" if check_prediction(prediction) == "flow" else "ddim"


def check_sampler(prediction: str, sampler: str) -> None:
    allowed = FLOW_SAMPLERS if check_prediction(prediction) == "flow" else DIFFUSION_SAMPLERS
    if sampler not in allowed:
        raise UsageError(f"sampler (--scheduler) {sampler!r} does not fit a {prediction!r} model; expected one of "
                         f"{allowed}.")


def check_steps(prediction: str, steps: int, num_train: int) -> None:
    """DDIM and DPM-Solver pick `steps` of the timesteps the model was trained on, so they cannot take more; the
    flow ODE solvers take any number."""
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}.")
    if check_prediction(prediction) != "flow" and steps > num_train:
        raise UsageError(f"--steps {steps} is more than the {num_train} timesteps this model was trained with.",
                         f"Use --steps {num_train} or fewer (the default is 50).")


WEIGHTINGS = ("uniform", "ratio", "law")
OBJECTIVES = ("hardness", "influence", "descent")
WARMUP_WEIGHTS = ("uniform", "prior")
# How LAW's objective weighs each row's noise level: as the denoiser's loss does (Min-SNR; all alike when that is
# off), only the layout-deciding levels (SNR below layout_snr), or all alike (revision 2).
LAW_TIME_WEIGHTS = ("denoiser", "layout", "none")


@dataclass(frozen=True)
class LAWConfig:
    """Every knob of LAW; the sweepable ones are reachable from `lawder tune`.

    lr and λ_prior (revision 3) were chosen so that the map leaves the prior within a run. Measured by
    fine-tuning a small UNet (64 px, batch 8, from a base trained 500 steps with the condition dropped) with LAW
    on the small-lesion set (`prepare synthetic --lesion-frac 0.003,0.03 --blobs 1`, 600 images), warm-up 0,
    `law_departure` = mean |log w − log w_prior| per 25-step window, from step 25 on:
      lr 1e-4, λ_prior 3 (revision 2): 0.002, 0.007, 0.017, 0.031: next to the prior (on Kvasir the LAW arm
                                       ended at the ratio map's w_lesion after 1,500 steps);
      lr 1e-3, λ_prior 3:              0.074, 0.141, 0.095, 0.076, 0.099, 0.064;
      lr 1e-3, λ_prior 1 (default):    0.075, 0.308, 0.256, 0.189, 0.214, 0.181, 0.211; w_lesion/w_background
                                       at 2.3–3.6× the prior's 6.7 (the lesions' 1.7 % of the pixels carry
                                       21–29 % of the weight, 10 % under the prior);
      lr 1e-3, λ_prior 1, influence:   0.073, 0.314, 0.393 (w_lesion/w_background 4.6× the prior's).
    The larger anchor keeps the map within ~10 % of the prior on average; λ_prior 1 lets it move by ~20 % at
    equilibrium, reached within ~50 steps. On the toy of tests/test_law.py (borders 4× harder) the default's
    departure grows 0.18 / 0.35 / 0.46 at 50 / 100 / 300 steps (lr 1e-4: 1e-4 after 120 steps).

    The remaining penalty defaults were measured with a real LAW on fixed features against a synthetic error
    field four times larger on lesion borders (lesions 1.6–10 % of a 64 × 64 map, 1500 Adam steps): λ_tv = 1
    would halve the saturation near the top of the factor range but lifts the lesion-logit gradient of a 1.6 %
    lesion to 11–12× the background's (0.3: 8–9×, the hardness term alone: 8×).
    """

    objective: str = "hardness"  # 'hardness' | 'influence' (|v_cond − v_uncond|) | 'descent' (ablation)
    time_weight: str = "denoiser"  # 'denoiser' | 'layout' | 'none': LAW_TIME_WEIGHTS
    layout_snr: float = 1.0  # time_weight 'layout': LAW learns from rows with SNR below this (t ≳ 0.5 T, cosine)
    gamma: float = 0.5  # (sweep 0–1) prior exponent: lesion weight ∝ r^−γ; 0 = uniform prior, 1 = equal mass
    w_min: float = 0.2  # (sweep) bounds of LAW's factor on the prior: [0.5,2], [0.25,4], [0.2,5], [0.1,10]
    w_max: float = 5.0
    lambda_prior: float = 1.0  # (sweep 0.5–10) mean((log w − log w_prior)²): how far LAW may leave the prior
    lambda_tv: float = 0.3  # (sweep 0–1) total variation of w: no speckle, no single-pixel spikes
    beta_kl: float = 0.01  # (sweep 0–0.1) KL(w/HW ‖ uniform): keeps mass from piling onto a few pixels
    warmup_frac: float = 0.1  # (sweep 0–0.33) share of steps before LAW switches on
    warmup_weights: str = "uniform"  # map used during warm-up: 'uniform' | 'prior'
    lr: float = 1e-3  # LAW's own AdamW (1e-4 left the map at the prior for a whole run: see the docstring)
    weight_decay: float = 0.0
    hidden: int = 16  # channels of the weighter CNN (16 keeps LAW at ~3 % of a small UNet's step; 32 costs ~10 %)
    groups: int = 4  # GroupNorm groups
    use_timestep: bool = True  # FiLM on the timestep embedding
    use_error: bool = False  # the detached per-pixel error as an extra input channel
    normalise_error: bool = True  # err′ = err / mean(err): the objective means the same at every noise level
    time_embed_dim: int = 32
    feature_module: str = ""  # dotted submodule of the denoiser's UNet to hook; "" = the last decoder block

    def __post_init__(self) -> None:
        numbers.check_fields(self, LAW_RANGES)
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown LAW objective {self.objective!r}; expected one of {OBJECTIVES}.")
        if self.time_weight not in LAW_TIME_WEIGHTS:
            raise UsageError(f"unknown LAW time weight {self.time_weight!r}; expected one of {LAW_TIME_WEIGHTS}.")
        if self.layout_snr <= 0:
            raise UsageError(f"LAW layout_snr must be positive, got {self.layout_snr}.")
        if self.warmup_weights not in WARMUP_WEIGHTS:
            raise UsageError(f"unknown warm-up weights {self.warmup_weights!r}; expected one of {WARMUP_WEIGHTS}.")
        if not 0 < self.w_min < 1 < self.w_max:
            raise UsageError(f"LAW factor range [{self.w_min}, {self.w_max}] must satisfy 0 < w_min < 1 < w_max.",
                             "The factor is 1 where LAW leaves the prior alone, e.g. w_min=0.2 w_max=5.")
        if self.gamma < 0:
            raise UsageError(f"LAW prior exponent gamma must be non-negative, got {self.gamma}.")
        if not 0 <= self.warmup_frac < 1:
            raise UsageError(f"LAW warmup_frac must lie in [0, 1), got {self.warmup_frac}.")
        if min(self.lambda_prior, self.lambda_tv, self.beta_kl, self.lr) < 0:
            raise UsageError("LAW penalty weights and learning rate must be non-negative.")
        if self.hidden < 1 or self.hidden % self.groups:
            raise UsageError(f"LAW hidden={self.hidden} must be a positive multiple of groups={self.groups}.")


# Finite, and what each knob means (the flags' names: --gamma, --w-min, ...; the rest are config/sweep keys).
LAW_RANGES = {"gamma": numbers.GAMMA, "w_min": numbers.W_MIN, "w_max": numbers.W_MAX,
              "lambda_prior": numbers.Range(0, 1000), "lambda_tv": numbers.Range(0, 1000),
              "beta_kl": numbers.Range(0, 1000), "lr": numbers.Range(0, 1), "weight_decay": numbers.FRACTION}
