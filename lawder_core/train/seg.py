"""Segmenter training: one plain-PyTorch loop per worker, for every model the factory builds.

The label map (`data/labels.py`, `--labels`) turns the stored labels into classes: one foreground class gives a
binary segmenter (polyps), several a multi-class one (KiTS: kidney, tumour, cyst); the map is saved with every
checkpoint. Rank 0 validates, keeps `best/` (highest validation Dice) and `last/`
(with optimiser and scheduler state for --resume), and appends one JSON line per epoch to metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lawder_core import runs
from lawder_core.config import to_dict
from lawder_core.data.dataset import SegDataset, set_dataset_epoch, to_model_input, with_synthetic
from lawder_core.data.device_batches import DeviceBatches, supports
from lawder_core.data.h5 import read_info
from lawder_core.data.labels import LabelMap, label_map
from lawder_core.errors import DataError
from lawder_core.models.factory import build_segmenter, load_segmenter, save_segmenter
from lawder_core.models.order import is_adapter_parameter
from lawder_core.train.amp import Precision, precision
from lawder_core.train.configs import SegTrainConfig, training_indices, validation_indices, worker_batch_size
from lawder_core.train.losses import boundary_kernel, segmentation_loss
from lawder_core.train.plots import plot_curves
from lawder_core.train.runtime import (
    Reporter,
    WorkerContext,
    barrier,
    check_finite,
    mean_across_workers,
    no_report,
    optimizer_options,
    set_sampler_epoch,
    train_sampler,
    unwrap_model,
    worker_context,
    wrap_model,
)

log = logging.getLogger(__name__)


def class_target(mask: torch.Tensor, lookup: torch.Tensor) -> torch.Tensor:
    """(B,H,W) stored labels -> (B,H,W) int64 class indices through the label map's table."""
    return lookup.to(mask.device)[mask.long()].long()


def model_target(classes: torch.Tensor, outputs: int) -> torch.Tensor:
    """What the loss takes: a (B,1,H,W) float mask for a binary model, the class indices otherwise."""
    return (classes > 0).float().unsqueeze(1) if outputs == 1 else classes


def dice_per_image(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean Dice over the foreground classes, per image; a class empty in both target and prediction scores 1.

    One channel: sigmoid > 0.5 against classes > 0; several: argmax against the class indices.
    """
    if classes.dim() == 4:  # a binary (B,1,H,W) mask
        classes = classes[:, 0].long()
    if logits.shape[1] == 1:
        pred, count = (logits[:, 0] > 0).long(), 2
    else:
        pred, count = logits.argmax(dim=1), logits.shape[1]
    scores = []
    for k in range(1, count):
        p, t = pred == k, classes == k
        inter = (p & t).sum(dim=(1, 2)).float()
        total = (p.sum(dim=(1, 2)) + t.sum(dim=(1, 2))).float()
        scores.append(torch.where(total > 0, 2 * inter / total.clamp_min(1e-9), torch.ones_like(total)))
    return torch.stack(scores).mean(dim=0)


@torch.no_grad()
def validate(model: torch.nn.Module, loader: DataLoader, lookup: torch.Tensor, device: torch.device) -> float:
    model.eval()
    scores = []
    for batch in loader:
        image, mask = to_model_input(*batch, device)
        scores.append(dice_per_image(model(image).float(), class_target(mask, lookup)))
    model.train()
    return float(torch.cat(scores).mean()) if scores else float("nan")


def run_label_map(cfg: SegTrainConfig) -> LabelMap:
    """The classes this run learns, from the data set's label names and --labels."""
    return label_map(read_info(cfg.data).label_names, cfg.labels)


def build_loaders(cfg: SegTrainConfig, ctx: WorkerContext) -> tuple[DataLoader | DeviceBatches, DataLoader, Any]:
    """Training batches from `DeviceBatches` (gathered and augmented whole, on the training device) when the
    training set is held in memory, else from a DataLoader; validation batches from a DataLoader."""
    # uint8 batches: a quarter of the bytes through loader workers and to the GPU (converted on the device)
    real = SegDataset(cfg.data, "train", size=cfg.size, augment=cfg.augment, seed=cfg.seed + ctx.rank, raw=True,
                      indices=training_indices(cfg))
    train_set = with_synthetic(real, cfg.synthetic, cfg.synthetic_ratio, cfg.size, cfg.augment, cfg.seed)
    val_set = SegDataset(cfg.data, "val", size=cfg.size, raw=True, indices=validation_indices(cfg))
    if len(train_set) == 0:
        raise DataError(f"{cfg.data} has no training samples.", "Check the split with `lawder inspect`.")
    if len(val_set) == 0:
        val_set = SegDataset(cfg.data, "train", size=cfg.size, raw=True)
        log.warning("%s has no validation split; validating on the training split", cfg.data)
    sampler = train_sampler(train_set, ctx, cfg.seed)
    pin = ctx.device.type == "cuda"
    batch = worker_batch_size(cfg.batch_size, ctx.world_size)  # --batch-size is the global batch
    drop_last = len(train_set) > cfg.batch_size
    train_loader: DataLoader | DeviceBatches
    if supports(train_set):
        train_loader = DeviceBatches(train_set, sampler, batch, drop_last, ctx.device)
    else:
        train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler, drop_last=drop_last,
                                  num_workers=cfg.loader_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=batch, num_workers=cfg.loader_workers, pin_memory=pin)
    return train_loader, val_loader, sampler


