"""The arms of a comparison: which `summary.json` files each holds, and the per-case scores read from them.

An arm is one or more summaries written by `lawder evaluate` (a run per seed or per fold). It is named on the
command line as NAME=GLOB (a glob may match several files; a folder stands for its summary.json) or in a YAML
file `{arms: {NAME: [GLOB, ...]}, replicates: {REPLICATE: ORIGINAL}}` whose relative globs start from the
file's folder. Within one glob the matches are taken in path order.

Per-case scores, each a metric name mapped to {case id: value} (non-finite values and null become NaN):
  * `metric_per_case`: every numeric score of every region, named METRIC/REGION (Dice/foreground,
    IoU/tumor, ...). Confusion counts (TP, FP, FN, TN, n_ref, n_pred) are counts, not scores, and stay out;
    Dice_image_mean/IoU_image_mean stay out when every case is one image (they equal Dice/IoU there). With more
    than one region, Dice/foreground_mean and IoU/foreground_mean are each case's mean over its regions (NaN
    regions left out), the per-case form of the summary's `foreground_mean`.
  * `summary[SECTION]["per_case"]`: rows with a `case` key; every numeric field becomes SECTION.FIELD, except
    the fields that describe the case rather than score it (`lesion_frac`: the same in every arm).
KID subset values (`fid.kid_subset_values`) are not paired by case and are kept per run as they are.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lawder_core.errors import DataError, UsageError

SUMMARY_FILE = "summary.json"
RUN_CONFIG = "config.json"
COUNT_KEYS = frozenset({"TP", "FP", "FN", "TN", "n_ref", "n_pred"})
# Per-case fields of a section that describe the case (its mask), not a model's output on it: every arm has the
# same value, and a "difference" of 0 with a verdict beside it would read as a finding.
CASE_DESCRIPTORS = frozenset({"lesion_frac"})
IMAGE_MEAN_KEYS = ("Dice_image_mean", "IoU_image_mean")
FOREGROUND_MEAN = "foreground_mean"
FOREGROUND_MEAN_KEYS = ("Dice", "IoU")
# Config keys that differ between replicates of one arm without changing what is tested.
REPLICATE_FREE_KEYS = frozenset({"seed", "out", "resume"})
_NAME_FORBIDDEN = set("=/<>, \t")
METRIC_NAMES = (
    "METRIC/REGION for Dice and IoU (Dice/foreground, IoU/tumor; Dice/foreground_mean is each case's mean over "
    "the regions, and plain Dice means that, or the only region), SECTION.FIELD for other per-case scores "
    "(adherence.contrast)"
)


@dataclass(frozen=True)
class ArmSpec:
    """An arm as the user named it: a name and the globs of its summaries."""

    name: str
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class RunScores:
    """One summary.json: its per-case scores and what it says about the run it scored."""

    path: str
    run: str | None  # metadata.inputs.run: the run folder `lawder evaluate` scored
    empty_policy: str | None
    metrics: Mapping[str, Mapping[str, float]]  # metric -> {case: value}, NaN where undefined
    regions: tuple[str, ...]
    kid_subset_values: tuple[float, ...] | None


@dataclass(frozen=True)
class Arm:
    name: str
    runs: tuple[RunScores, ...]


# ---------------------------------------------------------------- naming the arms


def check_arm_name(name: str, where: str) -> str:
    name = name.strip()
    if not name or _NAME_FORBIDDEN & set(name):
        raise UsageError(f"{where}: arm name {name!r} must be non-empty without spaces or any of = / < > ,",
                         "Name arms like ORDER, mkunet-t or seed_1.")
    return name


def specs_from_args(args: Iterable[str]) -> list[ArmSpec]:
    """NAME=GLOB arguments; a name given twice collects every glob given for it."""
    patterns: dict[str, list[str]] = {}
    for arg in args:
        name, sep, pattern = arg.partition("=")
        if not sep or not pattern.strip():
            raise UsageError(f"{arg!r} is not NAME=GLOB.",
                             "Name each arm: lawder compare A='runs/a/*/summary.json' B='runs/b/*/summary.json'.")
        patterns.setdefault(check_arm_name(name, arg), []).append(pattern.strip())
    return [ArmSpec(name, tuple(p)) for name, p in patterns.items()]


def specs_from_yaml(path: str | os.PathLike) -> tuple[list[ArmSpec], dict[str, str]]:
    """Arms and declared replicates from `{arms: {NAME: [GLOB, ...]}, replicates: {REPLICATE: ORIGINAL}}`."""
    from lawder_core.config import read_config_file

    path = Path(path)
    data = read_config_file(path)
    unknown = set(data) - {"arms", "replicates"}
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {sorted(unknown)}; an arms file holds `arms` and `replicates`.")
    arms = data.get("arms")
    if not isinstance(arms, Mapping) or not arms:
        raise UsageError(f"{path} names no arms.", "Write `arms: {A: [runs/a/*/summary.json], B: [...]}`.")
    specs = []
    for name, globs in arms.items():
        globs = [globs] if isinstance(globs, str) else globs
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) for g in globs):
            raise UsageError(f"{path}: arm {name!r} must list one or more globs (strings).")
        # relative globs start from the arms file's folder, so the file works from any working directory
        specs.append(ArmSpec(check_arm_name(str(name), str(path)),
                             tuple(g if os.path.isabs(os.path.expanduser(g)) else str(path.parent / g)
                                   for g in globs)))
    replicates = data.get("replicates") or {}
    if not isinstance(replicates, Mapping):
        raise UsageError(f"{path}: `replicates` must map a replicate arm to its original, e.g. {{A2: A}}.")
    return specs, {str(k): str(v) for k, v in replicates.items()}


def parse_replicates(args: Iterable[str]) -> dict[str, str]:
    """--replicate NAME=ORIGINAL options."""
    out = {}
    for arg in args:
        name, sep, original = arg.partition("=")
        if not sep or not name.strip() or not original.strip():
            raise UsageError(f"--replicate {arg!r} is not NAME=ORIGINAL.",
                             "E.g. --replicate T_seed1=T: arm T_seed1 repeats arm T with another seed.")
        out[name.strip()] = original.strip()
    return out


# ---------------------------------------------------------------- finding and reading the summaries


def summary_files(spec: ArmSpec) -> list[Path]:
    """Every summary an arm's globs name: matches in path order, a folder as its summary.json, no repeats."""
    found: dict[Path, None] = {}
    for pattern in spec.patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(glob.glob(expanded, recursive=True))
        else:
            matches = [expanded] if os.path.exists(expanded) else []
        if not matches:
            raise DataError(f"arm {spec.name}: {pattern} matches no file.",
                            "Check the path; quote globs so the shell leaves them to lawder.")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                path = path / SUMMARY_FILE
                if not path.exists():
                    raise DataError(f"arm {spec.name}: {match} is a folder without a {SUMMARY_FILE}.",
                                    "Name the summary.json that `lawder evaluate -o` wrote.")
            found.setdefault(path, None)
    return list(found)


