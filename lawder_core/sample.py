"""Synthetic image/mask pairs from a trained `train-law` run (DESIGN §2, `lawder sample`).

Image i depends only on (seed, first_index + i): the initial noise is drawn per sample and DDIM (η = 0) and
DPM-Solver are deterministic, so splitting the masks across workers or batches gives the same images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from torch import Tensor

from lawder_core.data.h5 import H5Writer, refuse_overwrite
from lawder_core.errors import DataError, UsageError
from lawder_core.models.denoiser import Denoiser, load_denoiser
from lawder_core.train.diffusion_run import run_info
from lawder_core.viz import save_pair_grid

SCHEDULERS = ("ddim", "dpm")


def sampling_scheduler(denoiser: Denoiser, name: str) -> DDIMScheduler | DPMSolverMultistepScheduler:
    """A fresh sampler built from the training schedule (a multistep solver keeps state, so never reuse one)."""
    if name == "ddim":
        return DDIMScheduler.from_config(denoiser.scheduler.config)
    if name == "dpm":
        return DPMSolverMultistepScheduler.from_config(denoiser.scheduler.config)
    raise UsageError(f"unknown scheduler {name!r}; expected one of {SCHEDULERS}.")


def initial_noise(shape: tuple[int, int, int], seed: int, indices: Sequence[int]) -> Tensor:
    """One independent noise tensor per global sample index (CPU generator: identical on every device)."""
    out = []
    for i in indices:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, int(i)]).generate_state(1)[0]))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out)


@torch.no_grad()
def generate(denoiser: Denoiser, masks: Tensor, noise: Tensor, *, steps: int = 50, scheduler: str = "ddim",
             guidance: float = 1.0) -> Tensor:
    """Masks (B,H,W) int and initial noise (B,C,h,w) on the model's device → images (B,C,H,W) in [0, 1].

    guidance > 1 is classifier-free guidance against the null mask: ε = ε_∅ + g · (ε_mask − ε_∅).
    """
    if steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}.")
    sched = sampling_scheduler(denoiser, scheduler)
    sched.set_timesteps(steps, device=noise.device)
    x = noise * sched.init_noise_sigma
    cond = denoiser.condition(masks)
    null = torch.zeros_like(cond)
    for t in sched.timesteps:
        model_in = sched.scale_model_input(x, t)
        tt = t.expand(x.shape[0]).to(x.device)
        if guidance == 1.0:
            eps = denoiser(model_in, tt, cond)
        else:
            both = denoiser(torch.cat([model_in, model_in]), torch.cat([tt, tt]), torch.cat([cond, null]))
            eps_cond, eps_null = both.float().chunk(2)
            eps = eps_null + guidance * (eps_cond - eps_null)
        x = sched.step(eps.float(), t, x).prev_sample
    return denoiser.decode(x)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B,C,H,W) in [0, 1] → (B,H,W,C) uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_masks(masks: np.ndarray, size: int, num_labels: int) -> None:
    if masks.ndim != 3 or masks.shape[1:] != (size, size):
        raise UsageError(f"masks have shape {masks.shape}; this model generates {size}×{size} images.",
                         f"Resize the masks to {size}×{size} (nearest neighbour) or prepare the data at --size {size}.")
    if masks.size and int(masks.max()) >= num_labels:
        raise DataError(f"masks contain label {int(masks.max())}; the model knows {num_labels} labels.")


def pick_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample_pairs(
    run_folder: str | os.PathLike,
    masks: np.ndarray,
    *,
    steps: int = 50,
    scheduler: str = "ddim",
    guidance: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    device: str | torch.device | None = None,
    first_index: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """One synthetic image per mask with the run's EMA weights: masks (N,H,W) uint8 → images (N,H,W,C) uint8.

    C is the training data's channel count (3 for polyps, 1 for CT). `progress(k)` is called after each batch
    with the number of images it added; `first_index` offsets the per-sample seeds for sharded sampling.
    """
    if scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}.")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}.")
    info = run_info(run_folder)
    check_masks(masks, info.spec.size, len(info.spec.label_names))
    dev = pick_device(device)
    denoiser = load_denoiser(info.model_folder).to(dev).eval()
    shape = denoiser.loss_shape()
    out = np.zeros((len(masks), info.spec.size, info.spec.size, info.spec.image_channels), np.uint8)
    use_amp = dev.type == "cuda"
    for start in range(0, len(masks), batch_size):
        stop = min(start + batch_size, len(masks))
        batch = torch.from_numpy(masks[start:stop].astype(np.int64)).to(dev)
        noise = initial_noise(shape, seed, range(first_index + start, first_index + stop)).to(dev)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
            images = generate(denoiser, batch, noise, steps=steps, scheduler=scheduler, guidance=guidance)
        out[start:stop] = to_uint8(images)
        if progress is not None:
            progress(stop - start)
    return out


def write_synthetic_h5(
    out: str | os.PathLike,
    images: np.ndarray,
    masks: np.ndarray,
    case_ids: Sequence[str],
    provenance: dict[str, Any],
    force: bool = False,
    label_names: Sequence[str] = ("background", "lesion"),
) -> Path:
    """Synthetic pairs in the lawder HDF5 schema (all split 'train'), plus `<out>.png`, a grid of the first 16.

    Every provenance key (run, step, scheduler, seed, ...) becomes a file attribute.
    """
    out = Path(out)
    refuse_overwrite(out, force)
    if images.ndim == 3:
        images = images[..., None]
    if len(images) != len(masks) or len(images) != len(case_ids):
        raise DataError(f"{len(images)} images, {len(masks)} masks and {len(case_ids)} case ids do not match.")
    if len(images) == 0:
        raise DataError("no synthetic samples to write.", "Check --n and the mask file's split.")
    n, h, w, c = images.shape
    with H5Writer(out, height=h, width=w, channels=c, label_names=list(label_names), source="lawder sample",
                  preprocessing={"synthetic": True}, extra_attrs=dict(provenance), force=force) as writer:
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            writer.add_batch(images[start:stop].astype(np.uint8), masks[start:stop].astype(np.uint8),
                             [str(c) for c in case_ids[start:stop]], ["train"] * (stop - start))
    save_pair_grid(out.with_suffix(".png"), images, masks)
    return out