@dataclass(frozen=True)
class Budget:
    """How long a run trains: `epochs` epochs of at most `per_epoch` optimiser steps, `total` steps in all."""

    epochs: int
    per_epoch: int
    total: int

    def steps_in(self, epoch: int) -> int:
        return max(0, min(self.per_epoch, self.total - epoch * self.per_epoch))


def training_budget(cfg: SegTrainConfig, loader: DataLoader) -> Budget:
    """--steps fixes the optimiser steps (the epochs follow, the last one cut short); else --epochs does."""
    per_epoch = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
    per_epoch = max(per_epoch, 1)
    if cfg.steps is None:
        return Budget(cfg.epochs, per_epoch, cfg.epochs * per_epoch)
    return Budget(math.ceil(cfg.steps / per_epoch), per_epoch, cfg.steps)


def restore(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler,
            scaler: torch.amp.GradScaler | None = None) -> tuple[int, float]:
    """Load `last/` into model, optimiser, scheduler (and fp16 grad scaler); returns (next epoch, best Dice so far).

    The model must already be on its device: the optimiser's state is loaded onto its parameters' devices.
    """
    checkpoint = runs.find_checkpoint(out, runs.LAST)
    state = runs.load_state(checkpoint) if checkpoint is not None else None
    if checkpoint is None or state is None:
        return 0, -1.0
    model.load_state_dict(load_segmenter(checkpoint).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    if "lr_lambdas" in state["scheduler"]:
        scheduler.load_state_dict(state["scheduler"])
    else:  # a checkpoint from the per-epoch CosineAnnealingLR: the same curve, continued at its epoch
        scheduler.last_epoch = int(state["scheduler"]["last_epoch"])
        for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas, strict=True):
            group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)
    if scaler is not None and scaler.is_enabled() and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return int(state["epoch"]) + 1, float(state["best_dice"])


def aux_loss_weights(model: torch.nn.Module, count: int, cfg: SegTrainConfig) -> list[float]:
    """MK-UNet's deep-supervision heads get `deep_supervision` in every model; ORDER's region heads (after them)
    get `order.aux_weight`."""
    heads = getattr(model, "deep_supervision_heads", 0)
    return [cfg.deep_supervision] * min(heads, count) + [cfg.order.aux_weight] * max(0, count - heads)


