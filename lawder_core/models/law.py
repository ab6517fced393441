"""LAW, the Learnable Adaptive Weighter: a per-pixel weight map for the diffusion loss (revision 3).

A small CNN looks at stop-gradient denoiser features, the lesion mask (and optionally the timestep and the
detached per-pixel error) and predicts one logit z per loss-space pixel. The map is

    w = p · f / mean(p · f)      p = prior^γ, the lesion/background ratio prior softened by γ
                                 f = w_min + (w_max − w_min) · sigmoid(z − mean(z) + b), with f = 1 at z = 0

so LAW starts exactly at the `ratio` baseline, moves any pixel at most by the factor range [w_min, w_max] away
from the prior, keeps a gradient at every pixel (nothing is hard-clamped) and has mean exactly 1 per sample, so
the loss scale never changes (the per-sample centring of z is explained at `centred`). The denoiser minimises
`mean(w · err)` with w detached; LAW's own objective is

    hardness (default): −mean(w · err′) + λ_prior · mean((log w − log w_prior)²) + λ_tv · TV(w) + β · KL(w/HW ‖ U)
    influence:          −mean(w · m′)   + the same anchors
    descent (ablation): +mean(w · err′) + the same anchors

with err′ the detached per-pixel error over its per-sample mean and m′ the mask influence |v_cond − v_uncond|
(the gap classifier-free guidance amplifies) over its per-sample mean. `hardness` ascends the weighted error:
weight goes where the denoiser is wrong (lesion borders, texture). `influence` puts weight where the mask
changes the prediction most. `descent` is the original objective (minimising the weighted error), kept only
to be measured against: its optimum is inverse-variance weighting (weight flows to easy pixels).

Each row's objective is weighted by a per-row time weight (`LAWConfig.time_weight`): by default the same
Min-SNR weight the denoiser's loss gets at that noise level, so LAW learns where its map changes the denoiser's
gradient. How far the map has moved is `law_departure` = mean |log w − log w_prior|.

`weighted_diffusion_loss` is the single loss function behind `--weighting uniform|ratio|law`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import get_timestep_embedding
from torch import Tensor, nn

from lawder_core.errors import UsageError
from lawder_core.models.configs import WEIGHTINGS, LAWConfig

_EPS = 1e-12


# ---------------------------------------------------------------- the map


def spatial_mean(x: Tensor) -> Tensor:
    return x.mean(dim=(-2, -1), keepdim=True)


def per_sample_mean(x: Tensor) -> Tensor:
    """(B, ...) → (B,)."""
    return x.flatten(1).mean(dim=1)


def lesion_at(masks: Tensor, size: tuple[int, int], labels: Sequence[int] | None = None) -> Tensor:
    """Integer label masks (B,H,W) → lesion fraction per loss-space pixel (B,1,h,w) in [0, 1].

    `labels` are the stored labels that count as lesion (`data/labels.py: lesion_labels`; KiTS: tumour and cyst,
    not the kidney around them); None: every label > 0 (a run from before `--lesion-labels`). Area pooling keeps
    small lesions visible at latent resolution instead of letting nearest sampling drop them.
    """
    if labels is None:
        lesion = (masks > 0).float()[:, None]
    else:
        wanted = torch.as_tensor(list(labels), dtype=masks.dtype, device=masks.device)
        lesion = torch.isin(masks, wanted).float()[:, None]
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


def prior_map(lesion: Tensor, gamma: float) -> Tensor:
    """The fixed map prior^γ at mean 1: the `ratio` baseline and LAW's value at z = 0.

    γ = 1 gives each region equal mass (lesion weight ≈ 1/(2r)), γ = 0.5 a lesion/background ratio of
    sqrt((1 − r)/r) (≈ 7.9 for a 1.6 % lesion), γ = 0 the uniform map.
    """
    p = raw_prior(lesion) ** gamma
    return p / spatial_mean(p)


def factor_bias(w_min: float, w_max: float) -> float:
    """b = logit((1 − w_min)/(w_max − w_min)): the shift that puts the factor at 1 when z = 0."""
    s = (1 - w_min) / (w_max - w_min)
    return math.log(s / (1 - s))


def learned_factor(z: Tensor, w_min: float, w_max: float) -> Tensor:
    """f = w_min + (w_max − w_min) · sigmoid(z + b), smooth in z and strictly inside (w_min, w_max).

    Written as 1 + (w_max − w_min) · (sigmoid(z + b) − sigmoid(b)), the same function, so that z = 0 gives
    exactly 1.0 in floating point and LAW's initial map is bit-for-bit the `ratio` baseline.
    """
    b = factor_bias(w_min, w_max)
    return 1 + (w_max - w_min) * (torch.sigmoid(z + b) - torch.sigmoid(torch.zeros_like(z) + b))


def centred(z: Tensor) -> Tensor:
    """z − mean(z) per sample.

    A constant logit shift hardly changes the map (the normalisation divides most of it out) but slides every
    pixel toward one end of the sigmoid. The objective pushes that shift steadily (pixels whose factor has grown
    lose leverage first), so without centring it drifts: measured, 97 % of the pixels sat at w_min after
    300 Adam steps and stopped learning. Centring removes that direction; z = 0 still gives the prior.
    """
    return z - spatial_mean(z)


def weight_map(z: Tensor, lesion: Tensor, gamma: float, w_min: float, w_max: float) -> Tensor:
    """Logits (B,1,h,w) and lesion fractions → w = p · f(z − mean z) / mean(p · f): mean exactly 1 per sample."""
    w = raw_prior(lesion) ** gamma * learned_factor(centred(z.float()), w_min, w_max)
    return w / spatial_mean(w)


# ---------------------------------------------------------------- the penalties (each per sample: (B,))


def prior_distance(w: Tensor, w_prior: Tensor) -> Tensor:
    """mean((log w − log w_prior)²): symmetric in ratio, so halving and doubling a weight cost the same."""
    return per_sample_mean((w.clamp_min(_EPS).log() - w_prior.clamp_min(_EPS).log()).pow(2))


def total_variation(w: Tensor) -> Tensor:
    """Anisotropic L1 total variation, mean per pixel pair."""
    return (per_sample_mean((w[..., 1:, :] - w[..., :-1, :]).abs())
            + per_sample_mean((w[..., :, 1:] - w[..., :, :-1]).abs()))


def kl_to_uniform(w: Tensor) -> Tensor:
    """KL(p ‖ uniform) with p = w / Σw; since mean(w) = 1 this is mean(w · log w), 0 for a flat map."""
    p = w / spatial_mean(w).clamp_min(_EPS)
    return per_sample_mean(p * p.clamp_min(_EPS).log())


def normalised_error(err: Tensor) -> Tensor:
    """err′ = err / mean(err) per sample: the objective's scale does not depend on the noise level."""
    return err / spatial_mean(err).clamp_min(_EPS)


