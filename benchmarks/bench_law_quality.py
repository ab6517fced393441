"""Does LAW help where its mechanism should show? LAW revision 3 on small lesions, in the paper's regime (fine-tuning
a pretrained denoiser on masks) at CPU scale, with replicate seeds and a replicate arm for the noise floor.

Stages, each skipped when its output is complete (a killed training resumes from its last checkpoint, every
`--save-every` steps; sampling and scoring redo only the pair file or summary that is missing):
  1. data   `prepare synthetic --lesion-frac 0.003,0.03 --blobs 1` at 64 px (--n images, 80 % train).
  2. base   one denoiser pre-trained on the train split with the condition dropped on every row (cond_dropout 1:
            it never sees a mask, as a text-to-image model has never seen one), uniform weighting, --base-steps.
            Shared by every arm.
  3. judge  a segmenter (--judge-model) trained on the real train split; its Dice on the real test split, per
            lesion-size bin, is the judge's own ceiling.
  4. arms   fine-tuned from the base's EMA weights (`--init-from`) for --steps each, the usual recipe (v target,
            cosine, Min-SNR-5, cond dropout 0.1), seeds 0..--seeds−1. `--init-from` starts the base's untrained
            mask inputs at zero (the revision 3 runs of docs/benchmarks.md, at 35c2a64, predate that):
              uniform         uniform weighting
              uniform-rep     uniform weighting, training seed + 100: the replicate whose spread is the noise floor
              ratio           the fixed γ-prior (LAW's starting map)
              law             LAW at its defaults (hardness objective, time-weighted like the denoiser)
              law-influence   LAW with the mask-influence target |v_cond − v_uncond|
  5. sample the first --n-sample training masks, DDIM --sample-steps; the sampling seed is the replicate's seed,
            so image i of every arm of one seed starts from the same noise (paired).
  6. score  `lawder evaluate --adherence --lesion-kid`: the judge's Dice, judge-free adherence (contrast, hit
            rate, spurious area, per lesion-size bin) against the real train pairs, KID on lesion-centred crops
            with its standard error. One summary.json per arm and seed: `lawder compare --arms WORK/compare.yaml`
            pairs them case by case.
  6b. kid   the lesion-crop KID again per size bin, "<3%" included, and on lesion-free crops, the control for a
            change of the whole image (`lesion_kid_bins.json` beside the summary; the merge computes it for a
            scored job that lacks it).
  7. merge  when every (arm, seed) is scored: means per arm and size bin, paired differences to uniform per seed,
            the decision rule, and the JSON result (--out).

Decision rule: an arm beats uniform on a metric when its mean paired difference to uniform, in the metric's good
direction, exceeds twice the replicate spread (the RMS over seeds of uniform-rep − uniform; for spurious area at
least one pixel per image, its resolution) with the same sign on every seed; the t-interval over seeds is reported
beside it. LAW is also judged against ratio, its starting map, by the same rule.

Budget (the defaults): 600 images, base 3,000 steps, 5 arms × 4 seeds × 1,500 steps (law-influence costs ~1.5×
a step: one extra forward), 240 samples × 25 DDIM steps per run, judge mkunet-base 40 epochs. At 0.7 s per step
(small UNet, batch 8, 64 px, one thread per process, both cores busy) that is about 35 min of base (the second
process trains the judge meanwhile, then waits), then ~3.2 h of fine-tuning, ~25 min of sampling and ~10 min of
scoring per process: about 4.4 h on two cores; about 6 h at 1 s per step (beside other jobs).

Shared by one single-thread process per core (`--shard I/N`): shard I takes every N-th (seed, arm) job; the base
and the judge are each trained by the first process that reaches them (the others wait on a lock, and take over
a stage whose process died). Launch (two cores):

    cd WORKTREE && for i in 0 1; do PYTHONPATH=. nohup .venv/bin/python benchmarks/bench_law_quality.py \\
        --work /tmp/law-r3 --shard $i/2 > /tmp/law-r3-$i.log 2>&1 & done
    # rerun the same command to resume; `--merge-only` rewrites the result from what is scored
    .venv/bin/python benchmarks/bench_law_quality.py --smoke --work /tmp/law-r3-smoke   # every stage, tiny
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lawder_core.metrics.paired import t_interval

HERE = Path(__file__).parent
ARMS = ("uniform", "uniform-rep", "ratio", "law", "law-influence")
REPLICATE_SEED_OFFSET = 100
MIN_SEEDS_FOR_A_CALL = 2
BINS = ("<1%", "1-3%", "<3%", "3-10%", ">=10%", "all")
SMALL = 0.03  # the goal's bin, "<3%": the union of the two smallest size bins, from the per-pair rows
# per-pair metrics and the direction that is better
PAIR_METRICS = {"hit_rate": +1, "contrast_rel": +1, "spurious_area": -1, "dice": +1}
# per-run metrics: KID on lesion-centred crops (per size bin), and on lesion-free crops (over all pairs: the control
# that tells a change at the lesion from a change of the whole image)
RUN_METRICS = {"lesion_kid": -1, "background_kid": -1}
log = logging.getLogger("bench_law_quality")


@dataclass(frozen=True)
class Budget:
    n: int = 600
    size: int = 64
    preset: str = "small"
    batch_size: int = 8
    base_steps: int = 3000
    steps: int = 1500
    seeds: int = 4
    n_sample: int = 240
    sample_steps: int = 25
    judge_model: str = "mkunet-base"
    judge_epochs: int = 40
    save_every: int = 250


SMOKE = Budget(n=40, size=32, preset="tiny", batch_size=4, base_steps=6, steps=4, seeds=2, n_sample=8,
               sample_steps=2, judge_model="mkunet-t", judge_epochs=1, save_every=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/lawder-bench/law_quality_r3",
                   help="Data, runs, samples and summaries (kept: a rerun resumes).")
    p.add_argument("--out", default=str(HERE / "results" / "bench_law_quality.json"))
    p.add_argument("--smoke", action="store_true", help="A tiny budget through every stage (minutes).")
    for field, default in Budget().__dict__.items():
        p.add_argument("--" + field.replace("_", "-"), type=type(default), default=None,
                       help=f"default {default} (smoke: {getattr(SMOKE, field)})")
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--guidance", type=float, default=1.0, help="Classifier-free guidance at sampling.")
    p.add_argument("--fid-weights", default=None, help="Inception weights; default: whatever resolves offline.")
    p.add_argument("--shard", default="0/1", help="I/N: this process takes every N-th (seed, arm) job from the I-th.")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: one process per core).")
    p.add_argument("--merge-only", action="store_true", help="Train nothing: write the result from what is scored.")
    p.add_argument("--wait", type=float, default=30.0, help="Seconds between checks while waiting on another shard.")
    return p.parse_args(argv)


def budget_of(args: argparse.Namespace) -> Budget:
    base = SMOKE if args.smoke else Budget()
    given = {k: getattr(args, k) for k in base.__dict__ if getattr(args, k) is not None}
    return replace(base, **given)


def check_budget(work: Path, b: Budget) -> None:
    """A work folder belongs to one budget: finished runs and scores of another would be mixed in silently."""
    path = work / "budget.json"
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != b.__dict__:
            changed = {k: (recorded.get(k), v) for k, v in b.__dict__.items() if recorded.get(k) != v}
            raise SystemExit(f"{work} was started with another budget (recorded vs now: {changed}); use another "
                             "--work, or the recorded values.")
    else:
        path.write_text(json.dumps(b.__dict__, indent=1))


def shard_of(text: str) -> tuple[int, int]:
    index, count = (int(v) for v in text.split("/"))
    if not 0 <= index < count:
        raise SystemExit(f"--shard {text}: expected I/N with 0 <= I < N")
    return index, count


# ---------------------------------------------------------------- shared stages


@contextlib.contextmanager
def stage_lock(work: Path, name: str) -> Iterator[None]:
    """One process per shared stage at a time; a waiting process blocks here. The kernel releases the lock of a
    process that dies, so the next one takes the stage over (and resumes it)."""
    path = work / f".stage-{name}.lock"
    with path.open("a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(work: Path, b: Budget) -> Path:
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    h5 = work / f"small-lesions-{b.size}.h5"
    with stage_lock(work, "data"):
        if not h5.exists():
            log.info("prepare %d small-lesion pairs at %d px -> %s", b.n, b.size, h5)
            prepare_synthetic(h5, n=b.n, size=b.size, seed=0, options=PrepareOptions(seed=0),
                              lesion_frac=(0.003, 0.03), blobs=1)
    return h5


def run_step(run: Path) -> int:
    from lawder_core.runs import find_checkpoint, read_progress

    checkpoint = find_checkpoint(run)
    return int(read_progress(checkpoint)["step"]) if checkpoint is not None else 0


def train_config(data: Path, run: Path, b: Budget, *, weighting: str, steps: int, seed: int, **extra: Any):
    from lawder_core.train.configs import DiffusionTrainConfig

    return DiffusionTrainConfig(data=str(data), out=str(run), size=b.size, steps=steps, batch_size=b.batch_size,
                                weighting=weighting, preset=b.preset, seed=seed, hflip=False,
                                log_every=max(1, min(50, steps // 10)), save_every=b.save_every,
                                sample_every=0, **extra)


def train(cfg: Any, name: str) -> dict[str, Any]:
    """Train (or resume) one run unless it is complete; its summary, plus this call's seconds."""
    from lawder_core.distributed.train import LaunchConfig
    from lawder_core.distributed.train import train_law as run_train_law
    from lawder_core.runs import has_run
    from lawder_core.train.diffusion import summarise_law_run

    run = Path(cfg.out)
    if run_step(run) >= cfg.steps:
        return {**summarise_law_run(run), "train_seconds": None}
    log.info("train %s: %d steps (from step %d)", name, cfg.steps, run_step(run))
    tic = time.perf_counter()
    summary = run_train_law(replace(cfg, resume=has_run(run)), LaunchConfig(workers=0, name=name))
    return {**summary, "train_seconds": round(time.perf_counter() - tic, 1)}


