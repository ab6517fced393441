"""A procedural, polyp-like data set: the built-in default for the demo and the tests.

Each sample is a smooth, textured mucosa-coloured background with one to three blob-shaped lesions whose
colour and texture differ from it, so a segmenter can learn them and a diffusion model has a layout to
follow. Lesions cover 1–20 % of the frame by default; `lesion_frac=(low, high)` and `blobs=N` draw another
regime, e.g. (0.003, 0.03) with one blob: the small-lesion set where a lesion-weighting method should matter.
The target share is drawn uniformly in [low, high] and split over the blobs; the rasterised mask's share
lands near it (a blob of a dozen pixels is a coarse disc). Deterministic: sample i depends only on (seed, i),
and the default options draw exactly the set they always drew.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from lawder_core.data.prepare import PreparedCase, PrepareOptions, Progress, write_dataset
from lawder_core.data.sources import DEFAULT_LESION_FRAC, check_lesion_options
from lawder_core.errors import UsageError

LABEL_NAMES = ("background", "lesion")
MIN_FRACTION, MAX_FRACTION = DEFAULT_LESION_FRAC
MAX_BLOBS = 3  # the default draws 1..MAX_BLOBS blobs per sample


def smooth_noise(rng: np.random.Generator, size: int, scale: int) -> np.ndarray:
    """Value noise: a coarse random grid upsampled bilinearly, in [0, 1]."""
    coarse = rng.random((scale + 1, scale + 1))
    x = np.linspace(0, scale, size, endpoint=False)
    i = x.astype(int)
    f = x - i
    top = coarse[i][:, i] * (1 - f)[None, :] + coarse[i][:, i + 1] * f[None, :]
    bottom = coarse[i + 1][:, i] * (1 - f)[None, :] + coarse[i + 1][:, i + 1] * f[None, :]
    return top * (1 - f)[:, None] + bottom * f[:, None]


def blob_mask(rng: np.random.Generator, size: int, area_fraction: float) -> np.ndarray:
    """A star-shaped blob: radius perturbed by a few random Fourier harmonics."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    base_r = np.sqrt(area_fraction * size * size / np.pi)
    margin = base_r * 1.3
    cy, cx = rng.uniform(margin, size - margin, 2) if size > 2 * margin else (size / 2, size / 2)
    angle = np.arctan2(yy - cy, xx - cx)
    radius = np.full_like(angle, base_r)
    for k in range(2, 5):
        radius += base_r * rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= radius


def synthetic_sample(seed: int, index: int, size: int,
                     lesion_frac: tuple[float, float] = (MIN_FRACTION, MAX_FRACTION),
                     blobs: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image HxWx3 uint8, mask HxW uint8) pair; `blobs` None draws one to three."""
    rng = np.random.default_rng([seed, index])
    low, high = lesion_frac
    target = rng.uniform(low, high)
    drawn = int(rng.integers(1, MAX_BLOBS + 1))  # drawn even when `blobs` is given: the stream stays the same
    n_blobs = blobs or drawn
    mask = np.zeros((size, size), bool)
    for share in rng.dirichlet(np.ones(n_blobs)):
        mask |= blob_mask(rng, size, max(target * share, low / n_blobs))
    background_tone = np.array([0.78, 0.42, 0.36]) + rng.uniform(-0.05, 0.05, 3)
    lesion_tone = np.array([0.62, 0.22, 0.28]) + rng.uniform(-0.05, 0.05, 3)
    bg_tex = 0.6 * smooth_noise(rng, size, 4) + 0.4 * smooth_noise(rng, size, 16)
    lesion_tex = smooth_noise(rng, size, 32)  # finer grain: the lesion's texture differs, not only its colour
    image = background_tone * (0.75 + 0.35 * bg_tex)[..., None]
    lesion = lesion_tone * (0.7 + 0.5 * lesion_tex)[..., None]
    image = np.where(mask[..., None], lesion, image)
    vignette = 1 - 0.35 * (np.hypot(*np.mgrid[-1:1:size * 1j, -1:1:size * 1j]) / np.sqrt(2)) ** 2
    image = image * vignette[..., None] + rng.normal(0, 0.015, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), mask.astype(np.uint8)


def synthetic_cases(n: int, size: int, seed: int, lesion_frac: tuple[float, float] = (MIN_FRACTION, MAX_FRACTION),
                    blobs: int | None = None) -> Iterator[PreparedCase]:
    """Each synthetic image is its own case (like Kvasir-SEG, which has no patient ids)."""
    for i in range(n):
        image, mask = synthetic_sample(seed, i, size, lesion_frac, blobs)
        yield PreparedCase(case_id=synthetic_case_id(i), images=image[None], masks=mask[None])


def synthetic_case_id(index: int) -> str:
    return f"synth_{index:05d}"


def prepare_synthetic(out: str | os.PathLike, n: int, size: int, seed: int, options: PrepareOptions,
                      progress: Progress | None = None,
                      lesion_frac: tuple[float, float] = (MIN_FRACTION, MAX_FRACTION),
                      blobs: int | None = None) -> dict:
    """Write the procedural set; `options.size` is ignored (samples are drawn at `size`)."""
    if n < 1:
        raise UsageError("--n must be at least 1 for the synthetic set.")
    if size < 16:
        raise UsageError("--size must be at least 16 for the synthetic set.")
    check_lesion_options(lesion_frac, blobs)
    ids = [synthetic_case_id(i) for i in range(n)]
    preprocessing = {"generator": "lawder.synthetic", "n": n, "size": size, "seed": seed,
                     "lesion_frac": list(lesion_frac), "blobs": blobs}
    return write_dataset(out, ids, synthetic_cases(n, size, seed, lesion_frac, blobs), label_names=LABEL_NAMES,
                         source="synthetic",
                         preprocessing=preprocessing, options=options, progress=progress)
