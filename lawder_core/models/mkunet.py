"""MK-UNet (Rahman & Marculescu, 2025): a tiny multi-kernel U-Net, written from the published architecture.

Read top to bottom: the building blocks (MKIR, channel/spatial attention, grouped attention gate), then the
encoder, the decoder and the heads. With one output class the five published variants have exactly the published
parameter counts (T 27,384; S 93,050; base 315,566; M 1,150,166; L 3,758,118); `tests/test_mkunet.py` checks it.
The sixth, `t-wide` (42,554), is lawder's own: MK-UNet-T widened to ORDER's size, as ORDER's control.

Every conv that is followed by a BatchNorm lives next to it in an `nn.Sequential`, so the fast inference path
(`lawder_core.models.fast`) can fold the BatchNorm into the conv without tracing the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lawder_core.models.configs import MKUNET_CHANNELS

DEPTHWISE_KERNELS = (1, 3, 5)
CHANNEL_ATTENTION_RATIOS = (16, 16, 16, 8, 4)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channel groups so the next 1×1 conv mixes what the depthwise branches produced."""
    if groups == 1:
        return x
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def conv_bn(cin: int, cout: int, kernel: int = 1, groups: int = 1, bias: bool = False) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)
    )


class MKIR(nn.Module):
    """Multi-kernel inverted residual: expand ×2, depthwise 1/3/5 summed, shuffle, project, residual."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        hidden = 2 * cin
        self.expand = nn.Sequential(*conv_bn(cin, hidden), nn.ReLU6(inplace=True))
        self.depthwise = nn.ModuleList(
            nn.Sequential(*conv_bn(hidden, hidden, k, groups=hidden), nn.ReLU6(inplace=True))
            for k in DEPTHWISE_KERNELS
        )
        self.shuffle_groups = math.gcd(hidden, cout)
        self.project = conv_bn(hidden, cout)
        self.shortcut: nn.Module = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.expand(x)
        h = sum(branch(h) for branch in self.depthwise)
        h = self.project(channel_shuffle(h, self.shuffle_groups))
        return h + self.shortcut(x)


class ChannelAttention(nn.Module):
    """Shared bottleneck MLP over the avg- and max-pooled channel vectors; returns the sigmoid weights."""

    def __init__(self, channels: int, ratio: int) -> None:
        super().__init__()
        ratio = min(ratio, channels)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, channels // ratio, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // ratio, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(F.adaptive_avg_pool2d(x, 1))
        peak = self.mlp(F.adaptive_max_pool2d(x, 1))
        return torch.sigmoid(avg + peak)


class SpatialAttention(nn.Module):
    """Channel-mean and channel-max maps through one 7×7 conv; one instance serves every decoder stage."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(stats))


class GroupedAttentionGate(nn.Module):
    """Gate the encoder skip `x` with the decoder stream `g`: grouped 3×3 convs, sum, ReLU, 1×1 to one map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.gate_conv = conv_bn(channels, half, 3, groups=half, bias=True)
        self.skip_conv = conv_bn(channels, half, 3, groups=half, bias=True)
        self.psi = conv_bn(half, 1, 1, bias=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        attention = F.relu(self.gate_conv(g) + self.skip_conv(x))
        return x * torch.sigmoid(self.psi(attention))


class MKUNetEncoder(nn.Module):
    """Five MKIR stages, each followed by 2×2 max-pooling; returns the four skips and the H/32 bottleneck."""

    def __init__(self, channels: tuple[int, ...], in_channels: int = 3) -> None:
        super().__init__()
        widths = (in_channels, *channels)
        self.stages = nn.ModuleList(MKIR(widths[i], widths[i + 1]) for i in range(5))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = F.max_pool2d(stage(x), 2)
            skips.append(x)
        return skips[:4], skips[4]


class DecoderStage(nn.Module):
    """Channel attention, shared spatial attention, MKIR, bilinear ×2, ReLU."""

    def __init__(self, cin: int, cout: int, ratio: int) -> None:
        super().__init__()
        self.channel_attention = ChannelAttention(cin, ratio)
        self.block = MKIR(cin, cout)

    def forward(self, x: torch.Tensor, spatial_attention: SpatialAttention) -> torch.Tensor:
        x = x * self.channel_attention(x)
        x = x * spatial_attention(x)
        x = F.interpolate(self.block(x), scale_factor=2, mode="bilinear", align_corners=False)
        return F.relu(x)


class MKUNet(nn.Module):
    """MK-UNet. `forward(x)` gives full-resolution logits; `return_aux=True` adds the out1..out3 head logits."""

    deep_supervision_heads = 3  # out1..out3 come first in the auxiliary outputs (ORDER appends its region heads)

    def __init__(self, variant: str = "t", num_classes: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        if variant not in MKUNET_CHANNELS:
            raise ValueError(f"unknown MK-UNet variant {variant!r}; known: {sorted(MKUNET_CHANNELS)}")
        self.variant, self.num_classes, self.in_channels = variant, num_classes, in_channels
        c = MKUNET_CHANNELS[variant]
        # The published network reads RGB; grey images are repeated rather than given their own stem.
        stem_channels = 3 if in_channels in (1, 3) else in_channels
        self.encoder = MKUNetEncoder(c, stem_channels)
        decoder_widths = (c[4], c[3], c[2], c[1], c[0], c[0])
        self.decoder = nn.ModuleList(
            DecoderStage(decoder_widths[k], decoder_widths[k + 1], CHANNEL_ATTENTION_RATIOS[k]) for k in range(5)
        )
        self.spatial_attention = SpatialAttention()
        self.gates = nn.ModuleList(GroupedAttentionGate(w) for w in (c[3], c[2], c[1], c[0]))
        self.out1 = nn.Conv2d(c[2], num_classes, 1)
        self.out2 = nn.Conv2d(c[1], num_classes, 1)
        self.out3 = nn.Conv2d(c[0], num_classes, 1)
        self.out4 = nn.Conv2d(c[0], num_classes, 1)

    def fuse_skip(self, index: int, out: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Skip fusion after decoder stage `index + 1` (`skip` is t4, t3, t2, t1 for index 0..3): gate, then add.

        Returns the fused stream and any auxiliary logits the fusion produced; ORDER overrides this for the
        late stages, where its region head adds a coarse lesion logit.
        """
        return out + self.gates[index](out, skip), []

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.in_channels in (1, 3):
            x = x.repeat(1, 3, 1, 1)
        return x

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        skips, out = self.encoder(self.prepare_input(x))
        skips = skips[::-1]  # t4, t3, t2, t1: the order the decoder meets them
        heads = {1: self.out1, 2: self.out2, 3: self.out3}
        deep_supervision: list[torch.Tensor] = []
        fusion_aux: list[torch.Tensor] = []
        for k, stage in enumerate(self.decoder):
            out = stage(out, self.spatial_attention)
            if k < 4:
                out, extra = self.fuse_skip(k, out, skips[k])
                fusion_aux.extend(extra)
            if return_aux and k in heads:
                deep_supervision.append(heads[k](out))
        logits = self.out4(out)
        if return_aux:
            return logits, deep_supervision + fusion_aux
        return logits