def law_objective(w: Tensor, w_prior: Tensor, target_n: Tensor, config: LAWConfig,
                  keep: Tensor | None = None, row_weight: Tensor | None = None) -> Tensor:
    """What LAW minimises: a weighted mean over the rows in `keep` (all when None), each row weighted by
    `row_weight` (B,) (the time weight; all alike when None). `target_n` is err′ (hardness, descent) or m′
    (influence), each over its per-sample mean.

    hardness:  −mean(w · err′) + anchors. LAW ascends the weighted error, so weight moves to where the denoiser
               is wrong; the anchors (λ_prior · mean((log w − log w_prior)²) + λ_tv · TV(w) + β · KL(w/HW ‖ U))
               bound how far. On a free map (TV and KL aside) it settles at
               log(w / w_prior) ≈ w · (err′ − mean(w · err′)) / (2 λ_prior): above-average error gains weight.
    influence: −mean(w · m′) + anchors: the same, with weight going where the mask changes the prediction.
    descent:   +mean(w · err′) + the same anchors: the original objective, an ablation only. Minimising
               the weighted error under mean(w) = 1 is inverse-variance weighting: weight flows to the pixels the
               denoiser already gets right (corr(w, err) = −0.81 on a free map).
    """
    weighted = per_sample_mean(w * target_n)
    seek = weighted if config.objective == "descent" else -weighted
    per_row = (seek + config.lambda_prior * prior_distance(w, w_prior)
               + config.lambda_tv * total_variation(w) + config.beta_kl * kl_to_uniform(w))
    k = torch.ones_like(per_row) if keep is None else keep.to(per_row)
    if row_weight is not None:
        k = k * row_weight.reshape(-1).to(per_row)
    # A batch without weight (all rows dropped, or outside the time window) gives 0 with a graph behind it, so
    # every LAW parameter still gets a (zero) gradient.
    return (per_row * k).sum() / k.sum().clamp_min(_EPS)


def law_departure(w: Tensor, w_prior: Tensor, keep: Tensor | None = None) -> Tensor:
    """mean |log w − log w_prior| over the kept rows: 0 at the prior, 0.1 ≈ every pixel 10 % off it; NaN when no
    row is kept. The number that says whether LAW learned a map at all or stayed the `ratio` baseline."""
    per_row = per_sample_mean((w.detach().clamp_min(_EPS).log() - w_prior.clamp_min(_EPS).log()).abs())
    if keep is not None:
        per_row = per_row[keep.reshape(-1).to(per_row.device)]
    return per_row.mean() if per_row.numel() else torch.tensor(float("nan"), device=w.device)


def mask_influence(pred_cond: Tensor, pred_null: Tensor) -> Tensor:
    """|out_cond − out_null| averaged over channels, (B,1,h,w): what the mask changes in the model's prediction,
    i.e. the direction classifier-free guidance amplifies. Zero wherever the condition makes no difference."""
    return (pred_cond.detach().float() - pred_null.detach().float()).abs().mean(dim=1, keepdim=True)


# ---------------------------------------------------------------- the network


