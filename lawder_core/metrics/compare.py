"""`lawder compare`: does one arm beat another? Paired differences per metric with a CI, a test and a noise floor.

For every metric that all compared runs score, and every requested pair of arms (default: each arm against the
first), the runs of the two arms are paired by case set: the run of A and the run of B that scored exactly the
same cases form a pair (fold i with fold i; several seeds on one test split pair in the order given). Arms that
do not pair up are refused (DataError, exit 3) with the first differing cases named. A case whose value is
undefined (null, NaN) in either run of a pair is left out of that pair, for both arms, and counted.

Each comparison B − A reports both arms' means on the paired cases, the mean of the per-case differences, its
hierarchical bootstrap CI (metrics/paired.py), the Wilcoxon signed-rank p of the per-case differences (each
case's difference averaged over the run pairs that share it), every run pair's mean difference and whether all
have the sign of the overall mean ("holds on every replicate"), and how many runs and cases are behind it.

A replicate arm (the same configuration as an original arm, another seed: declared, or found from the run
folders' config.json) is compared with its original and reported as the noise floor: the largest |bound| of the
replicate's CI, i.e. the biggest difference that a change of seed alone is compatible with. (Its mean difference
would be a poor floor: on five folds it can land near 0 by chance while single folds move by ±3 points.) Every
other difference of that metric must exceed the floor, and its verdict is a direction only when the CI excludes
0, the sign holds on every run pair and the noise floor (if any) is cleared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lawder_core.errors import DataError, UsageError
from lawder_core.metrics.arms import FOREGROUND_MEAN, METRIC_NAMES, Arm, ArmSpec, detect_replicates, read_arm
from lawder_core.metrics.paired import DEFAULT_LEVEL, DEFAULT_RESAMPLES, paired_difference
from lawder_core.metrics.summary import to_jsonable

DEFAULT_METRIC = "Dice"
NOISE_FLOOR = "noise floor"
DIFFERENCE = "difference"
MIN_RESAMPLES = 100
# How every figure is made, written into the result beside the numbers.
METHOD = {
    "difference": "B - A: mean of the per-case differences over every paired run and case",
    "ci": "hierarchical bootstrap (run pairs with replacement, then cases within each with replacement), "
          "percentile interval",
    "test": "two-sided Wilcoxon signed-rank on per-case differences (mean over the run pairs sharing a case; "
            "zero differences dropped)",
    "pairing": "runs of two arms pair when they score the same set of cases, in the order given",
    "noise_floor": "the largest |CI bound| of a replicate's difference against its original (what a change of "
                   "seed alone is compatible with); a difference exceeds it when its |mean| is larger",
    "verdict": "a direction when the CI excludes 0, every run pair has the same sign and the noise floor (when "
               "measured) is exceeded; else undecided",
}


@dataclass(frozen=True)
class Expectation:
    """A gate: `left op right` on the gated metric, with a margin the CI bound must clear."""

    left: str
    op: str  # ">" or "<"
    right: str

    @property
    def text(self) -> str:
        return f"{self.left} {self.op} {self.right}"


@dataclass(frozen=True)
class CompareRequest:
    arms: tuple[ArmSpec, ...]
    replicates: tuple[tuple[str, str], ...] = ()  # (replicate, original), declared
    pairs: tuple[str, ...] = ()  # "B-A": report B − A; none: every arm against the first
    expect: tuple[str, ...] = ()  # "B > A" / "B < A"
    metric: str | None = None  # the gated and plotted metric; None: Dice's foreground mean
    margin: float = 0.0
    resamples: int = DEFAULT_RESAMPLES
    level: float = DEFAULT_LEVEL
    seed: int = 0


@dataclass(frozen=True)
class Plan:
    """What to compute: ordered (b, a) pairs meaning b − a, which are noise floors, and the gates."""

    pairs: tuple[tuple[str, str], ...]
    noise_floors: frozenset[tuple[str, str]]
    gates: tuple[tuple[Expectation, tuple[str, str], int], ...]  # expectation, its pair, +1 (b − a) or −1 (a − b)


# ---------------------------------------------------------------- the request


def parse_pair(text: str, names: Sequence[str]) -> tuple[str, str]:
    """'B-A' (or 'B - A', 'B−A') as (B, A); arm names may hold '-', so every split into two known arms is tried."""
    text = text.replace("−", "-").strip()
    splits = {(text[:i].strip(), text[i + 1:].strip()) for i, ch in enumerate(text) if ch == "-"}
    found = [(b, a) for b, a in splits if b in names and a in names]
    if len(found) != 1:
        why = "is ambiguous" if found else "does not name two arms"
        raise UsageError(f"--pair {text!r} {why}; arms: {', '.join(names)}.", "Write --pair 'B-A' to report B − A.")
    b, a = found[0]
    if a == b:
        raise UsageError(f"--pair {text!r} compares an arm with itself.")
    return b, a


def parse_expectation(text: str, names: Sequence[str]) -> Expectation:
    """'B > A' or 'B < A' between two known arms."""
    ops = [ch for ch in text if ch in "<>"]
    if len(ops) != 1:
        raise UsageError(f"--expect {text!r} is not 'B > A' or 'B < A'.", "E.g. --expect 'ORDER > T' --margin 0.01.")
    left, _, right = (side.strip() for side in text.partition(ops[0]))
    for side in (left, right):
        if side not in names:
            raise UsageError(f"--expect {text!r}: {side!r} is not an arm; arms: {', '.join(names)}.")
    if left == right:
        raise UsageError(f"--expect {text!r} compares an arm with itself.")
    return Expectation(left, ops[0], right)


def check_request(request: CompareRequest) -> tuple[list[tuple[str, str]], list[Expectation]]:
    """Refuse what can be known before reading any file; the parsed pairs and expectations."""
    names = [spec.name for spec in request.arms]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise UsageError(f"arm(s) {', '.join(duplicated)} named twice (on the command line and in --arms?).")
    if len(names) < 2:
        raise UsageError(f"compare needs at least two arms, got {len(names)}.",
                         "Name them: lawder compare A='runs/a/*/summary.json' B='runs/b/*/summary.json'.")
    for replicate, original in request.replicates:
        for name in (replicate, original):
            if name not in names:
                raise UsageError(f"replicate {replicate}={original}: {name!r} is not an arm; arms: {', '.join(names)}.")
        if replicate == original:
            raise UsageError(f"replicate {replicate}={original}: an arm cannot replicate itself.")
    if request.resamples < MIN_RESAMPLES:
        raise UsageError(f"--resamples {request.resamples} is too few for a {request.level:.0%} interval; use "
                         f"{MIN_RESAMPLES} or more (default {DEFAULT_RESAMPLES}).")
    if not 0 < request.level < 1:
        raise UsageError(f"the confidence level {request.level} must lie between 0 and 1.")
    if not math.isfinite(request.margin) or request.margin < 0:
        raise UsageError(f"--margin {request.margin} must be 0 or more (in the metric's units).")
    pairs = [parse_pair(p, names) for p in request.pairs]
    return pairs, [parse_expectation(e, names) for e in request.expect]


def plan(names: Sequence[str], pairs: Sequence[tuple[str, str]], expectations: Sequence[Expectation],
         replicates: Mapping[str, str]) -> Plan:
    """Requested pairs (default: each non-replicate arm against the first), each replicate against its original,
    and the pairs the gates need, each once, in that order."""
    wanted = list(pairs) or [(name, names[0]) for name in names[1:] if name not in replicates]
    wanted += [(rep, orig) for rep, orig in replicates.items()]
    gates = []
    for e in expectations:
        if (e.right, e.left) in wanted and (e.left, e.right) not in wanted:
            gates.append((e, (e.right, e.left), -1))
        else:
            wanted.append((e.left, e.right))
            gates.append((e, (e.left, e.right), 1))
    unique = tuple(dict.fromkeys(wanted))
    floors = frozenset(p for p in unique if replicates.get(p[0]) == p[1] or replicates.get(p[1]) == p[0])
    return Plan(unique, floors, tuple(gates))


# ---------------------------------------------------------------- pairing runs by case set


def _case_groups(arm: Arm, metric: str) -> dict[frozenset[str], list[int]]:
    groups: dict[frozenset[str], list[int]] = {}
    for i, run in enumerate(arm.runs):
        groups.setdefault(frozenset(run.metrics[metric]), []).append(i)
    return groups


def _cases_text(cases: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in cases[:3])
    more = f" and {len(cases) - 3} more" if len(cases) > 3 else ""
    return f"case{'s' if len(cases) > 1 else ''} {shown}{more}"


def _mismatch(metric: str, arm: Arm, index: int, cases: frozenset[str], other: Arm,
              other_groups: Mapping[frozenset[str], list[int]]) -> DataError:
    # name the differences from the other arm's closest case set: the fold or split this run was meant to match
    closest = max(other_groups, key=lambda s: (len(s & cases), -len(s ^ cases)))
    here, there = sorted(cases - closest), sorted(closest - cases)
    parts = [f"{_cases_text(here)} only in {arm.name}'s {arm.runs[index].path}"] if here else []
    if there:
        parts.append(f"{_cases_text(there)} only in {other.name}'s {other.runs[other_groups[closest][0]].path}")
    return DataError(f"cannot pair arm {arm.name} with arm {other.name} on {metric}: " + "; ".join(parts) + ".",
                     "Paired runs must score the same cases: evaluate every arm on the same split (and folds).")


def pair_runs(metric: str, a: Arm, b: Arm) -> list[tuple[int, int]]:
    """(run of a, run of b) index pairs with identical case sets, in a's order; DataError when they do not match."""
    groups_a, groups_b = _case_groups(a, metric), _case_groups(b, metric)
    for cases, runs in groups_b.items():
        if cases not in groups_a:
            raise _mismatch(metric, b, runs[0], cases, a, groups_a)
    for cases, runs in groups_a.items():
        if cases not in groups_b:
            raise _mismatch(metric, a, runs[0], cases, b, groups_b)
        if len(runs) != len(groups_b[cases]):
            raise DataError(f"cannot pair arm {a.name} with arm {b.name} on {metric}: {len(runs)} run(s) of "
                            f"{a.name} (e.g. {a.runs[runs[0]].path}) and {len(groups_b[cases])} of {b.name} "
                            f"(e.g. {b.runs[groups_b[cases][0]].path}) score the same {len(cases)} cases.",
                            "Give both arms as many runs (seeds) on each split or fold.")
    return sorted(pair for cases in groups_a for pair in zip(groups_a[cases], groups_b[cases], strict=True))


