"""The range each number lawder takes must lie in: finite, and what the number's meaning allows.

One `Range` per kind of number, used twice: by the command line's option types (`lawder_cli/options.py`), so a
bad value is refused while the options are parsed, before anything is imported or read; and by the config
dataclasses, so the same value from a `--config` file or a resumed run's config.json is refused too. No
dependency beyond the standard library: both sides import it at no cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lawder_core.errors import UsageError


@dataclass(frozen=True)
class Range:
    """low..high (either end may be open), finite; integers may have to be a multiple of `step`; `also` lists
    values outside the range that mean something of their own (`prepare --size 0`: keep the original size)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    step: int = 1
    also: tuple[float, ...] = ()
    meaning: str = ""  # why the range is what it is, for the message

    def problem(self, value: float) -> str | None:
        """What is wrong with `value` in a few words, or None when it lies in the range."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
        if not math.isfinite(value):
            return f"{value} is not a finite number"
        if value in self.also:
            return None
        if self.step > 1 and value % self.step:
            return f"{show(value)} is not divisible by {self.step}"
        below = value < self.low or (self.low_open and value == self.low)
        above = value > self.high or (self.high_open and value == self.high)
        if below or above:
            return f"{show(value)} is outside {self}" + (f" ({self.meaning})" if self.meaning else "")
        return None

    def __str__(self) -> str:
        if self.high == math.inf:
            text = f"{'>' if self.low_open else '≥'} {show(self.low)}"
        else:
            text = f"{'(' if self.low_open else '['}{show(self.low)}, {show(self.high)}{')' if self.high_open else ']'}"
        extra = [show(v) for v in self.also]
        return f"{text} or {', '.join(extra)}" if extra else text


def show(value: float) -> str:
    """A number as a person writes it: 10000000, not 1e+07; 0.5; 1e-30."""
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def check_number(name: str, value: Any, allowed: Range, hint: str | None = None) -> None:
    """Raise a UsageError naming `name` when `value` is not in `allowed`."""
    problem = allowed.problem(value)
    if problem is not None:
        raise UsageError(f"{name}: {problem}.", hint)


def check_fields(config: Any, ranges: dict[str, Range], prefix: str = "--") -> None:
    """Check the named fields of a config dataclass (None: not set, allowed); names print as options."""
    for name, allowed in ranges.items():
        value = getattr(config, name)
        if value is not None:
            check_number(prefix + name.replace("_", "-"), value, allowed,
                         "Fix the value on the command line or in the config file.")


# ---------------------------------------------------------------- shared kinds of number

MAX_COUNT = 10_000_000  # steps, samples, intervals: more would run for months on any machine lawder targets
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_WORKERS = 1024  # Ray workers, GPUs, threads, jobs on one command
MAX_IMAGE_SIZE = 65_536  # PIL's and HDF5 chunks' practical limit; memory is checked separately (limits.py)
WEEK_S = 7 * 24 * 3600.0

SEED = Range(0, 2**32 - 1, meaning="NumPy's and PyTorch's seeds are 32-bit")
COUNT = Range(1, MAX_COUNT)
EVERY = Range(0, MAX_COUNT, meaning="0: never")
EPOCHS = Range(1, MAX_EPOCHS)
BATCH = Range(1, MAX_BATCH)
WORKERS = Range(0, MAX_WORKERS)
JOBS = Range(1, MAX_WORKERS)
WAIT_S = Range(0, WEEK_S, meaning="seconds, at most a week")
LEARNING_RATE = Range(0, 1, low_open=True)
FRACTION = Range(0, 1)
RATIO = Range(0, 1000)
CPUS = Range(0, MAX_WORKERS, low_open=True)
GPUS = Range(0, MAX_WORKERS)
SEG_SIZE = Range(32, MAX_IMAGE_SIZE, step=32)  # the U-Nets halve the resolution 5 times
IMAGE_SIZE = Range(8, MAX_IMAGE_SIZE)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
FINITE = Range()

# ---------------------------------------------------------------- one command's numbers

PREPARE_SIZE = Range(8, MAX_IMAGE_SIZE, also=(0,), meaning="0 keeps the original size")
CHANNELS = Range(1, 3)  # 1 or 3: `prepare kits` refuses 2 by name
SPACING_MM = Range(0.05, 50, meaning="mm per pixel; CT in-plane spacing is about 0.3-1.5")
LAW_SIZE = Range(8, 1024)
W_MIN = Range(0, 1, low_open=True, high_open=True, meaning="LAW's factor range must hold 1")
W_MAX = Range(1, 1000, low_open=True, meaning="LAW's factor range must hold 1")
GAMMA = Range(0, 2, meaning="0: uniform prior, 1: lesion and background get equal mass")
SAMPLING_STEPS = Range(1, MAX_COUNT, meaning="at most the run's training noise levels, checked when the run is read")
GUIDANCE = Range(0, 50, meaning="classifier-free guidance scale: 1 is none, 0 ignores the mask")
TRIALS = Range(1, 10_000)
DICE_GATE = Range(0, 1, meaning="Dice lies in [0, 1]")
DISTANCE_GATE = Range(0, meaning="FID and KID gates are upper bounds on a distance")
EXPORT_SIZE = Range(32, MAX_IMAGE_SIZE, step=32, also=(0,), meaning="0: the training size; else divisible by 32")
DATASET_ID = Range(1, 999, meaning="nnU-Net's DatasetNNN")
BLOBS = Range(1, 10, meaning="lesions per synthetic sample")
FOLDS = Range(2, 1000, meaning="cross-validation needs at least 2 folds")
FOLD = Range(0, 999, meaning="a fold index, 0..K-1")
RESAMPLES = Range(100, 1_000_000, meaning="bootstrap resamples")
