"""LAW, the Learnable Adaptive Weighter: a per-pixel weight map for the diffusion loss (DESIGN §1.1).

A small CNN looks at stop-gradient denoiser features, the lesion mask (and optionally the timestep and the
detached per-pixel error) and predicts a one-channel map `w`. The diffusion loss becomes `mean(w · (ε − ε̂)²)`.
Three things keep the map from collapsing: normalisation (per-sample spatial mean exactly 1), clamping
(`w ∈ [w_min, w_max]`) and penalties (a mask prior and total variation, or an entropy term in adversarial mode).

`weighted_diffusion_loss` is the single loss function behind `--weighting uniform|ratio|law`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from lawder_core.errors import UsageError

WEIGHTINGS = ("uniform", "ratio", "law")
OBJECTIVES = ("joint", "adversarial")
WARMUP_WEIGHTS = ("uniform", "prior")

# softplus(SOFTPLUS_BIAS) == 1: with a zero last layer the learned factor is exactly 1.
SOFTPLUS_BIAS = math.log(math.e - 1)
_EPS = 1e-12


@dataclass(frozen=True)
class LAWConfig:
    """Every knob of DESIGN §1.1; the (sweep) ones are reachable from `lawder tune`."""

    objective: str = "joint"  # 'joint' | 'adversarial'
    w_min: float = 0.2  # (sweep) clamp range: [0.5,2], [0.25,4], [0.2,5], [0.1,10]
    w_max: float = 5.0
    lambda_prior: float = 0.1  # (sweep 0.01–1) joint: anchor to the lesion/background ratio map
    lambda_tv: float = 1e-3  # (sweep 0–1e-2) joint: smoothness
    entropy_weight: float = 1e-2  # (sweep 1e-3–1e-1) adversarial: KL(w/HW ‖ uniform)
    warmup_frac: float = 0.1  # (sweep 0–0.33) share of steps before LAW switches on
    warmup_weights: str = "uniform"  # map used during warm-up: 'uniform' | 'prior'
    lr: float = 1e-4  # LAW's own AdamW
    weight_decay: float = 0.0
    hidden: int = 16  # channels of the weighter CNN (16 keeps LAW at ~3 % of a small UNet's step; 32 costs ~10 %)
    groups: int = 4  # GroupNorm groups
    use_timestep: bool = True  # FiLM on the timestep embedding
    use_error: bool = False  # the detached per-pixel error as an extra input channel
    normalise_error: bool = True  # LAW sees err / mean(err) so its penalties mean the same at every noise level
    time_embed_dim: int = 32
    feature_module: str = ""  # dotted submodule of the denoiser's UNet to hook; "" = the last decoder block

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UsageError(f"unknown LAW objective {self.objective!r}; expected one of {OBJECTIVES}.")
        if self.warmup_weights not in WARMUP_WEIGHTS:
            raise UsageError(f"unknown warm-up weights {self.warmup_weights!r}; expected one of {WARMUP_WEIGHTS}.")
        if not 0 <= self.w_min <= 1 <= self.w_max or self.w_min == self.w_max:
            raise UsageError(f"LAW clamp [{self.w_min}, {self.w_max}] must contain 1 with w_min < w_max.",
                             "A map with mean 1 has to fit inside the clamp, e.g. w_min=0.2 w_max=5.")
        if not 0 <= self.warmup_frac < 1:
            raise UsageError(f"LAW warmup_frac must lie in [0, 1), got {self.warmup_frac}.")
        if min(self.lambda_prior, self.lambda_tv, self.entropy_weight, self.lr) < 0:
            raise UsageError("LAW penalty weights and learning rate must be non-negative.")
        if self.hidden < 1 or self.hidden % self.groups:
            raise UsageError(f"LAW hidden={self.hidden} must be a positive multiple of groups={self.groups}.")


# ---------------------------------------------------------------- the map pipeline


def spatial_mean(x: Tensor) -> Tensor:
    return x.mean(dim=(-2, -1), keepdim=True)


def renormalise_within(w: Tensor, w_min: float, w_max: float) -> Tensor:
    """One renormalisation step that makes the mean exactly 1 without leaving [w_min, w_max].

    Plain division by the mean would push clamped pixels past the bound again. Instead every pixel moves
    toward the bound on the side the mean has to go, in proportion to its room there; the step is affine,
    so it is differentiable and lands exactly on mean 1 (room never runs out because w_min ≤ 1 ≤ w_max).
    """
    m = spatial_mean(w)
    room_up, room_down = w_max - w, w - w_min
    up = (1 - m) / spatial_mean(room_up).clamp_min(_EPS)
    down = (m - 1) / spatial_mean(room_down).clamp_min(_EPS)
    return torch.where(m < 1, w + up * room_up, w - down * room_down)


def normalise_map(raw: Tensor, w_min: float, w_max: float) -> Tensor:
    """Positive raw map (B,1,h,w) → divide by per-sample mean → clamp → renormalise once."""
    w = raw / spatial_mean(raw).clamp_min(_EPS)
    return renormalise_within(w.clamp(w_min, w_max), w_min, w_max)


def lesion_at(masks: Tensor, size: tuple[int, int]) -> Tensor:
    """Integer label masks (B,H,W) → lesion fraction per loss-space pixel (B,1,h,w) in [0, 1].

    Area pooling keeps small lesions visible at latent resolution instead of letting nearest sampling drop them.
    """
    lesion = (masks > 0).float()[:, None]
    if tuple(lesion.shape[-2:]) == tuple(size):
        return lesion
    return F.adaptive_avg_pool2d(lesion, size)


def raw_prior(lesion: Tensor) -> Tensor:
    """Lesion pixels get 1 − r, background r (r = lesion fraction), so each region carries equal mass.

    An empty (or full) mask has no imbalance to correct: the map is uniform there.
    """
    r = spatial_mean(lesion)
    prior = lesion * (1 - r) + (1 - lesion) * r
    degenerate = (r <= 0) | (r >= 1)
    return torch.where(degenerate, torch.ones_like(prior), prior)


def prior_map(lesion: Tensor, w_min: float, w_max: float) -> Tensor:
    """The `ratio` baseline and LAW's anchor: the lesion/background ratio map through the same pipeline."""
    return normalise_map(raw_prior(lesion), w_min, w_max)