# ---------------------------------------------------------------- one comparison


def compare_metric(metric: str, a: Arm, b: Arm, *, resamples: int, level: float, seed: int) -> dict[str, Any]:
    """B − A on one metric: means, the paired difference with its CI and p, and the counts behind them."""
    pairs = pair_runs(metric, a, b)
    differences, values_a, values_b, used = [], [], [], []
    by_case: dict[str, list[float]] = {}
    left_out = 0
    for ia, ib in pairs:
        scores_a, scores_b = a.runs[ia].metrics[metric], b.runs[ib].metrics[metric]
        cases = sorted(scores_a)
        va = np.array([scores_a[c] for c in cases])
        vb = np.array([scores_b[c] for c in cases])
        keep = np.isfinite(va) & np.isfinite(vb)
        left_out += int((~keep).sum())
        if not keep.any():
            continue
        d = vb[keep] - va[keep]
        differences.append(d)
        values_a.append(va[keep])
        values_b.append(vb[keep])
        used.append([ia, ib])
        for case, diff in zip((c for c, k in zip(cases, keep, strict=True) if k), d, strict=True):
            by_case.setdefault(case, []).append(float(diff))
    row: dict[str, Any] = {"metric": metric, "name": f"{b.name} - {a.name}", "a": a.name, "b": b.name,
                           "pairs": used, "n_runs": len(used), "n_cases": len(by_case), "n_left_out": left_out}
    if not differences:
        return {**row, "mean_a": None, "mean_b": None, "difference": None, "ci_low": None, "ci_high": None,
                "p_wilcoxon": None, "run_differences": [], "holds_on_every_replicate": False, "n_values": 0}
    case_means = np.array([np.mean(v) for v in by_case.values()])
    result = paired_difference(differences, case_means, resamples=resamples, level=level, seed=seed)
    sign = np.sign(result.mean)
    return {**row, "mean_a": float(np.concatenate(values_a).mean()), "mean_b": float(np.concatenate(values_b).mean()),
            "difference": result.mean, "ci_low": result.ci_low, "ci_high": result.ci_high,
            "p_wilcoxon": result.p_wilcoxon, "run_differences": list(result.run_means),
            "holds_on_every_replicate": bool(sign != 0 and all(np.sign(m) == sign for m in result.run_means)),
            "n_values": result.n_values}


