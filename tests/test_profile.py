"""Parameter, FLOP and throughput measurements."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lawder_core.metrics.profile import count_flops, count_params, measure_latency
from lawder_core.models.factory import build_segmenter
from lawder_core.models.order import MKUNetOrder, OrderConfig


class Attention(nn.Module):
    def __init__(self, queries: int, keys: int, dim: int) -> None:
        super().__init__()
        self.q = nn.Parameter(torch.randn(1, 2, queries, dim))
        self.kv = nn.Parameter(torch.randn(1, 2, keys, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(self.q, self.kv, self.kv)


def test_count_params() -> None:
    assert count_params(nn.Conv2d(3, 8, 3)) == 3 * 8 * 9 + 8
    frozen = nn.Linear(4, 4)
    frozen.bias.requires_grad_(False)
    assert count_params(frozen, trainable_only=True) == 16


def test_conv_flops_are_exact() -> None:
    result = count_flops(nn.Conv2d(3, 8, 3, padding=1, bias=False), size=16)
    assert result["macs"] == 8 * 3 * 9 * 16 * 16
    assert result["flops"] == 2 * result["macs"]


def test_attention_flops_are_counted() -> None:
    queries, keys, dim = 50, 16, 8
    result = count_flops(Attention(queries, keys, dim), size=4)
    # Q·Kᵀ and P·V: 2 heads × 2 matmuls × queries × keys × dim multiply-accumulates
    assert result["macs"] == 2 * 2 * queries * keys * dim


def test_order_flops_include_its_attention() -> None:
    plain = count_flops(build_segmenter("mkunet-t"), size=64)["macs"]
    config = OrderConfig(rho=0.25, kv_grid=16, attn_dim=32, heads=2, late_stages=3)
    model = MKUNetOrder("t", config=config)
    order = count_flops(model, size=64)["macs"]
    attention = 0
    for selected, total in model.selection_counts():
        side = int(total**0.5)
        keys = min(16, side) ** 2
        attention += 2 * 2 * selected * keys * config.attn_dim  # two directions, QKᵀ and PV
    assert order - plain > attention


def test_mkunet_t_macs_at_256() -> None:
    # Convolutions and matmuls only; the paper's 0.062 G also counts element-wise work.
    assert count_flops(build_segmenter("mkunet-t"), size=256)["macs"] == pytest.approx(0.0495e9, rel=0.01)


def test_count_flops_restores_training_mode() -> None:
    model = build_segmenter("mkunet-t").train()
    count_flops(model, size=64)
    assert model.training


def test_measure_latency_reports_throughput() -> None:
    result = measure_latency(build_segmenter("mkunet-t").eval(), size=32, batch=2, repeats=2)
    assert result["img_per_s"] > 0
    assert result["ms_per_batch"] == pytest.approx(2 / result["img_per_s"] * 1000)
    assert result["ms_per_batch_median"] >= result["ms_per_batch"]
