"""MK-UNet reproduces the published sizes exactly and has the documented forward contract."""

from __future__ import annotations

import pytest
import torch

from lawder_core.models.mkunet import MKUNET_CHANNELS, MKUNet

PUBLISHED_PARAMS = {"t": 27_384, "s": 93_050, "base": 315_566, "m": 1_150_166, "l": 3_758_118}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_the_paper(variant: str) -> None:
    model = MKUNet(variant, num_classes=1)
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[variant]


def test_every_published_variant_is_tested() -> None:
    assert set(MKUNET_CHANNELS) == set(PUBLISHED_PARAMS) | {"t-wide"}


def test_the_wide_control_matches_order_within_five_percent() -> None:
    from lawder_core.models.order import MKUNetOrder

    wide = sum(p.numel() for p in MKUNet("t-wide").parameters())
    order = sum(p.numel() for p in MKUNetOrder("t").parameters())
    assert abs(wide / order - 1) <= 0.05


@pytest.mark.parametrize("size", [256, 352])
def test_forward_shapes(size: int) -> None:
    model = MKUNet("t", num_classes=2).eval()
    with torch.no_grad():
        logits, aux = model(torch.randn(1, 3, size, size), return_aux=True)
    assert logits.shape == (1, 2, size, size)
    assert [a.shape for a in aux] == [(1, 2, size // d, size // d) for d in (8, 4, 2)]


def test_plain_forward_returns_only_logits() -> None:
    model = MKUNet("s").eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 1, 64, 64)


def test_grey_input_is_repeated_to_three_channels() -> None:
    model = MKUNet("t", in_channels=1).eval()
    grey = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(grey), model(grey.repeat(1, 3, 1, 1)))


def test_other_channel_counts_get_their_own_stem() -> None:
    model = MKUNet("t", in_channels=4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 4, 64, 64)).shape == (1, 1, 64, 64)


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown MK-UNet variant"):
        MKUNet("xl")


def test_deep_supervision_heads_receive_gradients() -> None:
    model = MKUNet("t")
    logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
    (logits.mean() + sum(a.mean() for a in aux)).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
