"""`lawder sample`: synthetic image/mask pairs from a trained `train-law` run.

Masks come from an HDF5 split, are resized (nearest) to the run's size, planned (one per mask, or cycled with
flips/rotations under `mask_aug`), sampled, and written in the lawder HDF5 schema with the run, step,
scheduler, seed, ... as file attributes, plus a PNG grid. Image i depends only on (seed, first_index + i): the
initial noise is drawn per sample and the samplers are deterministic, so splitting the masks across workers or
batches (`distributed/sample.py`) gives the same images.

With `mask_aug`, mask j's k-th use gets the k-th of the 8 dihedral transforms (flips and 90° rotations) in a
seeded order of its own, so up to 8 uses of one mask are 8 different layouts and N may exceed the mask count.
Case ids record the origin: `syn_<case>`, or `syn_<case>_r<use>_t<transform>` with augmentation.

The pairs keep every label of the masks they were conditioned on (KiTS: 0–3, with the source's `label_names`),
so synthetic KiTS pairs train multi-class segmenters; the denoiser sees each label as its own one-hot channel.
The file also records which labels are the lesion (`lesion_labels`, `lesion_names`: the run's LAW lesion set, or
`--lesion-labels`), which is what mask adherence judges.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lawder_core import limits, numbers, runs
from lawder_core.data.h5 import SAMPLED, H5Writer, load_arrays, read_info, refuse_overwrite, split_indices
from lawder_core.data.labels import default_lesion_labels, lesion_labels, lesion_names
from lawder_core.environment import DEFAULT_WAIT_S, package_version, pick_device
from lawder_core.errors import DataError, UsageError
from lawder_core.files import atomic_save
from lawder_core.locks import hold_output_lock, release_output_lock
from lawder_core.models.configs import SAMPLERS, SPEC_FILE, check_sampler, check_steps, default_sampler
from lawder_core.viz import save_pair_grid

# torch and diffusers are imported where they are used: a bad `lawder sample` request is refused before they load
if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from lawder_core.models.denoiser import Denoiser, DenoiserSpec

Generator = Callable[["SampleConfig", np.ndarray, "Callable[[int], None] | None"], np.ndarray]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the trained run


@dataclass(frozen=True)
class RunInfo:
    """What sampling needs to know about a trained `train-law` run."""

    model_folder: Path  # the EMA denoiser, loadable with load_denoiser
    step: int
    spec: DenoiserSpec
    lesion_labels: tuple[int, ...] | None = None  # LAW's lesion set; None: not recorded (older run, bare model)


def run_info(run: str | os.PathLike) -> RunInfo:
    """Accepts a run folder, its checkpoint folder, or a saved denoiser folder."""
    run = Path(run)
    if (run / SPEC_FILE).exists():
        checkpoint, model = run.parent, run
    else:
        checkpoint = runs.find_checkpoint(run) or run
        model = checkpoint / runs.DENOISER_EMA
    if not (model / SPEC_FILE).exists():
        raise DataError(f"{run} holds no trained diffusion model (looked for {model}).",
                        "Train one with `lawder train-law --out RUN`, then pass --run RUN.")
    from lawder_core.models.denoiser import read_spec

    progress = read_run_progress(checkpoint)
    recorded = progress.get("lesion_labels")
    return RunInfo(model_folder=model, step=progress.get("step", -1), spec=read_spec(model),
                   lesion_labels=tuple(recorded) if recorded is not None else None)


def read_run_progress(checkpoint: Path) -> dict[str, Any]:
    """The checkpoint's progress record ({} when absent); sampling reads `step` and `lesion_labels` from it, so
    those two are checked too."""
    path = checkpoint / runs.PROGRESS
    if not path.exists():
        return {}
    hint = "Train the run again (`lawder train-law --out RUN --force`), or restore it from a copy."
    progress = runs.read_progress(checkpoint, hint)
    problem = _progress_problem(progress)
    if problem:
        raise DataError(f"{path} is damaged: {problem}.", hint)
    return progress


def _progress_problem(progress: Any) -> str | None:
    if not isinstance(progress, dict):
        return "expected a JSON object"
    step, labels = progress.get("step", -1), progress.get("lesion_labels")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"'step' is {step!r}, not an integer"
    if labels is not None and not (isinstance(labels, list) and all(type(k) is int for k in labels)):
        return f"'lesion_labels' is {labels!r}, not a list of integers"
    return None


# ---------------------------------------------------------------- generation


def generate(denoiser: Denoiser, masks: Tensor, noise: Tensor, *, steps: int = 50, scheduler: str | None = None,
             guidance: float = 1.0) -> Tensor:
    """Masks (B,H,W) int and initial noise (B,C,h,w) on the model's device → images (B,C,H,W) in [0, 1].

    The run's own recipe decides the target and the sampler family (`models/recipe.py`); `scheduler` None is its
    default (DDIM, or Euler for flow). guidance > 1 is classifier-free guidance against the null mask.
    """
    from lawder_core.models import recipe

    x0 = recipe.denoise(denoiser, denoiser.condition(masks), denoiser.null_condition(masks), noise,
                         scheduler_config=denoiser.scheduler.config, prediction=denoiser.spec.prediction,
                         steps=steps, sampler=scheduler, guidance=guidance)
    return denoiser.decode(x0)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B,C,H,W) in [0, 1] → (B,H,W,C) uint8."""
    import torch

    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def check_masks(masks: np.ndarray, size: int, num_labels: int) -> None:
    if masks.ndim != 3 or masks.shape[1:] != (size, size):
        raise UsageError(f"masks have shape {masks.shape}; this model generates {size}×{size} images.",
                         f"Resize the masks to {size}×{size} (nearest neighbour) or prepare the data at --size {size}.")
    if masks.size and int(masks.max()) >= num_labels:
        raise DataError(f"masks contain label {int(masks.max())}; the model knows {num_labels} labels.")


