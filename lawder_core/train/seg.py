"""Segmenter training: one plain-PyTorch loop per worker, for every model the factory builds.

The label map (`data/labels.py`, `--labels`) turns the stored labels into classes: one foreground class gives a
binary segmenter (polyps), several a multi-class one (KiTS: kidney, tumour, cyst); the map is saved with every
checkpoint. Rank 0 validates, keeps `best/` (highest validation Dice) and `last/`
(with optimiser and scheduler state for --resume), and appends one JSON line per epoch to metrics.jsonl.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from lawder_core import runs
from lawder_core.config import to_dict
from lawder_core.data.dataset import SegDataset, to_model_input, with_synthetic
from lawder_core.data.h5 import read_info
from lawder_core.data.labels import LabelMap, label_map
from lawder_core.errors import DataError
from lawder_core.models.factory import build_segmenter, load_segmenter, save_segmenter
from lawder_core.train.configs import SegTrainConfig
from lawder_core.train.losses import segmentation_loss
from lawder_core.train.plots import plot_curves
from lawder_core.train.runtime import (
    Reporter,
    WorkerContext,
    barrier,
    check_finite,
    mean_across_workers,
    no_report,
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


def build_loaders(cfg: SegTrainConfig, ctx: WorkerContext) -> tuple[DataLoader, DataLoader, Any]:
    # uint8 batches: a quarter of the bytes through loader workers and to the GPU (converted on the device)
    real = SegDataset(cfg.data, "train", size=cfg.size, augment=cfg.augment, seed=cfg.seed + ctx.rank, raw=True)
    train_set = with_synthetic(real, cfg.synthetic, cfg.synthetic_ratio, cfg.size, cfg.augment, cfg.seed)
    val_set = SegDataset(cfg.data, "val", size=cfg.size, raw=True)
    if len(train_set) == 0:
        raise DataError(f"{cfg.data} has no training samples.", "Check the split with `lawder inspect`.")
    if len(val_set) == 0:
        val_set = SegDataset(cfg.data, "train", size=cfg.size, raw=True)
        log.warning("%s has no validation split; validating on the training split", cfg.data)
    sampler = train_sampler(train_set, ctx, cfg.seed)
    pin = ctx.device.type == "cuda"
    train_loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, drop_last=len(train_set) >
                              cfg.batch_size * ctx.world_size, num_workers=cfg.loader_workers, pin_memory=pin)
    val_loader = DataLoader(val_set, batch_size=cfg.batch_size, num_workers=cfg.loader_workers, pin_memory=pin)
    return train_loader, val_loader, sampler


def restore(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[int, float]:
    """Load `last/` into model, optimiser and scheduler; returns (next epoch, best Dice so far)."""
    checkpoint = runs.find_checkpoint(out, runs.LAST)
    state = runs.load_state(checkpoint) if checkpoint is not None else None
    if checkpoint is None or state is None:
        return 0, -1.0
    model.load_state_dict(load_segmenter(checkpoint).state_dict())
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]) + 1, float(state["best_dice"])


def train_one_epoch(model, loader, optimizer, scheduler, cfg: SegTrainConfig, ctx: WorkerContext,
                    aux_weight: float, epoch: int, lookup: torch.Tensor) -> float:
    total, steps = 0.0, 0
    use_amp = cfg.amp and ctx.device.type == "cuda"
    for step, (image, mask) in enumerate(loader):
        if cfg.max_steps_per_epoch is not None and step >= cfg.max_steps_per_epoch:
            break
        image, mask = to_model_input(image, mask, ctx.device)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
            logits, aux = model(image, return_aux=True)
        target = model_target(class_target(mask, lookup), logits.shape[1])
        loss = segmentation_loss(logits.float(), [a.float() for a in aux], target, aux_weight)
        check_finite(loss, epoch * len(loader) + step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach())
        steps += 1
    scheduler.step()
    return total / max(steps, 1)


def train_segmenter(cfg: SegTrainConfig, report: Reporter = no_report) -> dict[str, Any]:
    """Train one segmenter; callable directly, from a Ray Train worker or from a Ray Tune trial."""
    ctx = worker_context()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    train_loader, val_loader, sampler = build_loaders(cfg, ctx)
    channels = train_loader.dataset[0][0].shape[0]
    labels = run_label_map(cfg)
    lookup = torch.from_numpy(labels.class_lookup())
    model = build_segmenter(cfg.model, num_classes=labels.outputs, in_channels=channels,
                            encoder_weights=cfg.encoder_weights, order=cfg.order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(cfg.epochs, 1))
    start, best = restore(out, model, optimizer, scheduler) if cfg.resume else (0, -1.0)
    model = wrap_model(model, ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        runs.write_config(out, to_dict(replace(cfg, resume=False)))
    result: dict[str, Any] = {"best_dice": best, "epochs": start}
    for epoch in range(start, cfg.epochs):
        set_sampler_epoch(sampler, epoch, cfg.seed)
        tic = time.perf_counter()
        loss = train_one_epoch(model, train_loader, optimizer, scheduler, cfg, ctx, cfg.order.aux_weight, epoch,
                               lookup)
        loss = mean_across_workers(loss, ctx)
        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss, "lr": scheduler.get_last_lr()[0]}
        if ctx.is_main:
            plain = unwrap_model(model)
            dice = validate(plain, val_loader, lookup, ctx.device)
            best = save_epoch(out, plain, optimizer, scheduler, cfg, epoch, dice, best, labels)
            metrics.update(val_dice=dice, best_dice=best, seconds=time.perf_counter() - tic)
            runs.append_metrics(out, metrics)
            plot_curves(out / runs.METRICS, out / "curves.png", ["train_loss", "val_dice"])
            log.info("epoch %d: loss %.4f val Dice %.4f (best %.4f)", epoch, loss, dice, best)
        report(metrics)
        result = {"best_dice": best, "epochs": epoch + 1}
        barrier(ctx)
    return {**result, "out": str(out)}


def save_epoch(out: Path, model: torch.nn.Module, optimizer, scheduler, cfg: SegTrainConfig, epoch: int,
               dice: float, best: float, labels: LabelMap) -> float:
    extra = {"epoch": epoch, "val_dice": dice, "train_config": to_dict(cfg), "label_map": labels.to_dict()}
    if dice > best:
        best = dice
        tmp = runs.new_checkpoint(out, runs.BEST)
        save_segmenter(model, tmp, extra=extra)
        runs.commit_checkpoint(tmp, out, runs.BEST, {"epoch": epoch, "val_dice": dice})
    # last/ is committed after best/, so a run killed in between resumes without losing the best checkpoint.
    tmp = runs.new_checkpoint(out, runs.LAST)
    save_segmenter(model, tmp, extra=extra)
    runs.save_state(tmp, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "epoch": epoch, "best_dice": best})
    runs.commit_checkpoint(tmp, out, runs.LAST, {"epoch": epoch, "val_dice": dice, "best_dice": best})
    return best


# ---------------------------------------------------------------- driver side (no workers yet)


def summarise_run(out: str | Path) -> dict[str, Any]:
    records = runs.read_metrics(out)
    if not records:
        return {"out": str(out), "epochs": 0, "best_dice": None, "best_epoch": None}
    best = max(records, key=lambda r: r.get("val_dice", -1))
    return {"out": str(out), "epochs": records[-1]["epoch"] + 1, "best_dice": best.get("val_dice"),
            "best_epoch": best["epoch"], "last": records[-1]}
