"""Case-level train/val/test splits: a case (patient) never lands in two splits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lawder_core.data.h5 import SPLITS
from lawder_core.errors import DataError, UsageError


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
