"""2D image/mask folders: Kvasir-SEG, CVC-ClinicDB, and any `--images/--masks` pair matched by file stem."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lawder_core.data.images import (
    IMAGE_SUFFIXES,
    binary_mask,
    image_size,
    is_image_file,
    list_images,
    mask_scale,
    mask_threshold,
    mask_values,
    read_image,
)
from lawder_core.data.prepare import PreparedCase, PrepareOptions, Progress, resize_pair, write_dataset
from lawder_core.errors import DataError, UsageError

log = logging.getLogger(__name__)
LABEL_NAMES = ("background", "lesion")
MASK_RULE = ("lesion = value >= half the set's full scale (1 for 0/1 masks, 255 for 8-bit, 65535 for 16-bit); "
             "value = brightest colour channel, or alpha when only alpha varies")

# Folder names the public releases use, matched case-insensitively.
LAYOUTS = {
    "kvasir": (("images",), ("masks",)),
    "cvc": (("original",), ("ground truth", "groundtruth", "ground_truth", "masks")),
}


def find_subfolder(root: Path, names: tuple[str, ...]) -> Path | None:
    """The first child (or grandchild, for a release unpacked into its own folder) named like one of `names`."""
    for depth_glob in ("*", "*/*"):
        for candidate in sorted(root.glob(depth_glob)):
            if candidate.is_dir() and candidate.name.lower() in names:
                return candidate
    return None


def layout_folders(source: str, in_dir: Path) -> tuple[Path, Path]:
    """Locate the image and mask folders of a known public layout."""
    if not in_dir.is_dir():
        raise DataError(f"input folder {in_dir} does not exist or is not a folder.")
    image_names, mask_names = LAYOUTS[source]
    images, masks = find_subfolder(in_dir, image_names), find_subfolder(in_dir, mask_names)
    if images is None or masks is None:
        want = f"{image_names[0]}/ and {mask_names[0]}/"
        raise DataError(
            f"{in_dir} does not look like a {source} folder: expected sub-folders {want}.",
            "Use `lawder prepare folder --images DIR --masks DIR` for another layout.",
        )
    return images, masks


def nested_hint(folder: Path) -> str | None:
    """Where the images are when a folder holds none itself but its sub-folders do (files are not searched
    recursively: a split or a class per sub-folder is the user's to choose)."""
    def holds_images(sub: Path) -> bool:
        return sub.is_dir() and any(map(is_image_file, sub.iterdir()))

    holders = sorted(filter(holds_images, folder.iterdir())) if folder.is_dir() else []
    if not holders:
        return None
    names = ", ".join(str(sub) for sub in holders[:3]) + (f" and {len(holders) - 3} more" if len(holders) > 3 else "")
    return (f"Its sub-folders hold images ({names}); lawder reads the files of the folder itself: name the folder "
            "that holds them.")


def match_pairs(images_dir: Path, masks_dir: Path) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for every image; every image must have a mask (a mask may end in _mask)."""
    images, masks = list_images(images_dir), list_images(masks_dir)
    if not images:
        raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images_dir}.", nested_hint(images_dir))
    by_stem = dict(masks)
    for stem, path in masks.items():
        for suffix in ("_mask", "_seg", "_segmentation"):
            if stem.endswith(suffix):
                by_stem.setdefault(stem[: -len(suffix)], path)
    missing = [stem for stem in images if stem not in by_stem]
    if missing:
        shown = ", ".join(images[s].name for s in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{len(missing)} image(s) in {images_dir} have no mask in {masks_dir}: {shown}",
                        "Masks are matched by file stem (optionally with a _mask suffix).")
    return [(stem, images[stem], by_stem[stem]) for stem in images]


def read_pair(image_path: Path, mask_path: Path, size: int | None, mode: str,
              scale: int = 255) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(image_path, "RGB")
    mask = binary_mask(mask_values(mask_path), scale)
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"{image_path.name} is {image.shape[1]}×{image.shape[0]} but its mask {mask_path} is "
            f"{mask.shape[1]}×{mask.shape[0]}.",
            "An image and its mask must have the same size; fix or remove the pair.",
        )
    return resize_pair(image, mask, size, mode)


def folder_cases(pairs: list[tuple[str, Path, Path]], size: int | None, mode: str,
                 scale: int) -> Iterator[PreparedCase]:
    """Every image is its own case: these polyp sets carry no patient id."""
    for stem, image_path, mask_path in pairs:
        image, mask = read_pair(image_path, mask_path, size, mode, scale)
        yield PreparedCase(case_id=stem, images=image[None], masks=mask[None])


def set_mask_scale(pairs: list[tuple[str, Path, Path]]) -> int:
    """The full scale of this set's masks (images.mask_scale); warns when every mask is empty, and when masks that
    hold values lie wholly below the set's threshold, so that they are read as empty."""
    maxima = [int(mask_values(mask_path).max()) for _, _, mask_path in pairs]
    if max(maxima, default=0) == 0:
        log.warning("every mask in %s is empty (all pixels 0): the data set has no lesion to learn from. "
                    "Check --masks.", pairs[0][2].parent if pairs else "the set")
    scale = mask_scale(maxima)
    threshold = mask_threshold(scale)
    faint = [(mask_path.name, top) for (_, _, mask_path), top in zip(pairs, maxima, strict=True)
             if 0 < top < threshold]
    if faint:
        shown = ", ".join(f"{name} (max {top})" for name, top in faint[:5]) + (
            f" and {len(faint) - 5} more" if len(faint) > 5 else "")
        log.warning("%d of %d masks hold values but none reaches this set's lesion threshold %d (of %d), so they are "
                    "read as empty: %s. Noise in an empty JPEG mask looks like this; a 0/1 label mask among 0/%d "
                    "masks does too: rescale such masks to the set's scale if they hold lesions.",
                    len(faint), len(pairs), threshold, scale, shown, scale)
    return scale


def check_uniform_size(pairs: list[tuple[str, Path, Path]], size: int | None) -> None:
    """Without --size every image must already share one size (HDF5 stores one shape)."""
    if size is not None:
        return
    sizes = set()
    for _, image_path, _ in pairs:
        sizes.add(image_size(image_path))  # the header only, with the decompression-bomb guard
        if len(sizes) > 1:
            raise DataError(f"images have different sizes ({sorted(sizes)[:3]}) and no --size was given.",
                            "Pass --size N to resize every pair to N×N.")


def folder_source(source: str, in_dir: str | os.PathLike | None, images: str | None,
                  masks: str | None) -> tuple[Path, Path]:
    if source == "folder":
        if not images or not masks:
            raise UsageError("`prepare folder` needs --images DIR and --masks DIR.",
                             "e.g. lawder prepare folder --images data/images --masks data/masks -o data.h5")
        return Path(images), Path(masks)
    return layout_folders(source, Path(in_dir or "."))


def prepare_folder(source: str, in_dir: str | os.PathLike | None, out: str | os.PathLike, options: PrepareOptions,
                   images: str | None = None, masks: str | None = None,
                   progress: Progress | None = None) -> dict:
    """Convert a Kvasir-SEG / CVC-ClinicDB / generic image+mask folder pair into one HDF5 file."""
    images_dir, masks_dir = folder_source(source, in_dir, images, masks)
    pairs = match_pairs(images_dir, masks_dir)
    check_uniform_size(pairs, options.size)
    scale = set_mask_scale(pairs)
    preprocessing = {"size": options.size, "resize_mode": options.resize_mode, "mask_scale": scale,
                     "mask_threshold": mask_threshold(scale), "mask_rule": MASK_RULE,
                     "images": str(images_dir), "masks": str(masks_dir)}
    cases = folder_cases(pairs, options.size, options.resize_mode, scale)
    return write_dataset(out, [stem for stem, _, _ in pairs], cases,
                         label_names=LABEL_NAMES, source=source, preprocessing=preprocessing, options=options,
                         progress=progress)
