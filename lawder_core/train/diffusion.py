"""The per-worker training loop of `lawder train-law`: a mask-conditioned denoiser, optionally weighted by LAW.

Plain PyTorch: called directly (tests, one process), or by the Ray launcher in every worker (DDP). One flag,
`weighting`, switches between the baselines (`uniform`, `ratio`) and LAW under the same loop, model and data.
The run folder follows `runs.py`; a checkpoint folder (`last/`) holds:

    denoiser/                   trained weights, diffusers save_pretrained layout (+ lawder_denoiser.json)
    denoiser_ema/               the EMA weights in the same layout: what `lawder sample` uses
    law.safetensors, law.json   LAW's weights and config (weighting 'law' only)
    training_state.pt, progress.json
and RUN/samples/step_000500.png are preview grids (image, mask, weight map, EMA sample).

Randomness is keyed by (seed, step, rank) — noise, timesteps and condition dropout — and the data order by
epoch, so a resumed run continues exactly where the interrupted one would have gone.

`init_from` starts the denoiser from another run's EMA weights (what `lawder sample` draws that run's images
with: the average of its last iterates, not the last noisy step), with a fresh EMA, a fresh LAW and fresh
optimisers: fine-tuning, the regime of the paper. progress.json and the run summary record where it started. A
source that never saw a mask (cond_dropout 1) has random mask input weights: they start at zero here, so the
fine-tune starts as the source for every mask (`mask_inputs_zeroed` in the record).

Gradient clipping is one rule in every arm: the global L2 norm of the denoiser's gradient of its training loss
(time weight × map × error; the map is detached, so that is the gradient of the weighted loss) is clipped at
`max_grad_norm`; LAW's own parameters are clipped at the same norm on LAW's objective, apart, so LAW never changes
how much the denoiser is clipped. `grad_norm` (before clipping) and `clipped` (the share of clipped steps) are
logged, so arms can be checked for how often the rule bit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from lawder_core import runs
from lawder_core.config import build_config, to_dict
from lawder_core.data.dataset import SegDataset
from lawder_core.errors import DataError, UsageError
from lawder_core.models.denoiser import (
    Denoiser,
    DenoiserSpec,
    build_denoiser,
    copy_weights,
    load_denoiser,
    load_saved_module,
)
from lawder_core.models.ema import EMA
from lawder_core.models.law import (
    LAW,
    FeatureGrabber,
    LossTerms,
    law_active,
    lesion_at,
    mask_influence,
    normalised_error,
    pixel_error,
    prior_map,
    weight_stats,
    weighted_diffusion_loss,
)
from lawder_core.models.recipe import (
    NoisedBatch,
    denoise,
    diffusion_snr,
    flow_snr,
    initial_noise,
    noised_batch,
)
from lawder_core.train.amp import precision
from lawder_core.train.configs import DiffusionTrainConfig, init_checkpoint, run_lesion_labels, worker_batch_size
from lawder_core.train.runtime import (
    Reporter,
    WorkerContext,
    barrier,
    check_finite,
    no_report,
    optimizer_options,
    set_sampler_epoch,
    train_sampler,
    worker_context,
    wrap_model,
)
from lawder_core.viz import save_weight_preview

log = logging.getLogger(__name__)

SAMPLES = "samples"
LAW_STATS = ("w_lesion", "w_background", "w_max", "law_objective", "law_departure", "law_active", "lesion_frac")


# ---------------------------------------------------------------- setup


def denoiser_spec(cfg: DiffusionTrainConfig, dataset: SegDataset) -> DenoiserSpec:
    recipe: dict[str, Any] = {}
    if cfg.backbone == "unet":
        recipe = {"prediction": cfg.prediction or "v", "beta_schedule": cfg.beta_schedule,
                  "timestep_spacing": cfg.timestep_spacing}
    return DenoiserSpec(backbone=cfg.backbone, preset=cfg.preset, size=cfg.size,
                        image_channels=dataset.info.channels, label_names=tuple(dataset.info.label_names),
                        pretrained=cfg.pretrained or "", prompt=cfg.prompt, **recipe)


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    key = int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])
    return torch.Generator(device=device).manual_seed(key)


class EpochOrder(Sampler[int]):
    """The indices of the current epoch, replaced between epochs: one DataLoader (and its worker processes)
    serves the whole run."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self):
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