class LAW(nn.Module):
    """1×1 conv → 2 × (3×3 conv, GroupNorm, SiLU) → 1×1 conv to one logit (zero-initialised).

    With the zero last layer the factor is exactly 1, so training starts from the `ratio` baseline.
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

    def map_from_logits(self, z: Tensor, lesion: Tensor) -> Tensor:
        """Logits z (B,1,h,w) and lesion fractions (B,1,h,w) → the weight map (mean 1 per sample)."""
        return weight_map(z, lesion, self.config.gamma, self.config.w_min, self.config.w_max)

    def forward(self, features: Tensor, lesion: Tensor, timesteps: Tensor | None = None,
                error: Tensor | None = None) -> Tensor:
        """Weight map (B,1,h,w): mean 1 per sample, within [w_min, w_max] × the prior before renormalising."""
        return self.map_from_logits(self.logits(features, lesion, timesteps, error), lesion)


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

    def clear(self) -> None:
        """Forget the latest features (after a forward whose features are not LAW's input, e.g. the null pass)."""
        self.features = None

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
    weights: Tensor | None = None  # the map used this step, detached, dropped rows at 1 (None for uniform)
    departure: Tensor | None = None  # law_departure of the kept rows (ratio: 0; uniform and LAW's warm-up: None)

    @property
    def total(self) -> Tensor:
        """One backward of this trains both: the two terms touch disjoint parameters."""
        return self.loss if self.law_objective is None else self.loss + self.law_objective


def pixel_error(pred: Tensor, target: Tensor) -> Tensor:
    """Squared error averaged over channels: (B,1,h,w), the one map broadcast over image/latent channels."""
    return (pred.float() - target.float()).pow(2).mean(dim=1, keepdim=True)


def dropped_rows_at_one(w: Tensor, keep: Tensor | None) -> Tensor:
    """Rows whose condition was dropped for guidance get weight 1: the model cannot see that mask."""
    if keep is None:
        return w
    return torch.where(keep.reshape(-1, 1, 1, 1).to(w.device), w, torch.ones_like(w))


def denoiser_loss(err: Tensor, w: Tensor | None, time_weight: Tensor | None) -> Tensor:
    """mean(time_weight · w · err): Min-SNR weighs noise levels, the map weighs pixels."""
    weighted = err if w is None else w * err
    if time_weight is not None:
        weighted = time_weight.reshape(-1, 1, 1, 1).to(weighted) * weighted
    return weighted.mean()


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
    keep: Tensor | None = None,
    time_weight: Tensor | None = None,
    law_row_weight: Tensor | None = None,
    influence: Tensor | None = None,
) -> LossTerms:
    """The diffusion loss for `--weighting uniform|ratio|law`.

    uniform: exactly diffusers' `F.mse_loss(pred, target)` (times `time_weight` per sample when given).
    ratio:   `mean(time_weight · w_prior · err)` with the fixed map `prior_map(lesion, config.gamma)`.
    law:     before warm-up ends (`active=False`) the warm-up map; then the denoiser minimises
             `mean(time_weight · w · err)` with w detached, and LAW's own objective (`law_objective`, its rows
             weighted by `law_row_weight`, not by `time_weight` unless the caller passes it there too) is
             returned separately. The `influence` objective needs `influence` (`mask_influence`).
    `keep` (bool (B,)): False for rows whose condition was dropped for classifier-free guidance; they are
    weighted 1 and left out of LAW's objective. `time_weight` (B,): per-sample Min-SNR weights.
    """
    if weighting not in WEIGHTINGS:
        raise UsageError(f"unknown weighting {weighting!r}; expected one of {WEIGHTINGS}.")
    if weighting == "uniform" and time_weight is None:
        return LossTerms(F.mse_loss(pred.float(), target.float(), reduction="mean"))
    err = pixel_error(pred, target)
    if weighting == "uniform":
        return LossTerms(denoiser_loss(err, None, time_weight))
    if lesion is None:
        raise ValueError(f"weighting={weighting!r} needs the lesion map at loss resolution")
    cfg = _law_config(law) if law is not None else (config or LAWConfig())
    if weighting == "ratio" or law is None or not active:
        fixed = weighting == "ratio" or law is None or cfg.warmup_weights == "prior"
        w = dropped_rows_at_one(prior_map(lesion, cfg.gamma) if fixed else torch.ones_like(err), keep)
        departure = torch.zeros((), device=err.device) if weighting == "ratio" else None
        return LossTerms(denoiser_loss(err, w, time_weight), None, w.detach(), departure)
    if features is None:
        raise ValueError("weighting='law' needs the denoiser features (see FeatureGrabber)")
    err_law = normalised_error(err.detach()) if cfg.normalise_error else err.detach()
    w = law(features, lesion, timesteps, err_law if cfg.use_error else None)
    used = dropped_rows_at_one(w.detach(), keep)
    w_prior = prior_map(lesion, cfg.gamma)
    if cfg.objective == "influence":
        if influence is None:
            raise ValueError("LAW's influence objective needs the mask influence (see mask_influence)")
        target_n = normalised_error(influence.detach().float())
    else:
        target_n = err_law
    objective = law_objective(w, w_prior, target_n, cfg, keep, law_row_weight)
    return LossTerms(denoiser_loss(err, used, time_weight), objective, used, law_departure(w, w_prior, keep))


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
