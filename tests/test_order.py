"""ORDER: size budget, top-ρ selection, attention only at selected pixels, gradients everywhere."""

from __future__ import annotations

import pytest
import torch

from lawder_core.errors import UsageError
from lawder_core.models.order import (
    MKUNetOrder,
    OrderConfig,
    OrderFusion,
    expected_selection,
    order_parameter_count,
    selection_count,
    uncertainty,
)
from lawder_core.train.losses import segmentation_loss


def test_whole_model_fits_the_budget() -> None:
    model = MKUNetOrder("t")
    total = sum(p.numel() for p in model.parameters())
    assert total <= 45_000
    assert order_parameter_count(model) > 0
    # The three replaced gates are gone, not merely unused.
    assert len(model.gates) == 1 and len(model.order_fusions) == 3


@pytest.mark.parametrize(("rho", "late_stages"), [(0.25, 3), (0.1, 2), (0.5, 3)])
def test_selects_the_requested_share(rho: float, late_stages: int) -> None:
    model = MKUNetOrder("t", config=OrderConfig(rho=rho, late_stages=late_stages)).eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 256, 256))
    counts = model.selection_counts()
    assert [s for s, _ in counts] == expected_selection(rho, 256, late_stages)
    assert [t for _, t in counts] == [(256 // d) ** 2 for d in (8, 4, 2)][3 - late_stages :]
    assert model.selected_share() == pytest.approx(rho, abs=1e-3)


def test_selection_count_rounds_and_never_drops_to_zero() -> None:
    assert selection_count(0.25, 1024) == 256
    assert selection_count(0.1, 4) == 1
    assert selection_count(1.0, 9) == 9


def test_uncertainty_peaks_at_half_probability() -> None:
    u = uncertainty(torch.tensor([-10.0, 0.0, 10.0]))
    assert u[1] == pytest.approx(1.0) and u[0] < 1e-3 and u[2] < 1e-3


def test_the_most_uncertain_pixels_are_selected() -> None:
    fusion = OrderFusion(4, OrderConfig(rho=0.25))
    logits = torch.full((1, 1, 4, 4), 8.0)
    uncertain = [1, 6, 11, 12]
    logits.view(-1)[uncertain] = torch.tensor([0.0, 0.1, -0.2, 0.3])
    assert sorted(fusion.select(logits)[0].tolist()) == uncertain


def test_attention_changes_only_selected_pixels() -> None:
    torch.manual_seed(0)
    fusion = OrderFusion(8, OrderConfig(rho=0.25, kv_grid=4)).eval()
    decoder, skip = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        new_decoder, new_skip, region, index = fusion.attend(decoder, skip)
    assert region.shape == (2, 1, 16, 16) and index.shape == (2, 64)
    for before, after in ((decoder, new_decoder), (skip, new_skip)):
        changed = (after - before).abs().amax(dim=1).flatten(1) > 0
        for b in range(2):
            assert set(changed[b].nonzero().flatten().tolist()) == set(index[b].tolist())


def test_aux_outputs_include_region_logits() -> None:
    model = MKUNetOrder("t", config=OrderConfig(late_stages=2)).eval()
    with torch.no_grad():
        logits, aux = model(torch.randn(1, 3, 128, 128), return_aux=True)
    assert logits.shape == (1, 1, 128, 128)
    # out1..out3 deep supervision, then the region heads at H/4 and H/2
    assert [a.shape[-1] for a in aux] == [16, 32, 64, 32, 64]


def test_gradients_reach_every_order_parameter() -> None:
    torch.manual_seed(0)
    model = MKUNetOrder("t").train()
    x = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.7).float()
    logits, aux = model(x, return_aux=True)
    segmentation_loss(logits, aux, target, aux_weight=0.2).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # Non-zero, not merely present: every ORDER weight is actually trained. (Some MK-UNet weights can get an
    # exact zero, e.g. the gate's conv bias that a BatchNorm follows, so the check is ORDER's own.)
    zero = [n for n, p in model.order_fusions.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == []


@pytest.mark.parametrize(
    "overrides",
    [{"rho": 0.0}, {"rho": 1.5}, {"attn_dim": 30, "heads": 4}, {"late_stages": 5}, {"kv_grid": 0}],
)
def test_invalid_configs_are_usage_errors(overrides: dict) -> None:
    with pytest.raises(UsageError):
        OrderConfig(**overrides)


def test_small_inputs_pool_to_at_most_their_own_size() -> None:
    model = MKUNetOrder("t", config=OrderConfig(kv_grid=64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)
