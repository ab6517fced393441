"""Statistics of paired per-case differences: a hierarchical bootstrap CI (runs, then cases) and a Wilcoxon p.

The data are the differences B − A of one metric, one array per paired run (a seed or a fold), one value per
case that both runs scored. Runs and cases are two levels of noise: a new seed or fold moves every case at once,
and the cases are a sample of the images or volumes the method will meet. The hierarchical bootstrap resamples
both, in that order: draw as many run pairs as there are, with replacement; within each drawn run pair, draw
as many of its cases as it has, with replacement; the statistic is the mean of every drawn per-case difference.
The interval is the percentile interval of that statistic over the resamples.

The random draws are laid out so that a plain loop can repeat them (tests/test_compare.py does):
`rng.integers(0, R, size=(B, R))` picks the runs, then `rng.random((B, R, n_max))` the cases, where case
slot j of drawn run r is `floor(u * n_r)` for j < n_r (slots beyond a run's own case count are unused).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
# Draws per chunk of resamples (about 16 MB of float64): bounds memory for many cases without slowing small runs.
_CHUNK_VALUES = 2_000_000
# The draws depend only on the runs' case counts and the seed, and every metric of one comparison (Dice, IoU, each
# region) usually has the same counts: up to this many drawn indices (40 MB) are kept for the next metric.
_CACHE_VALUES = 10_000_000


@dataclass(frozen=True)
class PairedResult:
    """One paired difference: its mean, CI and test, and the runs and cases behind them."""

    mean: float  # mean of every per-case difference (pooled over the run pairs)
    ci_low: float
    ci_high: float
    p_wilcoxon: float | None  # None when no case is left to test
    run_means: tuple[float, ...]  # the mean difference of each run pair, in order
    n_runs: int
    n_values: int  # per-case differences behind `mean` (cases × runs, less those left out)


def _draws(counts: tuple[int, ...], resamples: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of (drawn cases as flat indices into the runs laid out as rows of n_max, drawn case count).

    Slots beyond a drawn run's own case count point one past the last row, where the caller puts a 0.
    """
    n_runs, n = len(counts), np.array(counts)
    n_max = int(n.max())
    rng = np.random.default_rng(seed)
    chosen = rng.integers(0, n_runs, size=(resamples, n_runs))
    slots = np.arange(n_max)
    chunk = max(1, _CHUNK_VALUES // (n_runs * n_max))
    for start in range(0, resamples, chunk):
        picked = chosen[start:start + chunk]  # (c, R) run indices
        n_picked = n[picked][..., None]  # (c, R, 1) case counts of the drawn runs
        u = rng.random((len(picked), n_runs, n_max))
        # floor(u·n) < n for u < 1 in exact arithmetic; the minimum guards float rounding at the top end
        cases = np.minimum((u * n_picked).astype(np.int64), n_picked - 1)
        flat = np.where(slots < n_picked, picked[..., None] * n_max + cases, n_runs * n_max)
        yield flat.reshape(len(picked), -1).astype(np.int32), n_picked.sum(axis=(1, 2))


@functools.lru_cache(maxsize=2)
def _kept_draws(counts: tuple[int, ...], resamples: int, seed: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    return tuple(_draws(counts, resamples, seed))


def hierarchical_bootstrap(differences: Sequence[np.ndarray], *, resamples: int = DEFAULT_RESAMPLES,
                           seed: int = 0) -> np.ndarray:
    """`resamples` values of the pooled mean difference, resampling runs, then cases within each drawn run."""
    runs = [np.asarray(d, np.float64) for d in differences]
    if not runs or any(len(d) == 0 for d in runs):
        raise ValueError("every run pair needs at least one case difference")
    counts = tuple(len(d) for d in runs)
    n_max = max(counts)
    laid_out = np.zeros(len(runs) * n_max + 1)  # the last 0 is what unused slots point at
    for r, d in enumerate(runs):
        laid_out[r * n_max:r * n_max + len(d)] = d
    small = resamples * len(runs) * n_max <= _CACHE_VALUES
    draws = _kept_draws(counts, resamples, seed) if small else _draws(counts, resamples, seed)
    return np.concatenate([laid_out[flat].sum(axis=1) / total for flat, total in draws])


def percentile_interval(stats: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap values."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(stats, [tail, 100 - tail])
    return float(low), float(high)


def t_interval(values: Sequence[float], level: float = DEFAULT_LEVEL) -> tuple[float | None, float | None]:
    """Student t interval of the mean of a few paired differences (one per seed or fold); None below two values."""
    from scipy import stats

    if len(values) < 2:
        return None, None
    mean, sem = float(np.mean(values)), float(np.std(values, ddof=1) / math.sqrt(len(values)))
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1)) * sem
    return mean - half, mean + half


def wilcoxon_p(case_differences: np.ndarray) -> float | None:
    """Two-sided Wilcoxon signed-rank p of per-case differences (zeros dropped, scipy's default).

    Every difference zero means no evidence of any difference: p = 1 (scipy refuses that input).
    """
    from scipy import stats

    d = np.asarray(case_differences, np.float64)
    if d.size == 0:
        return None
    if not np.any(d != 0):
        return 1.0
    with warnings.catch_warnings():
        # small samples with ties make scipy switch from the exact to the normal approximation and say so
        warnings.simplefilter("ignore")
        p = float(stats.wilcoxon(d).pvalue)
    return p if math.isfinite(p) else None


def paired_difference(differences: Sequence[np.ndarray], case_differences: np.ndarray, *,
                      resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                      seed: int = 0) -> PairedResult:
    """Mean, hierarchical bootstrap CI and Wilcoxon p of paired differences.

    `differences` holds one array per run pair (its per-case differences); `case_differences` one value per
    case (the mean over the run pairs that share it), which is what the signed-rank test sees.
    """
    pooled = np.concatenate([np.asarray(d, np.float64) for d in differences])
    low, high = percentile_interval(hierarchical_bootstrap(differences, resamples=resamples, seed=seed), level)
    return PairedResult(mean=float(pooled.mean()), ci_low=low, ci_high=high, p_wilcoxon=wilcoxon_p(case_differences),
                        run_means=tuple(float(np.mean(d)) for d in differences), n_runs=len(differences),
                        n_values=int(pooled.size))
