"""Image files on disk: which files in a folder are images, and reading one with a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from lawder_core.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def list_images(folder: Path) -> dict[str, Path]:
    """Image files by stem; hidden files and other suffixes are ignored."""
    if not folder.is_dir():
        raise DataError(f"folder {folder} does not exist or is not a folder.")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in files:
                raise DataError(f"two images share the stem {path.stem!r} in {folder}: {files[path.stem].name}, "
                                f"{path.name}.", "Keep one of them.")
            files[path.stem] = path
    return files


def read_image(path: Path, mode: str) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"cannot read {path}: {err}", "The file may be truncated or not an image.") from err
