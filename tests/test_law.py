"""LAW: the map pipeline, the prior, zero-init behaviour, gradient routing, both objectives, warm-up."""

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
    kl_to_uniform,
    law_active,
    lesion_at,
    normalise_map,
    pixel_error,
    prior_map,
    raw_prior,
    top_share,
    total_variation,
    weighted_diffusion_loss,
)

CLAMPS = [(0.5, 2.0), (0.25, 4.0), (0.2, 5.0), (0.1, 10.0)]


def blob_lesion(batch: int, size: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    disk = ((yy - size / 3) ** 2 + (xx - size / 2) ** 2 <= radius**2).float()
    return disk.expand(batch, 1, size, size).clone()


@pytest.mark.parametrize("w_min,w_max", CLAMPS)
def test_normalised_map_has_mean_one_and_stays_in_clamp(w_min: float, w_max: float) -> None:
    torch.manual_seed(0)
    raw = torch.exp(3 * torch.randn(6, 1, 20, 24))  # spans ~8 orders of magnitude: the clamp must bite
    w = normalise_map(raw, w_min, w_max)
    assert torch.allclose(w.mean(dim=(-2, -1)), torch.ones(6, 1), atol=1e-5)
    assert w.min() >= w_min - 1e-6 and w.max() <= w_max + 1e-5
    assert (w >= w_max - 1e-4).any()  # the heavy tail is clipped at w_max, and the mean is still exactly 1


@pytest.mark.parametrize("w_min,w_max", CLAMPS)
def test_prior_map_of_a_tiny_lesion_respects_clamp_and_mean(w_min: float, w_max: float) -> None:
    lesion = blob_lesion(2, 32, 2.0)  # about 1 % of the frame: raw ratio weight ≈ 50 on the lesion
    w = prior_map(lesion, w_min, w_max)
    assert torch.allclose(w.mean(dim=(-2, -1)), torch.ones(2, 1), atol=1e-5)
    assert w.min() >= w_min - 1e-6 and w.max() <= w_max + 1e-5
    assert w[lesion > 0].min() > w[lesion == 0].max()


def test_raw_prior_balances_lesion_and_background_mass() -> None:
    lesion = blob_lesion(1, 32, 5.0)
    r = lesion.mean()
    prior = raw_prior(lesion)
    assert torch.allclose(prior[lesion > 0], 1 - r) and torch.allclose(prior[lesion == 0], r)
    assert torch.isclose((prior * lesion).sum(), (prior * (1 - lesion)).sum())  # equal mass per region


def test_prior_of_empty_or_full_mask_is_uniform() -> None:
    lesion = torch.cat([torch.zeros(1, 1, 16, 16), torch.ones(1, 1, 16, 16)])
    assert torch.equal(prior_map(lesion, 0.2, 5.0), torch.ones_like(lesion))


def test_zero_initialised_law_equals_prior_exactly() -> None:
    torch.manual_seed(0)
    lesion = blob_lesion(3, 24, 4.0)
    for cfg in (LAWConfig(), LAWConfig(use_error=True, w_min=0.1, w_max=10.0)):
        law = LAW(feature_channels=16, config=cfg)
        w = law(torch.randn(3, 16, 24, 24), lesion, torch.tensor([0, 500, 999]), torch.rand(3, 1, 24, 24))
        assert torch.equal(w, prior_map(lesion, cfg.w_min, cfg.w_max))


def test_law_is_far_below_a_tenth_of_a_million_parameters_even_on_sd_features() -> None:
    assert sum(p.numel() for p in LAW(feature_channels=320).parameters()) < 20_000  # 10,945 with hidden=16


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


def test_ratio_weighting_uses_the_prior_map_with_the_configured_clamp() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    lesion = blob_lesion(2, 16, 2.5)
    cfg = LAWConfig(w_min=0.5, w_max=2.0)
    terms = weighted_diffusion_loss(pred, target, weighting="ratio", lesion=lesion, config=cfg)
    w = prior_map(lesion, 0.5, 2.0)
    assert torch.equal(terms.weights, w)
    assert torch.allclose(terms.loss, (w * (pred - target).pow(2).mean(1, keepdim=True)).mean())


def test_joint_objective_at_init_has_no_prior_penalty_and_adds_tv() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)
    lesion = blob_lesion(2, 16, 3.0)
    cfg = LAWConfig(lambda_tv=0.5, use_timestep=False)
    law = LAW(4, cfg)
    terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law,
                                    features=torch.randn(2, 4, 16, 16))
    err = pixel_error(pred, target)
    err_n = err / err.mean(dim=(-2, -1), keepdim=True)
    w = prior_map(lesion, cfg.w_min, cfg.w_max)
    expected = (w * err_n).mean() + 0.5 * total_variation(w)
    assert torch.allclose(terms.law_objective, expected)
    assert torch.allclose(terms.loss, (w * err).mean())