def batches(dataset: SegDataset, ctx: WorkerContext, cfg: DiffusionTrainConfig, start_step: int):
    """Endless batches; on resume the first epoch skips the batches already seen (indices only, no loading).

    --batch-size is the global batch: each worker draws its share of it from its own shard of the data."""
    sampler = train_sampler(dataset, ctx, cfg.seed)
    batch = worker_batch_size(cfg.batch_size, ctx.world_size)
    per_epoch = len(sampler) // batch  # type: ignore[arg-type]
    if per_epoch == 0:
        raise UsageError(f"--batch-size {cfg.batch_size} is larger than the {len(dataset)} training samples.",
                         "Lower --batch-size.")
    epoch, skip = divmod(start_step, per_epoch)
    order = EpochOrder()
    loader = DataLoader(dataset, batch_size=batch, sampler=order, drop_last=True, num_workers=cfg.num_workers,
                        persistent_workers=cfg.num_workers > 0, pin_memory=ctx.device.type == "cuda")
    while True:
        set_sampler_epoch(sampler, epoch, cfg.seed)
        order.order = list(sampler)[skip * batch:]
        yield from loader
        epoch, skip = epoch + 1, 0


def uses_uniform_time(cfg: DiffusionTrainConfig) -> bool:
    """Min-SNR weighting belongs to the pixel recipe; ControlNet keeps its checkpoint's plain objective."""
    return cfg.snr_gamma is None or cfg.backbone != "unet"


def random_hflip(images: Tensor, masks: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mirror each pair left-right with probability ½ (keyed by the step's generator, so a resume repeats it)."""
    flip = torch.rand(images.shape[0], generator=g, device=g.device) < 0.5
    return (torch.where(flip[:, None, None, None], images.flip(-1), images),
            torch.where(flip[:, None, None], masks.flip(-1), masks))


def amp_settings(cfg: DiffusionTrainConfig, device: torch.device) -> tuple[bool, torch.dtype]:
    """Autocast on or off, and its type: bf16 where the GPU runs it natively, else fp16 (`train/amp.py`)."""
    amp = precision(device, cfg.amp, cfg.amp_dtype)
    return amp.enabled, amp.dtype


@dataclass
class Trainer:
    """Everything one worker holds; `model`/`law_model` are the (possibly DDP-wrapped) views that train."""

    cfg: DiffusionTrainConfig
    ctx: WorkerContext
    denoiser: Denoiser
    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    law: LAW | None = None
    law_model: nn.Module | None = None
    law_optimizer: torch.optim.Optimizer | None = None
    grabber: FeatureGrabber | None = None
    # The stored labels that are lesion for LAW's prior, map and statistics (run_lesion_labels); the denoiser's
    # condition is every label, one-hot, whatever this says.
    lesion_labels: tuple[int, ...] | None = None
    # Where the denoiser started (`init_from`): run, checkpoint, step, weights; None: from scratch.
    init_record: dict[str, Any] | None = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)


def build_trainer(cfg: DiffusionTrainConfig, ctx: WorkerContext, spec: DenoiserSpec,
                  checkpoint: Path | None, lesion_labels: tuple[int, ...] | None = None) -> tuple[Trainer, int]:
    torch.manual_seed(cfg.seed)  # identical initial weights on every worker
    init_record = None
    if checkpoint is not None:
        denoiser = load_denoiser(checkpoint / runs.DENOISER, pretrained=cfg.pretrained)
        check_same_spec(denoiser.spec, spec, checkpoint)
    elif cfg.init_from:
        denoiser, init_record = load_init_denoiser(cfg.init_from, spec, cfg.pretrained)
    else:
        denoiser = build_denoiser(spec)
    denoiser.to(ctx.device)
    ema = EMA(denoiser.trainable_module(), cfg.ema_decay)
    law = LAW(denoiser.feature_channels, cfg.law).to(ctx.device) if cfg.weighting == "law" else None
    grabber = FeatureGrabber(denoiser.feature_module(cfg.law.feature_module)) if law is not None else None
    params = [p for p in denoiser.trainable_module().parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_options(ctx.device))
    warm = max(cfg.lr_warmup_steps, 1)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm))
    law_optimizer = (torch.optim.AdamW(law.parameters(), lr=cfg.law.lr, weight_decay=cfg.law.weight_decay,
                                       **optimizer_options(ctx.device)) if law is not None else None)
    use_amp, amp_dtype = amp_settings(cfg, ctx.device)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    trainer = Trainer(cfg, ctx, denoiser, denoiser, ema, optimizer, lr_schedule, scaler, law, law, law_optimizer,
                      grabber, lesion_labels, init_record)
    start = restore(trainer, checkpoint) if checkpoint is not None else 0
    trainer.model = wrap_model(denoiser, ctx)
    trainer.law_model = wrap_model(law, ctx) if law is not None else None
    return trainer, start


