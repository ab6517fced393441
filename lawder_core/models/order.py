"""ORDER — Optimal Region Detection with Efficient Resolution — on MK-UNet (the design brief §1.2).

At the late (high-resolution) decoder stages ORDER replaces MK-UNet's gate-then-add skip fusion:

1. a 1×1 region head on the decoder feature predicts a coarse lesion logit `z` (returned as an auxiliary output,
   so the training loop supervises it with the mask);
2. the uncertainty `1 − |2σ(z) − 1|` ranks the pixels; the top-ρ share become queries;
3. bidirectional attention at those pixels only: decoder queries attend to the skip stream and skip queries
   attend to the decoder stream, both with keys/values average-pooled to a small fixed grid (the "efficient
   resolution"), pre-LayerNorm, scaled-dot-product attention;
4. the attention results are added back at the selected pixels (residual scatter) and the two streams are
   fused by a 1×1 conv + BatchNorm.

Unselected pixels skip attention entirely: the cost grows with ρ·H·W·grid², not (H·W)².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lawder_core.models.configs import MKUNET_CHANNELS, SKIP_FUSIONS, OrderConfig
from lawder_core.models.mkunet import MKUNet, conv_bn


def selection_count(rho: float, positions: int) -> int:
    """How many of `positions` pixels become queries: round(ρ·positions), at least one."""
    return max(1, min(positions, round(rho * positions)))


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """1 at σ(z) = 0.5, 0 where the region head is certain either way."""
    return 1.0 - (2.0 * torch.sigmoid(logits) - 1.0).abs()


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C); free for channels_last tensors."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def from_tokens(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H·W, C) -> (B, C, H, W) as a channels_last-strided view."""
    b, _, c = tokens.shape
    return tokens.view(b, height, width, c).permute(0, 3, 1, 2)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return tokens.gather(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def scatter_add_tokens(tokens: torch.Tensor, index: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    return tokens.scatter_add(1, index.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), update)


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention from `channels`-wide queries to `channels`-wide keys/values."""

    def __init__(self, channels: int, attn_dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_query = nn.LayerNorm(channels)
        self.norm_context = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, attn_dim)
        self.to_k = nn.Linear(channels, attn_dim)
        self.to_v = nn.Linear(channels, attn_dim)
        self.to_out = nn.Linear(attn_dim, channels)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = self.split_heads(self.to_q(self.norm_query(query)))
        context = self.norm_context(context)
        k = self.split_heads(self.to_k(context))
        v = self.split_heads(self.to_v(context))
        attended = F.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = attended.shape
        return self.to_out(attended.transpose(1, 2).reshape(b, n, -1))


class OrderFusion(nn.Module):
    """One ORDER skip fusion on `channels`-wide decoder and skip streams of the same resolution."""

    def __init__(self, channels: int, config: OrderConfig) -> None:
        super().__init__()
        self.config = config
        self.region_head = nn.Conv2d(channels, 1, 1)
        self.decoder_to_skip = CrossAttention(channels, config.attn_dim, config.heads)
        self.skip_to_decoder = CrossAttention(channels, config.attn_dim, config.heads)
        self.fuse = conv_bn(2 * channels, channels)
        # Filled by each forward so callers (tests, profiling) can see what share of pixels was attended.
        self.last_selected = 0
        self.last_positions = 0

    def select(self, region_logits: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the k most uncertain pixels of each image."""
        scores = uncertainty(region_logits.detach()).flatten(1)
        k = selection_count(self.config.rho, scores.shape[1])
        self.last_selected, self.last_positions = k, scores.shape[1]
        return scores.topk(k, dim=1, sorted=False).indices

    def pooled_context(self, x: torch.Tensor) -> torch.Tensor:
        grid = (min(self.config.kv_grid, x.shape[2]), min(self.config.kv_grid, x.shape[3]))
        return to_tokens(F.adaptive_avg_pool2d(x, grid))

    def attend(
        self, decoder: torch.Tensor, skip: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both streams after bidirectional attention at the selected pixels, the region logits, the indices."""
        height, width = decoder.shape[2:]
        region_logits = self.region_head(decoder)
        index = self.select(region_logits)
        decoder_tokens, skip_tokens = to_tokens(decoder), to_tokens(skip)
        decoder_update = self.decoder_to_skip(gather_tokens(decoder_tokens, index), self.pooled_context(skip))
        skip_update = self.skip_to_decoder(gather_tokens(skip_tokens, index), self.pooled_context(decoder))
        decoder = from_tokens(scatter_add_tokens(decoder_tokens, index, decoder_update), height, width)
        skip = from_tokens(scatter_add_tokens(skip_tokens, index, skip_update), height, width)
        return decoder, skip, region_logits, index

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the fused stream and the region head's coarse logits (B, 1, H, W)."""
        decoder, skip, region_logits, _ = self.attend(decoder, skip)
        return self.fuse(torch.cat([decoder, skip], dim=1)), region_logits


class MKUNetOrder(MKUNet):
    """MK-UNet whose last `config.late_stages` skip fusions are ORDER fusions.

    `model(x, return_aux=True)` returns (logits, aux) with aux = MK-UNet's out1..out3 deep-supervision logits
    followed by the region heads' coarse logits (coarsest first).
    """

    def __init__(
        self, variant: str = "t", num_classes: int = 1, in_channels: int = 3, config: OrderConfig | None = None
    ) -> None:
        super().__init__(variant, num_classes, in_channels)
        self.order_config = config or OrderConfig()
        self.first_order_fusion = SKIP_FUSIONS - self.order_config.late_stages
        c = MKUNET_CHANNELS[variant]
        skip_widths = (c[3], c[2], c[1], c[0])
        # The replaced gates must not exist, or they would be counted and saved without being used.
        self.gates = nn.ModuleList(self.gates[: self.first_order_fusion])
        self.order_fusions = nn.ModuleList(
            OrderFusion(w, self.order_config) for w in skip_widths[self.first_order_fusion :]
        )

    def fuse_skip(self, index: int, out: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if index < self.first_order_fusion:
            return super().fuse_skip(index, out, skip)
        fused, region_logits = self.order_fusions[index - self.first_order_fusion](out, skip)
        return fused, [region_logits]

    def selection_counts(self) -> list[tuple[int, int]]:
        """(selected, total) pixels per ORDER fusion in the last forward pass, coarsest first."""
        return [(f.last_selected, f.last_positions) for f in self.order_fusions]

    def selected_share(self) -> float:
        counts = self.selection_counts()
        return sum(s for s, _ in counts) / max(1, sum(t for _, t in counts))


def order_parameter_count(model: MKUNetOrder) -> int:
    """Parameters that belong to the ORDER adapter itself (for reports)."""
    return sum(p.numel() for p in model.order_fusions.parameters())


def expected_selection(rho: float, size: int, late_stages: int) -> list[int]:
    """Selection counts a square `size` input gives, coarsest ORDER stage first (used by tests and docs)."""
    sides = [size // 2 ** (SKIP_FUSIONS - i) for i in range(SKIP_FUSIONS)][SKIP_FUSIONS - late_stages :]
    return [selection_count(rho, s * s) for s in sides]


__all__ = [
    "CrossAttention",
    "MKUNetOrder",
    "OrderConfig",
    "OrderFusion",
    "expected_selection",
    "order_parameter_count",
    "selection_count",
    "uncertainty",
]