def adversarial_top_share(entropy_weight: float, w_max: float = 100.0, steps: int = 60) -> float:
    """Train LAW alone against a fixed error map with four 'hard' pixels (1 % of the frame)."""
    torch.manual_seed(0)
    b, h = 2, 20
    err = torch.rand(b, 1, h, h) * 0.5 + 0.5
    err[:, :, 15, 3:7] = 4.0
    pred, target = err.sqrt().expand(b, 3, h, h), torch.zeros(b, 3, h, h)
    cfg = LAWConfig(objective="adversarial", w_min=0.01, w_max=w_max, entropy_weight=entropy_weight,
                    use_error=True, use_timestep=False, hidden=8)
    law = LAW(4, cfg)
    features, lesion = torch.randn(b, 4, h, h), blob_lesion(b, h, 3.0)
    opt = torch.optim.Adam(law.parameters(), lr=5e-2)
    for _ in range(steps):
        terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features)
        opt.zero_grad()
        terms.law_objective.backward()
        opt.step()
    return float(top_share(terms.weights, 0.01).max())


def test_adversarial_entropy_penalty_keeps_mass_from_collapsing() -> None:
    torch.set_num_threads(1)
    collapsed = adversarial_top_share(entropy_weight=0.0)
    bounded = adversarial_top_share(entropy_weight=1.0)
    # Without the penalty the adversary puts ~all mass on the hard 1 %; with it the optimum is the Gibbs map
    # w ∝ exp(err / β): here a 60:1 contrast, i.e. about 38 % of the mass.
    assert collapsed > 0.95
    assert bounded < 0.5


def test_adversarial_with_default_clamp_is_bounded_by_the_clamp() -> None:
    share = adversarial_top_share(entropy_weight=LAWConfig().entropy_weight, w_max=LAWConfig().w_max)
    assert share <= 0.01 * LAWConfig().w_max * 1.05  # a handful of pixels cannot carry more than w_max each


def test_adversarial_gradient_reversal_makes_law_ascend_the_weighted_loss() -> None:
    torch.manual_seed(0)
    err = torch.rand(1, 1, 12, 12) + 0.1
    pred, target = err.sqrt().expand(1, 3, 12, 12), torch.zeros(1, 3, 12, 12)
    law = LAW(2, LAWConfig(objective="adversarial", entropy_weight=0.0, use_timestep=False, use_error=True,
                           hidden=8))
    features, lesion = torch.randn(1, 2, 12, 12), blob_lesion(1, 12, 2.0)
    before = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features)
    opt = torch.optim.Adam(law.parameters(), lr=5e-2)
    for _ in range(30):
        terms = weighted_diffusion_loss(pred, target, weighting="law", lesion=lesion, law=law, features=features)
        opt.zero_grad()
        terms.law_objective.backward()
        opt.step()
    assert float(terms.loss) > float(before.loss) * 1.05


def test_kl_to_uniform_is_zero_for_a_flat_map_and_positive_otherwise() -> None:
    assert float(kl_to_uniform(torch.ones(1, 1, 8, 8))) == pytest.approx(0.0, abs=1e-7)
    assert float(kl_to_uniform(normalise_map(torch.rand(1, 1, 8, 8) + 0.1, 0.2, 5.0))) > 0


def test_warm_up_uses_the_warm_up_map_and_no_law_objective() -> None:
    cfg = LAWConfig(warmup_frac=0.25, warmup_weights="prior", use_timestep=False)
    assert not law_active(24, 100, cfg) and law_active(25, 100, cfg)
    lesion = blob_lesion(1, 16, 3.0)
    terms = weighted_diffusion_loss(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), weighting="law",
                                    lesion=lesion, law=LAW(2, cfg), active=False)
    assert terms.law_objective is None
    assert torch.equal(terms.weights, prior_map(lesion, cfg.w_min, cfg.w_max))
    uniform = weighted_diffusion_loss(torch.randn(1, 3, 16, 16), torch.zeros(1, 3, 16, 16), weighting="law",
                                      lesion=lesion, law=LAW(2, LAWConfig()), active=False)
    assert torch.equal(uniform.weights, torch.ones_like(lesion))


def test_lesion_at_latent_resolution_keeps_small_lesions_as_fractions() -> None:
    masks = torch.zeros(1, 32, 32, dtype=torch.long)
    masks[0, 0:2, 0:2] = 1  # smaller than one 8×8 latent pixel
    lesion = lesion_at(masks, (4, 4))
    assert lesion.shape == (1, 1, 4, 4)
    assert float(lesion[0, 0, 0, 0]) == pytest.approx(4 / 64) and float(lesion.sum()) == pytest.approx(4 / 64)


@pytest.mark.parametrize("kwargs", [{"w_min": 1.5}, {"w_max": 0.9}, {"objective": "minimax"},
                                    {"warmup_frac": 1.0}, {"hidden": 10, "groups": 4}])
def test_config_rejects_impossible_settings(kwargs: dict) -> None:
    with pytest.raises(UsageError):
        LAWConfig(**kwargs)