def check_same_spec(saved: DenoiserSpec, wanted: DenoiserSpec, checkpoint: Path,
                    hint: str = "Resume with the same --size/--preset/--backbone/--prompt and data, or use a new "
                                "--out.") -> None:
    a, b = asdict(replace(saved, pretrained="")), asdict(replace(wanted, pretrained=""))
    if a != b:
        differ = ", ".join(f"{k} {a[k]!r} (wanted {b[k]!r})" for k in a if a[k] != b[k])
        raise UsageError(f"the checkpoint in {checkpoint} was trained with another model: {differ}.", hint)


def load_init_denoiser(run: str | Path, spec: DenoiserSpec, pretrained: str | None) -> tuple[Denoiser, dict[str, Any]]:
    """Another run's EMA denoiser as this run's starting point, checked to be the model this run trains."""
    checkpoint = init_checkpoint(run)
    denoiser = load_denoiser(checkpoint / runs.DENOISER_EMA, pretrained=pretrained)
    check_same_spec(denoiser.spec, spec, checkpoint,
                    "--init-from needs a run of the same model: the same --size/--preset/--backbone/--prediction "
                    "and the same labels.")
    record = {"run": str(Path(run).resolve()), "checkpoint": str(checkpoint.resolve()),
              "step": int(runs.read_progress(checkpoint).get("step", -1)), "weights": runs.DENOISER_EMA,
              "mask_inputs_zeroed": never_saw_a_mask(run) and denoiser.zero_mask_inputs()}
    return denoiser, record


def never_saw_a_mask(run: str | Path, _seen: frozenset[Path] = frozenset()) -> bool:
    """A run that dropped the condition on every row (cond_dropout 1), and so did every run it was fine-tuned from:
    its mask input weights are still at their random initialisation, and with masks in {−1, +1} they would move the
    prediction at every pixel (6–9 % of its norm, measured on bench_law_quality's base). A fine-tune zeroes them, so
    it starts as the source for any mask. A cond_dropout-1 run started from one that saw masks carries that run's
    trained mask weights (the null condition gives them no gradient): they are kept. So are they whenever a link of
    the chain cannot be read."""
    here = Path(run).resolve()
    if runs.config_path(run) is None or here in _seen:  # a folder without its config (or a loop): nothing says so
        return False
    config = runs.read_config(run)
    if float(config.get("cond_dropout", 0.0)) < 1.0:
        return False
    source = config.get("init_from")
    return source is None or never_saw_a_mask(source, _seen | {here})


# ---------------------------------------------------------------- one step


