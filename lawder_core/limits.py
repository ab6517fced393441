"""Will a request fit in this machine's memory? An estimate made before any pixel is read, and the largest value
that fits; and what an allocation failure during the work means to the user.

A size or a batch that the machine cannot hold is refused up front (exit 2) with the estimate, what is available
and the largest value of each option that fits, instead of growing until the kernel's OOM killer ends this process
or, on a shared workstation, someone else's. The estimates are linear in the pixels a step holds, with bytes per
pixel measured by `benchmarks/bench_memory.py` (lawder's real training and inference loops on the CPU) and rounded
up. They are upper bounds for the activations, not promises: an allocation can still fail during the work, and
then `errors.out_of_memory` turns it into "out of memory" (exit 4) with a smaller-size hint, never a "--resume" hint.

`LAWDER_NO_MEMORY_CHECK=1` skips the up-front refusal (an estimate that does not fit a machine it was not made
on); the allocation failure is still reported as out of memory.

No torch, no numpy: the CLI runs these checks before it imports either.
"""

from __future__ import annotations

import os
import resource
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lawder_core.errors import UsageError

GiB = 2**30
MiB = 2**20
SHARE = 0.9  # of the available memory one request may plan to use: the rest is for what the estimate leaves out
PROCESS_BYTES = 700 * MiB  # one process with torch loaded and its model built (the baseline of bench_memory.py)

# Peak bytes per input pixel (batch × height × width) of one training step and one inference pass, CPU, float32
# (benchmarks/results/bench_memory.json: the measured values plus about 10 %). A model that is not listed
# (unetpp-r34) gets the largest of its kind.
SEG_TRAIN_BPP = {
    "mkunet-t": 1500, "mkunet-t-order": 2600, "mkunet-t-wide": 1800, "mkunet-s": 2400, "mkunet-s-order": 3300,
    "mkunet-base": 4000, "mkunet-base-order": 5100, "mkunet-m": 7700, "mkunet-l": 14100, "unet-r18": 2200,
    "unet-r34": 2000, "unet-mbv2": 2000,  # unet-mbv2 not measured: taken as its sibling unet-r34
}
SEG_INFER_BPP = {
    "mkunet-t": 140, "mkunet-t-order": 460, "mkunet-t-wide": 210, "mkunet-s": 240, "mkunet-s-order": 500,
    "mkunet-base": 500, "mkunet-base-order": 650, "mkunet-m": 1100, "mkunet-l": 1100, "unet-r18": 850,
    "unet-r34": 970, "unet-mbv2": 970,
}
LAW_TRAIN_BPP = {"tiny": 8200, "small": 12900, "base": 44000}
LAW_SAMPLE_BPP = {"tiny": 2400, "small": 3600, "base": 7800}
# `prepare`: resizing one sample (PIL and NumPy copies, the procedural set's float64 fields) and the fingerprint,
# which reads the masks back in blocks of up to 64 MiB (data/fingerprint.py) and works on them in float. Measured
# as bench_memory.py measures, with three samples at 256 and 1536 px: 140 B/px (synthetic), 101 B/px (a folder of
# 40×40 pairs); 24 samples instead of 3 at 1024 px added 25 B/px per sample.
PREPARE_SAMPLE_BPP = 150
FINGERPRINT_BPP = 25
FINGERPRINT_BLOCK = 64 * MiB
KITS_CASE_BYTES = GiB  # one CT volume being converted (a KiTS case: 512 × 512 × ~600 voxels, in float32, twice)
# A training split held in memory: at most 2 GiB and 1/8 of the RAM (data/dataset.py, cache_limit)
CACHE_BYTES = 2 * GiB


def bpp(table: dict[str, int], name: str) -> int:
    return table.get(name, max(table.values()))