def sample_pairs(
    run_folder: str | os.PathLike,
    masks: np.ndarray,
    *,
    steps: int = 50,
    scheduler: str | None = None,
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
    if scheduler is not None and scheduler not in SAMPLERS:
        raise UsageError(f"unknown --scheduler {scheduler!r}; expected one of {SAMPLERS}.")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}.")
    info = run_info(run_folder)
    check_masks(masks, info.spec.size, len(info.spec.label_names))
    if scheduler is not None:
        check_sampler(info.spec.prediction, scheduler)  # before loading the model
    return sample_loaded(load_sampler(info, device), masks, steps=steps, scheduler=scheduler, guidance=guidance,
                         batch_size=batch_size, seed=seed, first_index=first_index, progress=progress)


@dataclass(frozen=True)
class LoadedSampler:
    """A run's EMA denoiser on its device, ready for any number of `sample_loaded` calls."""

    info: RunInfo
    denoiser: Denoiser
    device: torch.device


MODEL_LOADS = [0]  # denoisers this process has loaded (a sampling worker should load one, once)


def load_sampler(run: str | os.PathLike | RunInfo, device: str | torch.device | None = None) -> LoadedSampler:
    """Load the run's EMA denoiser once onto `device` (None or 'auto': the first GPU when there is one)."""
    from lawder_core.models.denoiser import load_denoiser

    info = run if isinstance(run, RunInfo) else run_info(run)
    dev = pick_device(device)
    denoiser = load_denoiser(info.model_folder).to(dev).eval()
    MODEL_LOADS[0] += 1
    return LoadedSampler(info, denoiser, dev)


