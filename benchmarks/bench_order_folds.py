"""ORDER revision 3 on K folds of Kvasir-SEG: two-stage and joint ORDER against MK-UNet-T, its extended-training
control, its widened control and a replicate of T with another seed (the noise floor).

Arms (every one on the same folds, the same batch size, learning rate, augmentation and structure loss; MK-UNet's
deep supervision at the same weight in every model; ORDER's region-head weight on ORDER's heads only):

    t             MK-UNet-T, E epochs, seed 0
    t-rep         MK-UNet-T, E epochs, seed 1                      (A/A: the replicate spread is the noise floor)
    order-2stage  ORDER from that fold's `t` run, E2 epochs, trunk frozen (BatchNorm in eval), adapter only
    t-ext         MK-UNet-T, E + E2 epochs, seed 0                  (the control for the extra training)
    order-joint   ORDER trained jointly (detached region heads, adapter group with warm-up), E + E2 epochs
    wide          mkunet-t-wide (ORDER's parameter count), E + E2 epochs
    order-2stage-fast  as order-2stage with the cheaper attention budget (rho 0.15, kv_grid 8)   [opt-in]

Every run trains with `--folds K --fold I` (validation = the held-out fold) and `--select last`: the held-out fold
is then an unbiased score of the last checkpoint (selecting on the fold and scoring on it would flatter whichever
arm is selected more). Each run is scored with `lawder evaluate` twice: on its held-out fold (per image: the
paired data of `lawder compare`) and on the untouched test split. order-2stage is also scored on the test split
with its best checkpoint, which keeps the trunk unless ORDER beat it on the held-out fold (that selection is
unbiased on the test split only).

The work goes fold by fold (t first, since order-2stage starts from it), so a partial run compares complete
folds. Everything is resumable: a finished run is skipped, an interrupted one resumes from its last epoch
(bit-exact), a written summary is never recomputed. `--shard I/N` takes every N-th fold, so one single-thread
process per core can share the work.

Usage (the revision-3 comparison at 128 px, two such single-thread processes on a 2-core machine: about 55 min
per fold on an AVX-512 EPYC, T ~15 s per epoch, joint ORDER ~23 s; 2.4 core-hours per fold on an older CPU):
    python benchmarks/bench_order_folds.py --size 128 --epochs 30 --extra 15 --work /work/bench/order_folds
then `lawder compare --arms WORK/arms.yaml` (written by this script) for the paired table.

Merging results of several shards or sessions (`--merge A.json B.json ... --out R.json`) keeps one row per arm and
fold, the later file's when two hold it, each with its "source" file. Both scores of such a rerun go under
"reproduced": runs are bit-exact on one machine, not across machines, so the runs of one fold pair only when one
machine made them all. It adds "fold_level": the paired differences of the issue's pairs from each fold's mean
Dice, with a bootstrap CI over folds and a Student t CI, the view of folds whose per-case scores are gone;
`lawder compare` on the per-case summaries is the protocol's (DESIGN §4) whenever they exist.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lawder_core import runs
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_folder import prepare_folder
from lawder_core.evaluate import EvaluateRequest, Inputs, Metrics, evaluate
from lawder_core.files import write_json, write_text
from lawder_core.metrics.paired import hierarchical_bootstrap, percentile_interval, t_interval
from lawder_core.models.configs import OrderConfig
from lawder_core.train.configs import SegTrainConfig, check_seg_config
from lawder_core.train.seg import summarise_run, train_segmenter


@dataclass(frozen=True)
class Arm:
    model: str
    seed: int = 0
    extended: bool = False  # E + E2 epochs instead of E
    stage_two_of: str | None = None  # E2 epochs from this arm's run of the same fold, trunk frozen
    order: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)  # other SegTrainConfig fields (the adapter sweep)


ARMS = {
    "t": Arm("mkunet-t"),
    "t-rep": Arm("mkunet-t", seed=1),
    "order-2stage": Arm("mkunet-t-order", stage_two_of="t"),
    "t-ext": Arm("mkunet-t", extended=True),
    "order-joint": Arm("mkunet-t-order", extended=True),
    "wide": Arm("mkunet-t-wide", extended=True),
    "order-2stage-fast": Arm("mkunet-t-order", stage_two_of="t", order={"rho": 0.15, "kv_grid": 8}),
    # the adapter's own learning rate and warm-up in joint training (a short sweep around 0.5 x lr, 2 epochs)
    "order-joint-lr1-w2": Arm("mkunet-t-order", extended=True, train={"adapter_lr_scale": 1.0}),
    "order-joint-lr025-w2": Arm("mkunet-t-order", extended=True, train={"adapter_lr_scale": 0.25}),
    "order-joint-lr05-w0": Arm("mkunet-t-order", extended=True, train={"adapter_warmup_epochs": 0}),
    "order-joint-lr1-w0": Arm("mkunet-t-order", extended=True,
                              train={"adapter_lr_scale": 1.0, "adapter_warmup_epochs": 0}),
}
DEFAULT_ARMS = ("t", "order-2stage", "t-rep", "t-ext", "order-joint", "wide")
REPLICATES = {"t-rep": "t"}
# B - A pairs of the fold-level table: the noise floor first, then the goals and their controls
FOLD_PAIRS = (("t-rep", "t"), ("order-2stage", "t"), ("order-2stage", "t-ext"), ("t-ext", "t"),
              ("order-joint", "t"), ("order-joint", "t-ext"), ("order-joint", "order-2stage"),
              ("order-joint", "wide"), ("wide", "t-ext"), ("order-2stage-fast", "order-2stage"))
SCORES = ("fold_dice", "test_dice")


def prepared(data: Path, size: int, work: Path) -> Path:
    out = work / f"kvasir-{size}.h5"
    if not out.exists():
        prepare_folder("kvasir", data, out, PrepareOptions(size=size, seed=0))
    return out


def run_folder(work: Path, arm: str, fold: int) -> Path:
    return work / "runs" / arm / f"fold{fold}"


def train_config(args: argparse.Namespace, h5: Path, arm_name: str, fold: int) -> SegTrainConfig:
    arm = ARMS[arm_name]
    epochs = args.extra if arm.stage_two_of else args.epochs + (args.extra if arm.extended else 0)
    out = run_folder(args.work, arm_name, fold)
    cfg = SegTrainConfig(data=str(h5), out=str(out), model=arm.model, size=args.size, epochs=epochs,
                         batch_size=args.batch_size, lr=args.lr, seed=arm.seed, folds=args.folds, fold=fold,
                         select="last", order=OrderConfig(**arm.order), resume=runs.has_run(out), **arm.train)
    if arm.stage_two_of:
        cfg = replace(cfg, init_from=str(run_folder(args.work, arm.stage_two_of, fold)), freeze_trunk=True)
    return cfg


def finished(cfg: SegTrainConfig) -> bool:
    records = [r for r in runs.read_metrics(cfg.out) if r.get("epoch", -1) >= 0]
    return bool(records) and records[-1]["epoch"] + 1 >= cfg.epochs


def train(cfg: SegTrainConfig) -> float:
    """Train (or resume) one run; returns the seconds it took in this invocation."""
    if finished(cfg):
        return 0.0
    check_seg_config(cfg)
    runs.open_run(cfg.out, resume=cfg.resume, force=False)
    tic = time.perf_counter()
    train_segmenter(cfg)
    runs.write_summary(cfg.out, summarise_run(cfg.out))
    return time.perf_counter() - tic


def score(run: Path, h5: Path, split: str, out: Path, note: str) -> dict[str, Any]:
    """`lawder evaluate --dice` of `run` (a run folder or one of its checkpoint folders), once."""
    path = out / "summary.json"
    if path.exists():
        return json.loads(path.read_text())
    request = EvaluateRequest(out=str(path), metrics=Metrics(dice=True),
                              inputs=Inputs(run=str(run), data=str(h5), split=split),
                              metadata={"command": "benchmarks/bench_order_folds.py", "note": note})
    return evaluate(request)


def one_unit(args: argparse.Namespace, h5: Path, arm: str, fold: int) -> dict[str, Any]:
    cfg = train_config(args, h5, arm, fold)
    seconds = train(cfg)
    run = Path(cfg.out)
    evals = args.work / "evaluate"
    held_out = score(run, h5, "fold", evals / arm / f"fold{fold}", f"{arm}, fold {fold}: held-out fold, last/")
    test = score(run, h5, "test", evals / f"{arm}.test" / f"fold{fold}", f"{arm}, fold {fold}: test split, last/")
    row = {"arm": arm, "fold": fold, "model": cfg.model, "seed": cfg.seed, "epochs": cfg.epochs,
           "steps": summarise_run(run)["steps"], "fold_dice": held_out["foreground_mean"]["Dice"],
           "test_dice": test["foreground_mean"]["Dice"], "train_seconds_this_invocation": round(seconds, 1)}
    if ARMS[arm].stage_two_of:
        best = score(run / runs.BEST, h5, "test", evals / f"{arm}.test-best" / f"fold{fold}",
                     f"{arm}, fold {fold}: test split, best/ (the trunk unless ORDER beat it on the fold)")
        row["test_dice_best"] = best["foreground_mean"]["Dice"]
        row["best_epoch"] = summarise_run(run)["best_epoch"]
    return row


def write_arms_file(args: argparse.Namespace) -> None:
    """The `lawder compare --arms` file: held-out-fold summaries per arm, and the replicate."""
    arms = {arm: [str(args.work / "evaluate" / arm / "fold*" / "summary.json")] for arm in args.arms}
    arms.update({f"{arm}.test": [str(args.work / "evaluate" / f"{arm}.test" / "fold*" / "summary.json")]
                 for arm in args.arms})
    replicates = {rep: orig for rep, orig in REPLICATES.items() if rep in args.arms and orig in args.arms}
    replicates.update({f"{rep}.test": f"{orig}.test" for rep, orig in replicates.items()})
    text = json.dumps({"arms": arms, "replicates": replicates}, indent=1)  # JSON is YAML
    write_text(args.work / "arms.yaml", text + "\n")


def write_result(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    result = {"benchmark": "order_folds", "data": str(args.data), "size": args.size, "folds": args.folds,
              "recipe": {"E": args.epochs, "E2": args.extra, "batch_size": args.batch_size, "lr": args.lr,
                         "optimizer": "AdamW, per-epoch cosine; ORDER's adapter its own group (joint: lr x0.5, "
                                      "2-epoch warm-up; two-stage: the adapter alone at lr)",
                         "loss": "structure loss, window scaled with the size; MK-UNet deep supervision 0.2 in "
                                 "every model; ORDER region heads 0.2 on ORDER's heads only, detached",
                         "select": "last (held-out fold unbiased); order-2stage also best/ on the test split",
                         "augmentation": "flips, 90° rotations, scale/crop"},
              "arms": {name: {"model": ARMS[name].model, "seed": ARMS[name].seed, "train": ARMS[name].train,
                              "epochs": args.extra if ARMS[name].stage_two_of else
                              args.epochs + (args.extra if ARMS[name].extended else 0),
                              "stage_two_of": ARMS[name].stage_two_of, "order": ARMS[name].order}
                       for name in args.arms},
              "machine": f"{platform.machine()}, {args.threads} torch thread(s) per process",
              "runs": sorted(rows, key=lambda r: (r["fold"], args.arms.index(r["arm"])))}
    write_json(args.out, result)


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """One result from several: one row per (arm, fold), the later file's; reruns listed with both scores."""
    merged: dict[str, Any] = {}
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    reproduced = []
    for path in paths:
        result = json.loads(path.read_text())
        arms = {**merged.get("arms", {}), **result["arms"]}
        merged.update({k: v for k, v in result.items() if k != "runs"}, arms=arms)
        for row in result["runs"]:
            key = (row["arm"], row["fold"])
            earlier = rows.get(key)
            if earlier is not None:
                if all(earlier[score] == row[score] for score in SCORES):
                    continue  # the same run reported again (a later shard lists the T runs its second stage used)
                reproduced.append({"arm": row["arm"], "fold": row["fold"],
                                   **{score: [earlier[score], row[score]] for score in SCORES}})
            rows[key] = {**row, "source": path.name}  # runs of one fold pair only if made on one machine
    order = {arm: i for i, arm in enumerate(merged.get("arms", {}))}
    merged["runs"] = sorted(rows.values(), key=lambda r: (r["fold"], order[r["arm"]]))
    merged["reproduced"] = reproduced
    merged["fold_level"] = fold_level(merged["runs"])
    return merged


