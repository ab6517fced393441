"""Model cost: parameters, FLOPs / multiply-accumulates, and measured CPU/GPU throughput.

Counting convention: `count_flops` counts the FLOPs of convolutions, matrix multiplies and scaled-dot-product
attention (a multiply-accumulate is 2 FLOPs) with `torch.utils.flop_counter.FlopCounterMode`; `macs` is
`flops / 2`, the unit MK-UNet's paper reports. Element-wise ops, normalisation, pooling and interpolation are
not counted, which is why MK-UNet-T comes out at 0.050 G MACs here against the published 0.062 G (the paper's
counter also counts those). FlopCounterMode misses the CPU flash-attention kernel; a formula for it is registered
here, so ORDER's attention is counted exactly.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args: Any, out_shape=None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_formulas() -> dict[Any, Any]:
    """Formulas FlopCounterMode lacks: scaled-dot-product attention on the CPU."""
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops}


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def count_flops(model: nn.Module, size: int | tuple[int, int] = 256, in_channels: int = 3) -> dict[str, float]:
    """FLOPs and MACs of one forward pass on one image of `size` (eval mode, no gradients)."""
    height, width = (size, size) if isinstance(size, int) else size
    x = torch.randn(1, in_channels, height, width, device=model_device(model))
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False, custom_mapping=flop_formulas()) as counter, torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
    flops = float(counter.get_total_flops())
    return {"flops": flops, "macs": flops / 2}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    model: nn.Module,
    size: int = 256,
    batch: int = 16,
    repeats: int = 5,
    in_channels: int = 3,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Throughput of `model` (any callable taking a batch) on random input; the best of `repeats` timings.

    The minimum, not the mean, because on a shared machine other processes only ever add time.
    """
    if device is None:
        device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    device = torch.device(device)
    x = torch.randn(batch, in_channels, size, size, device=device)
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        _synchronize(device)
        timings = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            model(x)
            _synchronize(device)
            timings.append(time.perf_counter() - start)
    best = min(timings)
    return {
        "img_per_s": batch / best,
        "ms_per_batch": best * 1000,
        "ms_per_batch_median": sorted(timings)[len(timings) // 2] * 1000,
    }
