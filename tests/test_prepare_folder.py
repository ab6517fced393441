import json

import numpy as np
import pytest
from PIL import Image

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.prepare import PrepareOptions, pad_to_square
from lawder_core.data.prepare_folder import prepare_folder
from lawder_core.errors import DataError
from tests.helpers import write_pair_folder


def test_folder_pairs_are_padded_resized_and_split(tmp_path):
    images, masks = write_pair_folder(tmp_path / "raw", 10)
    out = tmp_path / "d.h5"
    fp = prepare_folder("folder", None, out, PrepareOptions(size=32), images=str(images), masks=str(masks))
    info = read_info(out)
    assert (info.n, info.height, info.width, info.channels) == (10, 32, 32, 3)
    assert fp["splits"]["train"]["samples"] == 8 and fp["splits"]["val"]["samples"] == 1
    _, m, _ = load_arrays(out)
    assert set(np.unique(m)) == {0, 1}
    # pad mode keeps black bars: the 40x30 image becomes 40x40 with 5 padded rows top and bottom
    assert m[:, :3].sum() == 0
    splits = json.loads((tmp_path / "d.splits.json").read_text())
    assert sorted(sum(splits.values(), [])) == sorted(f"img{i:02d}" for i in range(10))
    assert json.loads((tmp_path / "d.fingerprint.json").read_text())["samples"] == 10


def test_kvasir_layout_with_jpg_and_a_nested_release_folder(tmp_path):
    write_pair_folder(tmp_path / "raw" / "Kvasir-SEG", 5, size=(32, 32), suffix=".jpg", mask_suffix=".jpg")
    out = tmp_path / "k.h5"
    prepare_folder("kvasir", tmp_path / "raw", out, PrepareOptions(size=None, fractions=(0.6, 0.2, 0.2)))
    assert read_info(out).n == 5


def test_cvc_layout_with_tif(tmp_path):
    root = tmp_path / "cvc"
    images, masks = write_pair_folder(root, 4, size=(24, 24), suffix=".tif", mask_suffix=".tif")
    images.rename(root / "Original")
    masks.rename(root / "Ground Truth")
    out = tmp_path / "c.h5"
    prepare_folder("cvc", root, out, PrepareOptions(size=16, resize_mode="stretch"))
    assert read_info(out).height == 16


def test_images_without_masks_are_listed(tmp_path):
    images, masks = write_pair_folder(tmp_path / "raw", 4)
    (masks / "img01.png").unlink()
    (masks / "img03.png").unlink()
    with pytest.raises(DataError, match=r"2 image\(s\).*img01.png, img03.png"):
        prepare_folder("folder", None, tmp_path / "d.h5", PrepareOptions(), images=str(images), masks=str(masks))
    assert not list(tmp_path.glob("d*"))


def test_truncated_image_and_size_mismatch_leave_no_output(tmp_path):
    images, masks = write_pair_folder(tmp_path / "raw", 4)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(masks / "img02.png")
    with pytest.raises(DataError, match="same size"):
        prepare_folder("folder", None, tmp_path / "d.h5", PrepareOptions(), images=str(images), masks=str(masks))
    write_pair_folder(tmp_path / "raw2", 3)
    bad = tmp_path / "raw2" / "images" / "img01.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DataError, match="img01.png"):
        prepare_folder("folder", None, tmp_path / "e.h5", PrepareOptions(),
                       images=str(tmp_path / "raw2" / "images"), masks=str(tmp_path / "raw2" / "masks"))
    assert not list(tmp_path.glob("*.h5*"))


def test_wrong_layout_and_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_folder("kvasir", tmp_path / "nope", tmp_path / "d.h5", PrepareOptions())
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="prepare folder"):
        prepare_folder("kvasir", tmp_path / "x", tmp_path / "d.h5", PrepareOptions())


def test_images_in_sub_folders_only_are_pointed_at(tmp_path):
    write_pair_folder(tmp_path / "raw" / "images", 2)  # raw/images/images/*.png: one level too deep
    with pytest.raises(DataError, match="no images") as caught:
        prepare_folder("folder", None, tmp_path / "d.h5", PrepareOptions(), images=str(tmp_path / "raw" / "images"),
                       masks=str(tmp_path / "raw" / "images" / "masks"))
    assert str(tmp_path / "raw" / "images" / "images") in caught.value.hint
    assert str(tmp_path / "raw" / "images" / "masks") in caught.value.hint and not list(tmp_path.glob("d*"))


def test_split_file_reuse_gives_the_same_split(tmp_path):
    images, masks = write_pair_folder(tmp_path / "raw", 10)
    prepare_folder("folder", None, tmp_path / "a.h5", PrepareOptions(seed=1), images=str(images), masks=str(masks))
    reuse = PrepareOptions(seed=99, split_file=str(tmp_path / "a.splits.json"))
    prepare_folder("folder", None, tmp_path / "b.h5", reuse, images=str(images), masks=str(masks))
    assert (tmp_path / "a.splits.json").read_text() == (tmp_path / "b.splits.json").read_text()


def test_pad_to_square_centres():
    a = pad_to_square(np.ones((2, 4)))
    assert a.shape == (4, 4) and a[0].sum() == 0 and a[1].sum() == 4
