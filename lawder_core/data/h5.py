"""The lawder HDF5 schema: one file holds a whole prepared data set.

Datasets (N = number of 2D samples):
  images   (N, H, W, C) uint8   one image per chunk, lzf-compressed
  masks    (N, H, W)    uint8   integer labels (0 = background)
  case_id  (N,)         str     patient / case; splits never cut a case
  split    (N,)         str     "train" | "val" | "test"
Optional (absent from files written before them; readers must not require them):
  slice_index    (N,) int32     the sample's index along its source volume's slice axis (`prepare kits`: the
                                canonical axial z), so a case's slices can be stacked back into a volume
  case_geometry  scalar str     JSON {case_id: {...}}: per-case geometry of the source volume (`prepare kits`:
                                see `prepare_kits.slice_geometry`); a dataset, not an attribute, because
                                HDF5 attributes stop at 64 KiB and a KiTS set has hundreds of cases
File attributes: schema_version, source, label_names (JSON list), preprocessing (JSON), created_by,
and any extra provenance (JSON values).

Writing goes to `<out>.partial` and is renamed on success, so a killed run never leaves a file that
looks complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lawder_core.errors import DISK_FULL_HINT, DataError, EnvironmentProblem, UsageError, is_disk_full
from lawder_core.locks import hold_output_lock, release_output_lock

SCHEMA_VERSION = 1
SAMPLED = "lawder sample"  # the `source` of the synthetic pairs `lawder sample` writes
SPLITS = ("train", "val", "test")
# lzf: fast to write and read, about 2x smaller; None: largest files, fastest reads; gzip: smallest, slowest.
COMPRESSIONS = ("lzf", None, "gzip")
_STR = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class H5Info:
    """What a reader needs to know about a file without loading pixels."""

    path: Path
    n: int
    height: int
    width: int
    channels: int
    label_names: tuple[str, ...]
    source: str
    preprocessing: dict[str, Any]
    attrs: dict[str, Any]


def not_sampled(info: H5Info, option: str) -> str | None:
    """A warning when a file given as synthetic pairs was not written by `lawder sample` (None when it was): real
    data passed there would be counted twice, or labelled synthetic."""
    if info.source == SAMPLED:
        return None
    return (f"{option} {info.path} was not written by `lawder sample` (its source: {info.source!r}); its pairs are "
            "used as synthetic ones. Pass the output of `lawder sample` there.")


def refuse_overwrite(path: Path, force: bool) -> None:
    """Never overwrite a user's file silently."""
    if path.exists() and not force:
        raise UsageError(
            f"{path} already exists.",
            "Choose another output path, or pass --force to replace it.",
        )