def batch_snr(denoiser: Denoiser, batch: NoisedBatch) -> Tensor:
    """Each row's signal-to-noise ratio α²/σ² (flow: ((1 − t)/t)²)."""
    if denoiser.spec.prediction == "flow":
        return flow_snr(batch.model_timesteps.float() / int(denoiser.scheduler.config.num_train_timesteps))
    return diffusion_snr(denoiser.scheduler, batch.model_timesteps)  # type: ignore[arg-type]


def law_row_weight(cfg: DiffusionTrainConfig, denoiser: Denoiser, batch: NoisedBatch) -> Tensor | None:
    """How much each row counts in LAW's objective (`LAWConfig.time_weight`); None: all alike."""
    mode = cfg.law.time_weight
    if mode == "denoiser":
        return None if uses_uniform_time(cfg) else batch.time_weight
    if mode == "layout":
        return (batch_snr(denoiser, batch) < cfg.law.layout_snr).float()
    return None


def training_step(tr: Trainer, images: Tensor, masks: Tensor, step: int) -> tuple[LossTerms, Tensor]:
    """One optimiser step of the denoiser (and LAW once active); returns the loss terms and the denoiser's
    gradient norm before clipping (a tensor: read at the log line, not at every step)."""
    cfg, ctx, denoiser = tr.cfg, tr.ctx, tr.denoiser
    images, masks = images.to(ctx.device, non_blocking=True), masks.to(ctx.device, non_blocking=True)
    g = step_generator(cfg.seed, step, ctx.rank, ctx.device)
    if cfg.hflip:
        images, masks = random_hflip(images, masks, g)
    x0 = denoiser.encode(images)
    noise = torch.randn(x0.shape, generator=g, device=ctx.device)
    batch = noised_batch(denoiser.scheduler, denoiser.spec.prediction, x0, noise, g, snr_gamma=cfg.snr_gamma)
    drop = torch.rand(x0.shape[0], generator=g, device=ctx.device) < cfg.cond_dropout
    use_amp, amp_dtype = amp_settings(cfg, ctx.device)
    with torch.autocast(device_type=ctx.device.type, dtype=amp_dtype, enabled=use_amp):
        pred = tr.model(batch.noisy, batch.model_timesteps, denoiser.condition(masks, drop))
    size = tuple(pred.shape[-2:])
    active = tr.law is not None and law_active(step, cfg.steps, cfg.law)
    features = tr.grabber.take(size) if tr.grabber is not None and active else None  # type: ignore[arg-type]
    influence = None
    if active and cfg.law.objective == "influence":
        # The unconditional prediction for the same noisy input: the gap is what the mask changes. No gradient,
        # and the unwrapped model, so DDP does not count it as a training forward.
        with torch.no_grad(), torch.autocast(device_type=ctx.device.type, dtype=amp_dtype, enabled=use_amp):
            pred_null = denoiser(batch.noisy, batch.model_timesteps, denoiser.null_condition(masks))
        if tr.grabber is not None:
            tr.grabber.clear()
        influence = mask_influence(pred, pred_null)
    time_weight = None if uses_uniform_time(cfg) else batch.time_weight
    terms = weighted_diffusion_loss(pred, batch.target, weighting=cfg.weighting,
                                    lesion=lesion_at(masks, size, tr.lesion_labels),  # type: ignore[arg-type]
                                    law=tr.law_model, features=features, timesteps=batch.model_timesteps,
                                    active=active, config=cfg.law, keep=~drop, time_weight=time_weight,
                                    law_row_weight=law_row_weight(cfg, denoiser, batch), influence=influence)
    optimizers = [tr.optimizer] + ([tr.law_optimizer] if active and tr.law_optimizer is not None else [])
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    tr.scaler.scale(terms.total).backward()
    for opt in optimizers:
        tr.scaler.unscale_(opt)
    # The same rule in every arm: the denoiser's global gradient norm of its weighted loss, clipped at one
    # threshold; LAW's parameters apart (see the module docstring).
    grad_norm = torch.nn.utils.clip_grad_norm_(tr.optimizer.param_groups[0]["params"], cfg.max_grad_norm)
    if len(optimizers) > 1:
        torch.nn.utils.clip_grad_norm_(tr.law_optimizer.param_groups[0]["params"], cfg.max_grad_norm)  # type: ignore[union-attr]
    for opt in optimizers:
        tr.scaler.step(opt)
    tr.scaler.update()
    tr.lr_schedule.step()
    tr.ema.update(denoiser.trainable_module())
    return terms, grad_norm.detach()


