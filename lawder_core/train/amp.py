"""Mixed precision on a GPU: which half-precision type the hardware runs natively, and the grad scaler it needs.

bfloat16 has float32's exponent range, so its gradients need no scaling; it is native on NVIDIA compute capability
8.0 and later (A100, H100, RTX 30xx+). Older GPUs (V100, T4) only emulate it, several times slower than float16,
and `torch.cuda.is_bf16_supported()` says yes to them unless asked about native support. There float16 is used,
with a `GradScaler` so that small gradients do not underflow. On the CPU autocast stays off: float32 throughout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lawder_core.train.configs import check_amp_dtype


@dataclass(frozen=True)
class Precision:
    """What a loop autocasts to: `enabled` False means float32 (the CPU, or amp switched off)."""

    enabled: bool
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32") if self.enabled else "fp32"

    @property
    def needs_scaler(self) -> bool:
        return self.enabled and self.dtype == torch.float16

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that scales float16 losses and passes everything else through unchanged."""
        return torch.amp.GradScaler("cuda", enabled=self.needs_scaler)


FP32 = Precision(False, torch.float32)


def native_bf16() -> bool:
    """Whether the current GPU runs bfloat16 in hardware (emulation does not count)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def precision(device: torch.device, amp: bool = True, wanted: str = "auto") -> Precision:
    """The autocast type on `device`: `wanted` 'auto' is bf16 where native, else fp16; 'bf16'/'fp16' force one."""
    check_amp_dtype(wanted)
    if not amp or device.type != "cuda":
        return FP32
    if wanted == "auto":
        wanted = "bf16" if native_bf16() else "fp16"
    return Precision(True, torch.bfloat16 if wanted == "bf16" else torch.float16)
