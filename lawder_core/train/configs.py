"""The training configs as frozen dataclasses, and the checks a request must pass before any worker starts.

No torch here (nor in what it imports): `lawder train-order --model typo` is refused before PyTorch is loaded.
The training loops (`seg.py`, `diffusion.py`) take these configs as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lawder_core import limits, numbers, runs
from lawder_core.config import build_config
from lawder_core.errors import DataError, UsageError
from lawder_core.models.configs import PRESETS, WEIGHTINGS, LAWConfig, OrderConfig, check_model_name, check_prediction

# numpy, h5py and the data readers load inside the checks: the CLI reads its help defaults from these
# dataclasses at start-up, which must stay light
if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

MAX_SIZE = 1024
AMP_DTYPES = ("auto", "bf16", "fp16")  # auto: bf16 where the GPU runs it natively, else fp16 (train/amp.py)


def check_amp_dtype(wanted: str) -> None:
    if wanted not in AMP_DTYPES:
        raise UsageError(f"amp_dtype {wanted!r}: expected one of {', '.join(AMP_DTYPES)}.")


def worker_batch_size(batch_size: int, world_size: int) -> int:
    """--batch-size is the global batch: each of `world_size` workers takes an equal share of it."""
    if world_size > 1 and batch_size % world_size:
        nearest = max(1, batch_size // world_size) * world_size
        raise UsageError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                         f"{world_size} workers.", f"Use a multiple of {world_size}, e.g. --batch-size {nearest}.")
    return max(1, batch_size // max(world_size, 1))


# ---------------------------------------------------------------- segmenters


@dataclass(frozen=True)
class SegTrainConfig:
    data: str
    out: str
    model: str = "mkunet-t-order"
    synthetic: str | None = None
    synthetic_ratio: float = 1.0  # synthetic samples per real training sample
    size: int = 256
    epochs: int = 50
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    augment: bool = True
    labels: str | None = None  # --labels: classes by name/number, ',' between classes, '+' merges (data/labels.py)
    order: OrderConfig = field(default_factory=OrderConfig)
    # MK-UNet's out1..out3 deep-supervision heads: one weight for every MK-UNet, ORDER included (ORDER's region
    # heads have their own, order.aux_weight), so the models of a comparison differ only in ORDER itself.
    deep_supervision: float = 0.2
    steps: int | None = None  # optimiser steps in all (equal budgets across arms); None: epochs × steps per epoch
    folds: int = 0  # k-fold cross-validation over the non-test cases; 0: train on train, validate on val
    fold: int | None = None  # with folds: the held-out fold (validated on), trained on the other folds
    select: str = "best"  # the checkpoint evaluate/predict use: best (validation Dice) or last
    init_from: str | None = None  # a run whose selected checkpoint starts this one (ORDER: an MK-UNet's trunk)
    freeze_trunk: bool = False  # ORDER two-stage: train ORDER's parameters only, the trunk's BatchNorm in eval
    # Joint ORDER training: the adapter's lr is lr × adapter_lr_scale, reached by a linear warm-up over
    # adapter_warmup_epochs. Measured (benchmarks/results/adapter_sweep_64): the full lr loses 2.8 Dice points
    # (CI excludes 0); 0.25 and 0.5, with or without the warm-up, are within the noise of each other.
    adapter_lr_scale: float = 0.5
    adapter_warmup_epochs: int = 2
    encoder_weights: str | None = None
    # DataLoader processes, for what is not held in memory (a training split that is goes through DeviceBatches)
    loader_workers: int = 0  # lzf HDF5 reads are fast; extra DataLoader processes are slower on 2 cores
    amp: bool = True  # autocast on GPUs only
    amp_dtype: str = "auto"  # auto (bf16 where native, else fp16 with a grad scaler) | bf16 | fp16
    max_steps_per_epoch: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        numbers.check_fields(self, SEG_RANGES)


SEG_RANGES = {"synthetic_ratio": numbers.RATIO, "size": numbers.SEG_SIZE, "epochs": numbers.EPOCHS,
              "batch_size": numbers.BATCH, "lr": numbers.LEARNING_RATE, "weight_decay": numbers.FRACTION,
              "seed": numbers.SEED, "loader_workers": numbers.WORKERS, "max_steps_per_epoch": numbers.COUNT}


def check_seg_config(cfg: SegTrainConfig, world_size: int = 1, processes: int | None = None,
                     on_gpu: bool = False) -> None:
    """Fail before starting workers (and before --force deletes anything) on what can be known up front,
    memory included: `processes` training processes on this machine (default: `world_size`; 0: all elsewhere),
    on GPUs or not."""
    from lawder_core.data.h5 import not_sampled, read_info, split_indices
    from lawder_core.data.labels import label_map

    check_model_name(cfg.model)
    check_amp_dtype(cfg.amp_dtype)
    if cfg.size % 32:
        raise UsageError(f"--size {cfg.size} must be divisible by 32 (the U-Nets downsample 5 times).")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise UsageError("--epochs and --batch-size must be at least 1.")
    worker_batch_size(cfg.batch_size, world_size)
    if cfg.steps is not None and cfg.steps < 1:
        raise UsageError(f"--steps {cfg.steps} must be at least 1.")
    if cfg.select not in runs.SELECTIONS:
        raise UsageError(f"--select {cfg.select!r}: expected one of {', '.join(runs.SELECTIONS)}.")
    if cfg.deep_supervision < 0 or cfg.adapter_lr_scale <= 0 or cfg.adapter_warmup_epochs < 0:
        raise UsageError("deep_supervision and adapter_warmup_epochs must be ≥ 0 and adapter_lr_scale > 0.")
    check_folds(cfg)
    check_init(cfg)
    info = read_info(cfg.data)
    label_map(info.label_names, cfg.labels)
    # Reading the splits also refuses a misspelt value before the run folder exists.
    train = len(training_indices(cfg))
    if not train and not cfg.synthetic:
        raise DataError(f"{cfg.data} has no training samples.", "Check the split with `lawder inspect`.")
    if cfg.synthetic and (note := not_sampled(read_info(cfg.synthetic), "--synthetic")) is not None:
        log.warning("%s", note)
    limits.check_seg_training(cfg.model, cfg.size, cfg.batch_size, (info.height, info.width, info.channels),
                              train + len(split_indices(cfg.data, "val")),
                              processes=world_size if processes is None else processes, on_gpu=on_gpu)


def check_folds(cfg: SegTrainConfig) -> None:
    if cfg.folds == 0 and cfg.fold is None:
        return
    if cfg.folds < 2 or cfg.fold is None:
        raise UsageError("--folds K (at least 2) and --fold I go together.",
                         "e.g. --folds 5 --fold 0 trains on folds 1-4 and validates on fold 0.")
    if not 0 <= cfg.fold < cfg.folds:
        raise UsageError(f"--fold {cfg.fold} is outside 0..{cfg.folds - 1} for --folds {cfg.folds}.")


def check_init(cfg: SegTrainConfig) -> None:
    """--init-from names a finished run; --freeze-trunk needs it and a model with an adapter to train."""
    if cfg.freeze_trunk and not cfg.init_from:
        raise UsageError("--freeze-trunk needs --init-from RUN: a frozen random trunk learns nothing.")
    if cfg.freeze_trunk and not cfg.model.endswith("-order"):
        raise UsageError(f"--freeze-trunk trains ORDER's parameters only; {cfg.model} has none.",
                         "Use an ORDER model (e.g. mkunet-t-order), or drop --freeze-trunk.")
    if cfg.init_from:
        runs.segmenter_checkpoint(cfg.init_from)  # a DataError naming the folder if it holds no checkpoint
        if Path(cfg.init_from).resolve() == Path(cfg.out).resolve():
            raise UsageError("--init-from names the run's own --out folder.", "Use --resume to continue a run.")


def training_indices(cfg: SegTrainConfig) -> np.ndarray:
    """The real samples this run trains on: the train split, or with --folds every non-test case outside --fold."""
    from lawder_core.data.h5 import split_indices
    from lawder_core.data.splits import fold_indices

    if cfg.folds:
        assert cfg.fold is not None  # check_folds
        return fold_indices(cfg.data, cfg.folds, cfg.fold, "train")
    return split_indices(cfg.data, "train")


def validation_indices(cfg: SegTrainConfig) -> np.ndarray:
    """The samples this run validates (and selects best/) on: the val split, or with --folds its held-out fold."""
    from lawder_core.data.h5 import split_indices
    from lawder_core.data.splits import fold_indices

    if cfg.folds:
        assert cfg.fold is not None
        return fold_indices(cfg.data, cfg.folds, cfg.fold, "val")
    return split_indices(cfg.data, "val")


def planned_steps_per_epoch(cfg: SegTrainConfig, world_size: int = 1) -> int:
    """Optimiser steps one epoch takes (what the training loader yields), from the data's sizes alone.

    The pipeline gives every arm of a comparison the same number of optimiser steps with this: an arm with
    synthetic images has more samples per epoch, so it gets fewer epochs.
    """
    from lawder_core.data.h5 import split_indices

    n = len(training_indices(cfg))
    if cfg.synthetic and cfg.synthetic_ratio > 0:
        n += min(len(split_indices(cfg.synthetic, None)), int(round(cfg.synthetic_ratio * n)))
    per_worker = math.ceil(n / world_size)
    batch = worker_batch_size(cfg.batch_size, world_size)
    steps = per_worker // batch if n > cfg.batch_size else math.ceil(per_worker / batch)
    if cfg.max_steps_per_epoch is not None:
        steps = min(steps, cfg.max_steps_per_epoch)
    return max(steps, 1)


# ---------------------------------------------------------------- diffusion


@dataclass(frozen=True)
class DiffusionTrainConfig:
    data: str = ""  # lawder HDF5 file
    out: str = "runs/law"
    split: str = "train"
    size: int = 64
    steps: int = 2000
    batch_size: int = 8  # the global batch: each of N workers takes batch_size / N
    lr: float = 2e-4  # the denoiser's AdamW (the field uses 1e-5 for ControlNet on SD 1.5)
    lr_warmup_steps: int = 100  # linear warm-up of the denoiser's learning rate
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    weighting: str = "law"  # 'uniform' | 'ratio' | 'law'
    law: LAWConfig = field(default_factory=LAWConfig)
    # --lesion-labels: the stored labels LAW's lesion/background prior and statistics treat as lesion, by name or
    # number joined by '+'; None: the data set's default (KiTS tumor+cyst, other data every label > 0). The
    # denoiser is conditioned on every label whatever this says (data/labels.py: lesion_labels).
    lesion_labels: str | None = None
    # the pixel backbone's recipe (models/recipe.py); ControlNet keeps its checkpoint's epsilon and schedule
    prediction: str | None = None  # 'v' (the unet's default) | 'flow' (rectified flow) | 'epsilon' (controlnet's)
    beta_schedule: str = "squaredcos_cap_v2"  # cosine; 'linear' is the original DDPM schedule
    timestep_spacing: str = "trailing"  # sampling starts at the last training timestep
    snr_gamma: float | None = 5.0  # Min-SNR-γ timestep weighting; None (--snr-gamma none) weighs every level alike
    backbone: str = "unet"  # 'unet' | 'controlnet'
    preset: str = "small"  # unet: 'tiny' | 'small' | 'base'
    pretrained: str | None = None  # controlnet: local Stable Diffusion 1.5-style folder
    prompt: str = ""  # controlnet
    cond_dropout: float = 0.1  # null-mask probability, for classifier-free guidance; 1: never sees a mask
    # Start the denoiser from this train-law run's EMA weights (fine-tuning); LAW and the optimisers start fresh.
    init_from: str | None = None
    ema_decay: float = 0.999  # the EMA's decay ramps up to this with the step count (models/ema.py)
    hflip: bool = False  # the only augmentation: a generator must learn the data's own orientation
    seed: int = 0
    log_every: int = 10
    save_every: int = 500  # 0: only at the end
    sample_every: int = 500  # preview grid; 0: never
    preview_count: int = 4
    preview_steps: int = 25
    num_workers: int = 0  # DataLoader workers
    amp: bool = True  # autocast on GPU
    amp_dtype: str = "auto"  # auto (bf16 where native, else fp16 with a grad scaler) | bf16 | fp16
    resume: bool = False

    def __post_init__(self) -> None:
        numbers.check_fields(self, LAW_TRAIN_RANGES)
        if self.weighting not in WEIGHTINGS:
            raise UsageError(f"unknown --weighting {self.weighting!r}; expected one of {WEIGHTINGS}.")
        if self.backbone == "unet" and self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; expected one of {tuple(PRESETS)}.")
        if self.steps < 1 or self.batch_size < 1 or self.size < 8:
            raise UsageError("--steps and --batch-size must be at least 1 and --size at least 8.")
        if not 0 <= self.cond_dropout <= 1:
            raise UsageError(f"cond_dropout must lie in [0, 1], got {self.cond_dropout}.",
                             "1 trains an unconditional model (a base to fine-tune with --init-from).")
        if self.prediction is not None:
            check_prediction(self.prediction)
        if self.backbone == "controlnet" and self.prediction not in (None, "epsilon"):
            raise UsageError("the controlnet backbone keeps its checkpoint's epsilon target.",
                             "Pass --prediction epsilon with --backbone controlnet.")
        check_amp_dtype(self.amp_dtype)
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise UsageError(f"snr_gamma must be positive (or None to switch Min-SNR off), got {self.snr_gamma}.")


LAW_TRAIN_RANGES = {"size": numbers.LAW_SIZE, "steps": numbers.COUNT, "batch_size": numbers.BATCH,
                    "lr": numbers.LEARNING_RATE, "lr_warmup_steps": numbers.EVERY, "weight_decay": numbers.FRACTION,
                    "max_grad_norm": numbers.POSITIVE, "snr_gamma": numbers.POSITIVE, "ema_decay": numbers.FRACTION,
                    "seed": numbers.SEED, "log_every": numbers.COUNT, "save_every": numbers.EVERY,
                    "sample_every": numbers.EVERY, "preview_count": numbers.BATCH,
                    "preview_steps": numbers.SAMPLING_STEPS, "num_workers": numbers.WORKERS}


def starting_config_file(config_file: str | Path | None, out: str | Path | None, resume: bool | None) -> Path | None:
    """The config a training command builds on: the file given, else (resuming) the one its run started with."""
    if config_file is None and resume and out is not None:
        return runs.config_path(out)
    return Path(config_file) if config_file is not None else None


def seg_config(config_file: str | Path | None, **overrides: Any) -> SegTrainConfig:
    """Defaults < config file (or, resuming, the run's own) < flags."""
    chosen = starting_config_file(config_file, overrides.get("out"), overrides.get("resume"))
    return build_config(SegTrainConfig, chosen, **overrides)


def law_config(config_file: str | Path | None, law_overrides: dict[str, Any] | None = None,
               **overrides: Any) -> DiffusionTrainConfig:
    """Defaults < config file (a `tune` best.yaml works as is; resuming, the run's own) < flags; LAW flags change
    single nested fields."""
    chosen = starting_config_file(config_file, overrides.get("out"), overrides.get("resume"))
    cfg = build_config(DiffusionTrainConfig, chosen, **overrides)
    given = {k: v for k, v in (law_overrides or {}).items() if v is not None}
    return replace(cfg, law=replace(cfg.law, **given)) if given else cfg


def check_size(cfg: DiffusionTrainConfig) -> None:
    if not 8 <= cfg.size <= MAX_SIZE:
        raise UsageError(f"--size {cfg.size} is outside [8, {MAX_SIZE}].", "Typical: 64 on a CPU, 256–512 on a GPU.")
    if cfg.backbone == "unet":
        factor = 2 ** (len(PRESETS[cfg.preset]["block_out_channels"]) - 1)
        if cfg.size % factor:
            raise UsageError(f"--size {cfg.size} must be divisible by {factor} for preset {cfg.preset!r} "
                             "(the UNet halves the resolution at every level).")
    elif cfg.backbone == "controlnet":
        if not cfg.pretrained or not Path(cfg.pretrained).is_dir():
            raise DataError(f"--pretrained {cfg.pretrained or '(none)'} is not a folder.",
                            "Give a local Stable Diffusion 1.5-style folder (vae/, unet/, scheduler/, text_encoder/).")
        if cfg.size % 8:
            raise UsageError(f"--size {cfg.size} must be divisible by 8 (the VAE works at 1/8 resolution).")
    else:
        raise UsageError(f"unknown --backbone {cfg.backbone!r}; expected unet or controlnet.")


def check_law_config(cfg: DiffusionTrainConfig, world_size: int = 1, processes: int = 1,
                     on_gpu: bool = False) -> None:
    """Fail before starting workers on what can be known up front: data, split, size, batch, backbone, and the
    memory of `processes` training processes on this machine (0: all elsewhere), on GPUs or not."""
    from lawder_core.data.h5 import read_info, split_indices

    if not cfg.data:
        raise UsageError("no training data given.", "Pass --data FILE.h5 (see `lawder prepare`).")
    info = read_info(cfg.data)
    n = len(split_indices(cfg.data, cfg.split))
    if n == 0:
        raise DataError(f"{cfg.data} has no samples in split {cfg.split!r}.", "Check the split, or prepare the data.")
    check_size(cfg)
    check_init_from(cfg)
    run_lesion_labels(cfg, info.label_names)
    batch = worker_batch_size(cfg.batch_size, world_size)
    per_worker = n // max(world_size, 1)
    if per_worker < batch:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {n} training samples.",
                         "Lower --batch-size.")
    if cfg.backbone == "unet":  # a ControlNet's cost is its checkpoint's, not a preset's
        limits.check_law_training(cfg.preset, cfg.size, cfg.batch_size, processes=processes, on_gpu=on_gpu)
    if cfg.size > max(info.height, info.width):
        log.warning("--size %d is larger than the data (%d×%d): images are upsampled.", cfg.size, info.height,
                    info.width)