# ---------------------------------------------------------------- metrics


class Window:
    """Running sums of the logged quantities between two log lines (NaN entries are skipped).

    `add` only keeps the step's (detached) tensors; they are read when the line is logged, so a step never
    waits for the GPU to report its numbers."""

    # averaged; w_max is the largest weight seen. lesion_frac: the share of loss-space pixels that are lesion
    # (the lesion labels'), what LAW's ratio prior is computed from. clipped: the share of steps whose gradient
    # norm was above max_grad_norm (grad_norm is before clipping).
    KEYS = ("loss", "law_objective", "law_departure", "w_lesion", "w_background", "lesion_frac", "grad_norm",
            "clipped")

    def __init__(self, max_grad_norm: float = float("inf")) -> None:
        self.max_grad_norm = max_grad_norm
        self.sums = dict.fromkeys(self.KEYS, 0.0)
        self.counts = dict.fromkeys(self.KEYS, 0.0)
        self.w_max = 0.0
        self.tic = time.perf_counter()
        self.steps = 0
        self.pending: list[tuple[Any, ...]] = []

    def add(self, *step_values: Any) -> None:
        self.pending.append(tuple(detached(v) for v in step_values))

    def check_finite(self, step: int) -> None:
        """A diverged run stops at the log line, before its checkpoint is written."""
        totals = [values[0].total for values in self.pending]
        if totals:
            check_finite(torch.stack([t.float() for t in totals]).sum(), step)

    def flush(self) -> None:
        for values in self.pending:
            self.accumulate(*values)
        self.pending = []

    def accumulate(self, terms: LossTerms, lesion: Tensor, grad_norm: Tensor | float = float("nan")) -> None:
        grad_norm = float(grad_norm)
        stats = weight_stats(terms.weights, lesion)
        self.w_max = max(self.w_max, stats.pop("w_max"))
        optional = {"law_objective": terms.law_objective, "law_departure": terms.departure}
        values = {"loss": float(terms.loss.detach()),
                  **{k: float(v.detach()) if v is not None else float("nan") for k, v in optional.items()},
                  **stats, "lesion_frac": float(lesion.float().mean()), "grad_norm": grad_norm,
                  "clipped": float(grad_norm > self.max_grad_norm) if np.isfinite(grad_norm) else float("nan")}
        for k, v in values.items():
            if np.isfinite(v):
                self.sums[k] += v
                self.counts[k] += 1
        self.steps += 1

    def summary(self, ctx: WorkerContext) -> dict[str, float | None]:
        self.flush()
        totals = torch.tensor([self.sums[k] for k in self.KEYS] + [self.counts[k] for k in self.KEYS],
                              dtype=torch.float64, device=ctx.device)
        w_max = torch.tensor([self.w_max], dtype=torch.float64, device=ctx.device)
        if ctx.distributed:
            dist.all_reduce(totals)
            dist.all_reduce(w_max, op=dist.ReduceOp.MAX)
        n = len(self.KEYS)
        out: dict[str, float | None] = {
            k: (float(totals[i] / totals[n + i]) if totals[n + i] > 0 else None) for i, k in enumerate(self.KEYS)}
        out["w_max"] = float(w_max)
        out["sec_per_step"] = (time.perf_counter() - self.tic) / max(self.steps, 1)
        return out


