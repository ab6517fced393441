"""Exponential moving average of a module's weights: the weights `lawder sample` uses."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of `module` tracking its weights.

    The effective decay is min(decay, (1 + n) / (10 + n)) after n updates, as in diffusers' EMAModel, so a short
    CPU run's average is not dominated by the random initialisation. The shadow is a whole module copy, so it
    can be saved with the module's own `save_pretrained`.
    """

    def __init__(self, module: nn.Module, decay: float = 0.999) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """One step towards `module`'s weights; its buffers are copied.

        Multi-tensor (`torch._foreach_*`) kernels: a denoiser has hundreds of tensors, and one launch per tensor
        and operation would cost a GPU step more than the arithmetic does."""
        self.num_updates += 1
        weight = 1 - self.current_decay()
        shadows, lives = list(self.shadow.parameters()), [p.detach() for p in module.parameters()]
        if len(shadows) != len(lives):
            raise ValueError(f"EMA of {len(shadows)} parameters updated from a module with {len(lives)}")
        lives = [live.to(shadow.dtype) for shadow, live in zip(shadows, lives, strict=True)]
        if shadows:
            torch._foreach_lerp_(shadows, lives, weight)
        buffers, live_buffers = list(self.shadow.buffers()), list(module.buffers())
        if len(buffers) != len(live_buffers):
            raise ValueError(f"EMA of {len(buffers)} buffers updated from a module with {len(live_buffers)}")
        if buffers:
            torch._foreach_copy_(buffers, live_buffers)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow.to(device)
        return self