def check_init_from(cfg: DiffusionTrainConfig) -> None:
    """--init-from names another finished run (its EMA denoiser is read when training starts)."""
    if not cfg.init_from:
        return
    source = Path(cfg.init_from)
    if cfg.out and source.resolve() == Path(cfg.out).resolve():
        raise UsageError("--init-from names the run being trained.", "To continue a run pass --resume instead.")
    init_checkpoint(source)


def init_checkpoint(run: str | Path) -> Path:
    """The checkpoint folder of an --init-from run (its last/), with the EMA denoiser in it; DataError if none."""
    checkpoint = runs.find_checkpoint(Path(run))
    if checkpoint is None or not (checkpoint / runs.DENOISER_EMA).is_dir():
        raise DataError(f"--init-from {run} holds no trained denoiser (no {runs.LAST}/{runs.DENOISER_EMA}).",
                        "Point it at a finished `lawder train-law` run folder.")
    return checkpoint


def run_lesion_labels(cfg: DiffusionTrainConfig, label_names: tuple[str, ...] | list[str]) -> tuple[int, ...]:
    """The lesion labels this run trains with: `cfg.lesion_labels` against the data's label names, or on --resume
    the set the checkpoint recorded (a checkpoint from before --lesion-labels: every label > 0, as it trained).

    A bad name, or a resume that would change the set mid-run, is a UsageError before any worker starts.
    """
    from lawder_core.data.labels import lesion_labels

    wanted = lesion_labels(label_names, cfg.lesion_labels)
    checkpoint = runs.find_checkpoint(Path(cfg.out)) if cfg.resume and cfg.out else None
    if checkpoint is None:
        return wanted
    recorded = runs.read_progress(checkpoint).get("lesion_labels")
    trained = tuple(recorded) if recorded is not None else tuple(range(1, len(label_names)))
    if cfg.lesion_labels is not None and wanted != trained:
        raise UsageError(f"the checkpoint in {checkpoint} trained LAW with lesion labels {list(trained)}, "
                         f"not {list(wanted)}.",
                         "Resume without --lesion-labels (or with the same labels), or use a new --out.")
    return trained