def judge(row: dict[str, Any], floor: float | None) -> None:
    """Add the noise floor, whether the difference clears it, and the verdict (in place)."""
    row["noise_floor"] = floor
    diff = row["difference"]
    row["exceeds_noise_floor"] = None if floor is None or diff is None else bool(abs(diff) > floor)
    verdict = "undecided"
    if diff is not None and row["holds_on_every_replicate"] and row["exceeds_noise_floor"] is not False:
        if row["ci_low"] > 0:
            verdict = f"{row['b']} > {row['a']}"
        elif row["ci_high"] < 0:
            verdict = f"{row['b']} < {row['a']}"
    row["verdict"] = verdict


# ---------------------------------------------------------------- the whole comparison


def resolve_metric(name: str, metrics: Sequence[str]) -> str | None:
    """The compared metric a --metric name means (see arms.METRIC_NAMES), or None."""
    if name in metrics:
        return name
    key, _, region = name.partition("/")
    if region in ("", FOREGROUND_MEAN):
        if f"{key}/{FOREGROUND_MEAN}" in metrics:
            return f"{key}/{FOREGROUND_MEAN}"
        regions = [m for m in metrics if m.startswith(f"{key}/")]
        if len(regions) == 1:
            return regions[0]
    return None


def common_metrics(arms: Sequence[Arm], notes: list[str]) -> list[str]:
    """Metrics every run of every arm scores, in the first run's order; the others are named in `notes`."""
    order = list(dict.fromkeys(m for arm in arms for run in arm.runs for m in run.metrics))
    kept = []
    for metric in order:
        missing = next(((arm, run) for arm in arms for run in arm.runs if metric not in run.metrics), None)
        if missing is None:
            kept.append(metric)
        else:
            notes.append(f"{metric} left out: {missing[0].name}'s {missing[1].path} does not score it.")
    if not kept:
        raise DataError("the arms share no per-case metric: every run must score at least one in common.",
                        "Compare summaries of the same kind (e.g. all from `lawder evaluate --dice`).")
    return kept


