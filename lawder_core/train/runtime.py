"""What a per-worker training function needs to know about where it runs, without importing Ray.

The same plain-PyTorch loop runs in three places: called directly (tests, one process), inside a Ray
Train worker (DDP over gloo or NCCL, set up by Ray before the loop starts), or inside a Ray Tune trial.
The loop asks this module for its rank and device, wraps its model with `wrap_model`, and reports metrics
through the `Reporter` it was given; it never touches Ray itself.

The device is the launcher's decision, not the worker's: the launcher sets LAWDER_DEVICE (`cpu` or `cuda`) in
every process it trains in (`on_device`), so `--gpus 0` stays on the CPU even where a GPU is visible (Ray leaves
CUDA_VISIBLE_DEVICES alone for workers that asked for no GPU). Unset, as when a loop is called directly, the
first visible GPU is used when there is one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, RandomSampler, Sampler

from lawder_core.errors import EnvironmentProblem, TrainingError, UsageError

Reporter = Callable[[dict[str, Any]], None]

DEVICE_ENV = "LAWDER_DEVICE"
DEVICE_KINDS = ("auto", "cpu", "cuda")


def no_report(metrics: dict[str, Any]) -> None:
    """Default reporter: metrics already go to the run folder's metrics.jsonl."""


@dataclass(frozen=True)
class WorkerContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def worker_context() -> WorkerContext:
    """Rank, world size and device of this process (rank 0 of 1 when not distributed).

    The device kind comes from LAWDER_DEVICE (see the module docstring); a CUDA worker takes the GPU of its
    local rank among the visible ones, and gets cuDNN's autotuner and TF32 matmuls.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if device_kind() == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        enable_cuda_speedups()
    else:
        device = torch.device("cpu")
    return WorkerContext(rank=rank, world_size=world, device=device)


def device_kind() -> str:
    """'cpu' or 'cuda': what the launcher told this process (LAWDER_DEVICE), else CUDA when PyTorch sees one."""
    kind = os.environ.get(DEVICE_ENV, "auto").strip().lower() or "auto"
    if kind not in DEVICE_KINDS:
        raise UsageError(f"{DEVICE_ENV}={kind!r}: expected one of {', '.join(DEVICE_KINDS)}.")
    if kind == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem("this worker was given a GPU, but PyTorch sees none here.",
                                 "Check `lawder env` on that machine (a CUDA build of PyTorch, a visible GPU), "
                                 "or train on the CPU with --gpus 0.")
    return kind


@contextmanager
def on_device(kind: str) -> Iterator[None]:
    """Train in this process on `kind` ('cpu' or 'cuda'): what `worker_context` will pick until the block ends."""
    if kind not in DEVICE_KINDS:
        raise UsageError(f"unknown device {kind!r}; expected one of {', '.join(DEVICE_KINDS)}.")
    before = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = kind
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = before


def enable_cuda_speedups() -> None:
    """cuDNN picks the fastest convolution for each input shape (training shapes repeat), and float32 matmuls and
    convolutions use TF32 tensor cores: ~10 bits of mantissa in the products, far below what training notices."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def optimizer_options(device: torch.device) -> dict[str, Any]:
    """Keyword arguments for AdamW on `device`: the fused CUDA kernel (one launch per step instead of several per
    parameter) on a GPU, PyTorch's default elsewhere."""
    return {"fused": True} if device.type == "cuda" else {}


def wrap_model(model: nn.Module, ctx: WorkerContext) -> nn.Module:
    """Move to the worker's device and wrap in DDP when more than one worker trains."""
    model = model.to(ctx.device)
    if ctx.distributed:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model


def unwrap_model(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def train_sampler(dataset: Dataset, ctx: WorkerContext, seed: int) -> Sampler:
    """Each worker sees its own shard; call `set_epoch` on it every epoch."""
    if ctx.distributed:
        return DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed)
    return RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))


def set_sampler_epoch(sampler: Sampler, epoch: int, seed: int) -> None:
    """A fresh, reproducible order per (seed, epoch): a resumed run sees the same order it would have."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed * 1_000_003 + epoch * 7919 + 1)


def mean_across_workers(value: float, ctx: WorkerContext) -> float:
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return float(t.item()) / ctx.world_size


def barrier(ctx: WorkerContext) -> None:
    if ctx.distributed:
        dist.barrier()


def check_finite(loss: torch.Tensor, step: int) -> None:
    """Stop a diverged run with a message instead of training on NaNs."""
    if not math.isfinite(float(loss.detach())):
        raise TrainingError(
            f"the loss became {float(loss.detach())} at step {step}.",
            "Lower --lr, check the data with `lawder inspect`, or resume from the last good checkpoint.",
        )