def detached(value: Any) -> Any:
    """A tensor, or a dataclass of tensors (LossTerms), without its autograd graph."""
    if isinstance(value, Tensor):
        return value.detach()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: detached(getattr(value, f.name)) for f in dataclasses.fields(value)
                                 if isinstance(getattr(value, f.name), Tensor)})
    return value


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(tr: Trainer, step: int) -> Path:
    """Rank 0 only; the folder appears complete or not at all."""
    tmp = runs.new_checkpoint(tr.out, runs.LAST)
    tr.denoiser.save_pretrained(tmp / runs.DENOISER)
    tr.denoiser.save_pretrained(tmp / runs.DENOISER_EMA, module=tr.ema.shadow)
    state: dict[str, Any] = {"optimizer": tr.optimizer.state_dict(), "lr_schedule": tr.lr_schedule.state_dict(),
                             "scaler": tr.scaler.state_dict()}
    if tr.law is not None and tr.law_optimizer is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tr.law.state_dict().items()}, tmp / runs.LAW_WEIGHTS)
        (tmp / runs.LAW_CONFIG).write_text(json.dumps(
            {"feature_channels": tr.law.feature_channels, "config": asdict(tr.law.config)}, indent=2))
        state["law_optimizer"] = tr.law_optimizer.state_dict()
    runs.save_state(tmp, state)
    progress: dict[str, Any] = {"step": step, "ema_updates": tr.ema.num_updates, "weighting": tr.cfg.weighting}
    if tr.init_record is not None:
        progress["init_from"] = tr.init_record
    if tr.lesion_labels is not None:
        progress["lesion_labels"] = list(tr.lesion_labels)  # what a resume and `lawder sample` read back
    return runs.commit_checkpoint(tmp, tr.out, runs.LAST, progress)


def restore(tr: Trainer, checkpoint: Path) -> int:
    """Load EMA, LAW and optimiser state into a trainer built from the checkpoint's weights; returns the step."""
    progress = runs.read_progress(checkpoint)
    tr.init_record = progress.get("init_from")  # a resumed fine-tune started where its first part did
    shadow_cls = type(tr.ema.shadow)
    ema_weights = load_saved_module(shadow_cls, checkpoint / runs.DENOISER_EMA / tr.denoiser.trainable_subfolder)
    copy_weights(ema_weights, tr.ema.shadow)
    tr.ema.num_updates = int(progress["ema_updates"])
    state = runs.load_state(checkpoint, map_location=tr.ctx.device)
    if state is None:
        raise DataError(f"the checkpoint in {checkpoint} has no {runs.STATE}.", "Start over with --force.")
    tr.optimizer.load_state_dict(state["optimizer"])
    tr.lr_schedule.load_state_dict(state["lr_schedule"])
    tr.scaler.load_state_dict(state["scaler"])
    if tr.law is not None and tr.law_optimizer is not None:
        if not (checkpoint / runs.LAW_WEIGHTS).exists():
            raise UsageError(f"the checkpoint in {checkpoint} was trained with --weighting "
                             f"{progress.get('weighting')}, not law.", "Resume with the same --weighting.")
        tr.law.load_state_dict(load_file(checkpoint / runs.LAW_WEIGHTS, device=str(tr.ctx.device)))
        if "law_optimizer" in state:
            tr.law_optimizer.load_state_dict(state["law_optimizer"])
    return int(progress["step"])


# ---------------------------------------------------------------- preview


@torch.no_grad()
def weight_maps(tr: Trainer, images: Tensor, masks: Tensor, step: int) -> Tensor:
    """The map the loss would use now, half way along the noise path for a fixed noise draw (what users SEE)."""
    denoiser, cfg = tr.denoiser, tr.cfg
    x0 = denoiser.encode(images)
    g = torch.Generator(device=x0.device).manual_seed(cfg.seed)
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    batch = noised_batch(denoiser.scheduler, denoiser.spec.prediction, x0, noise, level=0.5)
    pred = denoiser(batch.noisy, batch.model_timesteps, denoiser.condition(masks))
    lesion = lesion_at(masks, tuple(pred.shape[-2:]), tr.lesion_labels)  # type: ignore[arg-type]
    if cfg.weighting == "uniform":
        return torch.ones_like(lesion)
    if cfg.weighting == "ratio" or tr.law is None or tr.grabber is None:
        return prior_map(lesion, cfg.law.gamma)
    err = normalised_error(pixel_error(pred, batch.target)) if cfg.law.normalise_error else pixel_error(
        pred, batch.target)
    return tr.law(tr.grabber.take(tuple(pred.shape[-2:])), lesion, batch.model_timesteps, err)  # type: ignore[arg-type]