# ---------------------------------------------------------------- what the machine has


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # not Linux: the physical memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """Room left under this process's cgroup memory limit (a container, a systemd slice, a batch job)."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 2**60:  # no limit (v1 writes a huge number)
                return None
            return max(0, int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def _address_space_room() -> int | None:
    """Room left under `ulimit -v` (RLIMIT_AS), which counts this process's whole address space."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(0, soft - int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available_memory() -> int | None:
    """Bytes this command can still allocate: the least of what the kernel has available, the cgroup's room and
    the address-space limit's room; None when none of them can be read (then nothing is refused)."""
    known = [v for v in (_meminfo_available(), _cgroup_room(), _address_space_room()) if v is not None]
    return min(known) if known else None


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / MiB:.0f} MiB"


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class Choice:
    """One option of a request, with the memory the request needs as a function of that option's value alone."""

    option: str  # "--size"
    value: int
    need: Callable[[int], float]  # bytes
    low: int = 1  # the smallest value the option allows
    step: int = 1  # values are multiples of this (from `low`)


def largest_fitting(choice: Choice, budget: float) -> int | None:
    """The largest value of the option, at most the requested one, whose need fits `budget` (need grows with it)."""
    if choice.need(choice.low) > budget:
        return None
    lo, hi = 0, (choice.value - choice.low) // choice.step  # in steps above `low`
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if choice.need(choice.low + mid * choice.step) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return choice.low + lo * choice.step


def free_disk(path: str | os.PathLike) -> int | None:
    """Free bytes on the file system that will hold `path` (its nearest existing folder)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def check_fits(what: str, choices: Sequence[Choice], note: str = "", *, disk: str | os.PathLike | None = None
               ) -> None:
    """Refuse (UsageError, exit 2) a request whose estimate exceeds what this machine can give, naming the estimate,
    what is available and the largest value of each option that fits with the others as asked. Memory, or with
    `disk` the free space where that output goes."""
    if os.environ.get("LAWDER_NO_MEMORY_CHECK", "") not in ("", "0"):
        return
    available = available_memory() if disk is None else free_disk(disk)
    if available is None or not choices:
        return
    need = choices[0].need(choices[0].value)
    budget = SHARE * available
    if need <= budget:
        return
    asked = " ".join(f"{c.option} {c.value}" for c in choices)
    fits = []
    for choice in choices:
        largest = largest_fitting(choice, budget)
        others = [f"{c.option} {c.value}" for c in choices if c is not choice]
        if largest is not None:
            fits.append(f"{choice.option} {largest}" + (f" (with {' '.join(others)})" if others else ""))
    hint = ("The largest that fits: " + "; or ".join(fits) + "." if fits else
            "Even the smallest values do not fit: free memory, or use a larger machine.")
    where = "memory" if disk is None else f"disk space for {Path(disk).name}"
    has = "this machine has" if disk is None else "its file system has"
    raise UsageError(f"{what} {asked} needs about {gib(need)} of {where}{note}; {has} {gib(available)} available.",
                     hint + " (LAWDER_NO_MEMORY_CHECK=1 skips this estimate.)")


# ---------------------------------------------------------------- the estimates, one per kind of request

LOADER_BPP = 32  # a training sample resized on the fly: float image and label copies (data/dataset.py)


def check_seg_training(model: str, size: int, batch: int, stored: tuple[int, int, int], samples: int, *,
                       processes: int = 1, on_gpu: bool = False, what: str = "train-order") -> None:
    """A segmenter's training: per process the runtime, the split held in memory (`stored`: H, W, C of the file,
    `samples` in the splits it reads) and one batch's activations, which on a GPU are not in this memory."""
    if processes < 1:
        return
    height, width, channels = stored
    cache = min(samples * height * width * (channels + 1), CACHE_BYTES)
    per_pixel = LOADER_BPP + (0 if on_gpu else bpp(SEG_TRAIN_BPP, model))

    def need(s: int, b: int) -> float:
        return processes * (PROCESS_BYTES + cache + b * s * s * per_pixel)

    note = f" ({model}, {processes} process{'es' if processes > 1 else ''})"
    check_fits(what, [Choice("--size", size, lambda s: need(s, batch), 32, 32),
                      Choice("--batch-size", batch, lambda b: need(size, b))], note)


