"""Case-level train/val/test splits and k cross-validation folds: a case (patient) never lands in two of them."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lawder_core.data.h5 import SPLITS, read_case_splits
from lawder_core.errors import DataError, UsageError
from lawder_core.files import write_json


def parse_fractions(text: str) -> tuple[float, float, float]:
    """'0.8,0.1,0.1' -> (0.8, 0.1, 0.1); must be three non-negative numbers summing to 1."""
    try:
        parts = tuple(float(p) for p in text.split(","))
    except ValueError as err:
        raise UsageError(f"--split {text!r} must be three numbers like 0.8,0.1,0.1") from err
    # `not <=` refuses NaN too (every comparison with NaN is false)
    if len(parts) != 3 or not all(0 <= p <= 1 for p in parts) or not abs(sum(parts) - 1.0) <= 1e-6:
        raise UsageError(f"--split {text!r} must be three non-negative fractions summing to 1, e.g. 0.8,0.1,0.1")
    return parts  # type: ignore[return-value]


def assign_splits(
    case_ids: Iterable[str], fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, str]:
    """Shuffle the unique cases with `seed` and cut them by `fractions` (rounded, largest split first)."""
    cases = sorted(set(case_ids))
    if not cases:
        raise DataError("no cases to split: the data set is empty.")
    order = np.random.default_rng(seed).permutation(len(cases))
    n = len(cases)
    # A requested split gets at least one case when there are enough cases to spare one.
    n_val = int(round(fractions[1] * n)) or int(fractions[1] > 0 and n >= 3)
    n_test = int(round(fractions[2] * n)) or int(fractions[2] > 0 and n >= 3)
    n_train = n - n_val - n_test
    bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    mapping = {}
    for split, (lo, hi) in bounds.items():
        for i in order[lo:hi]:
            mapping[cases[i]] = split
    return mapping


def write_split_file(path: str | Path, mapping: dict[str, str]) -> None:
    """nnU-Net-like: {"train": [...case ids], "val": [...], "test": [...]}."""
    by_split = {s: sorted(c for c, sp in mapping.items() if sp == s) for s in SPLITS}
    Path(path).write_text(json.dumps(by_split, indent=1))


def read_split_file(path: str | Path) -> dict[str, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"split file {path} cannot be read: {err}") from err
    if not isinstance(data, dict) or set(data) - set(SPLITS):
        raise UsageError(f"split file {path} must map {list(SPLITS)} to lists of case ids.")
    mapping: dict[str, str] = {}
    for split, cases in data.items():
        for case in cases:
            if case in mapping:
                raise UsageError(f"split file {path} puts case {case!r} in two splits.")
            mapping[str(case)] = split
    return mapping


def splits_for(case_ids: Iterable[str], fractions: Sequence[float], seed: int,
               split_file: str | Path | None) -> dict[str, str]:
    """Reuse a split file when given (every case must be listed), else draw a seeded split."""
    case_ids = list(case_ids)
    if split_file is None:
        return assign_splits(case_ids, fractions, seed)
    mapping = read_split_file(split_file)
    missing = sorted(set(case_ids) - set(mapping))
    if missing:
        raise UsageError(f"split file {split_file} does not list {len(missing)} case(s), e.g. {missing[:5]}.",
                         "Regenerate it, or drop --split-file to draw a new split.")
    return mapping


# ---------------------------------------------------------------- k folds (cross-validation over non-test cases)

FOLD_SEED = 0  # one fixed draw per data file: every arm and every seed of a comparison sees the same folds


def folds_path(data: str | os.PathLike, k: int) -> Path:
    """`<data stem>.folds<k>.json`, beside the HDF5 file like its splits.json."""
    stem = Path(data).with_suffix("")
    return Path(f"{stem}.folds{k}.json")


def draw_folds(case_ids: Iterable[str], k: int, seed: int = FOLD_SEED) -> list[list[str]]:
    """The unique cases shuffled with `seed` and cut into k near-equal folds (sizes differ by at most one)."""
    cases = sorted(set(case_ids))
    if k < 2:
        raise UsageError(f"--folds {k}: cross-validation needs at least 2 folds.")
    if len(cases) < k:
        raise DataError(f"{len(cases)} non-test case(s) cannot fill {k} folds.", "Use fewer --folds.")
    order = np.random.default_rng(seed).permutation(len(cases))
    return [sorted(cases[i] for i in chunk) for chunk in np.array_split(order, k)]


def fold_cases(data: str | os.PathLike, k: int) -> list[list[str]]:
    """The k folds of `data`'s non-test cases: read from the folds file, or drawn once and written there.

    A folds file that no longer covers the data's non-test cases exactly once (the data were prepared again with
    another split) is refused rather than silently redrawn: runs trained on the old folds would be scored on
    cases they saw.
    """
    case_ids, splits = read_case_splits(data)
    pool = set(case_ids[splits != "test"].tolist())
    path = folds_path(data, k)
    if path.exists():
        try:
            folds = [[str(c) for c in fold] for fold in json.loads(path.read_text())["folds"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"the folds file {path} cannot be read: {err}",
                            "Delete it to draw the folds again (runs trained on it then no longer match).") from err
        flat = [c for fold in folds for c in fold]
        if len(folds) != k or len(flat) != len(set(flat)) or set(flat) != pool:
            raise DataError(f"the folds file {path} does not split {data}'s non-test cases into {k} disjoint folds.",
                            "The data were prepared again: delete the folds file and retrain every fold run.")
        return folds
    folds = draw_folds(pool, k)
    write_json(path, {"k": k, "seed": FOLD_SEED, "data": Path(data).name,
                      "note": "cross-validation folds over the train+val cases; the test split is untouched",
                      "folds": folds})
    return folds


def fold_indices(data: str | os.PathLike, k: int, fold: int, role: str) -> np.ndarray:
    """Sample indices of fold `fold` ('val': its held-out cases) or of every other non-test case ('train')."""
    if not 0 <= fold < k:
        raise UsageError(f"--fold {fold} is outside 0..{k - 1} for --folds {k}.")
    if role not in ("train", "val"):
        raise ValueError(f"role must be 'train' or 'val', not {role!r}")
    held_out = set(fold_cases(data, k)[fold])
    case_ids, splits = read_case_splits(data)
    inside = np.array([c in held_out for c in case_ids.tolist()], dtype=bool)
    keep = inside if role == "val" else (~inside & (splits != "test"))
    return np.flatnonzero(keep)
