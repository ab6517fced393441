"""`prepare` reads masks by their real value range and 16-bit images without clipping (issue 16, item 4)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from lawder_core.data.h5 import load_arrays
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_folder import prepare_folder

pytestmark = pytest.mark.faults


def grey(lesion: np.ndarray, on: int, dtype=np.uint8) -> Image.Image:
    return Image.fromarray((lesion.astype(np.int64) * on).astype(dtype))


def red_on_black(lesion: np.ndarray) -> Image.Image:
    rgb = np.zeros((*lesion.shape, 3), np.uint8)
    rgb[..., 0] = lesion * 255
    return Image.fromarray(rgb)


def alpha_only(lesion: np.ndarray) -> Image.Image:
    rgba = np.full((*lesion.shape, 4), 255, np.uint8)  # white everywhere; the lesion is only in alpha
    rgba[..., 3] = lesion * 255
    return Image.fromarray(rgba)


def palette(lesion: np.ndarray) -> Image.Image:
    im = Image.fromarray(lesion.astype(np.uint8), mode="P")
    im.putpalette([0, 0, 0, 128, 0, 0] + [0] * 762)  # index 1 is dark red, as in VOC-style masks
    return im


FORMATS = {
    "8-bit 0/1": lambda m: grey(m, 1),
    "8-bit 0/255": lambda m: grey(m, 255),
    "16-bit 0/1": lambda m: grey(m, 1, np.uint16),
    "16-bit 0/65535": lambda m: grey(m, 65535, np.uint16),
    "RGB red lesion": red_on_black,
    "RGBA alpha lesion": alpha_only,
    "palette": palette,
}


def write_set(root: Path, lesions: list[np.ndarray], make_mask, image_of=None) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    for i, lesion in enumerate(lesions):
        image = image_of(i, lesion.shape) if image_of else Image.fromarray(
            np.full((*lesion.shape, 3), 40 + i, np.uint8))
        image.save(images / f"c{i:02d}.png")
        make_mask(lesion).save(masks / f"c{i:02d}.png")
    return images, masks


def prepared_masks(root: Path, images: Path, masks: Path) -> np.ndarray:
    out = root / "d.h5"
    prepare_folder("folder", None, out, PrepareOptions(size=None, force=True), images=str(images), masks=str(masks))
    return load_arrays(out)[1]


def lesions(seed: int, n: int = 4, size: int = 12) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size)) < 0.1 + 0.2 * i).astype(np.uint8) for i in range(n)]


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_mask_format_prepares_to_its_lesion(fmt, tmp_path):
    truth = lesions(0)
    images, masks = write_set(tmp_path, truth, FORMATS[fmt])
    got = prepared_masks(tmp_path, images, masks)
    by_case = dict(zip(sorted(f"c{i:02d}" for i in range(len(truth))), truth, strict=True))
    _, _, cases = load_arrays(tmp_path / "d.h5")
    for mask, case in zip(got, cases, strict=True):
        np.testing.assert_array_equal(mask, by_case[case])


# derandomize: the same 20 cases on every run, so CI cannot flake; @example pins a case a random run once found
# (an empty mask drawn in alpha only is fully transparent and must prepare to an empty mask, not a full one).
@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@example(fmt="RGBA alpha lesion", seed=1954, size=4, n=1)
@given(fmt=st.sampled_from(sorted(FORMATS)), seed=st.integers(0, 2**16), size=st.integers(4, 20),
       n=st.integers(1, 4))
def test_any_lossless_mask_round_trips(fmt, seed, size, n, tmp_path_factory):
    truth = lesions(seed, n, size)
    root = tmp_path_factory.mktemp("set")
    images, masks = write_set(root, truth, FORMATS[fmt])
    got = prepared_masks(root, images, masks)
    assert sorted(int(m.sum()) for m in got) == sorted(int(t.sum()) for t in truth)


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path):
    values = np.linspace(0, 4000, 12 * 12).reshape(12, 12).astype(np.uint16)  # a 12-bit scan in a 16-bit PNG
    images, masks = write_set(tmp_path, lesions(1, 1), FORMATS["8-bit 0/255"],
                              image_of=lambda i, shape: Image.fromarray(values))
    prepared_masks(tmp_path, images, masks)
    image = load_arrays(tmp_path / "d.h5")[0][0]
    assert image.shape == (12, 12, 3) and image.min() == 0 and image.max() == 255
    np.testing.assert_array_equal(image[..., 0], np.round(values * (255 / 4000)).astype(np.uint8))
    assert (image[..., 0] == 255).sum() == 1  # the old conversion saturated most of the image at 255


def test_a_set_of_empty_masks_warns(tmp_path, caplog):
    images, masks = write_set(tmp_path, [np.zeros((8, 8), np.uint8)] * 2, FORMATS["8-bit 0/255"])
    with caplog.at_level(logging.WARNING, logger="lawder_core.data.prepare_folder"):
        got = prepared_masks(tmp_path, images, masks)
    assert got.sum() == 0 and "every mask" in caplog.text


def test_label_masks_mixed_into_a_sixteen_bit_set_are_named_in_a_warning(tmp_path, caplog):
    truth = lesions(3)
    images, masks = write_set(tmp_path, truth, FORMATS["16-bit 0/65535"])
    grey(truth[1], 1, np.uint16).save(masks / "c01.png")  # one 0/1 label mask among 0/65535 masks
    with caplog.at_level(logging.WARNING, logger="lawder_core.data.prepare_folder"):
        got = prepared_masks(tmp_path, images, masks)
    assert sorted(int(m.sum()) for m in got) == sorted([0, *(int(t.sum()) for i, t in enumerate(truth) if i != 1)])
    assert "1 of 4 masks hold values but none reaches this set's lesion threshold 32768" in caplog.text
    assert "c01.png (max 1)" in caplog.text


def test_a_set_of_one_scale_gives_no_faint_mask_warning(tmp_path, caplog):
    images, masks = write_set(tmp_path, lesions(4), FORMATS["8-bit 0/255"])
    with caplog.at_level(logging.WARNING, logger="lawder_core.data.prepare_folder"):
        prepared_masks(tmp_path, images, masks)
    assert "threshold" not in caplog.text


def test_noisy_jpeg_masks_keep_the_half_scale_threshold(tmp_path):
    truth = lesions(2)
    images, masks = tmp_path / "images", tmp_path / "masks"
    write_set(tmp_path, truth, FORMATS["8-bit 0/255"])
    for path in masks.glob("*.png"):  # JPEG masks as Kvasir ships them: values near 0 and 255, not exactly
        Image.open(path).save(path.with_suffix(".jpg"), quality=90)
        path.unlink()
    got = prepared_masks(tmp_path, images, masks)
    agree = np.mean([np.mean(g == t) for g, t in zip(got, truth, strict=True)])
    assert agree > 0.9