def check_law_training(preset: str, size: int, batch: int, *, processes: int = 1, on_gpu: bool = False) -> None:
    """A diffusion model's training: per process the runtime and one batch through the denoiser and LAW."""
    if processes < 1:
        return
    per_pixel = LOADER_BPP + (0 if on_gpu else bpp(LAW_TRAIN_BPP, preset))

    def need(s: int, b: int) -> float:
        return processes * (PROCESS_BYTES + b * s * s * per_pixel)

    check_fits("train-law", [Choice("--size", size, lambda s: need(s, batch), 8, 8),
                             Choice("--batch-size", batch, lambda b: need(size, b))], f" ({preset} UNet)")


def check_sampling(preset: str, size: int, channels: int, batch: int, n: int, guidance: float, *,
                   stored_masks: int = 0, processes: int = 0, on_gpu: bool = False) -> None:
    """`sample`: the masks as stored and at the model's size, every image until it is written, and one batch's
    pass through the denoiser (twice with classifier-free guidance) in this process or in each of `processes`
    local workers."""
    passes = 1 if guidance == 1 else 2
    per_pixel = 0 if on_gpu else passes * bpp(LAW_SAMPLE_BPP, preset)
    samplers = max(processes, 1)

    def need(k: int, b: int) -> float:
        return (PROCESS_BYTES * (1 + processes) + stored_masks + k * size * size * (channels + 2)
                + samplers * b * size * size * per_pixel)

    check_fits("sample", [Choice("--n", n, lambda k: need(k, batch)),
                          Choice("--batch-size", batch, lambda b: need(n, b))], f" ({size}×{size} images)")


def check_inference(what: str, model: str, size: int, batch: int = 1, copies: int = 1) -> None:
    """One forward pass of a segmenter at size×size (`copies`: models or runtimes holding activations at once,
    e.g. PyTorch and ONNX Runtime while an export is checked)."""

    def need(s: int) -> float:
        return PROCESS_BYTES + copies * batch * s * s * bpp(SEG_INFER_BPP, model)

    check_fits(what, [Choice("--size", size, need, 32, 32)], f" ({model})")


def check_inference_batch(what: str, model: str, size: int, batch: int) -> None:
    """Batches of `batch` images through a segmenter at size×size (evaluate's --dice and --adherence)."""

    def need(b: int) -> float:
        return PROCESS_BYTES + b * size * size * bpp(SEG_INFER_BPP, model)

    check_fits(what, [Choice("--batch-size", batch, need)], f" ({model} at its training size {size})")


def check_prepare(size: int, *, samples: int | None = None, jobs: int = 1, volumes: bool = False) -> None:
    """`prepare`: each sample resized to size×size, the fingerprint reading the masks back in blocks, and with
    CT volumes one volume per parallel job."""

    def need(s: int, j: int) -> float:
        pixels = s * s
        block = max(FINGERPRINT_BLOCK, pixels) if samples is None else min(samples * pixels,
                                                                          max(FINGERPRINT_BLOCK, pixels))
        per_job = pixels * PREPARE_SAMPLE_BPP + (KITS_CASE_BYTES if volumes else 0)
        return PROCESS_BYTES / 4 + j * per_job + block * FINGERPRINT_BPP  # no torch: a quarter of the runtime

    choices = [Choice("--size", size, lambda s: need(s, jobs), 8)]
    if jobs > 1:
        choices.append(Choice("--jobs", jobs, lambda j: need(size, j)))
    check_fits("prepare", choices)


def check_output_disk(what: str, out: str | os.PathLike, n: int, size: int, channels: int) -> None:
    """n samples of size×size images and masks, uncompressed (an upper bound: lzf keeps most of it), against
    the free space where `out` goes."""
    check_fits(what, [Choice("--n", n, lambda k: k * size * size * (channels + 1))],
               " (uncompressed images and masks)", disk=out)
