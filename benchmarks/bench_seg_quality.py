"""Test Dice of mkunet-t, mkunet-t-order, mkunet-base and unet-r34 on Kvasir-SEG: same recipe, several seeds.

Every model gets the same data (prepared at --size), epochs, batch size, learning rate, augmentation and
seeds; the best-validation-Dice checkpoint is scored on the test split (per-image Dice at 0.5, empty masks
scoring 1 when both are empty). Results are appended run by run, so an interrupted benchmark keeps what it
finished and `--resume` skips those runs.

Usage: python benchmarks/bench_seg_quality.py [--data ../shared/data/kvasir-seg-256] [--size 128] [--epochs 8]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_folder import prepare_folder
from lawder_core.evaluate import dice_for_run
from lawder_core.train.seg import SegTrainConfig, train_segmenter

MODELS = ("mkunet-t", "mkunet-t-order", "mkunet-base", "unet-r34")


def prepared(data: Path, size: int, work: Path) -> Path:
    out = work / f"kvasir-{size}.h5"
    if not out.exists():
        prepare_folder("kvasir", data, out, PrepareOptions(size=size, seed=0))
    return out


def one_run(h5: Path, model: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    run = work / "runs" / f"{model}-s{seed}"
    cfg = SegTrainConfig(data=str(h5), out=str(run), model=model, size=args.size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=seed, resume=(run / "last").exists())
    tic = time.perf_counter()
    train_segmenter(cfg)
    seconds = time.perf_counter() - tic
    report, _ = dice_for_run(run, h5, "test")
    return {"model": model, "seed": seed, "test_dice": report.foreground_mean["Dice"],
            "test_iou": report.foreground_mean["IoU"], "train_seconds": round(seconds, 1)}


def summarise(rows: list[dict]) -> dict:
    table = {}
    for model in MODELS:
        dice = [r["test_dice"] for r in rows if r["model"] == model]
        if dice:
            table[model] = {"mean": statistics.mean(dice), "sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                            "seeds": len(dice)}
    if "mkunet-t" in table and "mkunet-t-order" in table:
        table["order_minus_t_points"] = 100 * (table["mkunet-t-order"]["mean"] - table["mkunet-t"]["mean"])
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kvasir-seg-256"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/seg_quality"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_seg_quality.json"))
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    h5 = prepared(args.data, args.size, args.work)
    previous = json.loads(args.out.read_text()).get("runs", []) if args.resume and args.out.exists() else []
    rows = list(previous)
    done = {(r["model"], r["seed"]) for r in rows}
    for seed in args.seeds:
        for model in args.models:
            if (model, seed) in done:
                continue
            rows.append(one_run(h5, model, seed, args, args.work))
            print(json.dumps(rows[-1]), flush=True)
            result = {"benchmark": "seg_quality", "data": str(args.data), "size": args.size,
                      "recipe": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                                 "optimizer": "AdamW + cosine", "loss": "structure loss (+0.2 aux for ORDER)",
                                 "augmentation": "flips, 90° rotations, scale/crop"},
                      "machine": f"{platform.machine()}, {args.threads} torch thread(s), shared 2-core CPU",
                      "runs": rows, "summary": summarise(rows)}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))
    for model, stats in summarise(rows).items():
        print(model, stats)


if __name__ == "__main__":
    main()
