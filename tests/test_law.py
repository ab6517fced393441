"""LAW: the map, the prior, zero-init behaviour, gradient routing, the objectives (hardness, influence, descent),
the per-row time weight, the departure from the prior, CFG rows, warm-up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lawder_core.errors import UsageError
from lawder_core.models.denoiser import DenoiserSpec, PixelDenoiser
from lawder_core.models.law import (
    LAW,
    FeatureGrabber,
    LAWConfig,
    factor_bias,
    kl_to_uniform,
    law_active,
    law_departure,
    law_objective,
    learned_factor,
    lesion_at,
    mask_influence,
    normalised_error,
    pixel_error,
    prior_map,
    raw_prior,
    weighted_diffusion_loss,
)

CLAMPS = [(0.5, 2.0), (0.25, 4.0), (0.2, 5.0), (0.1, 10.0)]


def blob_lesion(batch: int, size: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = ((yy - size / 3) ** 2 + (xx - size / 2) ** 2 <= radius**2).float()
    return disk.expand(batch, 1, size, size).clone()


def square_lesions(size: int, sides: list[int], at: tuple[int, int] = (10, 12)) -> torch.Tensor:
    lesion = torch.zeros(len(sides), 1, size, size)
    for i, side in enumerate(sides):
        lesion[i, :, at[0]:at[0] + side, at[1]:at[1] + side] = 1
    return lesion


def region_ratio(w: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
    """Per sample: mean weight on the lesion over mean weight on the background."""
    on = lesion > 0.5
    return torch.stack([w[i][on[i]].mean() / w[i][~on[i]].mean() for i in range(len(w))])


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation over pixels."""
    a = a.flatten(1) - a.flatten(1).mean(1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------- the map


@pytest.mark.parametrize("w_min,w_max", CLAMPS)
def test_map_has_mean_one_and_moves_each_pixel_at_most_by_the_factor_range(w_min: float, w_max: float) -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(6, 24, 3.0)
    law = LAW(4, LAWConfig(w_min=w_min, w_max=w_max))
    w = law.map_from_logits(6 * torch.randn(6, 1, 24, 24), lesion)  # far into both ends of the sigmoid
    assert torch.allclose(w.mean(dim=(-2, -1)), torch.ones(6, 1), atol=1e-6)
    tilt = (w / prior_map(lesion, 0.5)).flatten(1)
    # Each pixel's factor lies in (w_min, w_max); the shared normalisation cancels in the ratio of two pixels.
    assert float((tilt.amax(1) / tilt.amin(1)).max()) <= w_max / w_min * (1 + 1e-5)
    assert float((tilt.amax(1) / tilt.amin(1)).max()) > 0.5 * w_max / w_min


def test_factor_is_one_at_zero_and_smooth_between_the_bounds() -> None:
    z = torch.tensor([-40.0, -3.0, 0.0, 3.0, 40.0])
    f = learned_factor(z, 0.2, 5.0)
    assert float(f[2]) == 1.0 and 0.2 - 1e-6 <= float(f.min()) < float(f.max()) <= 5.0 + 1e-6
    assert torch.all(f[1:] > f[:-1])
    assert factor_bias(0.2, 5.0) == pytest.approx(torch.logit(torch.tensor(0.8 / 4.8)).item(), rel=1e-6)


def test_prior_map_softens_the_ratio_prior_by_gamma() -> None:
    lesion = square_lesions(64, [8])  # 1.56 % of the frame
    r = float(lesion.mean())
    for gamma in (0.0, 0.5, 1.0):
        w = prior_map(lesion, gamma)
        assert torch.allclose(w.mean(dim=(-2, -1)), torch.ones(1, 1), atol=1e-6)
        assert float(region_ratio(w, lesion)[0]) == pytest.approx(((1 - r) / r) ** gamma, rel=1e-5)
    assert torch.equal(prior_map(lesion, 0.0), torch.ones_like(lesion))  # γ = 0: the uniform map
    w = prior_map(lesion, 1.0)  # γ = 1: each region carries half the mass
    assert float((w * lesion).sum()) == pytest.approx(float((w * (1 - lesion)).sum()), rel=1e-5)


def test_raw_prior_balances_lesion_and_background_mass() -> None:
    lesion = blob_lesion(1, 32, 5.0)
    r = lesion.mean()
    prior = raw_prior(lesion)
    assert torch.allclose(prior[lesion > 0], 1 - r) and torch.allclose(prior[lesion == 0], r)
    assert torch.isclose((prior * lesion).sum(), (prior * (1 - lesion)).sum())  # equal mass per region


def test_prior_of_empty_or_full_mask_is_uniform() -> None:
    lesion = torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)])
    assert torch.equal(prior_map(lesion, 0.5), torch.ones_like(lesion))


