"""What ORDER's adapter changes on a frozen trunk: each two-stage run of `bench_order_folds.py` against the T run it
started from, image by image on one split.

The fold comparison says whether two-stage ORDER scores better than its trunk. When it does not, this says why: a
dead adapter (its zero-initialised output still zero, nothing changes) or a live one whose changes cancel out. Per
fold it reports
- whether the trunk is bit-identical to T's (every non-adapter tensor, BatchNorm statistics included);
- the norms of the adapter's output projections (`to_out`, zero at the start);
- on the split's images: the mean |Δ logit| against T's mean |logit|, the share of pixels whose prediction flips,
  split into flips that make the pixel right and flips that make it wrong (against the reference mask), and the
  per-image mean Dice of both models (foreground against background; an image empty in both scores 1).

Usage (after, or beside, the fold comparison; one thread is enough):
    python benchmarks/order_adapter_effect.py --work WORK --data WORK/kvasir-128.h5   # WORK: bench_order_folds' --work
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lawder_core import runs
from lawder_core.data.dataset import SegDataset
from lawder_core.files import write_json
from lawder_core.metrics.dice import dice_iou
from lawder_core.models.factory import load_segmenter
from lawder_core.models.inference import logits_to_labels
from lawder_core.models.order import is_adapter_parameter

TRUNK_ARM, TWO_STAGE_ARM = "t", "order-2stage"


def run_pair(work: Path, fold: int) -> tuple[Path, Path]:
    """(T's checkpoint, the two-stage run's last checkpoint) of one fold: the two-stage run starts from T's last/."""
    return work / "runs" / TRUNK_ARM / f"fold{fold}" / "last", work / "runs" / TWO_STAGE_ARM / f"fold{fold}" / "last"


def finished_folds(work: Path) -> list[int]:
    folds = sorted(int(p.name.removeprefix("fold")) for p in (work / "runs" / TWO_STAGE_ARM).glob("fold*"))
    return [k for k in folds if all((c / "model.safetensors").exists() for c in run_pair(work, k))]


def trunk_identical(trunk: dict[str, torch.Tensor], order: dict[str, torch.Tensor]) -> bool:
    kept = {k: v for k, v in order.items() if not is_adapter_parameter(k)}
    return kept.keys() == trunk.keys() and all(torch.equal(trunk[k], kept[k]) for k in trunk)


def logits(model: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def foreground(scores: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) logits → (B, H, W) bool: any class but background, as `lawder predict` labels the pixels."""
    return logits_to_labels(scores, tuple(scores.shape[-2:])) > 0


def mean_dice(prediction: torch.Tensor, reference: torch.Tensor) -> float:
    tp = (prediction & reference).sum((1, 2))
    fp = (prediction & ~reference).sum((1, 2))
    fn = (~prediction & reference).sum((1, 2))
    return float(np.mean([dice_iou(int(a), int(b), int(c))[0] for a, b, c in zip(tp, fp, fn, strict=True)]))


def adapter_effect(trunk_checkpoint: Path, order_checkpoint: Path, images: torch.Tensor,
                   masks: torch.Tensor) -> dict[str, Any]:
    trunk, order = load_segmenter(trunk_checkpoint).eval(), load_segmenter(order_checkpoint).eval()
    weights = order.state_dict()
    return {"trunk": str(trunk_checkpoint), "order": str(order_checkpoint),
            "trunk_identical": trunk_identical(trunk.state_dict(), weights),
            "to_out_norms": [round(float(v.norm()), 4) for k, v in weights.items() if k.endswith("to_out.weight")],
            "images": len(images), **prediction_change(logits(trunk, images), logits(order, images), masks)}


def prediction_change(before: torch.Tensor, after: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
    """How the logits and the foreground prediction move from `before` to `after`, against the reference masks."""
    pb, pa, reference = foreground(before), foreground(after), masks > 0
    flipped = pb != pa
    return {"mean_abs_delta_logit": float((after - before).abs().mean()),
            "mean_abs_logit_trunk": float(before.abs().mean()), "flipped": float(flipped.float().mean()),
            "flipped_to_right": float((flipped & (pa == reference)).float().mean()),
            "flipped_to_wrong": float((flipped & (pa != reference)).float().mean()),
            "dice_trunk": mean_dice(pb, reference), "dice_order": mean_dice(pa, reference)}


def split_tensors(data: Path, split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = SegDataset(data, split=split, size=size)
    pairs = [dataset[i] for i in range(len(dataset))]
    return torch.stack([image for image, _ in pairs]), torch.stack([mask for _, mask in pairs])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="bench_order_folds.py's work folder.")
    parser.add_argument("--data", type=Path, required=True, help="The prepared HDF5 file the runs trained on.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--size", type=int, help="Default: the size the T runs trained at.")
    parser.add_argument("--folds", type=int, nargs="*", help="Default: every fold whose two runs are finished.")
    parser.add_argument("--out", type=Path, help="Default: WORK/order_adapter_effect.SPLIT.json.")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folds = args.folds if args.folds else finished_folds(args.work)
    if not folds:
        parser.error(f"no fold of {args.work} has both a finished {TRUNK_ARM} and {TWO_STAGE_ARM} run")
    size = args.size or int(runs.read_config(run_pair(args.work, folds[0])[0].parent)["size"])
    images, masks = split_tensors(args.data, args.split, size)
    result = {"split": args.split, "size": size, "data": str(args.data),
              "folds": {str(k): adapter_effect(*run_pair(args.work, k), images, masks) for k in folds}}
    for fold, row in result["folds"].items():
        print(f"fold {fold}: trunk identical {row['trunk_identical']}; mean |Δ logit| {row['mean_abs_delta_logit']:.3f}"
              f" (|logit| {row['mean_abs_logit_trunk']:.2f}); flipped {row['flipped']:.2%} (to right "
              f"{row['flipped_to_right']:.2%}, to wrong {row['flipped_to_wrong']:.2%}); Dice T {row['dice_trunk']:.4f}"
              f", two-stage {row['dice_order']:.4f}")
    write_json(args.out or args.work / f"order_adapter_effect.{args.split}.json", result)
    return result


if __name__ == "__main__":
    main()
