"""Does LAW revision 2 make better synthetic images, and does the new recipe converge? Kvasir-SEG, equal budgets.

Arms (issue 13), each the same mask-conditioned small UNet, steps, batch, learning rate and seed, trained through
the `lawder train-law` driver and sampled through the `lawder sample` driver (one image per training mask, the
first N masks, DDIM):
  - old-uniform: the first build's recipe (epsilon target, linear betas, leading DDIM spacing, no Min-SNR,
    no lr warm-up) with uniform weighting: the "before";
  - uniform, ratio, law: the revision-2 recipe (v target, cosine schedule, Min-SNR-5, lr warm-up, trailing DDIM,
    horizontal flips) with uniform weighting, the fixed γ-prior and LAW.
Scores per synthetic set: FID and KID against the real training images at the same size (the FID Inception
features; the extractor is recorded), and mask adherence: a segmenter trained on the real training split at this
size segments the synthetic images, Dice against the masks they were generated from (its own Dice on the real
test split is reported). Goals: new uniform FID ≤ 0.6 × old; LAW FID ≤ 0.85 × new uniform; LAW adherence ≥
uniform + 0.05. Whatever comes out is reported. Every stage is skipped when its output is complete, so arms can
run in separate processes (`--arms`) and a final run with all arms only scores and writes the table.

    .venv/bin/python benchmarks/bench_law_quality.py --steps 1500 --limit 360 --segmenter RUN   # see README
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
from lawder_core.models.configs import LAWConfig
from lawder_core.runs import read_metrics
from lawder_core.train.diffusion import DiffusionTrainConfig

HERE = Path(__file__).parent
ARMS = ("old-uniform", "uniform", "ratio", "law", "law-err")
# LAW arms: the default LAWConfig, and LAW that also sees the detached per-pixel error with a freer map
# (lr 1e-3, λ_prior 1): with the defaults the map stays near the prior on Kvasir (issue 13, session 5 notes).
LAW_ARMS: dict[str, dict[str, Any]] = {"law": {}, "law-err": {"use_error": True, "lr": 1e-3, "lambda_prior": 1.0}}
OLD_RECIPE = {"prediction": "epsilon", "beta_schedule": "linear", "timestep_spacing": "leading", "snr_gamma": None,
              "lr_warmup_steps": 0, "hflip": False}
NEW_RECIPE = {"prediction": "v", "beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing",
              "snr_gamma": 5.0, "lr_warmup_steps": 100, "hflip": True}
KVASIR = "/work/shared/data/kvasir-seg-256"
log = logging.getLogger("bench_law_quality")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kvasir", default=KVASIR, help="Kvasir-SEG folder (images/, masks/).")
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "lawder-bench" / "law_quality"),
                   help="Data, runs and synthetic sets (kept, so a rerun continues).")
    p.add_argument("--out", default=str(HERE / "results" / "bench_law_quality.json"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500, help="Training steps per arm (equal budget).")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--preset", default="small")
    p.add_argument("--limit", type=int, default=360,
                   help="Sample for the first N training masks only (0: all); the real set is the whole train split.")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps.")
    p.add_argument("--sample-batch", type=int, default=32)
    p.add_argument("--segmenter", default=None, help="A train-order run on real data; default: train one.")
    p.add_argument("--seg-epochs", type=int, default=40)
    p.add_argument("--seg-model", default="mkunet-base", help="The adherence judge's model.")
    p.add_argument("--guidance", type=float, default=1.0, help="Classifier-free guidance at sampling.")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is fastest on a shared 2-core machine (2 threads contend with other jobs).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fid-weights", default=None, help="FID Inception weights; default: whatever resolves offline.")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--grid", default=str(HERE / "results" / "law_quality_grid.png"),
                   help="PNG: the same masks under every arm (written when every arm is in the run).")
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
    """The mask-adherence judge: a segmenter trained on the real training images at this size (or the run given)."""
    if args.segmenter:
        return Path(args.segmenter)
    from lawder_core.distributed.train import train_order as run_train_order
    from lawder_core.train.seg import SegTrainConfig

    run = work / "segmenter"
    records = read_metrics(run)
    if records and records[-1]["epoch"] + 1 >= args.seg_epochs:
        return run
    log.info("train the adherence judge: %s, %d epochs", args.seg_model, args.seg_epochs)
    cfg = SegTrainConfig(data=str(data), out=str(run), model=args.seg_model, size=args.size, epochs=args.seg_epochs,
                         batch_size=16, seed=args.seed, resume=True)
    run_train_order(cfg, LaunchConfig(workers=0, name="bench-segmenter"))
    return run


def arm_config(args: argparse.Namespace, data: Path, run: Path, arm: str, resume: bool) -> DiffusionTrainConfig:
    weighting = "law" if arm in LAW_ARMS else arm.removeprefix("old-")
    recipe = OLD_RECIPE if arm.startswith("old-") else NEW_RECIPE
    return DiffusionTrainConfig(data=str(data), out=str(run), size=args.size, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, weighting=weighting, preset=args.preset,
                                seed=args.seed, log_every=max(1, args.steps // 20), save_every=max(1, args.steps // 4),
                                sample_every=args.steps, resume=resume, law=LAWConfig(**LAW_ARMS.get(arm, {})),
                                **recipe)


def train_arm(args: argparse.Namespace, data: Path, run: Path, arm: str) -> dict[str, Any]:
    from lawder_core.distributed.train import train_law as run_train_law
    from lawder_core.runs import find_checkpoint, read_progress
    from lawder_core.train.diffusion import summarise_law_run

    checkpoint = find_checkpoint(run)
    if checkpoint is not None and read_progress(checkpoint)["step"] >= args.steps:
        return {**summarise_law_run(run), "train_seconds": None}
    log.info("train-law %s: %d steps, batch %d", arm, args.steps, args.batch_size)
    tic = time.perf_counter()
    summary = run_train_law(arm_config(args, data, run, arm, resume=True), LaunchConfig(workers=0, name=arm))
    return {**summary, "train_seconds": round(time.perf_counter() - tic, 1)}


def sample_arm(args: argparse.Namespace, data: Path, run: Path, out: Path, n: int) -> dict[str, Any]:
    from lawder_core.distributed.sample import run_sample
    from lawder_core.sample import SampleConfig

    if out.exists() and read_info(out).n == n:
        return {"out": str(out), "n": n, "seconds": None}
    log.info("sample %d images from %s (DDIM %d steps, guidance %g)", n, run, args.sample_steps, args.guidance)
    cfg = SampleConfig(run=str(run), masks=str(data), out=str(out), split="train", n=n, steps=args.sample_steps,
                       scheduler="ddim", guidance=args.guidance, batch_size=args.sample_batch, seed=args.seed,
                       force=True)
    result = run_sample(cfg)
    return {k: result[k] for k in ("out", "n", "seconds", "images_per_s", "prediction")}


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


def table(rows: dict[str, dict[str, Any]], judge_test: float | None) -> str:
    base = rows.get("uniform", {})
    lines = [f"{'arm':<12} {'FID':>8} {'vs unif':>8} {'KID×1e3':>8} {'adher.':>7} {'w_les/w_bg':>10} {'s/step':>7}"]
    for name, r in rows.items():
        fr = ratio(r["fid"], base.get("fid"))
        law = r.get("law_stats") or {}
        wl, wb = law.get("w_lesion"), law.get("w_background")
        wr = f"{wl / wb:10.2f}" if wl and wb else f"{'':>10}"
        lines.append(f"{name:<12} {r['fid']:8.2f} {fr or float('nan'):8.3f} {1e3 * r['kid']:8.2f} "
                     f"{r['adherence_dice']:7.3f} {wr} {r['sec_per_step'] or float('nan'):7.3f}")
    if judge_test is not None:
        lines.append(f"{'real test':<12} {'':>8} {'':>8} {'':>8} {judge_test:7.3f}   (the judge on real test images)")
    return "\n".join(lines)


def verdict(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "uniform" in rows and "old-uniform" in rows:
        value = rows["uniform"]["fid"] / rows["old-uniform"]["fid"]
        out["new_vs_old_uniform_fid"] = {"value": value, "goal": "<= 0.6", "met": value <= 0.6}
    for arm in LAW_ARMS:
        if "uniform" in rows and arm in rows:
            prefix = arm.replace("-", "_")
            value = rows[arm]["fid"] / rows["uniform"]["fid"]
            out[f"{prefix}_vs_uniform_fid"] = {"value": value, "goal": "<= 0.85", "met": value <= 0.85}
            gain = rows[arm]["adherence_dice"] - rows["uniform"]["adherence_dice"]
            out[f"{prefix}_adherence_gain"] = {"value": gain, "goal": ">= 0.05", "met": gain >= 0.05}
    return out


def save_grid(path: Path, data: Path, arms: list[str], work: Path, count: int = 8) -> Path:
    """Rows: the real image with its mask, then each arm's synthetic image for that same mask."""
    from PIL import Image

    from lawder_core.viz import overlay

    images, masks, _ = load_arrays(data, "train", limit=count)
    rows = [np.concatenate([overlay(im, m) for im, m in zip(images, masks, strict=True)], axis=1)]
    for arm in arms:
        synthetic, syn_masks, _ = load_arrays(work / "synthetic" / f"{arm}.h5", None, limit=count)
        assert np.array_equal(syn_masks, masks)  # the first masks of the split, in order, in every arm
        rows.append(np.concatenate(list(synthetic), axis=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 2, len(rows) * rows[0].shape[0] * 2), Image.NEAREST).save(path)
    return path


