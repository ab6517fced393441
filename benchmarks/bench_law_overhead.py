"""What LAW costs: training step time with `law` vs `uniform` (same model, batch and data), and sampling speed.

Both trainers start from the same weights and see the same batch; their steps are interleaved so that load from
other processes hits both equally, and the medians are compared. Goal (issue 4): law / uniform ≤ 1.10.
Sampling uses the EMA-free live model; LAW costs nothing there, so one number per step count is enough.

    .venv/bin/python benchmarks/bench_law_overhead.py --preset small --size 64 --batch-size 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lawder_core.models.denoiser import DenoiserSpec
from lawder_core.models.law import LAWConfig
from lawder_core.models.recipe import initial_noise
from lawder_core.sample import generate
from lawder_core.train.diffusion import DiffusionTrainConfig, Trainer, build_trainer, training_step
from lawder_core.train.runtime import worker_context


def blob_batch(batch: int, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images with one disk-shaped lesion each (5–15 % of the frame)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    masks = np.zeros((batch, size, size), np.int64)
    for i in range(batch):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        r = np.sqrt(rng.uniform(0.05, 0.15) * size * size / np.pi)
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    images = torch.from_numpy(rng.random((batch, 3, size, size), dtype=np.float32))
    return images, torch.from_numpy(masks)


def make_trainer(weighting: str, args: argparse.Namespace) -> Trainer:
    cfg = DiffusionTrainConfig(size=args.size, steps=10**6, batch_size=args.batch_size, preset=args.preset,
                               weighting=weighting, law=LAWConfig(warmup_frac=0.0))
    # the pixel recipe new runs train with (v target, cosine schedule); the step's cost does not depend on it
    spec = DenoiserSpec(preset=args.preset, size=args.size, prediction="v", beta_schedule="squaredcos_cap_v2",
                        timestep_spacing="trailing")
    trainer, _ = build_trainer(cfg, worker_context(), spec, checkpoint=None)
    trainer.model.train()
    return trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_training(args: argparse.Namespace) -> dict[str, float]:
    trainers = {w: make_trainer(w, args) for w in ("uniform", "law")}
    device = trainers["law"].ctx.device
    images, masks = blob_batch(args.batch_size, args.size)
    times: dict[str, list[float]] = {w: [] for w in trainers}
    for step in range(args.warmup + args.steps):
        for weighting, trainer in trainers.items():
            sync(device)
            tic = time.perf_counter()
            training_step(trainer, images, masks, step)
            sync(device)
            if step >= args.warmup:
                times[weighting].append(time.perf_counter() - tic)
    uniform, law = statistics.median(times["uniform"]), statistics.median(times["law"])
    law_net = trainers["law"].law
    return {"uniform_s_per_step": uniform, "law_s_per_step": law, "ratio": law / uniform,
            "law_parameters": sum(p.numel() for p in law_net.parameters()) if law_net is not None else 0,
            "denoiser_parameters": sum(p.numel() for p in trainers["law"].denoiser.parameters())}


def time_sampling(args: argparse.Namespace) -> dict[str, float]:
    trainer = make_trainer("uniform", args)
    denoiser, device = trainer.denoiser.eval(), trainer.ctx.device
    _, masks = blob_batch(args.sample_batch, args.size, seed=1)
    masks = masks.to(device)
    out = {}
    for steps in (25, 50):
        noise = initial_noise(denoiser.loss_shape(), 0, range(len(masks))).to(device)
        generate(denoiser, masks[:1], noise[:1], steps=2)  # warm-up (kernels, allocator)
        sync(device)
        tic = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            generate(denoiser, masks, noise, steps=steps, scheduler="ddim")
        sync(device)
        out[f"ddim{steps}_images_per_s"] = len(masks) / (time.perf_counter() - tic)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=("tiny", "small", "base"))
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per weighting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--sample-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (0: torch's default); 1 keeps timings stable on a shared machine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_law_overhead.json"),
                        help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = worker_context()
    result = {
        "device": torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else platform.processor()
        or "cpu",
        "torch_threads": torch.get_num_threads(),
        "load_before": os.getloadavg(), "preset": args.preset, "size": args.size, "batch_size": args.batch_size,
        "timed_steps": args.steps,
        **time_training(args), **time_sampling(args),
    }
    result["goal_met"] = result["ratio"] <= 1.10
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    sys.exit(0)


if __name__ == "__main__":
    main()