def test_zero_initialised_law_is_exactly_the_ratio_baseline() -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(3, 24, 4.0)
    for cfg in (LAWConfig(), LAWConfig(use_error=True, w_min=0.1, w_max=10.0, gamma=0.8)):
        law = LAW(feature_channels=16, config=cfg)
        w = law(torch.randn(3, 16, 24, 24), lesion, torch.tensor([0, 500, 999]), torch.rand(3, 1, 24, 24))
        assert torch.equal(w, prior_map(lesion, cfg.gamma))
        assert torch.equal(law.map_from_logits(torch.zeros(3, 1, 24, 24), lesion), prior_map(lesion, cfg.gamma))
        ratio = weighted_diffusion_loss(torch.randn(3, 3, 24, 24), torch.zeros(3, 3, 24, 24), weighting="ratio",
                                        lesion=lesion, config=cfg)
        assert torch.equal(ratio.weights, w)


def test_law_is_far_below_a_tenth_of_a_million_parameters_even_on_sd_features() -> None:
    assert sum(p.numel() for p in LAW(feature_channels=320).parameters()) < 20_000  # 10,945 with hidden=16


# ---------------------------------------------------------------- gradients and the objectives


def test_a_small_lesion_keeps_a_gradient_of_the_same_order_as_the_background() -> None:
    """The first build's clamp pinned a 1.6 % lesion at w_max: its logits got exactly zero gradient.

    Loss: the hardness objective with the default anchors (`law_objective`, LAWConfig()) at z = 0, against a
    random error (the mean of three squared standard normals per pixel, like a 3-channel ε error). Compared:
    the mean |∂loss/∂z| over lesion pixels and over background pixels. The lesion's is larger because its
    weight is larger (r = 1.56 %: √63 ≈ 7.9×): measured 8.3–9.2× here, 7.7–8.5× for the hardness term alone.
    """
    lesion = square_lesions(64, [8, 8])
    assert float(lesion[0].mean()) == pytest.approx(0.0156, abs=1e-4)
    cfg = LAWConfig()
    law = LAW(4, cfg)
    for seed in range(3):
        err = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).pow(2).mean(1, keepdim=True)
        for config in (cfg, LAWConfig(lambda_tv=0.0, beta_kl=0.0)):
            z = torch.zeros(2, 1, 64, 64, requires_grad=True)
            law_objective(law.map_from_logits(z, lesion), prior_map(lesion, cfg.gamma), normalised_error(err),
                          config).backward()
            on, off = z.grad[lesion > 0].abs().mean(), z.grad[lesion == 0].abs().mean()
            assert float(z.grad[lesion > 0].abs().min()) > 0
            assert 0.1 < float(on / off) < 10, float(on / off)