def fold_difference(per_fold: dict[int, float], level: float = 0.95) -> dict[str, Any]:
    """Mean of per-fold differences with a bootstrap CI over folds and a Student t CI (n - 1 degrees of freedom)."""
    values = np.array(list(per_fold.values()))
    mean = float(values.mean())
    boot = percentile_interval(hierarchical_bootstrap([np.array([v]) for v in values]), level)
    sign = "b > a" if (values > 0).all() else "b < a" if (values < 0).all() else "mixed"
    return {"per_fold": {str(k): v for k, v in per_fold.items()}, "mean": mean, "bootstrap_ci": list(boot),
            "t_ci": list(t_interval(values, level)), "every_fold": sign}


def fold_level(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """B - A per fold of each score, for the pairs in FOLD_PAIRS that share at least two folds."""
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault(row["arm"], {})[row["fold"]] = row
    table = []
    for b, a in FOLD_PAIRS:
        folds = sorted(set(by_arm.get(b, {})) & set(by_arm.get(a, {})))
        if len(folds) < 2:
            continue
        for score in SCORES:
            per_fold = {k: by_arm[b][k][score] - by_arm[a][k][score] for k in folds}
            table.append({"b": b, "a": a, "score": score, **fold_difference(per_fold)})
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/kvasir-seg-256"))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30, help="E: T's epochs (and the trunk's, for two-stage).")
    parser.add_argument("--extra", type=int, default=15, help="E2: the second stage's epochs.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/order_folds"))
    parser.add_argument("--out", type=Path, default=None, help="Result JSON (default WORK/result.shardI.json).")
    parser.add_argument("--shard", default="0/1", help="I/N: every N-th fold from the I-th.")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="RESULT",
                        help="Merge these result JSONs into --out (nothing is trained) and add the fold-level table.")
    args = parser.parse_args(argv)
    if args.merge:
        if args.out is None:
            parser.error("--merge needs --out")
        missing = [str(path) for path in args.merge if not path.is_file()]
        if missing:
            parser.error(f"no result file: {', '.join(missing)}")
        write_json(args.out, merge_results(args.merge))
        return
    index, count = (int(v) for v in args.shard.split("/"))
    args.out = args.out or args.work / f"result.shard{index}.json"
    for arm in args.arms:
        needed = ARMS[arm].stage_two_of
        if needed and needed not in args.arms:
            parser.error(f"arm {arm} starts from arm {needed}: add it to --arms")
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    h5 = prepared(args.data, args.size, args.work)
    write_arms_file(args)
    rows: list[dict[str, Any]] = []
    for fold in range(index, args.folds, count):
        for arm in args.arms:
            rows.append(one_unit(args, h5, arm, fold))
            print(json.dumps(rows[-1]), flush=True)
            write_result(args, rows)


if __name__ == "__main__":
    main()
