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
        self.num_updates += 1
        weight = 1 - self.current_decay()
        for shadow, live in zip(self.shadow.parameters(), module.parameters(), strict=True):
            shadow.lerp_(live.detach().to(shadow.dtype), weight)
        for shadow, live in zip(self.shadow.buffers(), module.buffers(), strict=True):
            shadow.copy_(live)

    def to(self, device: torch.device | str) -> EMA:
        self.shadow.to(device)
        return self