def train_one_epoch(model, loader, optimizer, cfg: SegTrainConfig, ctx: WorkerContext, epoch: int,
                    lookup: torch.Tensor, steps: int, kernel: int, amp: Precision | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> float:
    """`steps` optimiser steps over `loader`; returns the mean loss (accumulated on the device: no host sync
    per step; a non-finite loss is caught once per epoch, before the checkpoint is written).

    `amp` is the autocast type (default: the run's, for this device); an fp16 run's `scaler` scales the loss."""
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    done = 0
    amp = amp if amp is not None else precision(ctx.device, cfg.amp, cfg.amp_dtype)
    scaler = scaler if scaler is not None else amp.grad_scaler()
    weights: list[float] | None = None
    train_mode(model, cfg)
    for step, (image, mask) in enumerate(loader):
        if step >= steps:
            break
        image, mask = to_model_input(image, mask, ctx.device)
        with torch.autocast(device_type=ctx.device.type, dtype=amp.dtype, enabled=amp.enabled):
            logits, aux = model(image, return_aux=True)
        if weights is None:
            weights = aux_loss_weights(unwrap_model(model), len(aux), cfg)
        target = model_target(class_target(mask, lookup), logits.shape[1])
        loss = segmentation_loss(logits.float(), [a.float() for a in aux], target, weights, kernel)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += loss.detach()
        done += 1
    mean = total / max(done, 1)
    check_finite(mean, epoch * steps + done)
    return float(mean)


def train_mode(model: torch.nn.Module, cfg: SegTrainConfig) -> None:
    """Training mode, except a frozen trunk: its BatchNorm keeps the statistics of the run it came from."""
    model.train()
    if cfg.freeze_trunk:
        for name, module in unwrap_model(model).named_modules():
            if name and not is_adapter_parameter(name + "."):
                module.eval()


def build_optimizer(model: torch.nn.Module, cfg: SegTrainConfig, epochs: int
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a per-epoch cosine decay. ORDER's adapter has its own group, reached by a linear warm-up (its
    attention should not learn at full rate while its queries and keys are still random), at a lower lr when the
    trunk trains with it; with a frozen trunk it is the only group, at the run's lr."""
    trunk, adapter = [], []
    for name, param in model.named_parameters():
        (adapter if is_adapter_parameter(name) else trunk).append(param)
    if cfg.freeze_trunk:
        for param in trunk:
            param.requires_grad_(False)
    groups: list[dict[str, Any]] = []
    if trunk and not cfg.freeze_trunk:
        groups.append({"params": trunk, "lr": cfg.lr})
    if adapter:
        scale = 1.0 if cfg.freeze_trunk else cfg.adapter_lr_scale
        groups.append({"params": adapter, "lr": cfg.lr * scale, "adapter": True})
    device = next(model.parameters()).device  # the model is on its device before its optimiser exists
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, **optimizer_options(device))

    def cosine(epoch: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / max(epochs, 1)))

    def warm(epoch: int) -> float:
        return cosine(epoch) * min(1.0, (epoch + 1) / (cfg.adapter_warmup_epochs + 1))

    lambdas = [warm if group.get("adapter") else cosine for group in groups]
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def start_from(model: torch.nn.Module, run: str) -> dict[str, Any]:
    """Load the selected checkpoint of `run` into `model`: every tensor of the source must fit, and only ORDER's
    own parameters may be missing (they keep their zero-initialised start, so the model starts as the source)."""
    folder = runs.segmenter_checkpoint(run)
    state = load_segmenter(folder).state_dict()
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    missing = sorted(k for k in set(own) - set(state) if not is_adapter_parameter(k))
    misfit = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if unexpected or missing or misfit:
        first = (unexpected or missing or misfit)[0]
        raise DataError(f"--init-from {run}: its weights do not fit {type(model).__name__} "
                        f"({len(unexpected)} unexpected, {len(missing)} missing, {len(misfit)} of another shape; "
                        f"e.g. {first}).",
                        "Start ORDER from an MK-UNet run of the same width and classes (mkunet-t-order from "
                        "mkunet-t).")
    model.load_state_dict(state, strict=False)
    return {"run": str(run), "checkpoint": str(folder), "tensors": len(state)}


def train_segmenter(cfg: SegTrainConfig, report: Reporter = no_report) -> dict[str, Any]:
    """Train one segmenter; callable directly, from a Ray Train worker or from a Ray Tune trial."""
    ctx = worker_context()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    train_loader, val_loader, sampler = build_loaders(cfg, ctx)
    budget = training_budget(cfg, train_loader)
    channels = train_loader.dataset[0][0].shape[0]
    labels = run_label_map(cfg)
    lookup = torch.from_numpy(labels.class_lookup()).to(ctx.device)
    model = build_segmenter(cfg.model, num_classes=labels.outputs, in_channels=channels,
                            encoder_weights=cfg.encoder_weights, order=cfg.order)
    started = start_from(model, cfg.init_from) if cfg.init_from else None
    if started is not None:
        log.info("started from %s (%d tensors)", started["checkpoint"], started["tensors"])
    # On its device before the optimiser exists: restored optimiser state lands on the parameters' device.
    model = model.to(ctx.device)
    optimizer, scheduler = build_optimizer(model, cfg, budget.epochs)
    amp = precision(ctx.device, cfg.amp, cfg.amp_dtype)
    scaler = amp.grad_scaler()
    start, best = restore(out, model, optimizer, scheduler, scaler) if cfg.resume else (0, -1.0)
    model = wrap_model(model, ctx)
    kernel = boundary_kernel(cfg.size)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, to_dict(replace(cfg, resume=False)))
        log.info("budget: %d epochs, %d optimiser steps (%d per epoch); structure-loss window %d px",
                 budget.epochs, budget.total, budget.per_epoch, kernel)
        if started is not None and start == 0:
            best = evaluate_start(out, unwrap_model(model), val_loader, lookup, ctx, cfg, labels)
    result: dict[str, Any] = {"best_dice": best, "epochs": start}
    for epoch in range(start, budget.epochs):
        set_sampler_epoch(sampler, epoch, cfg.seed)
        set_dataset_epoch(train_loader.dataset, epoch)
        tic = time.perf_counter()
        steps = budget.steps_in(epoch)
        loss = train_one_epoch(model, train_loader, optimizer, cfg, ctx, epoch, lookup, steps, kernel, amp, scaler)
        scheduler.step()
        loss = mean_across_workers(loss, ctx)
        done = min(budget.total, (epoch + 1) * budget.per_epoch)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": scheduler.get_last_lr()[0],
                                   "steps": done}
        if ctx.is_main:
            plain = unwrap_model(model)
            dice = validate(plain, val_loader, lookup, ctx.device)
            best = save_epoch(out, plain, optimizer, scheduler, cfg, epoch, dice, best, labels, scaler)
            metrics.update(val_dice=dice, best_dice=best, seconds=time.perf_counter() - tic)
            runs.append_metrics(out, metrics)
            plot_curves(out / runs.METRICS, out / "curves.png", ["train_loss", "val_dice"])
            log.info("epoch %d: loss %.4f val Dice %.4f (best %.4f)", epoch, loss, dice, best)
        report(metrics)
        result = {"best_dice": best, "epochs": epoch + 1}
        barrier(ctx)
    return {**result, "out": str(out)}