class H5Writer:
    """Append samples one at a time; the file appears only when `close()` succeeds."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        height: int,
        width: int,
        channels: int,
        label_names: list[str] | tuple[str, ...],
        source: str,
        preprocessing: Mapping[str, Any] | None = None,
        extra_attrs: Mapping[str, Any] | None = None,
        force: bool = False,
        compression: str | None = "lzf",
        slice_index: bool = False,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise DataError(f"unknown compression {compression!r}; choose one of {sorted(map(str, COMPRESSIONS))}.")
        self.path = Path(path)
        hold_output_lock(self.path)  # before the overwrite check: a second writer must not even look
        refuse_overwrite(self.path, force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = self.path.with_name(self.path.name + ".partial")
        self.shape = (height, width, channels)
        self.n = 0
        self.geometry: dict[str, Any] = {}
        self._file: h5py.File | None = None
        with self._writing():
            self._file = f = h5py.File(self.tmp_path, "w")
            # Held for the writer's life, not looked up per batch: a dataset object h5py frees flushes its chunks
            # in a destructor, where a full disk can only print "Can't decrement id ref count" and carry on.
            self._datasets = {
                "images": f.create_dataset(
                    "images", shape=(0, height, width, channels), maxshape=(None, height, width, channels),
                    dtype=np.uint8, chunks=(1, height, width, channels), compression=compression, fletcher32=True),
                "masks": f.create_dataset(
                    "masks", shape=(0, height, width), maxshape=(None, height, width),
                    dtype=np.uint8, chunks=(1, height, width), compression=compression, fletcher32=True),
                "case_id": f.create_dataset("case_id", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,)),
                "split": f.create_dataset("split", shape=(0,), maxshape=(None,), dtype=_STR, chunks=(1024,)),
            }
            if slice_index:
                self._datasets["slice_index"] = f.create_dataset("slice_index", shape=(0,), maxshape=(None,),
                                                                 dtype=np.int32, chunks=(1024,))
            f.attrs["schema_version"] = SCHEMA_VERSION
            f.attrs["source"] = source
            f.attrs["label_names"] = json.dumps(list(label_names))
            f.attrs["preprocessing"] = json.dumps(dict(preprocessing or {}))
            f.attrs["created_by"] = "lawder"
            for key, value in (extra_attrs or {}).items():
                f.attrs[key] = json.dumps(value)

    def add(self, image: np.ndarray, mask: np.ndarray, case_id: str, split: str,
            slice_index: int | None = None) -> None:
        if image.ndim == 2:
            image = image[..., None]
        if image.shape != self.shape or image.dtype != np.uint8:
            raise DataError(f"image for case {case_id!r} has shape {image.shape} {image.dtype}, "
                            f"expected {self.shape} uint8")
        if mask.shape != self.shape[:2]:
            raise DataError(f"mask for case {case_id!r} has shape {mask.shape}, expected {self.shape[:2]}")
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
        self.add_batch(image[None], mask[None].astype(np.uint8), [case_id], [split],
                       None if slice_index is None else [slice_index])

    def add_batch(self, images: np.ndarray, masks: np.ndarray, case_ids: list[str], splits: list[str],
                  slice_indices: np.ndarray | list[int] | None = None) -> None:
        k = len(images)
        datasets = self._datasets
        has_index = "slice_index" in datasets
        if (slice_indices is not None) != has_index:
            raise DataError("slice indices must be given for every sample of a file created with slice_index=True, "
                            "and only there.")
        with self._writing():
            for dataset in datasets.values():
                dataset.resize(self.n + k, axis=0)
            datasets["images"][self.n:self.n + k] = images
            datasets["masks"][self.n:self.n + k] = masks
            datasets["case_id"][self.n:self.n + k] = case_ids
            datasets["split"][self.n:self.n + k] = splits
            if has_index:
                datasets["slice_index"][self.n:self.n + k] = np.asarray(slice_indices, dtype=np.int32)
        self.n += k

    def add_case_geometry(self, case_id: str, geometry: Mapping[str, Any]) -> None:
        """A case's source geometry (JSON values), written as the `case_geometry` dataset on close."""
        self.geometry[case_id] = dict(geometry)

    def close(self, before_commit: Callable[[Path], None] | None = None) -> Path:
        """Finish the file and move it into place atomically.

        `before_commit(partial_path)` runs on the finished file before the rename (side files that must exist
        whenever the file does, e.g. the fingerprint); if it fails, the file is discarded.
        """
        if self.n == 0:
            self.abort()
            raise DataError("no samples were written: the data set is empty.",
                            "Check the input folder and the filters (e.g. --empty-share for KiTS).")
        with self._writing():
            if self.geometry:
                self._file.create_dataset("case_geometry", data=json.dumps(self.geometry), dtype=_STR)
            self._file.flush()  # a full disk is refused here, as an exception, not in a destructor
            self._file.close()
            self._datasets = {}
            if before_commit is not None:
                before_commit(self.tmp_path)
            os.replace(self.tmp_path, self.path)
        release_output_lock(self.path)  # the file is complete: a later writer now meets it (and --force)
        return self.path

    def abort(self) -> None:
        """Discard the partial file (it may be called again: the second call does nothing)."""
        try:
            self._discard_file()
        finally:
            self.tmp_path.unlink(missing_ok=True)
            release_output_lock(self.path)

    def _discard_file(self) -> None:
        """Close the HDF5 file without writing it out.

        HDF5 has no "close without flushing": closing writes out the chunks and metadata it still caches, which a
        full disk refuses; the file then stays open inside the library, which retries at interpreter exit and
        crashed there (a segfault). The partial file is deleted anyway, so its descriptor is pointed at /dev/null
        first: the flush succeeds into nothing and the close is clean.
        """
        f, self._file = self._file, None
        if f is None or not f.id.valid:
            self._datasets = {}
            return
        try:
            fd = f.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDWR)
            try:
                os.dup2(null, fd)
            finally:
                os.close(null)
        except (OSError, TypeError, ValueError):  # a driver without a plain descriptor: close it as it is
            pass
        self._datasets = {}  # freed only now: a dataset's destructor flushes, which now goes nowhere
        try:
            f.close()
        except (OSError, RuntimeError):  # nothing to keep: the file is deleted next
            pass

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Any failure while writing discards the partial file at once; a full disk becomes one clear
        EnvironmentProblem (exit 4) instead of h5py's multi-line error."""
        try:
            yield
        except BaseException as err:
            self.abort()
            if isinstance(err, Exception) and is_disk_full(err):
                raise EnvironmentProblem(f"the disk is full: cannot write {self.path} (the partial file was "
                                         "removed).", DISK_FULL_HINT) from err
            raise

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@contextmanager
def open_h5(path: str | os.PathLike) -> Iterator[h5py.File]:
    """Open a lawder HDF5 file read-only, turning every failure into a clear DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist.", "Create it with `lawder prepare ... -o FILE.h5`.")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(
            f"{path} is not a readable HDF5 file ({err}).",
            "It may be truncated or corrupt: prepare it again with `lawder prepare ... --force`.",
        ) from err
    try:
        check_schema(path, f)
        yield f
    finally:
        f.close()


REQUIRED = ("images", "masks", "case_id", "split")
RECREATE = "Re-create it with `lawder prepare ... -o FILE.h5 --force`."


def check_schema(path: Path, f: h5py.File) -> None:
    """Refuse a file that breaks the schema above, from shapes, dtypes and attributes alone (no pixel is read).

    Every reader passes through `open_h5`, so a hand-made or damaged file stops here with one DataError naming
    the dataset, instead of an IndexError or a shape mismatch deep inside training or `inspect`.
    """
    missing = [k for k in REQUIRED if k not in f]
    if missing:
        raise DataError(f"{path} is not a lawder data file: missing datasets {missing}.", RECREATE)
    version = _schema_version(f)
    if version != SCHEMA_VERSION:
        raise DataError(f"{path} has schema version {version}; this lawder reads version {SCHEMA_VERSION}.",
                        "Re-create it with this version of lawder: `lawder prepare ... -o FILE.h5 --force`.")
    # Each dataset is opened once: h5py's f[name] costs a lookup every time, and this runs on every open.
    found = {name: f[name] for name in (*REQUIRED, "slice_index", "case_geometry") if name in f}
    problem = (_dataset_problem(found) or _length_problem(found) or _size_problem(found, path)
               or _attribute_problem(f))
    if problem:
        raise DataError(f"{path} is not a valid lawder data file: {problem}.", RECREATE)


def _schema_version(f: h5py.File) -> int | str:
    value = _json_attr(f.attrs.get("schema_version", -1))
    return value if isinstance(value, int) and not isinstance(value, bool) else repr(value)


def _dataset_problem(found: dict[str, Any]) -> str | None:
    """The first dataset whose kind, rank or dtype is wrong (None: all fine)."""
    for name, item in found.items():
        if not isinstance(item, h5py.Dataset):
            return f"'{name}' is a group, not a dataset"
    images, masks = found["images"], found["masks"]
    shape, dtype, mask_shape, mask_dtype = images.shape, images.dtype, masks.shape, masks.dtype
    if len(shape) != 4 or dtype != np.uint8 or 0 in shape[1:]:
        return (f"dataset 'images' is {shape} {dtype}; expected (N, H, W, C) uint8 "
                "(grey images too keep a channel axis, C = 1)")
    if len(mask_shape) != 3 or mask_dtype != np.uint8:
        return f"dataset 'masks' is {mask_shape} {mask_dtype}; expected (N, H, W) uint8 labels"
    if mask_shape[1:] != shape[1:3]:
        return f"masks are {mask_shape[1]}×{mask_shape[2]} but images {shape[1]}×{shape[2]}"
    for name in ("case_id", "split", "slice_index"):
        if name not in found:
            continue
        column = found[name]
        want_strings = name != "slice_index"
        kind_ok = (h5py.check_string_dtype(column.dtype) is not None if want_strings
                   else column.dtype.kind in "iu")
        if column.ndim != 1 or not kind_ok:
            return (f"dataset '{name}' is {column.shape} {column.dtype}; expected (N,) "
                    f"{'strings' if want_strings else 'integers'}")
    return None


def _length_problem(found: dict[str, Any]) -> str | None:
    """Every per-sample dataset must hold one row per sample: a short one would index out of range later."""
    lengths = {name: found[name].shape[0] for name in (*REQUIRED, "slice_index") if name in found}
    if len(set(lengths.values())) > 1:
        return "datasets have different lengths (" + ", ".join(f"{k} {v}" for k, v in lengths.items()) + ")"
    if lengths["images"] == 0:
        return "it holds no samples"
    return None


# Sane bounds on what a file may declare: a 10 KB file that declares 64 × 60000² images passed the checks above,
# then `inspect` read fill values for minutes and training asked for 10 GiB.
MAX_SIDE = 16384  # pixels, height and width
MAX_CHANNELS = 4


def _size_problem(found: dict[str, Any], path: Path) -> str | None:
    """Declared sizes within sane bounds, and backed by data the file really holds: every chunk the shape needs is
    written (lawder writes them all) and no dataset claims more bytes than the file has. Metadata only."""
    _, height, width, channels = found["images"].shape
    if height > MAX_SIDE or width > MAX_SIDE or channels > MAX_CHANNELS:
        return (f"dataset 'images' declares {height}×{width} pixels with {channels} channel(s); lawder reads at most "
                f"{MAX_SIDE}×{MAX_SIDE} with {MAX_CHANNELS}")
    file_size = path.stat().st_size
    for name in ("images", "masks"):
        dataset = found[name]
        if dataset.is_virtual or dataset.external:
            return f"dataset '{name}' refers to data in other files"
        declared = dataset.size * dataset.dtype.itemsize
        stored = dataset.id.get_storage_size()
        if dataset.chunks is None:
            missing = stored < declared
        else:
            needed = int(np.prod([-(-n // c) for n, c in zip(dataset.shape, dataset.chunks, strict=True)]))
            missing = dataset.id.get_num_chunks() < needed
        if missing or stored > file_size:
            return (f"dataset '{name}' declares {'×'.join(map(str, dataset.shape))} ({_bytes(declared)}) but the "
                    f"file ({_bytes(file_size)}) holds {_bytes(stored)} of it")
    return None


def _bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _attribute_problem(f: h5py.File) -> str | None:
    """The JSON attributes `read_info` relies on, when present, must have the types it expects."""
    names = _json_attr(f.attrs.get("label_names", "[]"))
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"attribute 'label_names' is {names!r}; expected a JSON list of strings"
    preprocessing = _json_attr(f.attrs.get("preprocessing", "{}"))
    if not isinstance(preprocessing, dict):
        return f"attribute 'preprocessing' is {preprocessing!r}; expected a JSON object"
    return None


def _json_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_info(path: str | os.PathLike) -> H5Info:
    with open_h5(path) as f:
        n, h, w, c = f["images"].shape
        attrs = {k: _json_attr(v) for k, v in f.attrs.items()}
        return H5Info(
            path=Path(path), n=n, height=h, width=w, channels=c,
            label_names=tuple(attrs.get("label_names") or ("background", "lesion")),
            source=str(attrs.get("source", "")),
            preprocessing=attrs.get("preprocessing") or {},
            attrs=attrs,
        )


def read_strings(f: h5py.File, name: str) -> np.ndarray:
    return np.array([s.decode() if isinstance(s, bytes) else s for s in f[name][:]], dtype=object)


def read_slice_index(path: str | os.PathLike, split: str | None = None) -> np.ndarray | None:
    """The `slice_index` of the samples in `split` (in file order, as `load_arrays`); None when not recorded."""
    idx = split_indices(path, split)
    with open_h5(path) as f:
        if "slice_index" not in f:
            return None
        return read_rows(f["slice_index"], idx).astype(np.int64)


def read_case_geometry(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The `case_geometry` record ({case_id: {...}}); empty when the file has none."""
    with open_h5(path) as f:
        if "case_geometry" not in f:
            return {}
        value = f["case_geometry"][()]
    geometry = _json_attr(value)
    if not isinstance(geometry, dict):
        raise DataError(f"{path} is not a valid lawder data file: dataset 'case_geometry' is not a JSON object.",
                        RECREATE)
    return geometry