def train_base(work: Path, data: Path, b: Budget) -> Path:
    run = work / "base"
    with stage_lock(work, "base"):
        train(train_config(data, run, b, weighting="uniform", steps=b.base_steps, seed=0, cond_dropout=1.0), "base")
    return run


def judge_done(run: Path, epochs: int) -> bool:
    from lawder_core.runs import read_metrics

    records = read_metrics(run) if run.exists() else []
    return bool(records) and records[-1]["epoch"] + 1 >= epochs and (run / "summary.json").exists()


def train_judge(work: Path, data: Path, b: Budget) -> Path:
    """The adherence judge: a segmenter trained on the real train split at the benchmark's size."""
    from lawder_core.distributed.train import LaunchConfig
    from lawder_core.distributed.train import train_order as run_train_order
    from lawder_core.runs import has_run
    from lawder_core.train.configs import SegTrainConfig

    run = work / "judge"
    with stage_lock(work, "judge"):
        if not judge_done(run, b.judge_epochs):
            log.info("train the judge: %s, %d epochs", b.judge_model, b.judge_epochs)
            cfg = SegTrainConfig(data=str(data), out=str(run), model=b.judge_model, size=b.size,
                                 epochs=b.judge_epochs, batch_size=16, seed=0, resume=has_run(run))
            run_train_order(cfg, LaunchConfig(workers=0, name="judge"))
    return run