def main() -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_before = os.getloadavg()
    data = prepare_data(args, work)
    n_train = len(load_arrays(data, "train")[1])
    n = min(args.limit or n_train, n_train)  # the first n training masks, in file order
    judge = train_segmenter_judge(args, data, work)
    from lawder_core.evaluate import adherence_for_run, dice_for_run

    judge_report, _ = dice_for_run(judge, data, "test")
    judge_test = float(judge_report.foreground_mean["Dice"])
    scorer = Scorer(args, data, judge)
    arms = args.arms.split(",")
    rows: dict[str, dict[str, Any]] = {}
    details: dict[str, Any] = {}
    for arm in arms:
        run = work / "runs" / arm
        trained = train_arm(args, data, run, arm)
        synthetic = work / "synthetic" / f"{arm}.h5"
        synthetic.parent.mkdir(exist_ok=True)
        sampled = sample_arm(args, data, run, synthetic, n)
        tic = time.perf_counter()
        scores = scorer(synthetic)
        sampled["score_seconds"] = round(time.perf_counter() - tic, 1)
        rows[arm] = {**scores, "final_loss": trained["loss"], "sec_per_step": trained["sec_per_step"],
                     "law_stats": trained["law"]}
        details[arm] = {"train": trained, "sample": sampled,
                        "config": {"weighting": "law" if arm in LAW_ARMS else arm.removeprefix("old-"),
                                   **(OLD_RECIPE if arm.startswith("old-") else NEW_RECIPE),
                                   **({"law": LAW_ARMS[arm]} if arm in LAW_ARMS else {})}}
        log.info("%s: FID %.2f, KID %.5f, adherence %.3f", arm, scores["fid"], scores["kid"], scores["adherence_dice"])
    print(table(rows, judge_test))
    grid = str(save_grid(Path(args.grid), data, arms, work)) if {"uniform", "law"} <= set(arms) else None
    judged = verdict(rows)
    result = {
        "benchmark": "bench_law_quality",
        "data": {"source": args.kvasir, "h5": str(data), "size": args.size, "n_train": n_train, "n_sampled": n},
        "budget": {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "preset": args.preset,
                   "seed": args.seed, "sampler": "ddim", "sample_steps": args.sample_steps,
                   "guidance": args.guidance},
        "judge": {"run": str(judge), "dice_on_real_test": judge_test,
                  "dice_on_real_train": adherence_for_run(judge, data, "train")["dice_mean"]},
        "real_features_seconds": scorer.seconds,
        "results": rows,
        "law_vs_uniform_fid": (judged.get("law_vs_uniform_fid") or {}).get("value"),
        "law_err_vs_uniform_fid": (judged.get("law_err_vs_uniform_fid") or {}).get("value"),
        "new_vs_old_uniform_fid": (judged.get("new_vs_old_uniform_fid") or {}).get("value"),
        "adherence": {arm: r["adherence_dice"] for arm, r in rows.items()},
        "verdict": judged, "details": details, "grid": grid,
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