def train_law_on_synthetic_error(objective: str, steps: int = 150):
    """A real LAW on fixed random features against a synthetic error field 4× larger on the lesion borders
    (and 1.5× inside the lesion); the error is redrawn every step like a diffusion loss's."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = 48
    lesion = square_lesions(size, [6, 10, 14])  # 1.6 %, 4.3 %, 8.5 %
    border = F.max_pool2d(lesion, 5, 1, 2) + F.max_pool2d(-lesion, 5, 1, 2)  # dilation − erosion
    expected = 1 + 3 * border + 0.5 * lesion
    law = LAW(8, LAWConfig(objective=objective))
    features = torch.randn(3, 8, size, size, generator=g)
    opt = torch.optim.Adam(law.parameters(), lr=1e-2)
    for _ in range(steps):
        err = expected * torch.randn(3, 3, size, size, generator=g).pow(2).mean(1, keepdim=True)
        pred = err.sqrt().expand(3, 3, size, size)
        terms = weighted_diffusion_loss(pred, torch.zeros_like(pred), weighting="law", lesion=lesion, law=law,
                                        features=features, timesteps=torch.randint(0, 1000, (3,), generator=g))
        opt.zero_grad()
        terms.law_objective.backward()
        opt.step()
    with torch.no_grad():
        w = law(features, lesion, torch.full((3,), 500))
    return w, prior_map(lesion, law.config.gamma), expected, lesion


def test_hardness_moves_weight_onto_the_hard_pixels_and_the_lesion() -> None:
    torch.set_num_threads(1)
    w, w_prior, err, lesion = train_law_on_synthetic_error("hardness")
    assert torch.all(corr(w, err) > 0)
    assert torch.all(corr(w, err) > corr(w_prior, err))  # more aligned with the error than the prior it left
    assert torch.all(corr((w / w_prior).log(), err) > 0.5)  # the direction it moved: toward the error
    assert torch.all(region_ratio(w, lesion) > region_ratio(w_prior, lesion))


def test_descent_ablation_moves_weight_away_from_the_hard_pixels() -> None:
    """Why `descent` is not the default: it learns inverse-variance weighting. Its map still correlates with
    the error here (the prior it starts from does, 0.52–0.60), but it moves every sample against the error."""
    torch.set_num_threads(1)
    w, w_prior, err, lesion = train_law_on_synthetic_error("descent")
    assert torch.all(corr((w / w_prior).log(), err) < -0.5)
    assert torch.all(corr(w, err) < corr(w_prior, err))
    assert torch.all(region_ratio(w, lesion) < region_ratio(w_prior, lesion))


def test_hardness_objective_at_init_is_the_negative_weighted_error_plus_the_anchors() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    lesion = blob_lesion(2, 16, 3.0)
    cfg = LAWConfig(lambda_tv=0.5, beta_kl=0.1, use_timestep=False)
    terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=LAW(4, cfg),
                                    features=torch.randn(2, 4, 16, 16))
    err = pixel_error(pred, target)
    err_n = err / err.mean(dim=(-2, -1), keepdim=True)
    w = prior_map(lesion, cfg.gamma)
    tv = ((w[..., 1:, :] - w[..., :-1, :]).abs().mean() + (w[..., :, 1:] - w[..., :, :-1]).abs().mean())
    expected = -(w * err_n).mean() + 0.5 * tv + 0.1 * (w * w.log()).mean()  # the prior term is 0 at init
    assert torch.allclose(terms.law_objective, expected, atol=1e-6)
    assert torch.allclose(terms.loss, (w * err).mean())
    descent = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion,
                                      law=LAW(4, LAWConfig(objective="descent", lambda_tv=0.5, beta_kl=0.1,
                                                           use_timestep=False)),
                                      features=torch.randn(2, 4, 16, 16))
    assert torch.allclose(descent.law_objective, expected + 2 * (w * err_n).mean(), atol=1e-6)


def test_kl_to_uniform_is_zero_for_a_flat_map_and_positive_otherwise() -> None:
    assert float(kl_to_uniform(torch.ones(1, 1, 8, 8))) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_uniform(prior_map(blob_lesion(1, 16, 3.0), 0.5))) > 0


# ---------------------------------------------------------------- classifier-free guidance rows, Min-SNR


def test_cfg_dropped_rows_weigh_one_and_stay_out_of_laws_objective() -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(2, 16, 3.0)
    law = LAW(4, LAWConfig(use_timestep=False))
    with torch.no_grad():
        law.out.weight.normal_(0, 0.5)  # a non-trivial map
    features = torch.randn(2, 4, 16, 16)
    pred, target = torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    keep = torch.tensor([True, False])
    terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features,
                                    keep=keep)
    assert torch.equal(terms.weights[1], torch.ones_like(terms.weights[1]))
    assert not torch.equal(terms.weights[0], torch.ones_like(terms.weights[0]))
    err = pixel_error(pred, target)
    assert torch.allclose(terms.loss, torch.cat([terms.weights[:1] * err[:1], err[1:]]).mean())
    # The objective is the kept row's alone: the dropped row's error does not reach it.
    other = pred.clone()
    other[1] = 10 * torch.randn(3, 16, 16)
    again = weighted_diffusion_loss(other, target, weighting="law", lesion=lesion, law=law, features=features,
                                    keep=keep)
    assert torch.equal(again.law_objective, terms.law_objective)
    only_kept = weighted_diffusion_loss(pred[:1], target[:1], weighting="law", lesion=lesion[:1], law=law,
                                        features=features[:1])
    assert torch.allclose(terms.law_objective, only_kept.law_objective, atol=1e-6)
    for weighting in ("ratio", "law"):  # fixed maps and the warm-up map weigh dropped rows 1 as well
        fixed = weighted_diffusion_loss(pred, target, weighting=weighting, lesion=lesion, law=law, active=False,
                                        config=LAWConfig(warmup_weights="prior"), keep=keep)
        assert torch.equal(fixed.weights[1], torch.ones_like(fixed.weights[1]))
    none_kept = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features,
                                        keep=torch.tensor([False, False]))
    assert float(none_kept.law_objective.detach()) == 0.0
    none_kept.law_objective.backward()
    assert law.out.weight.grad is not None  # a graph is still there, so DDP sees every parameter


def test_time_weight_multiplies_the_denoiser_loss_not_laws_objective() -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(2, 16, 3.0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    tw = torch.tensor([0.25, 2.0])
    err = pixel_error(pred, target)
    uniform = weighted_diffusion_loss(pred, target, weighting="uniform", time_weight=tw)
    assert torch.allclose(uniform.loss, (tw[:, None, None, None] * (pred - target).pow(2)).mean())
    ones = weighted_diffusion_loss(pred, target, weighting="uniform", time_weight=torch.ones(2))
    assert torch.allclose(ones.loss, F.mse_loss(pred, target))
    ratio = weighted_diffusion_loss(pred, target, weighting="ratio", lesion=lesion, time_weight=tw)
    assert torch.allclose(ratio.loss, (tw[:, None, None, None] * prior_map(lesion, 0.5) * err).mean())
    law = LAW(4, LAWConfig(use_timestep=False))
    features = torch.randn(2, 4, 16, 16)
    plain = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features)
    timed = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features,
                                    time_weight=tw)
    assert torch.allclose(timed.loss, (tw[:, None, None, None] * plain.weights * err).mean())
    assert torch.equal(timed.law_objective, plain.law_objective)


# ---------------------------------------------------------------- the denoiser and the loss


def tiny_denoiser() -> PixelDenoiser:
    torch.manual_seed(0)
    return PixelDenoiser(DenoiserSpec(preset="tiny", size=16))


def denoiser_batch(denoiser: PixelDenoiser):
    torch.manual_seed(1)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 4:9, 5:10] = 1
    x0 = denoiser.encode(torch.rand(2, 3, 16, 16))
    noise = torch.randn_like(x0)
    t = torch.tensor([100, 700])
    noisy = denoiser.scheduler.add_noise(x0, noise, t)
    return masks, noise, t, noisy


def test_law_gets_gradients_and_the_denoiser_none_through_law() -> None:
    denoiser = tiny_denoiser()
    grabber = FeatureGrabber(denoiser.feature_module())
    law = LAW(denoiser.feature_channels, LAWConfig(use_error=True))
    with torch.no_grad():  # move LAW off its zero init so the map depends on the features
        law.out.weight.normal_(0, 0.5)
    masks, noise, t, noisy = denoiser_batch(denoiser)
    pred = denoiser(noisy, t, denoiser.condition(masks))
    features = grabber.take((16, 16))
    assert not features.requires_grad
    lesion = lesion_at(masks, (16, 16))
    terms = weighted_diffusion_loss(pred, noise, weighting="law", lesion=lesion, law=law, features=features,
                                    timesteps=t)
    terms.total.backward()
    law_grads = [p.grad for p in law.parameters()]
    assert all(g is not None for g in law_grads) and sum(float(g.abs().sum()) for g in law_grads) > 0
    with_law = [p.grad.clone() for p in denoiser.parameters()]

    # The denoiser's gradient is exactly that of mean(w · err) with w a constant: nothing leaks through LAW.
    denoiser.zero_grad()
    pred = denoiser(noisy, t, denoiser.condition(masks))
    (terms.weights * pixel_error(pred, noise)).mean().backward()
    for a, p in zip(with_law, denoiser.parameters(), strict=True):
        assert torch.allclose(a, p.grad, atol=1e-7)

    # LAW's objective alone sends nothing at all into the denoiser.
    denoiser.zero_grad(set_to_none=True)
    pred = denoiser(noisy, t, denoiser.condition(masks))
    again = weighted_diffusion_loss(pred, noise, weighting="law", lesion=lesion, law=law,
                                    features=grabber.take((16, 16)), timesteps=t)
    again.law_objective.backward()
    assert all(p.grad is None for p in denoiser.parameters())
    grabber.remove()


def test_uniform_weighting_is_diffusers_plain_mse_exactly() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    terms = weighted_diffusion_loss(pred, target, weighting="uniform")
    assert torch.equal(terms.loss, F.mse_loss(pred.float(), target.float(), reduction="mean"))
    assert terms.law_objective is None and terms.weights is None


def test_ratio_weighting_uses_the_prior_map_with_the_configured_gamma() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    lesion = blob_lesion(2, 16, 2.5)
    terms = weighted_diffusion_loss(pred, target, weighting="ratio", lesion=lesion, config=LAWConfig(gamma=1.0))
    w = prior_map(lesion, 1.0)
    assert torch.equal(terms.weights, w)
    assert torch.allclose(terms.loss, (w * (pred - target).pow(2).mean(1, keepdim=True)).mean())


def test_warm_up_uses_the_warm_up_map_and_no_law_objective() -> None:
    cfg = LAWConfig(warmup_frac=0.25, warmup_weights="prior", use_timestep=False)
    assert not law_active(24, 100, cfg) and law_active(25, 100, cfg)
    lesion = blob_lesion(1, 16, 3.0)
    terms = weighted_diffusion_loss(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), weighting="law",
                                    lesion=lesion, law=LAW(2, cfg), active=False)
    assert terms.law_objective is None
    assert torch.equal(terms.weights, prior_map(lesion, cfg.gamma))
    uniform = weighted_diffusion_loss(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), weighting="law",
                                      lesion=lesion, law=LAW(2, LAWConfig()), active=False)
    assert torch.equal(uniform.weights, torch.ones_like(lesion))


def test_lesion_at_latent_resolution_keeps_small_lesions_as_fractions() -> None:
    masks = torch.zeros(1, 32, 32, dtype=torch.long)
    masks[0, 0:2, 0:2] = 1  # smaller than one 8×8 latent pixel
    lesion = lesion_at(masks, (4, 4))
    assert lesion.shape == (1, 1, 4, 4)
    assert float(lesion[0, 0, 0, 0]) == pytest.approx(4 / 64) and float(lesion.sum()) == pytest.approx(4 / 64)


@pytest.mark.parametrize("kwargs", [{"w_min": 1.0}, {"w_min": 0.0}, {"w_max": 1.0}, {"objective": "joint"},
                                    {"objective": "adversarial"}, {"gamma": -0.5}, {"lambda_prior": -1.0},
                                    {"warmup_frac": 1.0}, {"hidden": 10, "groups": 4}])
def test_config_rejects_impossible_settings(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        LAWConfig(**kwargs)


# ---------------------------------------------------------------- revision 3: departure, row weights, influence


def test_law_departure_is_zero_at_the_prior_and_grows_as_law_trains_at_the_defaults() -> None:
    """The toy of `train_law_on_synthetic_error` (borders 4× harder), trained with LAW's own default learning
    rate: the map leaves the prior, and keeps leaving it as the steps go on."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    size = 48
    lesion = square_lesions(size, [6, 10, 14])
    border = F.max_pool2d(lesion, 5, 1, 2) + F.max_pool2d(-lesion, 5, 1, 2)
    expected = 1 + 3 * border + 0.5 * lesion
    cfg = LAWConfig()
    law = LAW(8, cfg)
    features = torch.randn(3, 8, size, size, generator=g)
    opt = torch.optim.AdamW(law.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    departures = []
    for step in range(121):
        err = expected * torch.randn(3, 3, size, size, generator=g).pow(2).mean(1, keepdim=True)
        pred = err.sqrt().expand(3, 3, size, size)
        terms = weighted_diffusion_loss(pred, torch.zeros_like(pred), weighting="law", lesion=lesion, law=law,
                                        features=features, timesteps=torch.randint(0, 1000, (3,), generator=g))
        if step in (0, 10, 40, 120):
            departures.append(float(terms.departure))
        opt.zero_grad()
        terms.law_objective.backward()
        opt.step()
    assert departures[0] == 0.0  # zero-initialised: exactly the prior
    assert departures[1] > 0 and all(b > a for a, b in zip(departures[1:], departures[2:], strict=False)), departures
    assert departures[-1] > 0.05, departures  # measurably off the prior: ~5 % per pixel on average


def test_law_departure_is_the_mean_absolute_log_ratio_of_the_kept_rows() -> None:
    lesion = blob_lesion(3, 16, 3.0)
    w_prior = prior_map(lesion, 0.5)
    w = w_prior * torch.tensor([1.0, 2.0, 0.5])[:, None, None, None]
    assert float(law_departure(w, w_prior)) == pytest.approx((0 + 2 * torch.log(torch.tensor(2.0))).item() / 3)
    kept = law_departure(w, w_prior, torch.tensor([True, False, False]))
    assert float(kept) == 0.0
    assert torch.isnan(law_departure(w, w_prior, torch.tensor([False, False, False])))
    ratio = weighted_diffusion_loss(torch.randn(3, 3, 16, 16), torch.zeros(3, 3, 16, 16), weighting="ratio",
                                    lesion=lesion)
    assert float(ratio.departure) == 0.0
    assert weighted_diffusion_loss(torch.randn(3, 3, 16, 16), torch.zeros(3, 3, 16, 16)).departure is None


def test_row_weight_makes_laws_objective_a_weighted_mean_of_its_rows() -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(3, 16, 3.0)
    law = LAW(4, LAWConfig(use_timestep=False))
    with torch.no_grad():
        law.out.weight.normal_(0, 0.5)
    features = torch.randn(3, 4, 16, 16)
    pred, target = torch.randn(3, 3, 16, 16), torch.zeros(3, 3, 16, 16)
    rows = [weighted_diffusion_loss(pred[i:i + 1], target[i:i + 1], weighting="law", lesion=lesion[i:i + 1],
                                    law=law, features=features[i:i + 1]).law_objective for i in range(3)]
    weight = torch.tensor([0.2, 1.0, 0.0])
    terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features,
                                    law_row_weight=weight)
    assert torch.allclose(terms.law_objective, (0.2 * rows[0] + rows[1]) / 1.2, atol=1e-6)
    unweighted = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features)
    assert torch.allclose(terms.loss, unweighted.loss)  # the denoiser's loss does not see LAW's row weights
    none = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features,
                                   law_row_weight=torch.zeros(3))
    assert float(none.law_objective.detach()) == 0.0