# ---------------------------------------------------------------- one (seed, arm) job


def arm_config(arm: str, seed: int, data: Path, work: Path, b: Budget):
    from lawder_core.models.configs import LAWConfig

    weighting = "law" if arm.startswith("law") else arm.removesuffix("-rep")
    law = LAWConfig(objective="influence") if arm == "law-influence" else LAWConfig()
    train_seed = seed + REPLICATE_SEED_OFFSET if arm == "uniform-rep" else seed
    return train_config(data, work / "runs" / arm / f"seed{seed}", b, weighting=weighting, steps=b.steps,
                        seed=train_seed, law=law, init_from=str(work / "base"))


def sample(run: Path, data: Path, out: Path, b: Budget, seed: int, guidance: float) -> dict[str, Any]:
    from lawder_core.data.h5 import read_info
    from lawder_core.distributed.sample import run_sample
    from lawder_core.sample import SampleConfig

    if out.exists() and read_info(out).n == b.n_sample:
        return {"out": str(out), "seconds": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("sample %d images from %s", b.n_sample, run)
    cfg = SampleConfig(run=str(run), masks=str(data), out=str(out), split="train", n=b.n_sample,
                       steps=b.sample_steps, scheduler="ddim", guidance=guidance, batch_size=32, seed=seed,
                       force=True)
    result = run_sample(cfg)
    return {"out": str(out), "seconds": result["seconds"]}


def score(synthetic: Path, data: Path, judge: Path, out: Path, args: argparse.Namespace, metadata: dict[str, Any],
          cache: dict) -> dict[str, Any]:
    from lawder_core.evaluate import EvaluateOptions, EvaluateRequest, Inputs, Metrics, evaluate

    path = out / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    log.info("score %s", synthetic)
    request = EvaluateRequest(
        out=str(out), metrics=Metrics(adherence=True, lesion_kid=True),
        inputs=Inputs(real=str(data), real_split="train", synthetic=str(synthetic), segmenter=str(judge),
                      fid_weights=args.fid_weights),
        options=EvaluateOptions(device="cpu", allow_download=False, seed=metadata["seed"]),
        metadata={"benchmark": "bench_law_quality", **metadata})
    return evaluate(request, real_features=cache)


def kid_bins() -> tuple[tuple[str, float, float], ...]:
    """The judge-free size bins plus the goal's bin, "<3%"."""
    from lawder_core.metrics.judge_free import SIZE_BINS

    return (*SIZE_BINS, ("<3%", 0.0, SMALL))


def score_kid_bins(synthetic: Path, data: Path, out: Path, args: argparse.Namespace, seed: int,
                   cache: dict) -> dict[str, Any]:
    """The lesion-crop KID per size bin (`kid_bins`) and on lesion-free crops, scored as `score` scores the whole
    set (same real split, weights and seed), so its "all" repeats the summary's KID. A record from before the
    lesion-free control is scored again."""
    from lawder_core.files import write_text
    from lawder_core.metrics.fid import lesion_crop_kid

    path = out / "lesion_kid_bins.json"
    if path.exists() and "background" in (record := json.loads(path.read_text())):
        return record
    log.info("lesion-crop KID per size bin of %s", synthetic)
    result = lesion_crop_kid(data, synthetic, real_split="train", weights=args.fid_weights, device="cpu",
                             seed=seed, allow_download=False, reuse_real=cache.get("kid-bins"), bins=kid_bins())
    cache["kid-bins"] = result
    record = {"all": result.kid.kid, "all_se": result.kid.se, "crop": result.crop, "bins": result.bins,
              "background": result.background}
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(record, indent=1))  # atomic: a merge killed mid-write leaves no half file
    return record


