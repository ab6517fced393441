"""Fast inference for segmenters: BatchNorm folding, channels_last, torch.compile.

Tiny U-Nets are memory-bound: in eager NCHW PyTorch the depthwise convs, BatchNorms and element-wise ops each
stream the whole activation through memory and leave most of the CPU idle. Folding every eval-mode BatchNorm
into the conv before it removes a pass per conv; channels_last lets oneDNN run the (depthwise) convs in its
fast NHWC kernels without layout conversions; torch.compile fuses the remaining element-wise chains.

Modes (see `optimize_for_inference`):
- `eager`: the model in eval mode, under inference mode — the reference.
- `channels_last`: eval + BN folding + channels_last weights and inputs.
- `compile`: `channels_last` + torch.compile; falls back to `channels_last` with a warning when compilation
  fails (no C compiler, unsupported op), at the first call.
- `auto`: `channels_last`. Measured on a 2-core CPU (benchmarks/bench_seg_speed.py) torch.compile is a
  little faster again, but it costs tens of seconds of compilation per input shape and needs a C compiler,
  which `predict`/`evaluate` on a handful of batches never earn back; ask for `compile` for long runs.
"""

from __future__ import annotations

import copy
import shutil
import warnings

import torch
from torch import nn

from lawder_core.models.configs import MODES

AUTO_MODE = "channels_last"


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A conv whose output equals bn(conv(x)) in eval mode."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    with torch.no_grad():
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return fused


def fold_sequential_batchnorms(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d inside an nn.Sequential, in place.

    That pattern covers every conv + BN of MK-UNet and ORDER (they are built that way on purpose) and
    needs no tracing, so data-dependent code (ORDER's top-k) is no obstacle. Returns how many were folded.
    """
    folded = 0
    for module in model.modules():
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = module._modules[first], module._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[first] = fold_conv_bn(conv, bn)
                module._modules[second] = nn.Identity()
                folded += 1
    return folded


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` with BatchNorms folded into convs; `model` itself is untouched."""
    model = copy.deepcopy(model).eval()
    inner = getattr(model, "net", None)
    if isinstance(inner, nn.Module):
        # smp networks keep conv/BN pairs as attributes (torchvision ResNets), which only tracing can see.
        try:
            from torch.fx.experimental.optimization import fuse

            model.net = fuse(inner)
        except Exception as err:  # noqa: BLE001 - tracing can fail in many ways; the Sequential pass still helps
            warnings.warn(f"BatchNorm folding by tracing failed ({err}); folding what is visible instead", stacklevel=2)
    fold_sequential_batchnorms(model)
    return model


class InferenceModel(nn.Module):
    """A segmenter prepared for inference: same call signature, runs under torch.inference_mode."""

    def __init__(self, model: nn.Module, channels_last: bool, mode: str) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        self.mode = mode
        self.compiled = None

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        with torch.inference_mode():
            x = self.prepare(x)
            if self.compiled is not None:
                try:
                    return self.compiled(x, return_aux=return_aux)
                except Exception as err:  # noqa: BLE001 - any compiler failure falls back to the same model
                    self.fall_back(err)
            return self.model(x, return_aux=return_aux)

    def fall_back(self, err: Exception) -> None:
        warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); using channels_last", stacklevel=3)
        self.compiled, self.mode = None, "channels_last"


def compiler_available() -> bool:
    """Inductor on the CPU writes and builds C++: without a compiler it can only fail."""
    return any(shutil.which(cc) for cc in ("cc", "gcc", "g++", "clang", "c++"))


def optimize_for_inference(model: nn.Module, mode: str = "auto", example: torch.Tensor | None = None) -> InferenceModel:
    """A copy of `model` prepared for fast inference (see the module docstring for the modes).

    `example` (a batch of the shape you will run) warms up `compile` mode at once, so compilation time
    and any compiler failure happen here rather than on the first real batch.
    """
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; known: {', '.join(MODES)}")
    if mode == "auto":
        mode = AUTO_MODE
    if mode == "eager":
        return InferenceModel(copy.deepcopy(model).eval(), channels_last=False, mode="eager")
    fast = fold_batchnorms(model).to(memory_format=torch.channels_last)
    wrapped = InferenceModel(fast, channels_last=True, mode="channels_last")
    if mode == "compile":
        if not compiler_available():
            warnings.warn("torch.compile needs a C compiler and none was found; using channels_last", stacklevel=2)
            return wrapped
        wrapped.compiled = torch.compile(fast, dynamic=False)
        wrapped.mode = "compile"
        if example is not None:
            wrapped(example)
    return wrapped
