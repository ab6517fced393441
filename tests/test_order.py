"""ORDER revision 2: starts as MK-UNet-T, size budget, top-ρ selection, local + pooled context, gradients everywhere."""

from __future__ import annotations

import pytest
import torch

from lawder_core.errors import UsageError
from lawder_core.models.mkunet import MKUNet
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
    assert 40_000 <= total <= 45_000
    assert order_parameter_count(model) == total - sum(p.numel() for p in MKUNet("t").parameters())
    # ORDER adds to the grouped gate at the three late fusions; it does not replace it.
    assert len(model.gates) == 4 and len(model.order_fusions) == 3


@pytest.mark.parametrize("train", [False, True])
def test_at_initialisation_order_computes_exactly_mkunet_t(train: bool) -> None:
    torch.manual_seed(0)
    plain = MKUNet("t")
    order = MKUNetOrder("t")
    missing, unexpected = order.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(k.startswith("order_fusions.") for k in missing)
    plain.train(train), order.train(train)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, expected_aux = plain(x, return_aux=True)
        got, got_aux = order(x, return_aux=True)
    assert torch.equal(got, expected)
    assert len(got_aux) == len(expected_aux) + 3  # MK-UNet's deep supervision, then ORDER's three region heads
    assert all(torch.equal(a, b) for a, b in zip(got_aux[:3], expected_aux, strict=True))


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
    u = uncertainty(torch.tensor([-10.0, 0.0, 10.0]).view(1, 1, 1, 3)).flatten()
    assert u[1] == pytest.approx(1.0) and u[0] < 1e-3 and u[2] < 1e-3


def test_the_most_uncertain_pixels_are_selected() -> None:
    fusion = OrderFusion(4, OrderConfig(rho=0.25))
    logits = torch.full((1, 1, 4, 4), 8.0)
    uncertain = [1, 6, 11, 12]
    logits.view(-1)[uncertain] = torch.tensor([0.0, 0.1, -0.2, 0.3])
    assert sorted(fusion.select(uncertainty(logits).flatten(1))[0].tolist()) == uncertain


def trained_fusion(channels: int, config: OrderConfig) -> OrderFusion:
    """A fusion whose zero-initialised output projection has been given weights, as training would."""
    torch.manual_seed(0)
    fusion = OrderFusion(channels, config).eval()
    with torch.no_grad():
        fusion.to_out.weight.normal_()
    return fusion


def fixed_selection(fusion: OrderFusion, decoder: torch.Tensor, selected: list[int]) -> None:
    """Make the region head certain everywhere except at `selected` (flat indices), whatever the decoder."""
    with torch.no_grad():
        fusion.region_head.weight.zero_()
        fusion.region_head.bias.fill_(8.0)
    logits = torch.full(decoder.shape[-2:], 8.0).flatten()
    logits[selected] = 0.0

    def head(_: torch.Tensor) -> torch.Tensor:
        return logits.view(1, 1, *decoder.shape[-2:]).expand(decoder.shape[0], -1, -1, -1)

    fusion.region_head.forward = head  # type: ignore[method-assign]


def test_the_update_touches_only_selected_pixels() -> None:
    fusion = trained_fusion(8, OrderConfig(rho=0.25, kv_grid=4))
    decoder, skip = torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        update, region = fusion(decoder, skip)
    assert region.shape == (2, 1, 16, 16) and update.shape == decoder.shape
    index = fusion.select(uncertainty(region).flatten(1))
    changed = update.abs().amax(dim=1).flatten(1) > 0
    for b in range(2):
        assert set(changed[b].nonzero().flatten().tolist()) == set(index[b].tolist())


def test_the_local_neighbourhood_reaches_the_selected_query() -> None:
    """A change in one skip pixel that leaves every pooled cell as it was reaches only the queries next to it."""
    fusion = trained_fusion(4, OrderConfig(rho=2 / 256, kv_grid=4))
    decoder, skip = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16)
    near, far = 5 * 16 + 5, 12 * 16 + 12  # (5, 5) and (12, 12)
    fixed_selection(fusion, decoder, [near, far])
    moved = skip.clone()
    moved[0, :, 5, 6] += 3.0  # a neighbour of (5, 5) ...
    moved[0, :, 7, 7] -= 3.0  # ... and a pixel of the same 4×4 pooling cell outside every selected window
    with torch.no_grad():
        before, _ = fusion(decoder, skip)
        after, _ = fusion(decoder, moved)
    delta = (after - before).abs().amax(dim=1).flatten()
    assert delta[near] > 1e-3
    assert delta[far] < 1e-5 and delta.sum() == pytest.approx(float(delta[near]), rel=1e-4)