def run_job(arm: str, seed: int, work: Path, data: Path, judge: Path, b: Budget, args: argparse.Namespace,
            cache: dict) -> None:
    record_path = work / "jobs" / f"{arm}-seed{seed}.json"
    if record_path.exists() and (work / "eval" / arm / f"seed{seed}" / "summary.json").exists():
        return
    cfg = arm_config(arm, seed, data, work, b)
    trained = train(cfg, f"{arm}-seed{seed}")
    synthetic = work / "synthetic" / arm / f"seed{seed}.h5"
    sampled = sample(Path(cfg.out), data, synthetic, b, seed, args.guidance)
    tic = time.perf_counter()
    train_info = {k: trained.get(k) for k in ("step", "loss", "law", "init_from", "sec_per_step", "grad_norm",
                                              "clipped")}
    score(synthetic, data, judge, work / "eval" / arm / f"seed{seed}", args,
          {"arm": arm, "seed": seed, "train_seed": cfg.seed, "train": train_info}, cache)
    score_kid_bins(synthetic, data, work / "eval" / arm / f"seed{seed}", args, seed, cache)
    record = {"arm": arm, "seed": seed, "train_seed": cfg.seed, "train": train_info,
              "train_seconds": trained.get("train_seconds"), "sample_seconds": sampled["seconds"],
              "score_seconds": round(time.perf_counter() - tic, 1)}
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, default=str))


# ---------------------------------------------------------------- merge