START_EPOCH = -1  # metrics.jsonl's record of a started-from model, scored before any step


def evaluate_start(out: Path, model: torch.nn.Module, val_loader: DataLoader, lookup: torch.Tensor,
                   ctx: WorkerContext, cfg: SegTrainConfig, labels: LabelMap) -> float:
    """Score the --init-from model before any step and keep it as best/: a run can then only select a model
    that beats where it started."""
    dice = validate(model, val_loader, lookup, ctx.device)
    extra = {"epoch": START_EPOCH, "val_dice": dice, "train_config": to_dict(cfg), "label_map": labels.to_dict()}
    tmp = runs.new_checkpoint(out, runs.BEST)
    save_segmenter(model, tmp, extra=extra)
    runs.commit_checkpoint(tmp, out, runs.BEST, {"epoch": START_EPOCH, "val_dice": dice})
    runs.append_metrics(out, {"epoch": START_EPOCH, "val_dice": dice, "best_dice": dice, "steps": 0,
                              "started_from": str(runs.segmenter_checkpoint(cfg.init_from))})
    log.info("start (from %s): val Dice %.4f", cfg.init_from, dice)
    return dice


def save_epoch(out: Path, model: torch.nn.Module, optimizer, scheduler, cfg: SegTrainConfig, epoch: int,
               dice: float, best: float, labels: LabelMap, scaler: torch.amp.GradScaler | None = None) -> float:
    extra = {"epoch": epoch, "val_dice": dice, "train_config": to_dict(cfg), "label_map": labels.to_dict()}
    if dice > best:
        best = dice
        tmp = runs.new_checkpoint(out, runs.BEST)
        save_segmenter(model, tmp, extra=extra)
        runs.commit_checkpoint(tmp, out, runs.BEST, {"epoch": epoch, "val_dice": dice})
    # last/ is committed after best/, so a run killed in between resumes without losing the best checkpoint.
    tmp = runs.new_checkpoint(out, runs.LAST)
    save_segmenter(model, tmp, extra=extra)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
             "best_dice": best}
    if scaler is not None and scaler.is_enabled():  # fp16: the loss scale it has found continues on --resume
        state["scaler"] = scaler.state_dict()
    runs.save_state(tmp, state)
    runs.commit_checkpoint(tmp, out, runs.LAST, {"epoch": epoch, "val_dice": dice, "best_dice": best})
    return best


# ---------------------------------------------------------------- driver side (no workers yet)


def summarise_run(out: str | Path) -> dict[str, Any]:
    """best_epoch -1 means the --init-from model itself was never beaten."""
    records = runs.read_metrics(out)
    config = runs.read_config(out) if runs.config_path(out) else {}
    start = next((r for r in records if r.get("epoch") == START_EPOCH), {})
    common = {"out": str(out), "select": config.get("select", runs.BEST), "folds": config.get("folds"),
              "fold": config.get("fold"), "started_from": start.get("started_from"),
              "start_dice": start.get("val_dice")}
    if not records:
        return {**common, "epochs": 0, "steps": 0, "best_dice": None, "best_epoch": None}
    best = max(records, key=lambda r: r.get("val_dice", -1))
    return {**common, "epochs": records[-1]["epoch"] + 1, "steps": records[-1].get("steps"),
            "best_dice": best.get("val_dice"), "best_epoch": best["epoch"], "last": records[-1]}
