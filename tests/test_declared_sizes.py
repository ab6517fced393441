"""Declared sizes are not trusted: an HDF5 file or an image that declares more than it holds, or more than lawder
reads, is refused from its header or metadata before anything is decoded or allocated."""

from __future__ import annotations

import json
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from lawder_cli.main import app
from lawder_core.data.images import MAX_PIXELS, image_size, read_image
from lawder_core.errors import DataError
from tests.helpers import runner, synthetic_h5, untrained_checkpoint, write_pair_folder

pytestmark = pytest.mark.faults



def declaring_h5(path: Path, n: int, side: int, chunk_side: int) -> Path:
    """A file of a few KB whose datasets declare n images of side×side pixels and hold none of their chunks."""
    strings = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.create_dataset("images", shape=(n, side, side, 3), maxshape=(None, side, side, 3), dtype=np.uint8,
                         chunks=(1, chunk_side, chunk_side, 3), compression="lzf")
        f.create_dataset("masks", shape=(n, side, side), maxshape=(None, side, side), dtype=np.uint8,
                         chunks=(1, chunk_side, chunk_side), compression="lzf")
        f.create_dataset("case_id", data=np.array([f"c{i}" for i in range(n)], dtype=object), dtype=strings)
        f.create_dataset("split", data=np.array(["train"] * n, dtype=object), dtype=strings)
        f.attrs["schema_version"] = 1
        f.attrs["label_names"] = json.dumps(["background", "lesion"])
    return path


@pytest.mark.parametrize(("n", "side", "chunk", "words"), [
    (64, 60000, 1024, "lawder reads at most 16384×16384"),  # beyond any sane image
    (64, 8000, 8000, "holds 0 bytes of it"),  # sane, but the file holds none of it
], ids=["beyond-limits", "more-than-the-file-holds"])
def test_an_hdf5_file_that_declares_more_than_it_holds_is_refused_at_once(tmp_path, n, side, chunk, words):
    path = declaring_h5(tmp_path / "bomb.h5", n, side, chunk)
    assert path.stat().st_size < 20_000
    tic = time.perf_counter()
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 3 and words in result.output, result.output
    assert time.perf_counter() - tic < 10  # no minutes of reading fill values
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-order", "--data", str(path), "--out", str(out), "--size", "32"])
    assert result.exit_code == 3 and words in result.output, result.output
    assert not out.exists()  # refused before the run folder


def test_a_real_file_with_missing_rows_is_refused_and_a_complete_one_passes(tmp_path):
    from lawder_core.data.h5 import read_info

    good = synthetic_h5(tmp_path / "s.h5", n=6, size=32)
    assert read_info(good).n == 6
    with h5py.File(good, "a") as f:  # two more rows declared, never written
        for name in ("images", "masks", "case_id", "split"):
            f[name].resize(8, axis=0)
    with pytest.raises(DataError, match="holds .* of it"):
        read_info(good)


def bomb(path: Path, side: int = 10000) -> Path:
    """A real PNG of a few KB that decodes to side² pixels (a 1-bit image: 12 MB to make, 300 MB as RGB)."""
    Image.new("1", (side, side)).save(path)
    return path


def test_an_image_bomb_is_refused_from_its_header(tmp_path):
    path = bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 100_000
    for read in (lambda: read_image(path, "RGB"), lambda: image_size(path)):
        with pytest.raises(DataError, match="100,000,000 pixels, more than lawder decodes"):
            read()
    Image.MAX_IMAGE_PIXELS, before = None, Image.MAX_IMAGE_PIXELS  # a library that switched Pillow's guard off
    try:
        with pytest.raises(DataError, match="10000×10000 pixels"):
            read_image(path, "RGB")
    finally:
        Image.MAX_IMAGE_PIXELS = before
    assert MAX_PIXELS < 10000 * 10000


def test_predict_skips_an_image_bomb_and_writes_the_others(tmp_path):
    images, _ = write_pair_folder(tmp_path / "in", 3)
    bomb(images / "zz_bomb.png")
    out = tmp_path / "pred"
    result = runner.invoke(app, ["predict", str(images), "--run", str(untrained_checkpoint(tmp_path / "ck")),
                                 "-o", str(out)])
    assert result.exit_code == 3, result.output  # any skip exits 3, as the README says
    summary = json.loads((out / "predict_summary.json").read_text())
    assert (summary["written"], summary["skipped"]) == (3, 1)
    assert summary["skipped_inputs"][0]["input"] == "zz_bomb.png"
    assert "more than lawder decodes" in summary["skipped_inputs"][0]["reason"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["img00.png", "img01.png", "img02.png"]


@pytest.mark.parametrize("where", ["images", "masks"])
def test_prepare_folder_names_the_bomb(tmp_path, where):
    images, masks = write_pair_folder(tmp_path / "in", 3)
    bomb((images if where == "images" else masks) / "img01.png")
    result = runner.invoke(app, ["prepare", "folder", "--images", str(images), "--masks", str(masks), "-o",
                                 str(tmp_path / "d.h5"), "--size", "32"])
    assert result.exit_code == 3, result.output
    assert str((images if where == "images" else masks) / "img01.png") in " ".join(result.output.split())
    assert "Traceback" not in result.output and not (tmp_path / "d.h5").exists()