@torch.no_grad()
def write_preview(tr: Trainer, preview: tuple[Tensor, Tensor], step: int) -> Path:
    """Rank 0: real image, mask, the current weight map, and an EMA sample for the same mask."""
    images, masks = (x.to(tr.ctx.device) for x in preview)
    denoiser = tr.denoiser
    was_training = denoiser.training
    denoiser.eval()
    weights = weight_maps(tr, images, masks, step)
    live = {k: v.clone() for k, v in denoiser.trainable_module().state_dict().items()}
    copy_weights(tr.ema.shadow, denoiser.trainable_module())
    try:
        noise = initial_noise(denoiser.loss_shape(), tr.cfg.seed, range(len(masks))).to(tr.ctx.device)
        samples = denoiser.decode(denoise(denoiser, denoiser.condition(masks), denoiser.null_condition(masks), noise,
                                           scheduler_config=denoiser.scheduler.config,
                                           prediction=denoiser.spec.prediction, steps=tr.cfg.preview_steps))
    finally:
        denoiser.trainable_module().load_state_dict(live)
        denoiser.train(was_training)
    to_np = lambda x: (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()  # noqa: E731
    state = "" if tr.cfg.weighting != "law" or law_active(step, tr.cfg.steps, tr.cfg.law) else " (warm-up: LAW off)"
    title = f"step {step + 1} · weighting {tr.cfg.weighting}{state}"
    return save_weight_preview(tr.out / SAMPLES / f"step_{step + 1:06d}.png", to_np(images),
                               masks.cpu().numpy(), weights[:, 0].cpu().numpy(), to_np(samples),
                               symmetric_range(weights), title)


def symmetric_range(weights: Tensor) -> tuple[float, float]:
    """A colour range centred on 1 on a log scale that holds every weight (the rev-2 map has no fixed bounds)."""
    spread = max(1.5, float(weights.max()), 1 / max(float(weights.min()), 1e-3))
    return 1 / spread, spread


def preview_batch(cfg: DiffusionTrainConfig) -> tuple[Tensor, Tensor]:
    fixed = SegDataset(cfg.data, split=cfg.split, size=cfg.size)
    items = [fixed[i] for i in range(min(cfg.preview_count, len(fixed)))]
    return torch.stack([im for im, _ in items]), torch.stack([m for _, m in items])


# ---------------------------------------------------------------- the loop


def due(done: int, every: int, total: int) -> bool:
    return done == total or (every > 0 and done % every == 0)


def train_diffusion(cfg: DiffusionTrainConfig, report: Reporter = no_report) -> dict[str, Any]:
    """Train one mask-conditioned denoiser with the chosen weighting; returns the final metrics.

    Every rank calls `report(record)` at each log or save step; rank 0 writes the run folder, and its records
    carry `checkpoint` (the folder) on steps that saved one and `preview` (the PNG) on preview steps.
    """
    ctx = worker_context()
    out = Path(cfg.out)
    if not cfg.data:
        raise UsageError("no training data given.", "Pass --data FILE.h5 (see `lawder prepare`).")
    dataset = SegDataset(cfg.data, split=cfg.split, size=cfg.size, seed=cfg.seed + ctx.rank)
    if len(dataset) == 0:
        raise DataError(f"{cfg.data} has no samples in split {cfg.split!r}.", "Check --split, or prepare the data.")
    checkpoint = runs.find_checkpoint(out)
    if checkpoint is not None and not cfg.resume:
        raise UsageError(f"{out} already holds a checkpoint.",
                         "Pass --resume to continue it, or choose another --out.")
    lesion = run_lesion_labels(cfg, dataset.info.label_names)
    tr, start = build_trainer(cfg, ctx, denoiser_spec(cfg, dataset), checkpoint if cfg.resume else None, lesion)
    if ctx.is_main:
        log.info("LAW lesion labels: %s", "+".join(dataset.info.label_names[k] for k in lesion))
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, to_dict(replace(cfg, resume=False)))
        runs.trim_metrics(out, "step", start)
    preview = preview_batch(cfg) if ctx.is_main and cfg.sample_every > 0 else None
    result: dict[str, Any] = {"step": start, "out": str(out)}
    window = Window(cfg.max_grad_norm)
    data = batches(dataset, ctx, cfg, start)
    tr.model.train()
    for step in range(start, cfg.steps):
        images, masks = (x.to(ctx.device, non_blocking=True) for x in next(data))  # once: the step and the log
        terms, grad_norm = training_step(tr, images, masks, step)
        map_size = terms.weights.shape[-2:] if terms.weights is not None else masks.shape[-2:]
        window.add(terms, lesion_at(masks.to(ctx.device), tuple(map_size), tr.lesion_labels), grad_norm)
        done = step + 1
        saved = due(done, cfg.save_every, cfg.steps)
        if not (saved or due(done, cfg.log_every, cfg.steps)):
            continue
        window.check_finite(done)
        record: dict[str, Any] = {"step": done, **window.summary(ctx), "lr": tr.lr_schedule.get_last_lr()[0],
                                  "law_active": tr.law is not None and law_active(step, cfg.steps, cfg.law)}
        if ctx.is_main:
            if saved:
                record["checkpoint"] = str(save_checkpoint(tr, done))
            if preview is not None and due(done, cfg.sample_every, cfg.steps):
                record["preview"] = str(write_preview(tr, preview, step))
            runs.append_metrics(out, record)
            log.info("step %d: loss %.4f", done, record["loss"] or float("nan"))
        barrier(ctx)
        report(record)
        result = record
        window = Window(cfg.max_grad_norm)  # after saving and previews: their time is not training time
    if tr.grabber is not None:
        tr.grabber.remove()
    return {**result, "out": str(out)}


