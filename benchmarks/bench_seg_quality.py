"""Test Dice of MK-UNet-T, its widened control, ORDER (and optionally bigger models) on Kvasir-SEG, paired by seed.

Every model gets the same data (prepared at --size), epochs, batch size, learning rate, augmentation and
seeds; the best-validation-Dice checkpoint is scored on the test split (per-image Dice at 0.5, empty masks
scoring 1 when both are empty). Results are appended run by run, so an interrupted benchmark keeps what it
finished and `--resume` skips those runs. `--shard I/N` runs every N-th (seed, model) pair, so one single-thread
process per core shares the work; `--merge A.json B.json` joins the shards into one table.

The summary pairs runs by seed: ORDER − MK-UNet-T and ORDER − mkunet-t-wide (the control with ORDER's parameter
count) per seed and on the mean. Every run's test split is scored with `lawder evaluate` into
WORK/evaluate/<model>-s<seed>/summary.json (per-image Dice), so `lawder compare` can pair the arms by image.
For a comparison with confidence intervals, prefer benchmarks/bench_order_folds.py (5 folds and a replicate arm).

Usage: python benchmarks/bench_seg_quality.py --size 128 --epochs 30 --shard 0/2 --out a.json   # and 1/2
       python benchmarks/bench_seg_quality.py --merge a.json b.json --out benchmarks/results/bench_seg_quality_128.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_folder import prepare_folder
from lawder_core.evaluate import EvaluateRequest, Inputs, Metrics, evaluate
from lawder_core.models.configs import OrderConfig
from lawder_core.train.seg import SegTrainConfig, train_segmenter

MODELS = ("mkunet-t", "mkunet-t-wide", "mkunet-t-order", "mkunet-base", "unet-r34")
ORDER, PAIRED = "mkunet-t-order", ("mkunet-t", "mkunet-t-wide")


def prepared(data: Path, size: int, work: Path) -> Path:
    out = work / f"kvasir-{size}.h5"
    if not out.exists():
        prepare_folder("kvasir", data, out, PrepareOptions(size=size, seed=0))
    return out


def one_run(h5: Path, model: str, seed: int, args: argparse.Namespace, work: Path) -> dict:
    run = work / "runs" / f"{model}-s{seed}"
    cfg = SegTrainConfig(data=str(h5), out=str(run), model=model, size=args.size, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=seed, resume=(run / "last").exists(),
                         order=order_config(args.order))
    tic = time.perf_counter()
    train_segmenter(cfg)
    seconds = time.perf_counter() - tic
    summary = evaluate(EvaluateRequest(out=str(work / "evaluate" / f"{model}-s{seed}" / "summary.json"),
                                       metrics=Metrics(dice=True), inputs=Inputs(run=str(run), data=str(h5),
                                                                                 split="test")))
    return {"model": model, "seed": seed, "test_dice": summary["foreground_mean"]["Dice"],
            "test_iou": summary["foreground_mean"]["IoU"], "train_seconds": round(seconds, 1)}


def summarise(rows: list[dict]) -> dict:
    table = {}
    for model in MODELS:
        dice = [r["test_dice"] for r in rows if r["model"] == model]
        if dice:
            table[model] = {"mean": statistics.mean(dice), "sd": statistics.stdev(dice) if len(dice) > 1 else 0.0,
                            "seeds": len(dice)}
    for other in PAIRED:
        gains = paired_gains(rows, ORDER, other)
        if gains:
            table[f"order_minus_{other.removeprefix('mkunet-').replace('-', '_')}_points"] = {
                "mean": statistics.mean(gains.values()), "per_seed": gains, "min": min(gains.values())}
    return table


def paired_gains(rows: list[dict], model: str, other: str) -> dict[int, float]:
    """Dice points of `model` minus `other`, per seed where both ran."""
    by = {(r["model"], r["seed"]): r["test_dice"] for r in rows}
    return {seed: round(100 * (by[(model, seed)] - by[(other, seed)]), 2)
            for (m, seed) in sorted(by) if m == model and (other, seed) in by}


def order_config(overrides: list[str]) -> OrderConfig:
    """OrderConfig from KEY=VALUE strings (e.g. rho=0.15 kv_grid=8); the defaults where none are given."""
    types = {"rho": float, "aux_weight": float}
    pairs = (item.split("=", 1) for item in overrides)
    return OrderConfig(**{key: types.get(key, int)(value) for key, value in pairs})


def shard_of(pairs: list[tuple[int, str]], shard: str) -> list[tuple[int, str]]:
    index, count = (int(v) for v in shard.split("/"))
    return pairs[index::count]


def write_result(args: argparse.Namespace, rows: list[dict]) -> None:
    result = {"benchmark": "seg_quality", "data": str(args.data), "size": args.size,
              "recipe": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
                         "optimizer": "AdamW + cosine",
                         "loss": "structure loss; MK-UNet deep supervision 0.2 in every model, ORDER's region heads "
                                 "0.2 (detached)",
                         "augmentation": "flips, 90° rotations, scale/crop"},
              "machine": f"{platform.machine()}, {args.threads} torch thread(s) per process, shared 2-core CPU",
              "order_config": args.order_record,
              "runs": sorted(rows, key=lambda r: (r["seed"], r["model"])), "summary": summarise(rows)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


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
    parser.add_argument("--order", nargs="*", default=[], metavar="KEY=VALUE",
                        help="ORDER settings other than the defaults, e.g. rho=0.15 kv_grid=8 (recorded in --out).")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th (seed, model) pair from the I-th.")
    parser.add_argument("--merge", type=Path, nargs="+", help="Join shard results into --out; trains nothing.")
    args = parser.parse_args()
    if args.merge:
        shards = [json.loads(p.read_text()) for p in args.merge]
        args.size, args.epochs = shards[0]["size"], shards[0]["recipe"]["epochs"]
        args.order_record = shards[0].get("order_config")
        write_result(args, [r for s in shards for r in s["runs"]])
        print(json.dumps(summarise([r for s in shards for r in s["runs"]]), indent=1))
        return
    args.order_record = dataclasses.asdict(order_config(args.order))
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    h5 = prepared(args.data, args.size, args.work)
    previous = json.loads(args.out.read_text()).get("runs", []) if args.resume and args.out.exists() else []
    rows = list(previous)
    done = {(r["model"], r["seed"]) for r in rows}
    for seed, model in shard_of([(s, m) for s in args.seeds for m in args.models], args.shard):
        if (model, seed) in done:
            continue
        rows.append(one_run(h5, model, seed, args, args.work))
        print(json.dumps(rows[-1]), flush=True)
        write_result(args, rows)
    for model, stats in summarise(rows).items():
        print(model, stats)


if __name__ == "__main__":
    main()