def check_empty_policies(arms: Sequence[Arm]) -> None:
    policies = {(run.empty_policy, arm.name, run.path) for arm in arms for run in arm.runs if run.empty_policy}
    if len({p[0] for p in policies}) > 1:
        shown = "; ".join(f"{name}'s {path}: {policy!r}" for policy, name, path in sorted(policies)[:4])
        raise DataError(f"the summaries score empty masks differently ({shown}), so their Dice do not compare.",
                        "Evaluate every arm with the same --empty-policy.")


def kid_spread(arm: Arm) -> dict[str, Any] | None:
    """Mean and sd of an arm's KID subset values over all its runs (not paired: no CI)."""
    runs = [run.kid_subset_values for run in arm.runs if run.kid_subset_values]
    values = np.array([v for vs in runs for v in vs if math.isfinite(v)])
    if not len(values):
        return None
    return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n_values": int(len(values)), "n_runs": len(runs)}


def gate_rows(plan_: Plan, rows: Sequence[dict[str, Any]], metric: str, margin: float,
              level: float) -> list[dict[str, Any]]:
    """One row per --expect: passed when the CI's bound clears the margin in the expected direction."""
    out = []
    for expectation, (b, a), orientation in plan_.gates:
        row = next(r for r in rows if r["metric"] == metric and (r["b"], r["a"]) == (b, a))
        gate = {"expect": expectation.text, "metric": metric, "margin": margin, "comparison": row["name"]}
        if row["difference"] is None:
            out.append({**gate, "passed": False, "ci": None,
                        "message": f"{expectation.text} on {metric}: no case has a value in both arms."})
            continue
        # the CI of left − right: the row's own, or the row's negated when the row is right − left
        low, high = ((row["ci_low"], row["ci_high"]) if orientation > 0 else (-row["ci_high"], -row["ci_low"]))
        passed = low > margin if expectation.op == ">" else high < -margin
        bound, need = ("lower", f"above {margin:+g}") if expectation.op == ">" else ("upper", f"below {-margin:+g}")
        message = None if passed else (
            f"{expectation.text} on {metric} is not supported: the {level:.0%} CI of {expectation.left} - "
            f"{expectation.right} is [{low:.4g}, {high:.4g}], its {bound} bound not {need}.")
        out.append({**gate, "passed": bool(passed), "ci": [low, high], "message": message})
    return out