def test_aux_outputs_include_region_logits() -> None:
    model = MKUNetOrder("t", config=OrderConfig(late_stages=2)).eval()
    with torch.no_grad():
        logits, aux = model(torch.randn(1, 3, 128, 128), return_aux=True)
    assert logits.shape == (1, 1, 128, 128)
    # out1..out3 deep supervision, then the region heads at H/4 and H/2
    assert [a.shape[-1] for a in aux] == [16, 32, 64, 32, 64]


def test_gradients_reach_every_order_parameter() -> None:
    """At step 0 only the zero-initialised output projection can learn; after one step every ORDER weight does,
    the region head through both its auxiliary loss and the uncertainty that scales the update."""
    torch.manual_seed(0)
    model = MKUNetOrder("t").train()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 3, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.7).float()
    for _ in range(2):
        optimiser.zero_grad()
        logits, aux = model(x, return_aux=True)
        segmentation_loss(logits, aux, target, aux_weight=0.2).backward()
        optimiser.step()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    # Non-zero, not merely present: every ORDER weight is actually trained. (Some MK-UNet weights can get an
    # exact zero, e.g. the gate's conv bias that a BatchNorm follows, so the check is ORDER's own.)
    zero = [n for n, p in model.order_fusions.named_parameters() if not p.grad.abs().sum() > 0]
    assert zero == []


def test_the_selection_passes_gradient_to_the_region_head_through_the_main_loss() -> None:
    fusion = trained_fusion(8, OrderConfig(rho=0.25, kv_grid=4)).train()
    update, _ = fusion(torch.randn(2, 8, 16, 16), torch.randn(2, 8, 16, 16))
    update.square().sum().backward()  # the region logits themselves are not in this loss
    assert fusion.region_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "overrides",
    [{"rho": 0.0}, {"rho": 1.5}, {"attn_dim": 30, "heads": 4}, {"late_stages": 5}, {"kv_grid": 0},
     {"token_dim": 0}],
)
def test_invalid_configs_are_usage_errors(overrides: dict) -> None:
    with pytest.raises(UsageError):
        OrderConfig(**overrides)


def test_small_inputs_pool_to_at_most_their_own_size() -> None:
    model = MKUNetOrder("t", config=OrderConfig(kv_grid=64)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_windows_at_selected_pixels_equal_the_unfolded_map() -> None:
    from lawder_core.models.order import to_tokens, window_tokens

    x = torch.randn(2, 5, 7, 6)
    index = torch.tensor([[0, 5, 41, 17], [36, 6, 13, 40]])  # corners, borders and the interior
    unfolded = torch.nn.functional.unfold(x, 3, padding=1).view(2, 5, 9, 42).permute(0, 3, 2, 1)
    expected = unfolded.gather(1, index[..., None, None].expand(-1, -1, 9, 5))
    padded = torch.nn.functional.pad(to_tokens(x).view(2, 7, 6, 5), (0, 0, 1, 1, 1, 1))
    assert torch.equal(window_tokens(padded, index), expected)


def textbook_attention(attn, query, grid, grid_size, window):
    """The same attention written directly: project every key and value, concatenate, one softmax."""
    def heads(x):
        return attn.split_heads(x)  # (B, h, ..., d)

    q = heads(attn.to_q(query))  # (B, h, k, d)
    keys = torch.cat([heads(attn.to_k(grid)).unsqueeze(2).expand(-1, -1, q.shape[2], -1, -1),
                      heads(attn.to_k(window))], dim=3)  # (B, h, k, G + 9, d)
    values = torch.cat([heads(attn.to_v(grid)).unsqueeze(2).expand(-1, -1, q.shape[2], -1, -1),
                        heads(attn.to_v(window))], dim=3)
    bias = torch.cat([attn.bias_for(grid_size)[:, 0], attn.local_bias], dim=-1)[:, None]  # (h, 1, G + 9)
    scores = (keys @ q.unsqueeze(-1)).squeeze(-1) * q.shape[-1] ** -0.5 + bias
    out = (scores.softmax(-1).unsqueeze(-2) @ values).squeeze(-2)  # (B, h, k, d)
    return out.movedim(1, 2).flatten(2)


@pytest.mark.parametrize("heads", [1, 2])
def test_the_fast_attention_equals_the_textbook_attention(heads: int) -> None:
    from lawder_core.models.order import LocalGlobalAttention

    torch.manual_seed(heads)
    attn = LocalGlobalAttention(token_dim=6, attn_dim=8, heads=heads, kv_grid=4).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p)  # non-zero biases: the rewrite moves b_k and b_v out of the local keys/values
    query, grid, window = torch.randn(2, 5, 6), torch.randn(2, 16, 6), torch.randn(2, 5, 9, 6)
    args = [t.double().requires_grad_() for t in (query, grid, window)]
    got, expected = attn(args[0], args[1], (4, 4), args[2]), textbook_attention(attn, args[0], args[1], (4, 4), args[2])
    torch.testing.assert_close(got, expected)
    grads = torch.autograd.grad(got.square().sum(), [*args, *attn.parameters()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [*args, *attn.parameters()])
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e)