def bins_of(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The summary's size bins, plus "<3%" (the goal's bin) computed the same way from its per-pair rows."""
    from lawder_core.metrics.judge_free import bin_summary

    adherence = summary["adherence"]
    small = [r for r in adherence.get("per_case", []) if 0 < r.get("lesion_frac", 0) < SMALL]
    return {**adherence["bins"], **({"<3%": bin_summary(small)["all"]} if small else {})}


def kid_bins_of(summary: dict[str, Any], scored: Path) -> tuple[dict[str, float | None], float | None]:
    """(size bin → lesion-crop KID, lesion-free KID): `lesion_kid_bins.json` where scored, else the summary's own;
    "all" is the summary's KID."""
    lesion_kid = summary["lesion_kid"]
    extra = json.loads(scored.read_text()) if scored.exists() else {}
    if extra and not math.isclose(extra["all"], lesion_kid["kid"], rel_tol=1e-4, abs_tol=1e-7):
        log.warning("%s: KID %.6g over all crops, the summary has %.6g", scored, extra["all"], lesion_kid["kid"])
    bins = extra.get("bins") or lesion_kid.get("bins") or {}
    background = extra.get("background") or lesion_kid.get("background") or {}
    return {**{label: entry["kid"] for label, entry in bins.items()}, "all": lesion_kid["kid"]}, background.get("kid")


def per_seed_table(work: Path, arms: list[str], seeds: int) -> dict[str, dict[int, dict[str, Any]]]:
    """arm → seed → {bins, lesion_kid (per bin), lesion_kid_se, law_departure, w ratio, seconds} for every scored
    job."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        for seed in range(seeds):
            path = work / "eval" / arm / f"seed{seed}" / "summary.json"
            if not path.exists():
                continue
            summary = json.loads(path.read_text())
            lesion_kid, background_kid = kid_bins_of(summary, path.with_name("lesion_kid_bins.json"))
            job = work / "jobs" / f"{arm}-seed{seed}.json"
            record = json.loads(job.read_text()) if job.exists() else {}
            law = (record.get("train") or {}).get("law") or {}
            table.setdefault(arm, {})[seed] = {
                "bins": bins_of(summary), "lesion_kid": lesion_kid, "background_kid": background_kid,
                "lesion_kid_se": summary["lesion_kid"]["kid_se"],
                "law_departure": law.get("law_departure"), "w_lesion": law.get("w_lesion"),
                "w_background": law.get("w_background"), "sec_per_step": (record.get("train") or {}).get(
                    "sec_per_step"), "clipped": (record.get("train") or {}).get("clipped"),
                "train_seconds": record.get("train_seconds"), "sample_seconds": record.get("sample_seconds"),
                "score_seconds": record.get("score_seconds")}
    return table


def metric_value(row: dict[str, Any], metric: str, bin_label: str) -> float | None:
    if metric == "lesion_kid":
        return row["lesion_kid"].get(bin_label)
    if metric == "background_kid":
        return row.get("background_kid") if bin_label == "all" else None
    value = row["bins"].get(bin_label, {}).get(metric)
    return None if value is None else float(value)


def paired(table: dict[str, dict[int, dict[str, Any]]], arm: str, metric: str, bin_label: str,
           reference: str = "uniform") -> list[float]:
    """arm − reference per seed (seeds where both were scored and have a value)."""
    out = []
    for seed, row in sorted(table.get(arm, {}).items()):
        base = table.get(reference, {}).get(seed)
        a = metric_value(row, metric, bin_label)
        u = metric_value(base, metric, bin_label) if base else None
        if a is not None and u is not None:
            out.append(a - u)
    return out


def resolutions(size: int) -> dict[str, float]:
    """The smallest difference each metric can show that means anything: the noise floor is never below it.
    Spurious area is a share of the frame: one pixel per image. Where every replicate scored the same (0 spurious
    pixels), the measured floor is 0 and a difference of two pixels in 240 images would be called."""
    return {"spurious_area": 1.0 / (size * size)}


def verdicts(table: dict[str, dict[int, dict[str, Any]]], arms: list[str], reference: str = "uniform",
             resolution: dict[str, float] | None = None) -> dict[str, Any]:
    """Per arm (vs `reference`), metric and bin: per-seed differences, mean, t-interval, noise floor (always the
    replicate's spread against uniform: what a change of seed alone moves a run; at least the metric's
    `resolution`), verdict."""
    resolution = resolution or {}
    directions = {**PAIR_METRICS, **RUN_METRICS}
    out: dict[str, Any] = {}
    for arm in [a for a in arms if a != reference]:
        for metric, sign in directions.items():
            for bin_label in BINS:
                diffs = paired(table, arm, metric, bin_label, reference)
                if not diffs:
                    continue
                floor_diffs = paired(table, "uniform-rep", metric, bin_label)
                measured = math.sqrt(float(np.mean(np.square(floor_diffs)))) if floor_diffs else None
                floor = None if measured is None else max(measured, resolution.get(metric, 0.0))
                mean = float(np.mean(diffs))
                low, high = t_interval(diffs)
                same_sign = all(d * sign > 0 for d in diffs)
                # one seed has no spread and "the same sign on every seed" holds trivially: no call before two
                callable_ = floor is not None and arm != "uniform-rep" and len(diffs) >= MIN_SEEDS_FOR_A_CALL
                wins = callable_ and mean * sign > 2 * floor and same_sign
                loses = callable_ and -mean * sign > 2 * floor and all(d * sign < 0 for d in diffs)
                out.setdefault(arm, {}).setdefault(metric, {})[bin_label] = {
                    "per_seed": diffs, "mean": mean, "ci95": [low, high], "noise_floor": floor,
                    "replicate_spread": measured,
                    "better_direction": "higher" if sign > 0 else "lower",
                    "verdict": f"beats {reference}" if wins else f"worse than {reference}" if loses else "no call"}
    return out


def arm_means(table: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per arm: mean ± sd over seeds of every metric per bin, lesion KID, LAW's departure and timings."""
    out: dict[str, Any] = {}
    for arm, seeds in table.items():
        rows = list(seeds.values())
        entry: dict[str, Any] = {"seeds": sorted(seeds)}
        for bin_label in BINS:
            for metric in (*PAIR_METRICS, *RUN_METRICS):
                values = [v for r in rows if (v := metric_value(r, metric, bin_label)) is not None]
                if values:
                    entry.setdefault("bins", {}).setdefault(bin_label, {})[metric] = {
                        "mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1
                        else None}
            n = [r["bins"][bin_label]["n"] for r in rows if bin_label in r["bins"]]
            if n:
                entry["bins"][bin_label]["n_pairs"] = n[0]
        for key in ("lesion_kid_se", "law_departure", "w_lesion", "w_background", "sec_per_step",
                    "clipped", "train_seconds", "sample_seconds", "score_seconds"):
            values = [r[key] for r in rows if r.get(key) is not None]
            entry[key] = {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1))
                          if len(values) > 1 else None} if values else None
        out[arm] = entry
    return out


def fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def text_table(means: dict[str, Any], bin_label: str) -> str:
    lines = [f"size bin {bin_label}", f"{'arm':<14} {'hit rate':>9} {'contrast×real':>13} {'spurious':>9} "
             f"{'judge Dice':>10} {'lesion KID×1e3':>15} {'departure':>9}"]
    for arm, entry in means.items():
        cells = entry.get("bins", {}).get(bin_label, {})
        mean = {m: (cells.get(m) or {}).get("mean") for m in PAIR_METRICS}
        kid = (cells.get("lesion_kid") or {}).get("mean")
        lines.append(f"{arm:<14} {fmt(mean['hit_rate']):>9} {fmt(mean['contrast_rel']):>13} "
                     f"{fmt(mean['spurious_area'], 4):>9} {fmt(mean['dice']):>10} "
                     f"{fmt(None if kid is None else 1e3 * kid, 2):>15} "
                     f"{fmt((entry.get('law_departure') or {}).get('mean')):>9}")
    return "\n".join(lines)


MARKDOWN_COLUMNS = (("hit_rate", "hit rate", 1.0, 3), ("contrast_rel", "contrast ÷ real", 1.0, 3),
                    ("dice", "judge Dice", 1.0, 3), ("spurious_area", "spurious area", 1.0, 4),
                    ("lesion_kid", "lesion KID ×10³", 1e3, 2),
                    ("background_kid", "lesion-free KID ×10³ (control)", 1e3, 2))
LAW_ARMS = ("law", "law-influence")
PRIOR = "ratio"  # LAW's starting map: LAW − ratio is what learning the map adds to weighting by it


def verdict_mark(verdict: str) -> str:
    return " ✓" if verdict.startswith("beats") else " ✗" if verdict.startswith("worse") else ""