# ---------------------------------------------------------------- driver side (no workers yet)


def latest_preview(out: Path) -> str | None:
    previews = sorted((out / SAMPLES).glob("step_*.png"))
    return str(previews[-1]) if previews else None


def recorded_lesion_labels(checkpoint: Path) -> list[int] | None:
    """The lesion labels a checkpoint trained with (None: from before --lesion-labels, every label > 0)."""
    return runs.read_progress(checkpoint).get("lesion_labels")


def summarise_law_run(out: str | Path) -> dict[str, Any]:
    """Final step, last loss, LAW's weight statistics (law_departure included), where the denoiser started,
    the checkpoint and the newest preview grid."""
    out = Path(out)
    records = runs.read_metrics(out)
    last = records[-1] if records else {}
    checkpoint = runs.find_checkpoint(out)
    config = runs.config_path(out)
    weighting = build_config(DiffusionTrainConfig, config).weighting if config is not None else None
    return {
        "out": str(out),
        "weighting": weighting,
        "step": int(last.get("step", 0)),
        "loss": last.get("loss"),
        "law": {k: last.get(k) for k in LAW_STATS},
        "lesion_labels": recorded_lesion_labels(checkpoint) if checkpoint is not None else None,
        "init_from": runs.read_progress(checkpoint).get("init_from") if checkpoint is not None else None,
        "grad_norm": last.get("grad_norm"),
        "clipped": last.get("clipped"),
        "sec_per_step": last.get("sec_per_step"),
        "checkpoint": str(checkpoint) if checkpoint is not None else None,
        "checkpoint_step": runs.read_progress(checkpoint)["step"] if checkpoint is not None else None,
        "preview": latest_preview(out),
        "metrics": str(out / runs.METRICS),
    }