def compare_all(metrics: Sequence[str], arms: Mapping[str, Arm], work: Plan, request: CompareRequest,
                notes: list[str]) -> list[dict[str, Any]]:
    """Every planned comparison on every metric; replicate rows set the noise floor the others are judged by."""
    rows = []
    for metric in metrics:
        found = [(compare_metric(metric, arms[a], arms[b], resamples=request.resamples, level=request.level,
                                 seed=request.seed), (b, a) in work.noise_floors) for b, a in work.pairs]
        floors = [max(abs(row["ci_low"]), abs(row["ci_high"])) for row, is_floor in found
                  if is_floor and row["difference"] is not None]
        floor = max(floors) if floors else None
        for row, is_floor in found:
            row["kind"] = NOISE_FLOOR if is_floor else DIFFERENCE
            if is_floor:
                row.update(noise_floor=None, exceeds_noise_floor=None, verdict=None)
            else:
                judge(row, floor)
            if row["n_left_out"]:
                notes.append(f"{metric}, {row['name']}: {row['n_left_out']} case value(s) left out "
                             "(undefined in at least one of the arms).")
            if row["difference"] is None:
                notes.append(f"{metric}, {row['name']}: no case has a value in both arms.")
            rows.append(row)
    return rows


def compare(request: CompareRequest) -> dict[str, Any]:
    """Read the arms, pair their runs, and return the JSON-ready result (see the module docstring)."""
    pairs, expectations = check_request(request)
    arms = {spec.name: read_arm(spec) for spec in request.arms}
    check_empty_policies(list(arms.values()))
    declared = dict(request.replicates)
    detected = detect_replicates(list(arms.values()), declared)
    replicates = {**declared, **detected}
    work = plan(list(arms), pairs, expectations, replicates)
    involved = [arm for name, arm in arms.items() if any(name in p for p in work.pairs)]
    notes: list[str] = []
    metrics = common_metrics(involved, notes)
    primary = resolve_metric(request.metric or DEFAULT_METRIC, metrics)
    if primary is None and (request.metric is not None or expectations):
        raise UsageError(f"--metric {request.metric or DEFAULT_METRIC!r} is not among the compared metrics: "
                         f"{', '.join(metrics)}.", f"Name one of them: {METRIC_NAMES}.")
    primary = primary or metrics[0]
    metrics = [primary] + [m for m in metrics if m != primary]

    rows = compare_all(metrics, arms, work, request, notes)
    kid = {name: spread for name, arm in arms.items() if (spread := kid_spread(arm)) is not None}
    result = {
        "arms": {name: {"summaries": [run.path for run in arm.runs], "runs": [run.run for run in arm.runs]}
                 for name, arm in arms.items()},
        "replicates": {rep: {"original": orig, "how": "declared" if rep in declared else "same config.json"}
                       for rep, orig in replicates.items()},
        "metric": primary,
        "metrics": metrics,
        "settings": {"level": request.level, "resamples": request.resamples, "seed": request.seed, **METHOD},
        "comparisons": rows,
        "kid": kid,
        "gates": gate_rows(work, rows, primary, request.margin, request.level),
        "notes": notes,
    }
    return to_jsonable(result)


def missed_gates(result: Mapping[str, Any]) -> list[str]:
    return [gate["message"] for gate in result["gates"] if not gate["passed"]]