def read_arm(spec: ArmSpec) -> Arm:
    return Arm(spec.name, tuple(read_run(path) for path in summary_files(spec)))


def read_run(path: str | os.PathLike) -> RunScores:
    """The per-case scores of one summary.json (see the module docstring for the metric names)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}).", "Write it again with `lawder evaluate`.") from err
    if not isinstance(data, dict):
        raise DataError(f"{path} is not a summary (a JSON object) of `lawder evaluate`.")
    metrics: dict[str, dict[str, float]] = {}
    regions = _read_metric_per_case(path, data.get("metric_per_case") or [], metrics)
    for section, block in data.items():
        if isinstance(block, dict) and isinstance(block.get("per_case"), list):
            _read_section(path, section, block["per_case"], metrics)
    if not metrics:
        raise DataError(f"{path} holds no per-case scores (no metric_per_case, no SECTION.per_case).",
                        "Compare the summary.json of `lawder evaluate --dice` (a training run's summary has none).")
    kid = _mapping(data, "fid").get("kid_subset_values")
    if kid is not None and not (isinstance(kid, list) and all(map(_numeric, kid))):
        raise DataError(f"{path}: fid.kid_subset_values must be a list of numbers.")
    return RunScores(path=str(path), run=_mapping(_mapping(data, "metadata"), "inputs").get("run"),
                     empty_policy=_mapping(data, "dice_settings").get("empty_policy"), metrics=metrics,
                     regions=regions, kid_subset_values=None if kid is None else tuple(map(_number, kid)))


def _mapping(data: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    """data[key] when it is a mapping, else an empty one (older summaries lack some sections)."""
    value = data.get(key)
    return value if isinstance(value, Mapping) else {}


def _number(value: Any) -> float:
    """A finite float, or NaN for null, inf and NaN (the case is then left out of that metric)."""
    value = float(value) if value is not None else math.nan
    return value if math.isfinite(value) else math.nan


def _numeric(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _put(path: Path, metrics: dict[str, dict[str, float]], name: str, case: str, value: Any) -> None:
    cases = metrics.setdefault(name, {})
    if case in cases:
        raise DataError(f"{path} scores case {case!r} twice for {name}.", "Each case must appear once per run.")
    cases[case] = _number(value)


REWRITE = "Write it again with `lawder evaluate --dice`."


def _read_metric_per_case(path: Path, entries: list[Any], metrics: dict[str, dict[str, float]]) -> tuple[str, ...]:
    regions: dict[str, None] = {}
    single_images = True
    if not isinstance(entries, list):
        raise DataError(f"{path}: metric_per_case must be a list of cases.", REWRITE)
    for entry in entries:
        if not isinstance(entry, dict) or "case" not in entry or not isinstance(entry.get("metrics"), dict):
            raise DataError(f"{path}: a metric_per_case entry has no `case` and `metrics`.", REWRITE)
        case = str(entry["case"])
        single_images &= entry.get("n_images", 1) == 1
        for region, scores in entry["metrics"].items():
            if scores is not None and not isinstance(scores, dict):
                raise DataError(f"{path}: case {case!r} gives region {region!r} a {type(scores).__name__}, not its "
                                "scores by metric name ({\"Dice\": ...}).", REWRITE)
            regions.setdefault(region, None)
            for key, value in (scores or {}).items():
                if key not in COUNT_KEYS and _numeric(value):
                    _put(path, metrics, f"{key}/{region}", case, value)
    if single_images:  # a case of one image: its image mean is its score
        for key in IMAGE_MEAN_KEYS:
            for region in regions:
                metrics.pop(f"{key}/{region}", None)
    if len(regions) > 1:
        for key in FOREGROUND_MEAN_KEYS:
            per_region = [metrics.get(f"{key}/{region}", {}) for region in regions]
            cases = dict.fromkeys(c for scores in per_region for c in scores)
            for case in cases:
                kept = [s[case] for s in per_region if case in s and not math.isnan(s[case])]
                _put(path, metrics, f"{key}/{FOREGROUND_MEAN}", case, sum(kept) / len(kept) if kept else None)
    return tuple(regions)


def _read_section(path: Path, section: str, rows: list[Any], metrics: dict[str, dict[str, float]]) -> None:
    fields: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, dict) or "case" not in row:
            raise DataError(f"{path}: {section}.per_case has a row without a `case` key.")
        fields.update((k, None) for k, v in row.items()
                      if k != "case" and k not in CASE_DESCRIPTORS and isinstance(v, (int, float))
                      and not isinstance(v, bool))
    for row in rows:
        for name in fields:
            value = row.get(name)
            _put(path, metrics, f"{section}.{name}", str(row["case"]), value if _numeric(value) else None)


# ---------------------------------------------------------------- replicates by configuration


def run_config(run: RunScores) -> dict[str, Any] | None:
    """The config.json of the run folder a summary scored, less the keys replicates may differ in."""
    if not run.run:
        return None
    path = Path(run.run) / RUN_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(config, dict):
        return None
    return {k: v for k, v in config.items() if k not in REPLICATE_FREE_KEYS}


def detect_replicates(arms: list[Arm], declared: Mapping[str, str]) -> dict[str, str]:
    """Arms whose runs' configs equal an earlier arm's except for seed/out/resume: {replicate: original}.

    Both arms need a readable config for every run (via `metadata.inputs.run`), the same multiset of configs,
    and no run folder in common (an arm listed twice is an A/A check, not a replicate).
    """
    configs: dict[str, list[str] | None] = {}
    folders: dict[str, set[str]] = {}
    for arm in arms:
        found = [run_config(run) for run in arm.runs]
        configs[arm.name] = None if any(c is None for c in found) else sorted(json.dumps(c, sort_keys=True)
                                                                             for c in found)
        folders[arm.name] = {os.path.realpath(run.run) for run in arm.runs if run.run}
    detected: dict[str, str] = {}
    for i, arm in enumerate(arms):
        if arm.name in declared or configs[arm.name] is None:
            continue
        for earlier in arms[:i]:
            if (earlier.name not in declared and earlier.name not in detected
                    and configs[earlier.name] == configs[arm.name] and not folders[earlier.name] & folders[arm.name]):
                detected[arm.name] = earlier.name
                break
    return detected
