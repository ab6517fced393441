"""ORDER — Optimal Region Detection with Efficient Resolution — on MK-UNet.

ORDER starts as MK-UNet-T and adds, at the late (high-resolution) decoder stages, a correction at the pixels
where the network is unsure:

1. a 1×1 region head on the decoder feature predicts a coarse lesion logit `z` (an auxiliary output, so the
   training loop supervises it with the mask); the uncertainty `u = 1 − |2σ(z) − 1|` ranks the pixels and the
   top-ρ share become queries (a multi-class model's head predicts every class and `u` is one minus the margin
   between its two most probable classes);
2. both streams are projected to `token_dim`-wide tokens (at H/2 MK-UNet-T has 4 channels: attention on the raw
   channels would have rank ≤ 4) and layer-normalised;
3. bidirectional attention at the selected pixels only: decoder queries attend to the skip stream and skip
   queries to the decoder stream. Each query's keys/values are the other stream pooled to a `kv_grid`² grid
   (with a learned positional bias on the scores) plus the query's own 3×3 neighbourhood at full resolution, so
   the fine detail that pooling throws away is still within reach;
4. the two attention results give one update per selected pixel, scaled by `u` there (so the selection passes
   gradient to the region head) and added to MK-UNet's own gate-then-add fusion. The output projection starts
   at zero: at initialisation ORDER computes exactly MK-UNet-T.

Unselected pixels skip attention: the cost grows with ρ·H·W·(grid² + 9), not (H·W)².
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lawder_core.models.configs import MKUNET_CHANNELS, SKIP_FUSIONS, OrderConfig
from lawder_core.models.mkunet import MKUNet

NEIGHBOURHOOD = 9  # the query's own 3×3 window in the other stream


def selection_count(rho: float, positions: int) -> int:
    """How many of `positions` pixels become queries: round(ρ·positions), at least one."""
    return max(1, min(positions, round(rho * positions)))


def uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """(B,1,H,W) in [0, 1]: 1 where the region head cannot decide, 0 where it is certain.

    One channel: 1 − |2σ(z) − 1|. Several classes: 1 − (p₁ − p₂), the margin between the two most probable
    classes of the softmax (the same number as the one-channel form for two classes).
    """
    if logits.shape[1] == 1:
        return 1.0 - (2.0 * torch.sigmoid(logits) - 1.0).abs()
    top2 = logits.softmax(dim=1).topk(2, dim=1).values
    return 1.0 - (top2[:, :1] - top2[:, 1:])


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H·W, C); free for channels_last tensors."""
    b, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(b, h * w, c)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(B, N, ...) tokens at `index` (B, k) -> (B, k, ...).

    Rows of the flattened (B·N, ...) tokens: `gather` would need the index expanded to every channel, and
    `tokens[batch, index]` exports to ONNX as GatherND between two transposes of the whole map; a row
    `index_select` is one contiguous copy per token in both.
    """
    b, n = tokens.shape[:2]
    rows = index + torch.arange(b, device=index.device).unsqueeze(1) * n
    return tokens.reshape(b * n, *tokens.shape[2:]).index_select(0, rows.flatten()).view(*index.shape,
                                                                                          *tokens.shape[2:])


def window_index(index: torch.Tensor, width: int) -> torch.Tensor:
    """Pixel indices (B, k) of a map `width` wide -> (B, k·9) indices of their 3×3 windows in the same map padded
    by one token on every side, row-major within each window (F.unfold's order); the centre is entry 4."""
    row, col = index // width, index % width
    offsets = torch.arange(3, device=index.device)
    rows = (row[..., None] + offsets)[..., :, None]  # (B, k, 3, 1): padded rows y-1+1 .. y+1+1
    cols = (col[..., None] + offsets)[..., None, :]  # (B, k, 1, 3)
    return (rows * (width + 2) + cols).flatten(1)


def window_tokens(padded: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Padded (B, H+2, W+2, C) token map and pixel indices (B, k) of the unpadded map -> (B, k, 9, C): the 3×3
    window around each selected pixel, gathered for the k selected pixels only (unfolding the whole map would
    move 9·H·W tokens to use ρ of them)."""
    b, h2, w2, c = padded.shape
    return gather_tokens(padded.view(b, -1, c), window_index(index, w2 - 2)).view(*index.shape, NEIGHBOURHOOD, c)


def head_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(rows, h, a) @ (h, a, c) -> (rows, h, c), one matmul per head (views, not copies, for one head)."""
    return (x.transpose(0, 1) @ weight).transpose(0, 1)


def per_query(x: torch.Tensor) -> torch.Tensor:
    """(B, h, k, c) -> (B·k, h, c)."""
    return x.transpose(1, 2).reshape(-1, x.shape[1], x.shape[-1])


def unflatten_rows(x: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """(B·k, h, c) -> (B, h, k, c)."""
    return x.reshape(b, k, *x.shape[1:]).transpose(1, 2)


class LocalGlobalAttention(nn.Module):
    """Multi-head attention from k queries to a shared pooled grid plus each query's own 3×3 neighbourhood.

    The positional bias is one learned score offset per head and key position (grid cell or window offset), so
    the attention knows where a pooled token came from at the cost of (grid² + 9) numbers per head. A smaller
    input pools to a smaller grid; its cells take the mean bias of the cells they cover.

    The local keys and values are never projected: a score q·(W_k n + b_k) is (W_kᵀ q)·n + q·b_k and a weighted
    sum of values Σ w (W_v n + b_v) is W_v (Σ w n) + b_v Σ w, so the query moves into token space instead of
    9 tokens per query (or the whole map) moving into attention space: the same function for less work.
    """

    def __init__(self, token_dim: int, attn_dim: int, heads: int, kv_grid: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(token_dim, attn_dim)
        self.to_k = nn.Linear(token_dim, attn_dim)
        self.to_v = nn.Linear(token_dim, attn_dim)
        self.grid_bias = nn.Parameter(torch.zeros(heads, kv_grid, kv_grid))
        self.local_bias = nn.Parameter(torch.zeros(heads, NEIGHBOURHOOD))

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ..., D) -> (B, heads, ..., D/heads)."""
        return x.unflatten(-1, (self.heads, -1)).movedim(-2, 1)

    def per_head(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's weight as (heads, d, T) and its bias as (heads, d)."""
        return linear.weight.view(self.heads, -1, linear.in_features), linear.bias.view(self.heads, -1)

    def bias_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """(heads, 1, cells) score offsets for a pooled grid of `grid_size`."""
        bias = self.grid_bias
        if tuple(bias.shape[-2:]) != grid_size:
            bias = F.adaptive_avg_pool2d(bias, grid_size)
        return bias.flatten(1)[:, None]

    def forward(self, query: torch.Tensor, grid: torch.Tensor, grid_size: tuple[int, int],
                window: torch.Tensor) -> torch.Tensor:
        """query (B, k, T), grid (B, G, T) shared by all queries, each query's 3×3 window of the other stream
        (B, k, 9, T), all layer-normalised tokens -> (B, k, attn_dim)."""
        b, k, t = query.shape
        q = self.to_q(query).view(b * k, self.heads, -1)  # (B·k, h, d): one row per query
        q = q * q.shape[-1] ** -0.5  # scaled once here: k·d numbers instead of the k·G scores
        grid_scores = self.grid_scores(unflatten_rows(q, b, k), grid, grid_size)  # (B, h, k, G)
        # Local scores (W_kᵀ q)·n + q·b_k per query as a tiny matmul with the heads as the narrow side (faster
        # than a broadcast multiply and a sum over the token axis in both runtimes; no head is broadcast to a copy).
        (w_k, b_k), (w_v, b_v) = self.per_head(self.to_k), self.per_head(self.to_v)
        rows = window.reshape(b * k, NEIGHBOURHOOD, t)
        local_scores = (rows @ head_matmul(q, w_k).transpose(1, 2)).transpose(1, 2) \
            + (q * b_k).sum(-1, keepdim=True) + self.local_bias  # (B·k, h, 9)
        # One softmax over the G + 9 keys of each query. The values are the grid's followed by 9 zero rows, so the
        # weights multiply them whole (a slice of the (k, G + 9) weights would be a copy); the local values enter
        # as W_v (Σ w n) + b_v Σ w.
        weights = torch.cat([grid_scores, unflatten_rows(local_scores, b, k)], dim=-1).softmax(dim=-1)
        local_weights = per_query(weights[..., -NEIGHBOURHOOD:])  # (B·k, h, 9)
        local_out = head_matmul(local_weights @ rows, w_v.transpose(1, 2)) \
            + local_weights.sum(-1, keepdim=True) * b_v
        return (per_query(weights @ self.grid_values(grid)) + local_out).reshape(b, k, -1)

    def grid_scores(self, q: torch.Tensor, grid: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
        """Queries (B, h, k, d) against the shared (B, G, T) grid -> scores (B, h, k, G), positional bias included.

        The bias rides in the matmul as one more key dimension against a constant 1 in the query: a separate add
        would be one more pass over the (k, G) scores.
        """
        b, h, k, d = q.shape
        keys = self.split_heads(self.to_k(grid))  # (B, h, G, d)
        bias = self.bias_for(grid_size).transpose(1, 2).expand(b, h, grid.shape[1], 1)  # (B, h, G, 1)
        return torch.cat([q, q.new_ones(b, h, k, 1)], dim=-1) @ torch.cat([keys, bias], dim=-1).transpose(2, 3)

    def grid_values(self, grid: torch.Tensor) -> torch.Tensor:
        """(B, G, T) -> (B, h, G + 9, d): the grid's values and a zero row for each local key."""
        values = self.split_heads(self.to_v(grid))
        return F.pad(values, (0, 0, 0, NEIGHBOURHOOD))


class OrderFusion(nn.Module):
    """ORDER's update to one skip fusion on `channels`-wide decoder and skip streams of the same resolution.

    `forward(decoder, skip)` returns the update (zero except at the selected pixels, and zero everywhere at
    initialisation) and the region head's coarse logits; MKUNetOrder adds the update to MK-UNet's fusion.
    """

    def __init__(self, channels: int, config: OrderConfig, classes: int = 1) -> None:
        super().__init__()
        self.config = config
        t = config.token_dim
        self.region_head = nn.Conv2d(channels, classes, 1)
        self.project_decoder = nn.Conv2d(channels, t, 1)
        self.project_skip = nn.Conv2d(channels, t, 1)
        self.norm_decoder = nn.LayerNorm(t)
        self.norm_skip = nn.LayerNorm(t)
        self.decoder_to_skip = LocalGlobalAttention(t, config.attn_dim, config.heads, config.kv_grid)
        self.skip_to_decoder = LocalGlobalAttention(t, config.attn_dim, config.heads, config.kv_grid)
        self.to_out = nn.Linear(2 * config.attn_dim, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)
        # Filled by each forward so callers (tests, profiling) can see what share of pixels was attended.
        self.last_selected = 0
        self.last_positions = 0

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """Indices (B, k) of the k highest-scoring (most uncertain) pixels of each image; scores (B, N)."""
        k = selection_count(self.config.rho, scores.shape[1])
        self.last_selected, self.last_positions = k, scores.shape[1]
        return scores.detach().topk(k, dim=1, sorted=False).indices

    def stream(self, x: torch.Tensor, project: nn.Module, norm: nn.LayerNorm, index: torch.Tensor,
               grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One stream as layer-normalised tokens: its pooled (B, G, T) grid and the (B, k, 9, T) 3×3 windows
        around the selected pixels; a window's centre is the stream's own query token there, its other eight
        are the local keys and values of the other direction.

        The 1×1 projection runs on pixel tokens (as a linear layer on the channels-last input, whose channels
        are few) so the wide projected map never needs a layout change, and it commutes with average pooling, so
        the grid pools the narrow input instead. The map is zero-padded before the norm, so outside the map a
        window holds LayerNorm's image of a zero token (its bias).
        """
        weight, bias = project.weight.flatten(1), project.bias
        grid = norm(F.linear(to_tokens(F.adaptive_avg_pool2d(x, grid_size)), weight, bias))
        tokens = F.linear(x.permute(0, 2, 3, 1), weight, bias)  # (B, H, W, T)
        padded = norm(F.pad(tokens, (0, 0, 1, 1, 1, 1)))  # (B, H+2, W+2, T)
        return grid, window_tokens(padded, index)

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, height, width = decoder.shape
        region_logits = self.region_head(decoder.detach() if self.config.detach_heads else decoder)
        scores = uncertainty(region_logits).flatten(1)
        index = self.select(scores)
        grid_size = (min(self.config.kv_grid, height), min(self.config.kv_grid, width))
        dgrid, dwindow = self.stream(decoder, self.project_decoder, self.norm_decoder, index, grid_size)
        sgrid, swindow = self.stream(skip, self.project_skip, self.norm_skip, index, grid_size)
        centre = NEIGHBOURHOOD // 2
        attended = torch.cat([self.decoder_to_skip(dwindow[:, :, centre], sgrid, grid_size, swindow),
                              self.skip_to_decoder(swindow[:, :, centre], dgrid, grid_size, dwindow)], dim=-1)
        # Scaling by the uncertainty is what lets the selection train the region head through the main loss.
        update = self.to_out(attended) * scores.gather(1, index).unsqueeze(-1)
        flat = update.new_zeros(b, height * width, c).scatter(1, index.unsqueeze(-1).expand(-1, -1, c), update)
        return flat.view(b, height, width, c).permute(0, 3, 1, 2), region_logits


class MKUNetOrder(MKUNet):
    """MK-UNet whose last `config.late_stages` skip fusions get ORDER's update on top of the grouped gate.

    Every MK-UNet weight keeps its name, so an MK-UNet state dict loads into it (the ORDER weights stay as
    initialised) and the two compute the same output. `model(x, return_aux=True)` returns (logits, aux) with
    aux = MK-UNet's out1..out3 deep-supervision logits followed by the region heads' logits (coarsest first).
    """

    def __init__(
        self, variant: str = "t", num_classes: int = 1, in_channels: int = 3, config: OrderConfig | None = None
    ) -> None:
        super().__init__(variant, num_classes, in_channels)
        self.order_config = config or OrderConfig()
        self.first_order_fusion = SKIP_FUSIONS - self.order_config.late_stages
        c = MKUNET_CHANNELS[variant]
        skip_widths = (c[3], c[2], c[1], c[0])
        self.order_fusions = nn.ModuleList(
            OrderFusion(w, self.order_config, num_classes) for w in skip_widths[self.first_order_fusion :]
        )

    def fuse_skip(self, index: int, out: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fused, aux = super().fuse_skip(index, out, skip)
        if index < self.first_order_fusion:
            return fused, aux
        update, region_logits = self.order_fusions[index - self.first_order_fusion](out, skip)
        return fused + update, [*aux, region_logits]

    def selection_counts(self) -> list[tuple[int, int]]:
        """(selected, total) pixels per ORDER fusion in the last forward pass, coarsest first."""
        return [(f.last_selected, f.last_positions) for f in self.order_fusions]

    def selected_share(self) -> float:
        counts = self.selection_counts()
        return sum(s for s, _ in counts) / max(1, sum(t for _, t in counts))


def is_adapter_parameter(name: str) -> bool:
    """True for ORDER's own parameters (state-dict names under `order_fusions`), False for the MK-UNet trunk."""
    return name.startswith("order_fusions.") or ".order_fusions." in name


def order_parameter_count(model: MKUNetOrder) -> int:
    """Parameters that belong to the ORDER adapter itself (for reports)."""
    return sum(p.numel() for p in model.order_fusions.parameters())


def expected_selection(rho: float, size: int, late_stages: int) -> list[int]:
    """Selection counts a square `size` input gives, coarsest ORDER stage first (used by tests and docs)."""
    sides = [size // 2 ** (SKIP_FUSIONS - i) for i in range(SKIP_FUSIONS)][SKIP_FUSIONS - late_stages :]
    return [selection_count(rho, s * s) for s in sides]


__all__ = [
    "LocalGlobalAttention",
    "MKUNetOrder",
    "OrderConfig",
    "OrderFusion",
    "expected_selection",
    "is_adapter_parameter",
    "order_parameter_count",
    "selection_count",
    "uncertainty",
]
