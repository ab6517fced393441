"""Image files on disk: which files in a folder are images, and reading images and masks by a stated rule.

Images: 8-bit files are read as RGB; files with more than 8 bits (16-bit PNG/TIFF, 32-bit integer or float) are
rescaled from their own minimum–maximum to 0–255 instead of being clipped at 255.

Masks (binary lesion masks of the folder sources): the value of a pixel is its brightest colour channel (a
coloured lesion on black counts), or its alpha when an RGBA/LA mask carries one colour everywhere and the lesion
only in alpha; palette masks use the colour their index shows. A pixel is lesion when its value is at least half
the SET's full scale: 1 when every mask of the set holds only 0 and 1 (label masks), 255 when the values fit 8
bits (0/255 masks, JPEG masks with compression noise), 65535 otherwise. The scale is decided once per set, so a
noisy empty JPEG mask is never read as a 0/1 label mask.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lawder_core.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def is_image_file(path: Path) -> bool:
    """A file lawder reads as an image: a known suffix, not hidden."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(folder: Path) -> dict[str, Path]:
    """Image files by stem; hidden files and other suffixes are ignored."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist or is not a folder.")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if is_image_file(path):
            if path.stem in files:
                raise DataError(f"two images share the stem {path.stem!r} in {folder}: {files[path.stem].name}, "
                                f"{path.name}.", "Keep one of them.")
            files[path.stem] = path
    return files


HIGH_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


# Pillow's own default bound (89,478,485 pixels, about 9459²), kept even where a library has switched Pillow's off:
# a 1 MB PNG can declare 20000² pixels and need gigabytes to decode (a decompression bomb).
MAX_PIXELS = 89_478_485
READ_HINT = "The file may be truncated or not an image."


def _open_header(path: Path) -> Image.Image:
    """The image with only its header read; a declared size beyond MAX_PIXELS is refused before any decoding."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # Pillow only warns up to twice its bound
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))  # Pillow says how many pixels, not the width and height
        raise too_large(path, f"{int(found.group(1)):,} pixels" if found else "more pixels") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}", READ_HINT) from err
    width, height = im.size
    if width * height > MAX_PIXELS:
        im.close()
        raise too_large(path, f"{width}×{height} pixels")
    return im


def too_large(path: Path, declared: str) -> DataError:
    return DataError(f"{path} declares {declared}, more than lawder decodes ({MAX_PIXELS:,}); it was not read.",
                     "A real image this large must be downscaled first; a small file that declares it is a "
                     "decompression bomb.")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header alone."""
    with _open_header(path) as im:
        return im.size


def _open(path: Path) -> Image.Image:
    im = _open_header(path)
    try:
        im.load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        im.close()
        raise DataError(f"cannot read {path}: {err}", READ_HINT) from err


def read_image(path: Path, mode: str) -> np.ndarray:
    """An 8-bit array in `mode` ("RGB" or "L"); high-bit-depth files are rescaled, not clipped."""
    with _open(path) as im:
        if im.mode not in HIGH_BIT_MODES:
            try:
                return np.array(im.convert(mode))  # a writable copy: torch warns about read-only arrays
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read {path}: {err}", READ_HINT) from err
        values = np.asarray(im, dtype=np.float64)
    low, high = float(values.min()), float(values.max())
    grey = np.zeros(values.shape, np.uint8) if high <= low else np.round(
        (values - low) * (255.0 / (high - low))).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1) if mode == "RGB" else grey


def mask_values(path: Path) -> np.ndarray:
    """A mask file's pixel values (H, W) in its own range, before thresholding (see the module docstring)."""
    with _open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        values = np.asarray(im)
        bands = im.getbands()
    if values.ndim == 2:
        return values.astype(np.int64)
    if "A" in bands:
        colour, alpha = values[..., :-1], values[..., -1]
        # One colour everywhere: the drawing is in the alpha channel, and a fully transparent mask is empty.
        if (colour == colour.reshape(-1, colour.shape[-1])[0]).all() and (alpha.min() != alpha.max()
                                                                           or alpha.max() == 0):
            return alpha.astype(np.int64)
        values = colour
    return values.max(axis=-1).astype(np.int64)


def mask_scale(maxima: list[int]) -> int:
    """The full scale of a set of masks from each mask's maximum value: 1 (0/1 labels), 255 or 65535."""
    top = max(maxima, default=0)
    return 1 if top <= 1 else 255 if top <= 255 else 65535


def mask_threshold(scale: int) -> int:
    """The lowest lesion value: half the full scale (1 of 1, 128 of 255, 32768 of 65535)."""
    return (scale + 1) // 2


def binary_mask(values: np.ndarray, scale: int) -> np.ndarray:
    """Lesion where the value reaches the scale's threshold (`mask_threshold`)."""
    return (values >= mask_threshold(scale)).astype(np.uint8)