def sample_loaded(loaded: LoadedSampler, masks: np.ndarray, *, steps: int = 50, scheduler: str | None = None,
                  guidance: float = 1.0, batch_size: int = 16, seed: int = 0, first_index: int = 0,
                  progress: Callable[[int], None] | None = None) -> np.ndarray:
    """`sample_pairs` with a model already loaded. On a GPU the sampler runs under autocast: bf16 where the GPU
    runs it natively, else fp16 (`train/amp.py`)."""
    import torch

    from lawder_core.models.recipe import initial_noise
    from lawder_core.train.amp import precision

    info, denoiser, dev = loaded.info, loaded.denoiser, loaded.device
    check_masks(masks, info.spec.size, len(info.spec.label_names))
    shape = denoiser.loss_shape()
    out = np.zeros((len(masks), info.spec.size, info.spec.size, info.spec.image_channels), np.uint8)
    amp = precision(dev)
    for start in range(0, len(masks), batch_size):
        stop = min(start + batch_size, len(masks))
        batch = torch.from_numpy(masks[start:stop].astype(np.int64)).to(dev)
        noise = initial_noise(shape, seed, range(first_index + start, first_index + stop)).to(dev)
        with torch.autocast(device_type=dev.type, dtype=amp.dtype, enabled=amp.enabled):
            images = generate(denoiser, batch, noise, steps=steps, scheduler=scheduler, guidance=guidance)
        if not bool(torch.isfinite(images).all()):  # uint8 would turn NaN into black images that look valid
            raise DataError(f"the diffusion model in {info.model_folder} generated NaN or infinite values (images "
                            f"{first_index + start}–{first_index + stop - 1}): its weights are damaged, or its "
                            "training diverged; nothing was written.",
                            "Use another run (or an earlier copy of this one), or train it again.")
        out[start:stop] = to_uint8(images)
        if progress is not None:
            progress(stop - start)
    return out


# ---------------------------------------------------------------- masks


DIHEDRAL = 8  # 4 rotations × {plain, flipped}


def dihedral(mask: np.ndarray, k: int) -> np.ndarray:
    """Transform k in 0..7 of a square mask: k % 4 quarter turns, then a left-right flip when k >= 4."""
    out = np.rot90(mask, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k >= 4 else out)


@dataclass(frozen=True)
class MaskPlan:
    """Which mask (and transform) each synthetic sample is conditioned on."""

    masks: np.ndarray  # (N,size,size) uint8, transforms applied
    source_index: np.ndarray  # (N,) index into the loaded masks
    transform: np.ndarray  # (N,) dihedral transform id; 0 = as stored
    case_ids: list[str]


def transform_order(seed: int, index: int) -> np.ndarray:
    return np.random.default_rng([seed, index]).permutation(DIHEDRAL)


def plan_masks(masks: np.ndarray, case_ids: np.ndarray, n: int | None, augment: bool, seed: int) -> MaskPlan:
    """N samples (default: one per mask) cycling over the masks; see the module docstring for `augment`."""
    m = len(masks)
    if m == 0:
        raise UsageError("no masks to condition on.", "Check --masks and --split.")
    n = m if n is None else n
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}.")
    if n > m and not augment:
        raise UsageError(f"--n {n} is more than the {m} masks available.",
                         "Pass --mask-aug to reuse masks with random flips and rotations, or lower --n.")
    index = np.arange(n) % m
    use = np.arange(n) // m
    if augment:
        transform = np.array([transform_order(seed, int(j))[u % DIHEDRAL] for j, u in zip(index, use, strict=True)])
    else:
        transform = np.zeros(n, dtype=np.int64)
    out = np.stack([dihedral(masks[j], int(k)) for j, k in zip(index, transform, strict=True)])
    names = [f"syn_{case_ids[j]}" + (f"_r{u}_t{k}" if augment else "")
             for j, u, k in zip(index, use, transform, strict=True)]
    return MaskPlan(masks=out.astype(np.uint8), source_index=index, transform=transform, case_ids=names)


# ---------------------------------------------------------------- the command


@dataclass(frozen=True)
class SampleConfig:
    run: str
    masks: str  # lawder HDF5 file whose masks condition the samples
    out: str
    split: str = "train"
    n: int | None = None  # None: one synthetic image per mask
    mask_aug: bool = False
    steps: int = 50
    scheduler: str | None = None  # None: the run's default sampler (DDIM; Euler for flow)
    guidance: float = 1.0
    batch_size: int = 16
    seed: int = 0
    gpus: int = 0  # > 0: spread chunks over N GPU workers
    workers: int = 0  # with gpus == 0: N CPU Ray workers; 0 samples in this process
    ray_address: str | None = None
    wait_for_resources: float = DEFAULT_WAIT_S  # a joined cluster: seconds to wait for a free worker
    force: bool = False
    lesion_labels: str | None = None  # recorded in the file for adherence; None: the run's LAW lesion set

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"n": numbers.COUNT, "steps": numbers.SAMPLING_STEPS,
                                    "guidance": numbers.GUIDANCE, "batch_size": numbers.BATCH, "seed": numbers.SEED,
                                    "gpus": numbers.GPUS, "workers": numbers.WORKERS,
                                    "wait_for_resources": numbers.WAIT_S})
        if self.scheduler is not None and self.scheduler not in SAMPLERS:
            raise UsageError(f"unknown --scheduler {self.scheduler!r}; expected one of {SAMPLERS}.")
        if self.steps < 1 or self.batch_size < 1:
            raise UsageError("--steps and --batch-size must be at least 1.")
        if self.gpus < 0 or self.workers < 0:
            raise UsageError("--gpus and --workers must be non-negative.")