def total_variation(w: Tensor) -> Tensor:
    """Anisotropic L1 total variation, mean per pixel pair."""
    return (w[..., 1:, :] - w[..., :-1, :]).abs().mean() + (w[..., :, 1:] - w[..., :, :-1]).abs().mean()


def kl_to_uniform(w: Tensor) -> Tensor:
    """KL(p ‖ uniform) with p = w / Σw; since mean(w) = 1 this is mean(w · log w), 0 for a flat map."""
    p = w / spatial_mean(w).clamp_min(_EPS)
    return (p * p.clamp_min(_EPS).log()).mean()


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return -grad


def reverse_gradient(x: Tensor) -> Tensor:
    """Identity forward, negated gradient backward: whoever produced x ascends what the loss descends."""
    return _GradientReversal.apply(x)


# ---------------------------------------------------------------- the network


class LAW(nn.Module):
    """1×1 conv → 2 × (3×3 conv, GroupNorm, SiLU) → 1×1 conv to one channel (zero-initialised).

    The output logit z becomes the map `normalise(prior · softplus(z + b) / softplus(b))`: at z = 0 it is
    the prior map exactly, so training starts from the prior.
    """

    def __init__(self, feature_channels: int, config: LAWConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or LAWConfig()
        self.feature_channels = feature_channels
        in_channels = feature_channels + 1 + int(cfg.use_error)
        self.inp = nn.Conv2d(in_channels, cfg.hidden, 1)
        self.conv1 = nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1)
        self.norm1 = nn.GroupNorm(cfg.groups, cfg.hidden)
        self.conv2 = nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1)
        self.norm2 = nn.GroupNorm(cfg.groups, cfg.hidden)
        self.out = nn.Conv2d(cfg.hidden, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        if cfg.use_timestep:
            self.film = nn.Sequential(nn.Linear(cfg.time_embed_dim, cfg.hidden), nn.SiLU(),
                                      nn.Linear(cfg.hidden, 2 * cfg.hidden))
            # FiLM starts as the identity so the timestep cannot move the initial map away from the prior.
            nn.init.zeros_(self.film[-1].weight)
            nn.init.zeros_(self.film[-1].bias)

    def logits(self, features: Tensor, lesion: Tensor, timesteps: Tensor | None = None,
               error: Tensor | None = None) -> Tensor:
        inputs = [features.detach().float(), lesion.float()]
        if self.config.use_error:
            if error is None:
                raise ValueError("this LAW was built with use_error=True: pass the per-pixel error")
            inputs.append(error.detach().float())
        h = self.inp(torch.cat(inputs, dim=1))
        h = self.norm1(self.conv1(h))
        if self.config.use_timestep:
            if timesteps is None:
                raise ValueError("this LAW was built with use_timestep=True: pass the timesteps")
            emb = get_timestep_embedding(timesteps.reshape(-1), self.config.time_embed_dim, flip_sin_to_cos=True)
            scale, shift = self.film(emb.to(h.dtype)).chunk(2, dim=1)
            h = h * (1 + scale[..., None, None]) + shift[..., None, None]
        h = F.silu(h)
        h = F.silu(self.norm2(self.conv2(h)))
        return self.out(h)

    def forward(self, features: Tensor, lesion: Tensor, timesteps: Tensor | None = None,
                error: Tensor | None = None) -> Tensor:
        """Weight map (B,1,h,w): mean 1 per sample, inside [w_min, w_max]."""
        z = self.logits(features, lesion, timesteps, error)
        bias = torch.full((), SOFTPLUS_BIAS, dtype=z.dtype, device=z.device)
        factor = F.softplus(z + bias) / F.softplus(bias)
        return normalise_map(raw_prior(lesion) * factor, self.config.w_min, self.config.w_max)

    def prior(self, lesion: Tensor) -> Tensor:
        return prior_map(lesion, self.config.w_min, self.config.w_max)


def law_active(step: int, total_steps: int, config: LAWConfig) -> bool:
    """LAW switches on after the warm-up share of the run."""
    return step >= int(config.warmup_frac * total_steps)


# ---------------------------------------------------------------- features


class FeatureGrabber:
    """Keeps the (detached) output of one denoiser submodule from the latest forward pass.

    A forward hook works for any diffusers UNet; detaching here is what guarantees that LAW's objective
    sends no gradient into the denoiser through its feature input.
    """

    def __init__(self, module: nn.Module) -> None:
        self.features: Tensor | None = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: object, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        self.features = out.detach()  # type: ignore[union-attr]

    def take(self, size: tuple[int, int]) -> Tensor:
        """The features at loss resolution, float32; each forward's features are used once."""
        if self.features is None:
            raise RuntimeError("no features captured: run the denoiser forward before asking LAW for a map")
        f, self.features = self.features.float(), None
        if tuple(f.shape[-2:]) != tuple(size):
            f = F.interpolate(f, size=size, mode="bilinear", align_corners=False)
        return f

    def remove(self) -> None:
        self._handle.remove()


def resolve_feature_module(unet: nn.Module, name: str = "") -> nn.Module:
    """`name` inside `unet`, or by default its last decoder block (the output before the final norm/conv)."""
    if name:
        try:
            return unet.get_submodule(name)
        except AttributeError as err:
            raise UsageError(f"the denoiser has no submodule {name!r} to take LAW features from.",
                             "Leave law.feature_module empty for the last decoder block.") from err
    if not hasattr(unet, "up_blocks"):
        raise UsageError(f"{type(unet).__name__} has no up_blocks: name law.feature_module explicitly.")
    return unet.up_blocks[-1]


# ---------------------------------------------------------------- the loss


@dataclass
class LossTerms:
    """`loss` is what the denoiser minimises; `law_objective` only reaches LAW's parameters."""

    loss: Tensor
    law_objective: Tensor | None = None
    weights: Tensor | None = None  # the map used this step, detached (None for uniform)

    @property
    def total(self) -> Tensor:
        """One backward of this trains both: the two terms touch disjoint parameters."""
        return self.loss if self.law_objective is None else self.loss + self.law_objective


def pixel_error(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error averaged over channels: (B,1,h,w), the one map broadcast over image/latent channels."""
    return (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)


def weighted_diffusion_loss(
    pred: Tensor,
    target: Tensor,
    *,
    weighting: str = "uniform",
    lesion: Tensor | None = None,
    law: nn.Module | None = None,
    features: Tensor | None = None,
    timesteps: Tensor | None = None,
    active: bool = True,
    config: LAWConfig | None = None,
) -> LossTerms:
    """The diffusion loss for `--weighting uniform|ratio|law`.

    uniform: exactly diffusers' `F.mse_loss(pred, target)`.
    ratio:   `mean(w_prior · err)` with the fixed lesion/background prior map (clamp from `config`).
    law:     before warm-up ends (`active=False`) the warm-up map; then the denoiser minimises
             `mean(w · err)` with w detached, and LAW's own objective is
             joint:        mean(w · err') + λ_prior · mean((w − w_prior)²) + λ_tv · TV(w)
             adversarial:  mean(GRL(w) · err') + β · KL(w ‖ uniform)      (LAW ascends the weighted loss)
             where err' is the detached error, divided by its per-sample mean when `normalise_error`.
    """
    if weighting not in WEIGHTINGS:
        raise UsageError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}.")
    if weighting == "uniform":
        return LossTerms(F.mse_loss(pred.float(), target.float(), reduction="mean"))
    if lesion is None:
        raise ValueError(f"weighting={weighting!r} needs the lesion map at loss resolution")
    err = pixel_error(pred, target)
    cfg = _law_config(law) if law is not None else (config or LAWConfig())
    if weighting == "ratio" or law is None:
        w = prior_map(lesion, cfg.w_min, cfg.w_max)
        return LossTerms((w * err).mean(), None, w.detach())
    if not active:
        w = prior_map(lesion, cfg.w_min, cfg.w_max) if cfg.warmup_weights == "prior" else torch.ones_like(err)
        return LossTerms((w * err).mean(), None, w.detach())
    if features is None:
        raise ValueError("weighting='law' needs the denoiser features (see FeatureGrabber)")
    err_law = err.detach()
    if cfg.normalise_error:
        err_law = err_law / spatial_mean(err_law).clamp_min(_EPS)
    w = law(features, lesion, timesteps, err_law if cfg.use_error else None)
    loss = (w.detach() * err).mean()
    if cfg.objective == "joint":
        w_prior = prior_map(lesion, cfg.w_min, cfg.w_max)
        objective = ((w * err_law).mean() + cfg.lambda_prior * (w - w_prior).pow(2).mean()
                     + cfg.lambda_tv * total_variation(w))
    else:
        objective = (reverse_gradient(w) * err_law).mean() + cfg.entropy_weight * kl_to_uniform(w)
    return LossTerms(loss, objective, w.detach())


def _law_config(law: nn.Module) -> LAWConfig:
    inner = law.module if isinstance(law, nn.parallel.DistributedDataParallel) else law
    return inner.config  # type: ignore[return-value]


def weight_stats(w: Tensor | None, lesion: Tensor) -> dict[str, float]:
    """Where the weight went: mean on lesion vs background pixels, and the largest weight."""
    if w is None:
        w = torch.ones_like(lesion)
    on = lesion > 0.5
    # NaN marks "no such pixels in this batch"; the training loop averages it away.
    w_lesion = float(w[on].mean()) if on.any() else float("nan")
    w_background = float(w[~on].mean()) if (~on).any() else float("nan")
    return {"w_lesion": w_lesion, "w_background": w_background, "w_max": float(w.max())}


def top_share(w: Tensor, fraction: float = 0.01) -> Tensor:
    """Per-sample share of the total weight carried by the top `fraction` of pixels (collapse diagnostic)."""
    flat = w.flatten(1)
    k = max(1, int(round(fraction * flat.shape[1])))
    return flat.topk(k, dim=1).values.sum(1) / flat.sum(1).clamp_min(_EPS)
