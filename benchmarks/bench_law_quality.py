"""Does LAW make better synthetic images? uniform vs ratio vs law on Kvasir-SEG, equal training budget.

Each weighting trains the same mask-conditioned UNet (same preset, steps, batch, learning rate, seed) through
the `lawder train-law` driver, then samples one synthetic image per training mask (DDIM) through the
`lawder sample` driver. Scores, per synthetic set:
  - FID and KID against the real training images (the FID Inception features; the extractor is recorded),
  - mask adherence: a segmenter trained on the real images segments the synthetic ones, Dice against the
    masks they were generated from (its Dice on the real training images is the ceiling).
Goal (issue 4, as the paper): LAW's FID at least 15 % below uniform's. Whatever comes out is reported.
Every stage is skipped when its output is complete, so an interrupted run continues where it stopped.

    .venv/bin/python benchmarks/bench_law_quality.py --steps 360 --limit 160 --size 64   # ~50 min, 2 shared cores
    .venv/bin/python benchmarks/bench_law_quality.py --steps 4 --limit 16 --sample-steps 2 --seg-epochs 1 \
        --work /tmp/lq   # smoke test
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.distributed.train import LaunchConfig
from lawder_core.runs import read_metrics
from lawder_core.train.diffusion import DiffusionTrainConfig

HERE = Path(__file__).parent
WEIGHTINGS = ("uniform", "ratio", "law")
KVASIR = "/work/shared/data/kvasir-seg-256"
log = logging.getLogger("bench_law_quality")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvasir", default=KVASIR, help="Kvasir-SEG folder (images/, masks/).")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lawder-bench" / "law_quality"),
                   help="Data, runs and synthetic sets (kept, so a rerun continues).")
    p.add_argument("--out", default=str(HERE / "results" / "bench_law_quality.json"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=360, help="Training steps per weighting (equal budget).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--preset", default="small")
    p.add_argument("--limit", type=int, default=160,
                   help="Sample for the first N training masks only (0: all); the real set is the whole train split.")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps.")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--segmenter", default=None, help="A train-order run on real data; default: train one.")
    p.add_argument("--seg-epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared 2-core machine (2 threads contend with other jobs).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-weights", default=None, help="FID Inception weights; default: whatever resolves offline.")
    p.add_argument("--weightings", default=",".join(WEIGHTINGS))
    return p.parse_args()


def prepare_data(args: argparse.Namespace, work: Path) -> Path:
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.prepare_folder import prepare_folder

    h5 = work / f"kvasir{args.size}.h5"
    if not h5.exists():
        log.info("prepare Kvasir-SEG at %d px -> %s", args.size, h5)
        prepare_folder("kvasir", args.kvasir, h5, PrepareOptions(size=args.size, seed=args.seed))
    return h5


def train_segmenter_judge(args: argparse.Namespace, data: Path, work: Path) -> Path:
    """The mask-adherence judge: MK-UNet-T + ORDER trained on the real images (or the run given)."""
    if args.segmenter:
        return Path(args.segmenter)
    from lawder_core.distributed.train import train_order as run_train_order
    from lawder_core.train.seg import SegTrainConfig

    run = work / "segmenter"
    records = read_metrics(run)
    if records and records[-1]["epoch"] + 1 >= args.seg_epochs:
        return run
    log.info("train the adherence judge: mkunet-t-order, %d epochs", args.seg_epochs)
    cfg = SegTrainConfig(data=str(data), out=str(run), model="mkunet-t-order", size=args.size, epochs=args.seg_epochs,
                         batch_size=16, seed=args.seed, resume=bool(records))
    run_train_order(cfg, LaunchConfig(workers=0, name="bench-segmenter"))
    return run


def train_weighting(args: argparse.Namespace, data: Path, run: Path, weighting: str) -> dict[str, Any]:
    from lawder_core.distributed.train import train_law as run_train_law
    from lawder_core.train.diffusion import summarise_law_run

    records = read_metrics(run)
    if records and records[-1]["step"] >= args.steps and (run / "checkpoint").exists():
        return {**summarise_law_run(run), "train_seconds": None}
    log.info("train-law --weighting %s: %d steps, batch %d", weighting, args.steps, args.batch_size)
    cfg = DiffusionTrainConfig(data=str(data), out=str(run), size=args.size, steps=args.steps,
                               batch_size=args.batch_size, lr=args.lr, weighting=weighting, preset=args.preset,
                               seed=args.seed, log_every=max(1, args.steps // 20),
                               save_every=max(1, args.steps // 4), sample_every=args.steps, resume=bool(records))
    tic = time.perf_counter()
    summary = run_train_law(cfg, LaunchConfig(workers=0, name=f"bench-{weighting}"))
    return {**summary, "train_seconds": round(time.perf_counter() - tic, 1)}


def sample_weighting(args: argparse.Namespace, data: Path, run: Path, out: Path, n: int) -> dict[str, Any]:
    from lawder_core.distributed.sample import run_sample
    from lawder_core.sample import SampleConfig

    if out.exists() and read_info(out).n == n:
        return {"out": str(out), "n": n, "seconds": None}
    log.info("sample %d images from %s (DDIM %d steps)", n, run, args.sample_steps)
    cfg = SampleConfig(run=str(run), masks=str(data), out=str(out), split="train", n=n, steps=args.sample_steps,
                       scheduler="ddim", batch_size=args.sample_batch, seed=args.seed, force=True)
    result = run_sample(cfg)
    return {k: result[k] for k in ("out", "n", "seconds", "images_per_s")}


class Scorer:
    """FID/KID against the real training images (their features extracted once) and mask adherence."""

    def __init__(self, args: argparse.Namespace, data: Path, judge: Path) -> None:
        from lawder_core.metrics.fid import build_fid_extractor, extract_features, open_source

        self.args, self.judge = args, judge
        self.model, self.info = build_fid_extractor(args.fid_weights, allow_download=False)
        self.model = self.model.eval()
        log.info("FID features: %s (%s); extracting the real training images once", self.info.name,
                 self.info.path)
        tic = time.perf_counter()
        cache = data.parent / f"{data.stem}.train.fid-{(self.info.sha256 or 'custom')[:12]}.npy"
        if cache.exists():
            self.real = np.load(cache)
        else:
            self.real, _ = extract_features(open_source(data, "train"), self.model, device=torch.device("cpu"))
            np.save(cache, self.real)
        self.seconds = round(time.perf_counter() - tic, 1)

    def __call__(self, synthetic: Path) -> dict[str, Any]:
        from lawder_core.evaluate import adherence_for_run
        from lawder_core.metrics.fid import (
            extract_features,
            frechet_distance_from_features,
            kernel_inception_distance,
            open_source,
        )

        feats, _ = extract_features(open_source(synthetic, None), self.model, device=torch.device("cpu"))
        adherence = adherence_for_run(self.judge, synthetic)
        n = min(len(self.real), len(feats))
        return {
            "fid": frechet_distance_from_features(self.real, feats),
            "kid": kernel_inception_distance(self.real, feats, max_subset_size=min(1000, n), seed=self.args.seed),
            "n_real": len(self.real), "n_synthetic": len(feats),
            "extractor": {"name": self.info.name, "source": self.info.source, "path": self.info.path,
                          "sha256": self.info.sha256, "dim": int(feats.shape[1])},
            "adherence_dice": adherence["dice_mean"], "adherence_dice_sd": adherence["dice_sd"],
            "adherence_iou": adherence["iou_mean"],
        }


def ratio(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else value / base


def table(rows: dict[str, dict[str, Any]], ceiling: float | None) -> str:
    base = rows.get("uniform", {})
    lines = [f"{'weighting':<10} {'FID':>8} {'vs unif':>8} {'KID×1e3':>8} {'vs unif':>8} {'adher.':>7} "
             f"{'loss':>7} {'s/step':>7}"]
    for name, r in rows.items():
        fr, kr = ratio(r["fid"], base.get("fid")), ratio(r["kid"], base.get("kid"))
        lines.append(f"{name:<10} {r['fid']:8.2f} {fr or float('nan'):8.3f} {1e3 * r['kid']:8.2f} "
                     f"{kr or float('nan'):8.3f} {r['adherence_dice']:7.3f} {r['final_loss'] or float('nan'):7.4f} "
                     f"{r['sec_per_step'] or float('nan'):7.3f}")
    if ceiling is not None:
        lines.append(f"{'real':<10} {'':>8} {'':>8} {'':>8} {'':>8} {ceiling:7.3f}   (the judge on real images)")
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    if "law" not in rows or "uniform" not in rows:
        return {}
    gain = 1 - rows["law"]["fid"] / rows["uniform"]["fid"]
    return {"law_fid_reduction_vs_uniform": gain, "goal": 0.15, "goal_met": gain >= 0.15}


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    data = prepare_data(args, work)
    n_train = len(load_arrays(data, "train")[1])
    n = min(args.limit or n_train, n_train)  # the first n training masks, in file order
    judge = train_segmenter_judge(args, data, work)
    from lawder_core.evaluate import adherence_for_run

    ceiling = adherence_for_run(judge, data, "train")["dice_mean"]
    scorer = Scorer(args, data, judge)
    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for weighting in args.weightings.split(","):
        run = work / "runs" / weighting
        trained = train_weighting(args, data, run, weighting)
        synthetic = work / "synthetic" / f"{weighting}.h5"
        synthetic.parent.mkdir(exist_ok=True)
        sampled = sample_weighting(args, data, run, synthetic, n)
        tic = time.perf_counter()
        scores = scorer(synthetic)
        sampled["score_seconds"] = round(time.perf_counter() - tic, 1)
        rows[weighting] = {**scores, "final_loss": trained["loss"], "sec_per_step": trained["sec_per_step"],
                           "law_stats": trained["law"]}
        details[weighting] = {"train": trained, "sample": sampled}
        log.info("%s: FID %.2f, KID %.5f, adherence %.3f", weighting, scores["fid"], scores["kid"],
                 scores["adherence_dice"])
    print(table(rows, ceiling))
    result = {
        "benchmark": "bench_law_quality",
        "data": {"source": args.kvasir, "h5": str(data), "size": args.size, "n_train": n_train, "n_sampled": n},
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "preset": args.preset,
                   "seed": args.seed, "sampler": "ddim", "sample_steps": args.sample_steps},
        "judge": {"run": str(judge), "dice_on_real_train": ceiling},
        "real_features_seconds": scorer.seconds,
        "results": rows, "ratios_vs_uniform": {w: {"fid": ratio(r["fid"], rows.get("uniform", {}).get("fid")),
                                                   "kid": ratio(r["kid"], rows.get("uniform", {}).get("kid"))}
                                               for w, r in rows.items()},
        "verdict": verdict(rows), "details": details,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
