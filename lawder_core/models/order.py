"""ORDER — Optimal Region Detection with Efficient Resolution — on MK-UNet (design brief §1.2, revision 2).

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


def window_tokens(tokens: torch.Tensor, index: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, W, C) token map and pixel indices (B, k) -> (B, k, 9, C): the 3×3 window around each selected pixel.

    Row-major window order, `fill` (C,) (default zero) outside the map (F.unfold's order and padding), but only
    for the k selected pixels: unfolding the whole map would move 9·H·W tokens to use ρ of them.
    """
    b, h, w, c = tokens.shape
    padded = pad_with(tokens, tokens.new_zeros(c) if fill is None else fill)
    row, col = index // w, index % w
    offsets = torch.arange(3, device=index.device)
    rows = (row[..., None] + offsets)[..., :, None]  # (B, k, 3, 1): padded rows y-1+1 .. y+1+1
    cols = (col[..., None] + offsets)[..., None, :]  # (B, k, 1, 3)
    flat = (rows * (w + 2) + cols).flatten(2)  # (B, k, 9)
    return gather_tokens(padded.view(b, -1, c), flat.flatten(1)).view(b, index.shape[1], NEIGHBOURHOOD, c)


def pad_with(tokens: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H+2, W+2, C) with a one-token border of `fill` (C,). Concatenation, not an in-place
    write into a filled tensor: that exports to ONNX as ScatterND between transposes of the whole map."""
    b, h, w, c = tokens.shape
    side = fill.expand(b, h, 1, c)
    rows = torch.cat([side, tokens, side], dim=2)
    edge = fill.expand(b, 1, w + 2, c)
    return torch.cat([edge, rows, edge], dim=1)


class LocalGlobalAttention(nn.Module):
    """Multi-head attention from k queries to a shared pooled grid plus each query's own 3×3 neighbourhood.

    The positional bias is one learned score offset per head and key position (grid cell or window offset), so
    the attention knows where a pooled token came from at the cost of (grid² + 9) numbers per head. A smaller
    input pools to a smaller grid; its cells take the mean bias of the cells they cover.
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

    def bias_for(self, grid_size: tuple[int, int]) -> torch.Tensor:
        """(heads, 1, cells) score offsets for a pooled grid of `grid_size`."""
        bias = self.grid_bias
        if tuple(bias.shape[-2:]) != grid_size:
            bias = F.adaptive_avg_pool2d(bias, grid_size)
        return bias.flatten(1)[:, None]

    def local_keys_values(self, tokens: torch.Tensor, index: torch.Tensor,
                          fill: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every query's 3×3 window, from the other stream's normalised (B, H, W, T) map.

        Projecting the whole map once and gathering the projected windows costs H·W projections instead of
        9·ρ·H·W (ρ = 0.25: 2.25 H·W) and equals projecting each window (the projection is per token); outside the
        map the window holds what the unprojected zero padding becomes, the projection of `fill`.
        """
        keys = window_tokens(self.to_k(tokens), index, self.to_k(fill))
        values = window_tokens(self.to_v(tokens), index, self.to_v(fill))
        return keys, values

    def forward(self, query: torch.Tensor, grid: torch.Tensor, grid_size: tuple[int, int],
                local: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """query (B, k, T), grid (B, G, T) shared by all queries, local keys and values (B, k, 9, A)
        -> (B, k, attn_dim)."""
        q = self.split_heads(self.to_q(query))  # (B, h, k, d)
        q = q * q.shape[-1] ** -0.5  # scaled once here: k·d numbers instead of the k·G scores
        k_grid, v_grid = self.split_heads(self.to_k(grid)), self.split_heads(self.to_v(grid))  # (B, h, G, d)
        k_local, v_local = (self.split_heads(t) for t in local)  # (B, h, k, 9, d)
        b, h, k, d = q.shape
        cells = grid.shape[1]
        # Grid scores plus positional bias in one baddbmm; the 9 local scores per query as a multiply-and-sum
        # (as a matmul they would be k tiny (9×d)·(d×1) products, run one by one on the CPU).
        bias = self.bias_for(grid_size).repeat(b, 1, 1)  # (B·h, 1, G)
        grid_scores = torch.baddbmm(bias, q.reshape(b * h, k, d), k_grid.reshape(b * h, cells, d).transpose(1, 2))
        local_scores = (k_local * q.unsqueeze(-2)).sum(-1) + self.local_bias[:, None]  # (B, h, k, 9)
        # One softmax over the G + 9 keys without concatenating them: shift by the shared maximum, exponentiate
        # in place, and divide the (k, d) output instead of the (k, G + 9) weights.
        grid_scores = grid_scores.view(b, h, k, cells)
        with torch.no_grad():  # the shift cancels out of the softmax: no gradient, and the scores stay free to edit
            top = torch.maximum(grid_scores.amax(-1, keepdim=True), local_scores.amax(-1, keepdim=True))
        grid_weights = grid_scores.sub_(top).exp_()
        local_weights = (local_scores - top).exp_()
        total = grid_weights.sum(-1, keepdim=True) + local_weights.sum(-1, keepdim=True)
        out = grid_weights @ v_grid + (local_weights.unsqueeze(-1) * v_local).sum(-2)
        return (out / total).movedim(1, 2).flatten(2)


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
               grid_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One stream as tokens: its queries at `index`, its pooled grid, its whole normalised (B, H, W, T) map
        (the other direction's local keys and values come from it) and what the map's zero padding normalises to.

        The projection is linear, so pooling the projected map equals projecting the pooled one; the norm comes
        after both.
        """
        projected = project(x)
        b, t, h, w = projected.shape
        normed = norm(to_tokens(projected))  # (B, H·W, T)
        grid = norm(to_tokens(F.adaptive_avg_pool2d(projected, grid_size)))
        fill = norm.bias if norm.bias is not None else projected.new_zeros(t)  # LayerNorm of a zero token
        return gather_tokens(normed, index), grid, normed.view(b, h, w, t), fill

    def forward(self, decoder: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, height, width = decoder.shape
        region_logits = self.region_head(decoder)
        scores = uncertainty(region_logits).flatten(1)
        index = self.select(scores)
        grid_size = (min(self.config.kv_grid, height), min(self.config.kv_grid, width))
        dq, dgrid, dmap, dfill = self.stream(decoder, self.project_decoder, self.norm_decoder, index, grid_size)
        sq, sgrid, smap, sfill = self.stream(skip, self.project_skip, self.norm_skip, index, grid_size)
        to_skip, to_decoder = self.decoder_to_skip, self.skip_to_decoder
        attended = torch.cat([to_skip(dq, sgrid, grid_size, to_skip.local_keys_values(smap, index, sfill)),
                              to_decoder(sq, dgrid, grid_size, to_decoder.local_keys_values(dmap, index, dfill))],
                             dim=-1)
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
    "order_parameter_count",
    "selection_count",
    "uncertainty",
]