def run_weighting(run: RunInfo) -> str | None:
    """The weighting the run was trained with, from its config (None for a bare model folder)."""
    for folder in (run.model_folder.parent.parent, run.model_folder.parent):
        path = runs.config_path(folder)
        if path is not None:
            return json.loads(path.read_text()).get("weighting")
    return None


def source_labels(cfg: SampleConfig, info: RunInfo) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The label names of --masks (what the synthetic file stores) and the lesion labels it records.

    The masks must speak the model's labels: one-hot channel k of the condition is label k. The lesion set is
    `--lesion-labels` (a bad name is a UsageError here, before the model loads), else the run's LAW set, else
    the data set's default (KiTS tumor+cyst, other data every label > 0).
    """
    if not Path(cfg.masks).exists():
        raise DataError(f"--masks {cfg.masks} does not exist.", "Pass a file written by `lawder prepare`.")
    names = tuple(read_info(cfg.masks).label_names)
    model_names = tuple(info.spec.label_names)
    if len(names) > len(model_names):
        raise DataError(f"--masks {cfg.masks} has labels {list(names)}; the model was trained on {list(model_names)}.",
                        "Condition on masks of the data set the run was trained on.")
    if [n.lower() for n in names] != [n.lower() for n in model_names[:len(names)]]:
        log.warning("--masks %s names its labels %s; the model was trained on %s (label k is condition channel k).",
                    cfg.masks, list(names), list(model_names))
    if cfg.lesion_labels is not None:
        lesion = lesion_labels(names, cfg.lesion_labels)
    elif info.lesion_labels is not None and all(0 < k < len(names) for k in info.lesion_labels):
        lesion = info.lesion_labels
    else:
        lesion = default_lesion_labels(names)
    return names, lesion


def load_plan(cfg: SampleConfig, spec: DenoiserSpec) -> tuple[MaskPlan, tuple[int, int]]:
    """The masks to condition on (every label kept), and the size they were stored at; the request is checked
    against this machine's memory first, from the file's shape and split (no pixels read)."""
    if not Path(cfg.masks).exists():
        raise DataError(f"--masks {cfg.masks} does not exist.", "Pass a file written by `lawder prepare`.")
    size = spec.size
    stored, count = read_info(cfg.masks), len(split_indices(cfg.masks, cfg.split))
    limits.check_sampling(spec.preset, size, spec.image_channels, cfg.batch_size, cfg.n or count, cfg.guidance,
                          stored_masks=count * stored.height * stored.width, processes=cfg.workers,
                          on_gpu=cfg.gpus > 0)
    limits.check_output_disk("sample", cfg.out, cfg.n or count, size, spec.image_channels)
    _, masks, cases = load_arrays(cfg.masks, cfg.split)
    if len(masks) == 0:
        raise DataError(f"{cfg.masks} has no masks in split {cfg.split!r}.", "Choose another --split.")
    stored = (int(masks.shape[1]), int(masks.shape[2]))
    from lawder_core.data.resize import resize_masks

    return plan_masks(resize_masks(masks, size), cases, cfg.n, cfg.mask_aug, cfg.seed), stored


def sampling_kwargs(cfg: SampleConfig) -> dict[str, Any]:
    return {"steps": cfg.steps, "scheduler": cfg.scheduler, "guidance": cfg.guidance, "batch_size": cfg.batch_size,
            "seed": cfg.seed}


def generate_here(cfg: SampleConfig, masks: np.ndarray, progress: Callable[[int], None] | None) -> np.ndarray:
    """Sampling in this process; `distributed.sample` passes its own generator for --gpus/--workers."""
    return sample_pairs(cfg.run, masks, progress=progress, **sampling_kwargs(cfg))


def provenance(cfg: SampleConfig, info: RunInfo, plan: MaskPlan, masks_size: tuple[int, int],
               label_names: Sequence[str] | None = None, lesion: Sequence[int] | None = None) -> dict[str, Any]:
    labels = {} if label_names is None or lesion is None else {
        "lesion_labels": [int(k) for k in lesion], "lesion_names": lesion_names(label_names, lesion)}
    return {
        "run": str(Path(cfg.run).resolve()), "step": info.step, "weighting": run_weighting(info),
        "model": str(info.model_folder.resolve()), "prediction": info.spec.prediction,
        "scheduler": cfg.scheduler or default_sampler(info.spec.prediction), "steps": cfg.steps,
        "guidance": cfg.guidance, "seed": cfg.seed, "masks": str(Path(cfg.masks).resolve()), "split": cfg.split,
        "masks_size": list(masks_size), "n": len(plan.masks), "mask_aug": cfg.mask_aug,
        "lawder_version": package_version("lawder"), **labels,
    }


def sample_to_file(cfg: SampleConfig, progress: Callable[[int], None] | None = None,
               on_plan: Callable[[int], None] | None = None, generate_images: Generator = generate_here
               ) -> dict[str, Any]:
    """Sample and write; `on_plan(n)` is told the number of images before sampling starts (for a progress bar)."""
    out = Path(cfg.out)
    # Locked for the whole command, as a training locks its run folder: a second `sample -o` the same file
    # (with --force or not) is refused at once, not after both have sampled for minutes.
    hold_output_lock(out)
    try:
        return sample_and_write(cfg, out, progress, on_plan, generate_images)
    finally:
        release_output_lock(out)


def sample_and_write(cfg: SampleConfig, out: Path, progress: Callable[[int], None] | None,
                     on_plan: Callable[[int], None] | None, generate_images: Generator) -> dict[str, Any]:
    refuse_overwrite(out, cfg.force)  # before minutes of sampling, not after
    info = run_info(cfg.run)
    if cfg.scheduler is not None:
        check_sampler(info.spec.prediction, cfg.scheduler)
    check_steps(info.spec.prediction, cfg.steps, info.spec.num_train_timesteps)  # before the model loads
    label_names, lesion = source_labels(cfg, info)
    plan, masks_size = load_plan(cfg, info.spec)
    if on_plan is not None:
        on_plan(len(plan.masks))
    tic = time.perf_counter()
    images = generate_images(cfg, plan.masks, progress)
    seconds = time.perf_counter() - tic
    prov = provenance(cfg, info, plan, masks_size, label_names, lesion)
    write_synthetic_h5(out, images, plan.masks, plan.case_ids, prov, force=cfg.force, label_names=label_names)
    return {"out": str(out), "grid": str(out.with_suffix(".png")), "n": len(images), "size": info.spec.size,
            "seconds": round(seconds, 3), "images_per_s": round(len(images) / max(seconds, 1e-9), 3),
            **prov, "config": asdict(cfg)}


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
    writer = H5Writer(out, height=h, width=w, channels=c, label_names=list(label_names), source=SAMPLED,
                      preprocessing={"synthetic": True}, extra_attrs=dict(provenance), force=force)
    try:
        for start in range(0, n, 256):
            stop = min(start + 256, n)
            writer.add_batch(images[start:stop].astype(np.uint8), masks[start:stop].astype(np.uint8),
                             [str(c) for c in case_ids[start:stop]], ["train"] * (stop - start))
        # the grid before the rename: a file that exists has its grid (a full disk fails both, leaves neither)
        grid = out.with_suffix(".png")
        writer.close(before_commit=lambda _: atomic_save(lambda p: save_pair_grid(p, images, masks), grid))
    except BaseException:
        writer.abort()
        raise
    return out
