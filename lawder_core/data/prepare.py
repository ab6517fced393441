"""The part every `prepare` converter shares: split by case, write HDF5 atomically, then the side files.

A converter only has to list its case ids up front and then yield one `PreparedCase` at a time, so a
KiTS volume of hundreds of MB is never held twice and converters can run cases in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core import numbers
from lawder_core.data.fingerprint import compute_fingerprint
from lawder_core.data.h5 import H5Writer, refuse_overwrite
from lawder_core.data.resize import resize_image, resize_mask
from lawder_core.data.splits import splits_for, write_split_file
from lawder_core.errors import DataError, UsageError
from lawder_core.files import write_json

Progress = Callable[[int], None]
RESIZE_MODES = ("pad", "stretch")


@dataclass(frozen=True)
class PreparedCase:
    """All 2D samples of one case: images (k,H,W,C) uint8 and label masks (k,H,W) uint8; for slices of a volume
    also each one's index along the volume's slice axis (k,) and the volume's geometry (JSON values), which the
    HDF5 keeps as `slice_index` and `case_geometry` (`h5.py`)."""

    case_id: str
    images: np.ndarray
    masks: np.ndarray
    slice_index: np.ndarray | None = None
    geometry: dict[str, Any] | None = None


@dataclass(frozen=True)
class PrepareOptions:
    size: int | None = 256
    resize_mode: str = "pad"  # "pad": zero-pad to a square, then resize; "stretch": plain resize
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    split_file: str | None = None
    force: bool = False
    compression: str | None = "lzf"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        numbers.check_fields(self, {"size": numbers.PREPARE_SIZE, "seed": numbers.SEED})
        if self.resize_mode not in RESIZE_MODES:
            raise UsageError(f"--resize must be one of {', '.join(RESIZE_MODES)}, not {self.resize_mode!r}.")


def side_paths(out: Path) -> tuple[Path, Path]:
    """fingerprint.json and splits.json live beside the HDF5 file, named after it."""
    stem = out.with_suffix("")
    return Path(f"{stem}.fingerprint.json"), Path(f"{stem}.splits.json")


def resize_pair(image: np.ndarray, mask: np.ndarray, size: int | None, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Resize image (bilinear, antialiased) and label mask (nearest) together to size×size (`data/resize.py`)."""
    if size is None:
        return image, mask
    if mode == "pad":
        image, mask = pad_to_square(image), pad_to_square(mask)
    return resize_image(image, size), resize_mask(mask, size)


def pad_to_square(array: np.ndarray) -> np.ndarray:
    """Zero-pad, centred, to a square: keeps the aspect ratio of lesions."""
    h, w = array.shape[:2]
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    pad = [(top, s - h - top), (left, s - w - left)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad)


def write_dataset(
    out: str | os.PathLike,
    case_ids: Sequence[str],
    cases: Iterable[PreparedCase],
    *,
    label_names: Sequence[str],
    source: str,
    preprocessing: dict[str, Any],
    options: PrepareOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write `cases` to `out` with case-level splits; returns the fingerprint."""
    out = Path(out)
    fingerprint_path, splits_path = side_paths(out)
    refuse_overwrite(out, options.force)
    if not case_ids:
        raise DataError("no cases found: the data set is empty.", "Check the input folder.")
    mapping = splits_for(case_ids, options.fractions, options.seed, options.split_file)
    writer: H5Writer | None = None
    try:
        for case in cases:
            if writer is None:
                _, h, w, c = case.images.shape
                writer = H5Writer(out, height=h, width=w, channels=c, label_names=label_names, source=source,
                                  preprocessing=preprocessing, extra_attrs=options.extra, force=options.force,
                                  compression=options.compression, slice_index=case.slice_index is not None)
            if len(case.images):
                split = mapping[case.case_id]
                writer.add_batch(case.images, case.masks, [case.case_id] * len(case.images),
                                 [split] * len(case.images), case.slice_index)
            if case.geometry is not None:
                writer.add_case_geometry(case.case_id, case.geometry)
            if progress is not None:
                progress(1)
        if writer is None:
            raise DataError("no samples were produced: the data set is empty.", "Check the input folder.")
        written_cases = {c: s for c, s in mapping.items() if c in set(case_ids)}
        fingerprint: dict[str, Any] = {}

        def write_side_files(finished: Path) -> None:
            # before the rename: whenever `out` exists, its fingerprint and split file do too (an interrupt
            # between them leaves only side files, which the next run replaces)
            try:
                write_split_file(splits_path, written_cases)
                fingerprint.update(compute_fingerprint(finished), path=str(out))
                write_json(fingerprint_path, fingerprint)
            except BaseException:
                if not out.exists():  # side files of no data set (a full disk) are not left behind
                    splits_path.unlink(missing_ok=True)
                    fingerprint_path.unlink(missing_ok=True)
                raise

        writer.close(before_commit=write_side_files)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return fingerprint