def markdown_cell(means: dict[str, Any], verdicts_: dict[str, Any], arm: str, metric: str, bin_label: str,
                  scale: float, digits: int) -> str:
    """'mean' for uniform; 'mean (Δ [95 % CI])' plus the decision rule's mark for every other arm."""
    mean = ((means.get(arm, {}).get("bins", {}).get(bin_label) or {}).get(metric) or {}).get("mean")
    if mean is None:
        return "–"
    cell = fmt(scale * mean, digits)
    call = (verdicts_.get(arm, {}).get(metric) or {}).get(bin_label)
    if call is not None:
        cell += f" ({difference(call, scale, digits)}){verdict_mark(call['verdict'])}"
    return cell


def markdown_tables(means: dict[str, Any], verdicts_: dict[str, Any]) -> str:
    """One table per size bin: each arm's mean over seeds and, beside it, its paired difference to uniform with the
    95 % t-interval over seeds; ✓/✗ where the decision rule calls it. The uniform-rep row is the noise floor."""
    parts = []
    for bin_label in BINS:
        if not any(bin_label in entry.get("bins", {}) for entry in means.values()):
            continue
        columns = [c for c in MARKDOWN_COLUMNS if c[0] not in RUN_METRICS or any(
            c[0] in entry.get("bins", {}).get(bin_label, {}) for entry in means.values())]
        pairs = next((e["bins"][bin_label].get("n_pairs") for e in means.values() if bin_label in e.get("bins", {})),
                     None)
        rows = [f"**Lesions {bin_label}** ({pairs} pairs per run)", "",
                "| arm | seeds | " + " | ".join(c[1] for c in columns) + " | LAW departure |",
                "|---" * (len(columns) + 3) + "|"]
        for arm, entry in means.items():
            cells = [markdown_cell(means, verdicts_, arm, metric, bin_label, scale, digits)
                     for metric, _, scale, digits in columns]
            departure = fmt((entry.get("law_departure") or {}).get("mean"))
            rows.append(f"| {arm} | {len(entry['seeds'])} | " + " | ".join(cells) + f" | {departure} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts) + "\n"


def difference(call: dict[str, Any], scale: float, digits: int) -> str:
    """'Δ [95 % CI]' of one call (no interval with one seed)."""
    low, high = call["ci95"]
    interval = "" if low is None else f" [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    return f"{scale * call['mean']:+.{digits}f}{interval}"


def difference_cell(call: dict[str, Any] | None, scale: float, digits: int) -> str:
    return "–" if call is None else difference(call, scale, digits) + verdict_mark(call["verdict"])


def prior_table(against_prior: dict[str, Any]) -> str:
    """LAW − ratio per bin and metric (mean [95 % CI], the decision rule's mark): whether the learnt map does
    better than the map it starts from."""
    rows = [f"**LAW against its prior map ({PRIOR})**, paired by seed, the same noise floor", "",
            "| arm | lesions | " + " | ".join(c[1] for c in MARKDOWN_COLUMNS) + " |",
            "|---" * (len(MARKDOWN_COLUMNS) + 2) + "|"]
    for arm, calls in against_prior.items():
        for bin_label in BINS:
            cells = [difference_cell((calls.get(metric) or {}).get(bin_label), scale, digits)
                     for metric, _, scale, digits in MARKDOWN_COLUMNS]
            if any(cell != "–" for cell in cells):
                rows.append(f"| {arm} | {bin_label} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def write_compare_arms(work: Path, arms: list[str]) -> Path:
    """The arms file `lawder compare --arms` reads: every seed's summary per arm, the replicate declared."""
    import yaml

    path = work / "compare.yaml"
    spec: dict[str, Any] = {"arms": {arm: [f"eval/{arm}/seed*/summary.json"] for arm in arms}}
    if "uniform-rep" in arms and "uniform" in arms:
        spec["replicates"] = {"uniform-rep": "uniform"}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def judge_report(judge: Path, data: Path) -> dict[str, Any]:
    """The judge's own Dice on the real test split, over all images and per lesion-size bin."""
    from lawder_core.data.h5 import load_arrays
    from lawder_core.evaluate import dice_for_run
    from lawder_core.metrics.judge_free import size_bin

    report, _ = dice_for_run(judge, data, "test")
    _, masks, _ = load_arrays(data, "test")
    dice = [im["metrics"]["foreground"]["Dice"] for im in report.per_image]
    by_bin: dict[str, list[float]] = {}
    for mask, value in zip(masks, dice, strict=True):
        by_bin.setdefault(size_bin(float((mask > 0).mean())) or "empty", []).append(value)
    return {"run": str(judge), "dice_on_real_test": float(report.foreground_mean["Dice"]),
            "dice_on_real_test_by_bin": {k: {"n": len(v), "dice": float(np.nanmean(v))} for k, v in by_bin.items()}}


def score_missing_kid_bins(work: Path, data: Path, arms: list[str], seeds: int, args: argparse.Namespace) -> None:
    """Step 6b for every scored job without it (jobs scored before it existed)."""
    cache: dict = {}
    for arm in arms:
        for seed in range(seeds):
            scored = work / "eval" / arm / f"seed{seed}"
            synthetic = work / "synthetic" / arm / f"seed{seed}.h5"
            if (scored / "summary.json").exists() and synthetic.exists():
                score_kid_bins(synthetic, data, scored, args, seed, cache)


def merge(args: argparse.Namespace, work: Path, data: Path, judge: Path | None, b: Budget, arms: list[str],
          started: float) -> dict[str, Any]:
    from lawder_core.files import write_text

    score_missing_kid_bins(work, data, arms, b.seeds, args)
    table = per_seed_table(work, arms, b.seeds)
    means = arm_means(table)
    resolution = resolutions(b.size)
    result = {
        "benchmark": "bench_law_quality (LAW revision 3: small lesions, fine-tuning, judge-free adherence)",
        "budget": b.__dict__, "arms": arms, "guidance": args.guidance,
        "data": {"h5": str(data), "lesion_frac": [0.003, 0.03], "blobs": 1},
        "base": {"run": str(work / "base"), "steps": b.base_steps, "cond_dropout": 1.0},
        "judge": judge_report(judge, data) if judge is not None and judge_done(judge, b.judge_epochs) else None,
        "complete": all(len(table.get(arm, {})) == b.seeds for arm in arms),
        "means": means, "verdicts": verdicts(table, arms, resolution=resolution), "per_seed": table,
        "against_prior": verdicts(table, [PRIOR, *[a for a in arms if a in LAW_ARMS]], reference=PRIOR,
                                  resolution=resolution) if PRIOR in arms else {},
        "decision_rule": "an arm beats uniform on a metric when its mean paired difference to uniform (over seeds) "
                         "exceeds twice the replicate spread (RMS over seeds of uniform-rep - uniform; for spurious "
                         "area at least one pixel per image) in the metric's better direction, with the same sign "
                         "on every seed",
        "compare": f"lawder compare --arms {write_compare_arms(work, arms)} --json",
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "load": os.getloadavg()},
        "seconds_this_process": round(time.perf_counter() - started, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    os.replace(tmp, out)
    write_text(out.with_suffix(".md"), markdown_tables(means, result["verdicts"]) + (
        "\n" + prior_table(result["against_prior"]) if result["against_prior"] else ""))
    for bin_label in BINS:
        if any(bin_label in entry.get("bins", {}) for entry in means.values()):
            print(text_table(means, bin_label), "\n")
    print(f"wrote {out}; pair by case with: {result['compare']}")
    return result


# ---------------------------------------------------------------- main


def wait_for(check: Callable[[], bool], what: str, seconds: float) -> None:
    while not check():
        log.info("waiting for %s", what)
        time.sleep(seconds)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    b = budget_of(args)
    index, count = shard_of(args.shard)
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; expected some of {ARMS}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with stage_lock(work, "data"):
        check_budget(work, b)
    data = prepare_data(work, b)
    if args.merge_only:
        merge(args, work, data, work / "judge", b, arms, started)
        return 0
    # the shared stages: shard 1 starts with the judge while shard 0 trains the base (one process: both, in turn)
    first, second = (train_judge, train_base) if index % 2 else (train_base, train_judge)
    first(work, data, b)
    second(work, data, b)
    judge = work / "judge"
    jobs = [(seed, arm) for seed in range(b.seeds) for arm in arms][index::count]
    cache: dict = {}
    for seed, arm in jobs:
        run_job(arm, seed, work, data, judge, b, args, cache)
    with stage_lock(work, "merge"):
        merge(args, work, data, judge, b, arms, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
