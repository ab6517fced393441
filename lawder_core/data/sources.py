"""Which converter prepares which raw source: the dispatch `lawder prepare` and `lawder pipeline --source` share.

Kept apart from `prepare.py` (what every converter shares) because the converters import that module: the
dispatch imports them, so in one file the two would import each other. Converters are imported only when
chosen (nibabel for KiTS, PIL for folders), and this module imports nothing heavy, so an unknown source or a
bad --window is reported at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lawder_core import limits, numbers
from lawder_core.errors import UsageError

if TYPE_CHECKING:
    from lawder_core.data.prepare import PrepareOptions, Progress

SOURCES = ("kvasir", "cvc", "folder", "kits", "synthetic")
DEFAULT_LESION_FRAC = (0.01, 0.20)  # the synthetic set's lesion share of the frame, per sample
# A share above this leaves no room around the lesion for the ring that judge-free adherence compares against.
MAX_LESION_FRAC = 0.5
MAX_BLOBS = 10
FOLDER_SOURCES = ("kvasir", "cvc", "folder")  # 2D image/mask folders, read by prepare_folder.py


@dataclass(frozen=True)
class SourceOptions:
    """What only some sources read; the rest (size, split, seed, ...) is `PrepareOptions`."""

    images: str | None = None  # folder: the images folder
    masks: str | None = None  # folder: the masks folder (matched by file stem)
    n: int = 200  # synthetic: number of samples
    lesion_frac: str | None = None  # synthetic: "LOW,HIGH" share of the frame per sample; None: 0.01,0.20
    blobs: int | None = None  # synthetic: lesions per sample; None: one to three
    window: str = "-79,304"  # kits: CT window in HU, LOW,HIGH
    empty_share: float = 0.1  # kits: share of kidney-free slices to keep (per kidney slice)
    jobs: int = 1  # kits: cases converted in parallel
    channels: int = 1  # kits: 1 (grey) or 3 (grey repeated)
    skip_incomplete: bool = False  # kits: leave out cases without segmentation.nii.gz
    spacing: float | None = None  # kits: in-plane mm per pixel before --size; None keeps each case's own

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"n": numbers.COUNT, "empty_share": numbers.RATIO, "jobs": numbers.JOBS,
                                    "channels": numbers.CHANNELS, "spacing": numbers.SPACING_MM})


def check_source(source: str, in_dir: str | Path | None, source_options: SourceOptions | None = None) -> None:
    """Every UsageError of a source and its options, raised before any file is read."""
    if source not in SOURCES:
        raise UsageError(f"unknown source {source!r}.", f"Choose one of: {', '.join(SOURCES)}.")
    if source == "kits" and in_dir is None:
        raise UsageError("`prepare kits` needs the KiTS folder (with case_XXXXX/ sub-folders).")
    if source in ("kvasir", "cvc") and in_dir is None:
        raise UsageError(f"`prepare {source}` needs the input folder.")
    extra = source_options or SourceOptions()
    parse_window(extra.window)  # a kits option, but a bad one is refused anywhere
    if source != "synthetic" and (extra.lesion_frac is not None or extra.blobs is not None):
        raise UsageError("--lesion-frac and --blobs belong to `prepare synthetic`.",
                         f"`prepare {source}` takes its lesions from the data.")
    if source == "synthetic":
        check_lesion_options(parse_lesion_frac(extra.lesion_frac), extra.blobs)


def check_lesion_options(lesion_frac: tuple[float, float], blobs: int | None) -> None:
    """The ranges `prepare synthetic --lesion-frac LOW,HIGH --blobs N` accepts."""
    low, high = lesion_frac
    if not 0 < low <= high <= MAX_LESION_FRAC:
        raise UsageError(f"--lesion-frac {low:g},{high:g} must satisfy 0 < LOW <= HIGH <= {MAX_LESION_FRAC:g}.",
                         "Shares of the frame, e.g. --lesion-frac 0.003,0.03 for small lesions.")
    if blobs is not None and not 1 <= blobs <= MAX_BLOBS:
        raise UsageError(f"--blobs {blobs} must lie between 1 and {MAX_BLOBS}.",
                         "Leave it out for the default of one to three blobs per sample.")


def parse_lesion_frac(text: str | None) -> tuple[float, float]:
    """"LOW,HIGH" → (low, high); None → the default 1–20 % of the frame."""
    if text is None:
        return DEFAULT_LESION_FRAC
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as err:
        raise UsageError(f"--lesion-frac {text!r} must be LOW,HIGH shares of the frame, e.g. 0.003,0.03") from err
    return low, high


def parse_window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError as err:
        raise UsageError(f"--window {text!r} must be LOW,HIGH in HU, e.g. -79,304") from err
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"--window {text!r}: LOW and HIGH must be finite numbers of HU, e.g. -79,304.")
    if low >= high:
        raise UsageError(f"--window {text!r}: LOW must be below HIGH.")
    return low, high


def check_prepare_memory(source: str, options: PrepareOptions, extra: SourceOptions) -> None:
    """The requested size (and CT jobs) against this machine's memory, before any file is read; a source kept
    at its own size (--size 0) is only known once read."""
    size = options.size or (128 if source == "synthetic" else None)
    if size is not None:
        limits.check_prepare(size, samples=extra.n if source == "synthetic" else None,
                             jobs=extra.jobs if source == "kits" else 1, volumes=source == "kits")


def prepare_source(source: str, in_dir: str | Path | None, out: str | Path, options: PrepareOptions,
                   source_options: SourceOptions | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Convert one raw source into a lawder HDF5 file with its splits and fingerprint; returns the fingerprint."""
    check_source(source, in_dir, source_options)
    extra = source_options or SourceOptions()
    out = Path(out)
    check_prepare_memory(source, options, extra)
    if source == "synthetic":
        limits.check_output_disk("prepare synthetic", out, extra.n, options.size or 128, 3)
    if source == "synthetic":
        from lawder_core.data.synthetic import prepare_synthetic

        return prepare_synthetic(out, n=extra.n, size=options.size or 128, seed=options.seed, options=options,
                                 progress=progress, lesion_frac=parse_lesion_frac(extra.lesion_frac),
                                 blobs=extra.blobs)
    if source == "kits":
        from lawder_core.data.prepare_kits import KitsOptions, prepare_kits

        assert in_dir is not None  # check_source
        kits = KitsOptions(window=parse_window(extra.window), empty_share=extra.empty_share, jobs=extra.jobs,
                           channels=extra.channels, skip_incomplete=extra.skip_incomplete, spacing=extra.spacing)
        return prepare_kits(Path(in_dir), out, options, kits, progress=progress)
    from lawder_core.data.prepare_folder import prepare_folder

    return prepare_folder(source, None if in_dir is None else Path(in_dir), out, options, images=extra.images,
                          masks=extra.masks, progress=progress)