def read_splits(f: h5py.File) -> np.ndarray:
    """The `split` column, refused if it holds a value other than SPLITS.

    Checked here rather than in `check_schema` because it reads N strings: readers that need the splits pay for
    it once, and a misspelt split ("trian") no longer drops its samples silently.
    """
    splits = read_strings(f, "split")
    unknown = sorted(set(np.unique(splits).tolist()) - set(SPLITS))
    if unknown:
        raise DataError(f"{f.filename} is not a valid lawder data file: dataset 'split' holds {unknown[:5]}; "
                        f"expected only {list(SPLITS)}.", RECREATE)
    return splits


def read_case_splits(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Every sample's case id and split, in file order (k-fold cross-validation draws its folds from these)."""
    with open_h5(path) as f:
        return read_strings(f, "case_id"), read_splits(f)


def split_indices(path: str | os.PathLike, split: str | None) -> np.ndarray:
    """Indices of the samples in `split` (all samples when split is None or 'all')."""
    with open_h5(path) as f:
        splits = read_splits(f)
    if split in (None, "all"):
        return np.arange(len(splits))
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS} or 'all'")
    return np.flatnonzero(splits == split)


def read_rows(dataset: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """dataset[indices] read as contiguous slices: h5py's fancy indexing is far slower than a slice per run."""
    indices = np.asarray(indices, dtype=np.int64)
    out = np.empty((len(indices),) + dataset.shape[1:], dtype=dataset.dtype)
    if len(indices) == 0:
        return out
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    breaks = np.flatnonzero(np.diff(sorted_idx) != 1) + 1
    for run_pos in np.split(np.arange(len(sorted_idx)), breaks):
        first, last = int(sorted_idx[run_pos[0]]), int(sorted_idx[run_pos[-1]])
        out[order[run_pos]] = dataset[first:last + 1]
    return out


def load_arrays(
    path: str | os.PathLike, split: str | None = None, limit: int | None = None, indices: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N,H,W,C), masks (N,H,W) and case ids of one split (or of the given sample indices, e.g. a
    cross-validation fold), in memory: for evaluation and sampling."""
    idx = split_indices(path, split) if indices is None else np.asarray(indices, dtype=np.int64)
    if limit is not None:
        idx = idx[:limit]
    with open_h5(path) as f:
        if len(idx) == 0:
            return (np.zeros((0, *f["images"].shape[1:]), np.uint8),
                    np.zeros((0, *f["masks"].shape[1:]), np.uint8), np.array([], dtype=object))
        images = read_rows(f["images"], idx)
        masks = read_rows(f["masks"], idx)
        cases = read_strings(f, "case_id")[idx]
    return images, masks, cases
