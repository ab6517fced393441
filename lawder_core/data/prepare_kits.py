"""KiTS19 / KiTS23 CT volumes (NIfTI) -> axial 2D slices in the lawder HDF5 schema.

Layout: `IN_DIR/case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` (KiTS23, whose `instances/` is ignored),
or the same under `IN_DIR/data/` (the KiTS19 repository). The case id is the case folder name (the patient),
so splits never cut a patient.

Orientation. Volumes are read RAS canonical and axial slices shown in radiological view, as
`data/ct_geometry.py` defines; slices are kept in increasing z (inferior to superior). Image and mask go
through the same view, so they stay aligned.

Labels are kept as they are: 0 background, 1 kidney, 2 tumour, 3 cyst. The file always carries the four
KiTS23 label names, for KiTS19 too (which simply never uses 3), so every KiTS file has the same classes and a
model trained on one version reads the other. Downsampled label maps are resampled by area with the priority
tumour > cyst > kidney (`resize.resize_mask_priority`): nearest neighbour drops tumours of a few voxels.

Slices. Train and val cases keep the slices with any label plus `--empty-share` of the others (the model
should not spend its epochs on empty abdomen); test cases keep every axial slice, so per-case Dice on the test
split is a volume Dice. The case split is therefore drawn (from --seed or --split-file, by patient) before any
slice is chosen.

Size. Each slice is resized to fit --size (pad: longest side = size, aspect kept, then zero-padded and centred;
stretch: size×size). With --spacing MM it is first brought to MM millimetres per pixel from the header's voxel
size, in the same single resampling, so the physical aspect ratio is right even when rows and columns differ.

Geometry. Each sample records its canonical axial index z (the HDF5's `slice_index`) and each case its source
geometry (`case_geometry`, see `slice_geometry`): the canonical shape and affine, where the resized slice lies
on the canvas, and `canvas_affine`, which takes a canvas voxel back to the scanner's world coordinates (mm).
With them a case's slices stack back into a NIfTI volume that overlays the original CT (`lawder export nnunet`).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import nibabel as nib
import numpy as np

from lawder_core.data.ct_geometry import (
    canonical_array,
    canonical_zooms,
    display_shape,
    fit_to_size,
    image_on_canvas,
    on_canvas,
    radiological_view,
    slice_geometry,
)
from lawder_core.data.prepare import PreparedCase, PrepareOptions, Progress, write_dataset
from lawder_core.data.resize import resize_mask_priority
from lawder_core.data.splits import splits_for
from lawder_core.errors import DataError, UsageError
from lawder_core.interrupts import signals_deferred

log = logging.getLogger(__name__)
T = TypeVar("T")

LABEL_NAMES = ("background", "kidney", "tumor", "cyst")
MAX_LABEL = len(LABEL_NAMES) - 1
IMAGING = "imaging.nii.gz"
SEGMENTATION = "segmentation.nii.gz"
CASE_PREFIX = "case_"
AFFINE_TOLERANCE_MM = 1e-3
ORIENTATION = "RAS canonical; axial slices in increasing z; radiological view (anterior up, patient right on left)"
LABEL_PRIORITY = (2, 3, 1)  # tumour > cyst > kidney: the smaller, rarer class takes a pixel it shares
MASK_RESIZE = ("area with priority tumour > cyst > kidney: when downsampling, the first of these labels covering at "
               "least half an input voxel of an output pixel (at most 1/4 of the pixel) takes it, else the label "
               "covering the most area (background included); nearest-exact along an upsampled axis")
GEOMETRY = ("slice_index: canonical axial z of each sample; case_geometry: per case canonical shape and affine, "
            "resized slice (rows, cols) and its (top, left) on the canvas, and canvas_affine (voxel (i, j, z) of "
            "the canvas in RAS order, i.e. canvas[size-1-j, size-1-i] of slice z, to world mm)")
KEPT_SLICES = ("train/val cases: label > 0, plus round(empty_share * labelled slices) random empty ones per case; "
               "test cases: every axial slice")
SAME_SPACING = 0.01  # relative difference under which two voxel sizes count as equal (old-KiTS19 check)


@dataclass(frozen=True)
class KitsOptions:
    """What is KiTS-specific in `lawder prepare kits`."""

    window: tuple[float, float] = (-79.0, 304.0)  # HU; nnU-Net's KiTS foreground range
    empty_share: float = 0.1  # slices without kidney kept, as a share of the case's kidney slices
    jobs: int = 1  # cases converted in parallel
    channels: int = 1  # 1: grey CT (H,W,1); 3: the same grey repeated, for RGB-pretrained models
    skip_incomplete: bool = False  # leave out case folders without imaging/segmentation instead of failing
    spacing: float | None = None  # mm per pixel in-plane before the resize to --size; None: each case's own


@dataclass(frozen=True)
class KitsCase:
    case_id: str
    imaging: Path
    segmentation: Path


@dataclass(frozen=True)
class SliceSettings:
    """Everything a worker needs to convert one case; small and picklable."""

    size: int
    resize_mode: str
    seed: int
    kits: KitsOptions
    test_cases: frozenset[str] = frozenset()  # these keep every axial slice


def check_kits_options(options: PrepareOptions, kits: KitsOptions) -> None:
    """Refuse impossible settings before touching any file."""
    low, high = kits.window
    if not high > low:
        raise UsageError(f"CT window {kits.window} must have low < high (HU), e.g. -79,304.")
    if kits.empty_share < 0:
        raise UsageError(f"--empty-share {kits.empty_share} must be >= 0 (0 keeps only slices with kidney).")
    if kits.jobs < 1:
        raise UsageError(f"--jobs {kits.jobs} must be at least 1.")
    if kits.channels not in (1, 3):
        raise UsageError(f"--channels {kits.channels} must be 1 or 3.")
    if kits.spacing is not None and not kits.spacing > 0:  # `not >` also refuses NaN
        raise UsageError(f"--spacing {kits.spacing} must be > 0 (millimetres per pixel), e.g. 0.8.")
    if kits.spacing is not None and options.resize_mode == "stretch":
        raise UsageError("--spacing keeps the physical aspect ratio, which --resize stretch would undo.",
                         "Use --resize pad with --spacing.")
    if options.size is None:
        raise UsageError("KiTS needs --size: cases differ in in-plane resolution, so slices must be resized.",
                         "For the native KiTS resolution pass --size 512.")


def kits_root(in_dir: Path) -> Path:
    """`in_dir`, or `in_dir/data` when the KiTS19 repository layout keeps the cases there."""
    if not in_dir.is_dir():
        raise DataError(f"input folder {in_dir} does not exist or is not a folder.")
    nested = in_dir / "data"
    if not _case_folders(in_dir) and nested.is_dir() and _case_folders(nested):
        return nested
    return in_dir


def _case_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CASE_PREFIX))


def find_cases(in_dir: Path, skip_incomplete: bool = False) -> tuple[list[KitsCase], list[str]]:
    """The complete cases, and the ids of incomplete ones (an error unless `skip_incomplete`)."""
    root = kits_root(in_dir)
    folders = _case_folders(root)
    if not folders:
        raise DataError(f"no KiTS case folders ({CASE_PREFIX}XXXXX/) in {in_dir}.",
                        f"Expected {CASE_PREFIX}00000/{IMAGING} and {SEGMENTATION} (KiTS19 or KiTS23 layout).")
    cases, incomplete = [], []
    for folder in folders:
        imaging, segmentation = folder / IMAGING, folder / SEGMENTATION
        if imaging.is_file() and segmentation.is_file():
            cases.append(KitsCase(folder.name, imaging, segmentation))
        else:
            missing = [f.name for f in (imaging, segmentation) if not f.is_file()]
            incomplete.append(f"{folder.name} (no {' or '.join(missing)})")
    if incomplete and not skip_incomplete:
        shown = ", ".join(incomplete[:10]) + (f" ... ({len(incomplete)} in all)" if len(incomplete) > 10 else "")
        raise DataError(f"{len(incomplete)} KiTS case folder(s) in {root} are incomplete: {shown}.",
                        "Every case needs both files; KiTS19's test cases (00210-00299) have no segmentation. "
                        "Pass --skip-incomplete to leave such cases out.")
    return cases, [text.split(" ")[0] for text in incomplete]


def load_header(path: Path) -> nib.Nifti1Image:
    """The lazily loaded image (header only); a file nibabel cannot parse is a DataError naming it."""
    try:
        image = nib.load(path)
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError)
        raise DataError(f"{path} is not a readable NIfTI file ({type(err).__name__}: {err}).",
                        "It may be truncated or corrupt: download or unpack it again.") from err
    if len(image.shape) != 3:
        raise DataError(f"{path} has shape {image.shape}; a KiTS volume is 3D.")
    return image


def check_pair(case: KitsCase) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """Imaging and segmentation must cover the same voxels: same shape and (near-)identical affine."""
    imaging, segmentation = load_header(case.imaging), load_header(case.segmentation)
    if imaging.shape != segmentation.shape:
        raise DataError(f"case {case.case_id}: imaging has shape {imaging.shape} but segmentation has "
                        f"{segmentation.shape}.", "The two files of a case must be the same voxel grid.")
    if not np.allclose(imaging.affine, segmentation.affine, atol=AFFINE_TOLERANCE_MM):
        raise DataError(f"case {case.case_id}: imaging and segmentation have different affines "
                        f"(max difference {np.abs(imaging.affine - segmentation.affine).max():.4g}).",
                        "The two files of a case must be the same voxel grid.")
    return imaging, segmentation


def _same_size(a: float, b: float) -> bool:
    return abs(a - b) <= SAME_SPACING * max(a, b)


def looks_like_old_kits19(zooms: tuple[float, float, float]) -> bool:
    """True for the voxel sizes of the first KiTS19 release, whose affine is diag(slice thickness, pixel, pixel).

    Its arrays are (slices, rows, cols), as in the current release, but the affine does not say so: after RAS
    reorientation the square CT pixel lies on axes y, z instead of x, y, and the "axial" slices are sagittal.
    The heuristic: y and z share a voxel size while x differs. CT pixels are square in-plane, so a correctly
    oriented volume (x = y) never matches; one whose slices are exactly as thick as its pixels is missed.
    """
    x, y, z = zooms
    return _same_size(y, z) and not _same_size(x, y)


def warn_old_kits19(suspects: Sequence[str]) -> None:
    """One warning for all suspect cases: the conversion goes on (the heuristic can be wrong), but says why."""
    if not suspects:
        return
    shown = ", ".join(suspects[:5]) + (f" ... ({len(suspects)} in all)" if len(suspects) > 5 else "")
    log.warning("%d case(s) look like the first KiTS19 release (affine diag(slice thickness, pixel, pixel): the "
                "slices would come out sagittal, not axial): %s. Re-download the current KiTS19 release "
                "(git pull, then python3 -m starter_code.get_imaging) or check these volumes' orientation in a viewer.",
                len(suspects), shown)


def label_volume(segmentation: nib.Nifti1Image, case: KitsCase) -> np.ndarray:
    """Canonical uint8 labels; anything but the integers 0..3 is a DataError."""
    labels = canonical_array(segmentation, case.segmentation)
    if not np.issubdtype(labels.dtype, np.integer):
        rounded = np.rint(labels)
        if not np.array_equal(rounded, labels):
            raise DataError(f"{case.segmentation} holds non-integer labels.")
        labels = rounded
    low, high = labels.min(), labels.max()
    if low < 0 or high > MAX_LABEL:
        raise DataError(f"{case.segmentation} holds labels {low}..{high}; KiTS labels are 0..{MAX_LABEL} "
                        f"({', '.join(LABEL_NAMES)}).")
    return labels.astype(np.uint8)


def case_seed(seed: int, case_id: str) -> np.random.Generator:
    """A generator per case, so the choice of empty slices does not depend on order or --jobs."""
    return np.random.default_rng([seed, zlib.crc32(case_id.encode())])


def select_slices(labels: np.ndarray, empty_share: float, rng: np.random.Generator,
                  keep_all: bool = False) -> np.ndarray:
    """Axial indices with kidney (any label > 0), plus round(empty_share * count) others, sorted; every
    index when `keep_all` (test cases: a volume Dice needs the whole volume)."""
    if keep_all:
        return np.arange(labels.shape[2], dtype=np.int64)
    has_kidney = labels.reshape(-1, labels.shape[2]).any(axis=0)
    kidney = np.flatnonzero(has_kidney)
    empty = np.flatnonzero(~has_kidney)
    n_empty = min(len(empty), int(round(empty_share * len(kidney))))
    chosen = rng.choice(empty, size=n_empty, replace=False) if n_empty else np.array([], dtype=np.int64)
    return np.sort(np.concatenate([kidney, chosen]).astype(np.int64))


def convert_slice(hu: np.ndarray, labels: np.ndarray, target: tuple[int, int], offset: tuple[int, int],
                  size: int, window: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """One canonical axial slice -> (image (size,size) uint8, mask (size,size) uint8) in radiological view."""
    mask = resize_mask_priority(radiological_view(labels), target, LABEL_PRIORITY)
    return image_on_canvas(hu, target, offset, (size, size), window), on_canvas(mask, offset, (size, size))


def convert_case(case: KitsCase, settings: SliceSettings) -> PreparedCase:
    """One case -> its kept slices, windowed and resized. Runs in a worker when --jobs > 1."""
    imaging, segmentation = check_pair(case)
    labels = label_volume(segmentation, case)
    kits = settings.kits
    indices = select_slices(labels, kits.empty_share, case_seed(settings.seed, case.case_id),
                            keep_all=case.case_id in settings.test_cases)
    size, channels = settings.size, kits.channels
    shape = display_shape(labels.shape, canonical_zooms(imaging), kits.spacing)
    target, offset = fit_to_size(shape, size, settings.resize_mode)
    images = np.zeros((len(indices), size, size, channels), np.uint8)
    masks = np.zeros((len(indices), size, size), np.uint8)
    if len(indices):
        volume = canonical_array(imaging, case.imaging)
        for i, z in enumerate(indices):
            image, masks[i] = convert_slice(volume[:, :, z], labels[:, :, z], target, offset, size, kits.window)
            images[i] = image[..., None]  # broadcasts the grey channel when channels == 3
    return PreparedCase(case.case_id, images, masks, slice_index=indices,
                        geometry=slice_geometry(imaging, target, offset, size))


def _convert_task(task: tuple[KitsCase, SliceSettings]) -> PreparedCase:
    return convert_case(*task)


@contextmanager
def converted_cases(cases: Sequence[KitsCase], settings: SliceSettings) -> Iterator[Iterator[PreparedCase]]:
    """Cases in order, one at a time; with jobs > 1 a spawn pool converts ahead while the caller writes.

    A context manager rather than a generator so the pool is terminated as soon as the writer fails, not
    whenever a traceback that still references the generator is garbage-collected.
    """
    tasks = [(case, settings) for case in cases]
    if settings.kits.jobs == 1 or len(cases) <= 1:
        yield map(_convert_task, tasks)
        return
    # spawn, not fork: the parent may hold threads (Ray, torch) or an open HDF5 file.
    context = multiprocessing.get_context("spawn")
    with ExitStack() as stack:
        with signals_deferred():  # a pool half started is never terminated: a signal waits until it is whole
            pool = stack.enter_context(spawn_ignoring_ctrl_c(lambda: context.Pool(
                min(settings.kits.jobs, len(cases)), initializer=_leave_interrupts_to_the_parent)))
        yield pool.imap(_convert_task, tasks, chunksize=1)


def spawn_ignoring_ctrl_c(start: Callable[[], T]) -> T:
    """`start()` with SIGINT ignored in this process for the moment it spawns children: an ignored signal stays
    ignored through exec, so a Ctrl-C sent to the whole process group while a worker is still importing Python
    cannot print "Fatal Python error: init_import_site" from it. A Ctrl-C in those milliseconds is dropped.
    Off the main thread signals cannot be changed (nor received): `start()` runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        return start()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _leave_interrupts_to_the_parent() -> None:
    """A pool worker ignores Ctrl-C (the terminal sends it to the whole process group): the parent stops,
    removes the partial file and terminates the pool, instead of every worker printing a traceback and then
    BrokenPipe errors into a closed pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def preprocessing_record(options: PrepareOptions, kits: KitsOptions, skipped: list[str],
                         suspects: list[str]) -> dict[str, Any]:
    record = asdict(kits)
    record.pop("jobs")  # does not change the output
    record.update(window=list(kits.window), size=options.size, resize_mode=options.resize_mode,
                  resize_order="in-plane spacing and --size in one resampling, then zero padding",
                  image_resize="bilinear (antialiased)", mask_resize=MASK_RESIZE, seed=options.seed,
                  orientation=ORIENTATION, kept_slices=KEPT_SLICES, geometry=GEOMETRY, test_cases_keep_all_slices=True,
                  skipped_cases=skipped, old_kits19_suspects=suspects)
    return record


def held_out_test_cases(case_ids: Sequence[str], options: PrepareOptions) -> frozenset[str]:
    """The test split, drawn exactly as `write_dataset` will draw it (same ids, fractions, seed, split file)."""
    mapping = splits_for(case_ids, options.fractions, options.seed, options.split_file)
    return frozenset(case for case in case_ids if mapping[case] == "test")


def prepare_kits(
    in_dir: str | os.PathLike,
    out: str | os.PathLike,
    options: PrepareOptions,
    kits: KitsOptions = KitsOptions(),
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Convert a KiTS19/KiTS23 folder to `out` (HDF5 + fingerprint + splits); returns the fingerprint."""
    check_kits_options(options, kits)
    cases, skipped = find_cases(Path(in_dir), kits.skip_incomplete)
    suspects = []
    for case in cases:  # headers only: a bad pair fails in seconds, not after hours of conversion
        imaging, _ = check_pair(case)
        if looks_like_old_kits19(canonical_zooms(imaging)):
            suspects.append(case.case_id)
    warn_old_kits19(suspects)
    case_ids = [case.case_id for case in cases]
    settings = SliceSettings(options.size, options.resize_mode, options.seed, kits,  # type: ignore[arg-type]
                             held_out_test_cases(case_ids, options))
    record = preprocessing_record(options, kits, skipped, suspects)
    with converted_cases(cases, settings) as stream:
        return write_dataset(
            out, case_ids, stream, label_names=LABEL_NAMES, source="kits", preprocessing=record,
            options=options, progress=progress,
        )