class ConditionInABox(torch.nn.Module):
    """A toy denoiser whose condition enters only inside a box: out = 2·x + box · conv(cond)."""

    def __init__(self, size: int, box: tuple[slice, slice]) -> None:
        super().__init__()
        self.box = torch.zeros(1, 1, size, size)
        self.box[..., box[0], box[1]] = 1
        self.conv = torch.nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return 2 * noisy + self.box * self.conv(cond)


def test_mask_influence_is_nonzero_only_where_the_condition_changes_the_prediction() -> None:
    torch.manual_seed(0)
    model = ConditionInABox(16, (slice(2, 9), slice(4, 12)))
    denoiser = PixelDenoiser(DenoiserSpec(preset="tiny", size=16))
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    masks[:, 5:8, 6:9] = 1
    noisy, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    influence = mask_influence(model(noisy, t, denoiser.condition(masks)),
                               model(noisy, t, denoiser.null_condition(masks)))
    assert influence.shape == (2, 1, 16, 16)
    inside = model.box.expand_as(influence) > 0
    assert torch.all(influence[~inside] == 0)
    assert torch.all(influence[inside] > 0)
    # and LAW's influence objective ascends exactly this map (normalised), not the error
    law = LAW(4, LAWConfig(objective="influence", use_timestep=False, lambda_tv=0.0, beta_kl=0.0))
    lesion = lesion_at(masks, (16, 16))
    pred, target = torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law,
                                    features=torch.randn(2, 4, 16, 16), influence=influence)
    w = prior_map(lesion, law.config.gamma)
    assert torch.allclose(terms.law_objective, -(w * normalised_error(influence)).mean(), atol=1e-6)
    with pytest.raises(ValueError, match="influence"):
        weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law,
                                features=torch.randn(2, 4, 16, 16))


def test_influence_objective_moves_weight_to_where_the_mask_matters() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    size = 24
    lesion = square_lesions(size, [4, 4], at=(4, 4))
    influence = torch.zeros(2, 1, size, size)
    influence[..., 14:20, 14:20] = 1.0  # where the mask changes the prediction, away from the lesion
    influence += 0.1
    law = LAW(4, LAWConfig(objective="influence"))
    features = torch.randn(2, 4, size, size)
    opt = torch.optim.Adam(law.parameters(), lr=1e-2)
    for _ in range(60):
        pred = torch.randn(2, 3, size, size)
        terms = weighted_diffusion_loss(pred, torch.zeros_like(pred), weighting="law", lesion=lesion, law=law,
                                        features=features, timesteps=torch.full((2,), 500), influence=influence)
        opt.zero_grad()
        terms.law_objective.backward()
        opt.step()
    with torch.no_grad():
        tilt = (law(features, lesion, torch.full((2,), 500)) / prior_map(lesion, law.config.gamma)).log()
    box = influence > 0.5
    assert torch.all(tilt[box].reshape(2, -1).mean(1) > tilt[~box].reshape(2, -1).mean(1) + 0.1)
