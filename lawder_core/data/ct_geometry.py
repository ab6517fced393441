"""CT slice geometry: RAS canonical volumes, the radiological view of an axial slice and its inverse, the
size×size canvas a slice is fitted onto, and the affine that takes a canvas voxel back to the scanner.

Orientation convention. Each volume is reoriented with `nib.as_closest_canonical` to RAS+ (array axis 0 runs
towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior), whatever its affine. Axial
slices are `volume[:, :, z]`. Each slice is shown the way radiologists read axial CT, looking up from the feet:
anterior at the top of the image and the patient's right on the image's left, i.e.
`display[row, col] = slice[X - 1 - col, Y - 1 - row]`. `prepare kits`, `predict` on volumes and
`export nnunet` all go through these functions, so images, masks and predictions stay aligned.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lawder_core.data.resize import resize_image
from lawder_core.errors import DataError

log = logging.getLogger(__name__)

AIR_HU = -1024.0  # what a NaN voxel is read as: air, the lowest value a CT holds (black in every window)


def canonical_array(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The voxel array in RAS+ order, in its stored dtype (not float64: volumes are hundreds of MB).

    NaN voxels (a float volume damaged in conversion) would silently become black slices through the window;
    they are read as air (AIR_HU) instead, with a warning that names the volume and counts them.
    """
    try:
        array = np.asanyarray(nib.as_closest_canonical(image).dataobj)
    except Exception as err:  # truncated gzip streams fail only here, when the data is read
        raise DataError(f"{path} cannot be read ({type(err).__name__}: {err}).",
                        "It may be truncated or corrupt: download or unpack it again.") from err
    if array.dtype.kind == "f":
        nan = np.isnan(array)
        count = int(nan.sum())
        if count:
            log.warning("%s: %d of %d voxels are NaN (%.2g%%); they were read as air (%g HU)", path, count,
                        array.size, 100 * count / array.size, AIR_HU)
            array = np.where(nan, np.asarray(AIR_HU, array.dtype), array)
    return array


def canonical_zooms(image: nib.Nifti1Image) -> tuple[float, float, float]:
    """Voxel sizes (mm) along the RAS axes, i.e. `as_closest_canonical(image).header.get_zooms()`, from the
    header alone (reorienting the image itself would read the whole volume)."""
    axes = nib.orientations.io_orientation(image.affine)[:, 0].astype(int)
    zooms = [0.0, 0.0, 0.0]
    for stored_axis, ras_axis in enumerate(axes):
        zooms[ras_axis] = float(image.header.get_zooms()[stored_axis])
    return zooms[0], zooms[1], zooms[2]


def canonical_geometry(image: nib.Nifti1Image) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of `nib.as_closest_canonical(image)`, from the header alone (no voxel is read)."""
    ornt = nib.orientations.io_orientation(image.affine)
    shape = [0, 0, 0]
    for stored_axis, ras_axis in enumerate(ornt[:, 0].astype(int)):
        shape[ras_axis] = int(image.shape[stored_axis])
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape)
    return (shape[0], shape[1], shape[2]), affine


def canvas_affine(affine: np.ndarray, shape: tuple[int, ...], target: tuple[int, int], offset: tuple[int, int],
                  size: int) -> np.ndarray:
    """World (mm) coordinates of canvas voxels, for a canonical volume of `shape` with `affine`.

    The canvas voxel (i, j, z) is `canvas[size-1-j, size-1-i]` of axial slice z (the radiological view undone,
    `from_radiological_view`, so i runs along canonical x and j along y). The resized
    slice (rows, cols) = `target` sits at (top, left) = `offset`; pixel centres map as in PIL's resize
    (centre c of the output <-> (c + 0.5) * input/output - 0.5 of the input), so canonical
    x = sx * i + X - 0.5 - (size - 0.5 - left) * sx with sx = X / cols, and likewise y with rows and top.
    The in-plane voxel size is therefore the native one times X / cols and Y / rows; z keeps the native one.
    """
    x, y = shape[0], shape[1]
    rows, cols = target
    top, left = offset
    sx, sy = x / cols, y / rows
    to_canonical = np.array([[sx, 0.0, 0.0, x - 0.5 - (size - 0.5 - left) * sx],
                             [0.0, sy, 0.0, y - 0.5 - (size - 0.5 - top) * sy],
                             [0.0, 0.0, 1.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    return affine @ to_canonical


def slice_geometry(image: nib.Nifti1Image, target: tuple[int, int], offset: tuple[int, int],
                   size: int) -> dict[str, Any]:
    """A case's `case_geometry` record (JSON values): canonical shape and affine, target, offset, canvas_affine."""
    shape, affine = canonical_geometry(image)
    return {"shape": list(shape), "affine": affine.tolist(), "target": [int(v) for v in target],
            "offset": [int(v) for v in offset], "size": int(size),
            "canvas_affine": canvas_affine(affine, shape, target, offset, size).tolist()}


def window_to_uint8(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Clip to the HU window and map it linearly onto 0..255 (low -> 0, high -> 255)."""
    low, high = window
    scaled = (np.clip(hu.astype(np.float32), low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


def radiological_view(axial: np.ndarray) -> np.ndarray:
    """RAS axial slice (x, y) -> display (row, col): anterior up, patient's right on the image's left."""
    return np.ascontiguousarray(axial.T[::-1, ::-1])


def display_shape(canonical_shape: tuple[int, ...], zooms: tuple[float, float, float],
                  spacing: float | None) -> tuple[float, float]:
    """(rows, cols) of a displayed slice, at `spacing` mm per pixel when given (rows run along y, cols along x)."""
    rows, cols = canonical_shape[1], canonical_shape[0]
    if spacing is None:
        return float(rows), float(cols)
    return rows * zooms[1] / spacing, cols * zooms[0] / spacing


def fit_to_size(shape: tuple[float, float], size: int, mode: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """The resized (rows, cols) and its (top, left) offset on the size×size canvas.

    pad: the longest side becomes `size`, the other keeps the aspect ratio and is centred between zeros;
    stretch: size×size. Resizing before padding keeps the black border out of the antialiasing filter.
    """
    if mode == "stretch":
        return (size, size), (0, 0)
    scale = size / max(shape)
    rows, cols = (min(size, max(1, round(n * scale))) for n in shape)
    return (rows, cols), ((size - rows) // 2, (size - cols) // 2)


def from_radiological_view(display: np.ndarray) -> np.ndarray:
    """The inverse of `radiological_view`: display (row, col) -> RAS axial slice (x, y)."""
    return np.ascontiguousarray(display[::-1, ::-1].T)


def image_on_canvas(hu: np.ndarray, target: tuple[int, int], offset: tuple[int, int], size: tuple[int, int],
                    window: tuple[float, float]) -> np.ndarray:
    """One canonical axial HU slice -> the uint8 canvas of `size` (rows, cols): windowed, in radiological view,
    resized to `target` and placed at `offset` (top, left) between zeros."""
    image = resize_image(window_to_uint8(radiological_view(hu), window), target)
    return on_canvas(image, offset, size)


def on_canvas(image: np.ndarray, offset: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """`image` placed at `offset` (top, left) on a zero canvas of `size` (rows, cols)."""
    top, left = offset
    canvas = np.zeros(size, image.dtype)
    canvas[top:top + image.shape[0], left:left + image.shape[1]] = image
    return canvas
