"""Malformed HDF5 files and damaged denoiser files are refused before any work (issue 16, item 8).

Every fault ends in one line naming the file and what is wrong, a hint, exit 3 (data), and no traceback.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from lawder_cli.main import app
from lawder_core import runs
from lawder_core.data.h5 import load_arrays, read_info, split_indices
from lawder_core.errors import EXIT_DATA, DataError
from lawder_core.models.configs import SPEC_FILE
from tests.helpers import runner, synthetic_h5

pytestmark = pytest.mark.faults

SIZE = 32


def refused(args: list[str], *words: str) -> str:
    """Run the CLI and check the documented refusal: exit 3, the words, a hint, no traceback."""
    result = runner.invoke(app, args)
    text = " ".join(result.output.split())
    assert result.exit_code == EXIT_DATA, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in text, result.output
    return text


# ---------------------------------------------------------------- HDF5 schema


@pytest.fixture(scope="module")
def good_h5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_h5(tmp_path_factory.mktemp("h5") / "good.h5", n=10, size=SIZE)


def replace_dataset(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def grey_without_channel_axis(f: h5py.File) -> None:
    replace_dataset(f, "images", f["images"][..., 0])


def short_masks(f: h5py.File) -> None:
    replace_dataset(f, "masks", f["masks"][:-3])


def short_case_ids(f: h5py.File) -> None:
    replace_dataset(f, "case_id", f["case_id"][:-1])


def short_splits(f: h5py.File) -> None:
    replace_dataset(f, "split", f["split"][:-2])


def masks_of_another_size(f: h5py.File) -> None:
    replace_dataset(f, "masks", f["masks"][:, : SIZE // 2])


def float_images(f: h5py.File) -> None:
    replace_dataset(f, "images", f["images"][()].astype(np.float32))


def no_masks(f: h5py.File) -> None:
    del f["masks"]


def misspelt_split(f: h5py.File) -> None:
    f["split"][0] = "trian"


def label_names_not_a_list(f: h5py.File) -> None:
    f.attrs["label_names"] = "lesion"


def schema_version_text(f: h5py.File) -> None:
    f.attrs["schema_version"] = "one"


def empty(f: h5py.File) -> None:
    for name in ("images", "masks", "case_id", "split"):
        f[name].resize(0, axis=0)


FAULTS: list[tuple[Callable[[h5py.File], None], tuple[str, ...]]] = [
    (grey_without_channel_axis, ("dataset 'images' is (10, 32, 32) uint8", "(N, H, W, C)", "C = 1")),
    (short_masks, ("different lengths", "images 10, masks 7")),
    (short_case_ids, ("different lengths", "case_id 9")),
    (short_splits, ("different lengths", "split 8")),
    (masks_of_another_size, ("masks are 16×32 but images 32×32",)),
    (float_images, ("dataset 'images'", "float32")),
    (no_masks, ("missing datasets ['masks']",)),
    (misspelt_split, ("dataset 'split' holds ['trian']",)),
    (label_names_not_a_list, ("attribute 'label_names'",)),
    (schema_version_text, ("schema version 'one'",)),
    (empty, ("holds no samples",)),
]


def broken_copy(good: Path, tmp_path: Path, fault: Callable[[h5py.File], None]) -> Path:
    path = tmp_path / f"{fault.__name__}.h5"
    shutil.copy(good, path)
    with h5py.File(path, "a") as f:
        fault(f)
    return path


@pytest.mark.parametrize(("fault", "words"), FAULTS, ids=[f.__name__ for f, _ in FAULTS])
def test_a_file_that_breaks_the_schema_is_refused_by_inspect(good_h5: Path, tmp_path: Path, fault, words) -> None:
    path = broken_copy(good_h5, tmp_path, fault)
    refused(["inspect", str(path)], str(path), *words, "lawder prepare")


@pytest.mark.parametrize("fault", [grey_without_channel_axis, short_masks, masks_of_another_size, float_images])
def test_train_order_refuses_it_before_the_run_folder_exists(good_h5: Path, tmp_path: Path, fault) -> None:
    path = broken_copy(good_h5, tmp_path, fault)
    out = tmp_path / "run"
    refused(["train-order", "--data", str(path), "--out", str(out), "--epochs", "1"], str(path), "lawder prepare")
    assert not out.exists()


def test_train_order_refuses_a_misspelt_split_before_creating_the_run(good_h5: Path, tmp_path: Path) -> None:
    """The split column is checked where it is read (choosing the training samples), not on every open; the
    request check reads it, so the refusal comes before the run folder exists."""
    path = broken_copy(good_h5, tmp_path, misspelt_split)
    out = tmp_path / "run"
    refused(["train-order", "--data", str(path), "--out", str(out), "--epochs", "1"], "'split' holds ['trian']")
    assert not out.exists()


@pytest.mark.parametrize("reader", [read_info, lambda p: split_indices(p, "train"), lambda p: load_arrays(p, "val")])
def test_every_reader_meets_the_same_check(good_h5: Path, tmp_path: Path, reader) -> None:
    path = broken_copy(good_h5, tmp_path, short_masks)
    with pytest.raises(DataError, match="different lengths"):
        reader(path)


def test_the_check_reads_no_pixels(good_h5: Path, tmp_path: Path) -> None:
    """A file whose every image and mask chunk is garbage still passes `read_info`: only metadata is read."""
    path = tmp_path / "garbled.h5"
    shutil.copy(good_h5, path)
    with h5py.File(path, "r") as f:
        offsets = [f["images"].id.get_chunk_info(i).byte_offset for i in range(f["images"].id.get_num_chunks())]
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset:offset + 64] = bytes(64)
    path.write_bytes(bytes(data))
    assert len(offsets) == 10 and read_info(path).n == 10
    with h5py.File(path, "r") as f, pytest.raises(OSError):  # the pixels themselves are unreadable
        f["images"][0]


# ---------------------------------------------------------------- denoiser files


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout `train-law` leaves (RUN/last/denoiser_ema + progress.json), written without training."""
    import torch

    from lawder_core.models.denoiser import DenoiserSpec, PixelDenoiser

    run = tmp_path_factory.mktemp("den") / "run"
    torch.manual_seed(0)
    PixelDenoiser(DenoiserSpec(preset="tiny", size=SIZE)).save_pretrained(run / runs.LAST / runs.DENOISER_EMA)
    (run / runs.LAST / runs.PROGRESS).write_text(json.dumps({"step": 2, "lesion_labels": [1]}))
    return run


def damaged_copy(saved_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    return run, run / runs.LAST / runs.DENOISER_EMA


def sample_refused(run: Path, masks: Path, tmp_path: Path, *words: str) -> str:
    out = tmp_path / "syn.h5"
    text = refused(["sample", "--run", str(run), "--masks", str(masks), "-o", str(out), "--steps", "1", "--n", "1"],
                   *words, "train-law")
    assert not out.exists()
    return text


def test_an_intact_run_samples(saved_run: Path, good_h5: Path, tmp_path: Path) -> None:
    """The control: the refusals below come from the damage, not from the hand-made run."""
    result = runner.invoke(app, ["sample", "--run", str(saved_run), "--masks", str(good_h5), "-o",
                                 str(tmp_path / "syn.h5"), "--steps", "1", "--n", "1"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(("text", "words"), [
    ("{not json", ("is not valid JSON",)),
    ("[1, 2]", ("expected a JSON object, found list",)),
    (json.dumps({"label_names": 5}), ("field 'label_names' is 5; expected a list of strings",)),
    (json.dumps({"size": "abc"}), ("field 'size' is 'abc'; expected a JSON int",)),
    (json.dumps({"size": 0}), ("field 'size' is 0; expected a positive integer",)),
    (json.dumps({"preset": "huge"}), ("unknown preset 'huge'",)),
    (json.dumps({"weights": "x"}), ("unknown fields ['weights']",)),
])
def test_a_damaged_spec_file_is_a_data_error(saved_run: Path, good_h5: Path, tmp_path: Path, text, words) -> None:
    run, model = damaged_copy(saved_run, tmp_path)
    if text.startswith("{\""):  # a one-field change to the spec lawder wrote
        text = json.dumps({**json.loads((model / SPEC_FILE).read_text()), **json.loads(text)})
    (model / SPEC_FILE).write_text(text)
    sample_refused(run, good_h5, tmp_path, SPEC_FILE, *words)


WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_torn_weights_are_a_data_error(saved_run: Path, good_h5: Path, tmp_path: Path, damage: str) -> None:
    run, model = damaged_copy(saved_run, tmp_path)
    weights = model / "unet" / WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 64, "empty": b""}[damage])
    sample_refused(run, good_h5, tmp_path, "cannot load the denoiser weights", "unet")


class Payload:
    """Unpickling this would create the marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_in_place_of_safetensors_are_refused_unread(saved_run: Path, good_h5: Path,
                                                                     tmp_path: Path) -> None:
    run, model = damaged_copy(saved_run, tmp_path)
    marker = tmp_path / "pwned"
    (model / "unet" / WEIGHTS).unlink()
    (model / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"conv_in.weight": Payload(marker)}))
    sample_refused(run, good_h5, tmp_path, "holds no safetensors weights", "which lawder never loads")
    assert not marker.exists()


@pytest.mark.parametrize(("file", "words"), [
    ("unet/config.json", ("cannot load the denoiser weights",)),
    ("scheduler/scheduler_config.json", ("cannot read the scheduler",)),
])
def test_damaged_configs_are_a_data_error(saved_run: Path, good_h5: Path, tmp_path: Path, file, words) -> None:
    run, model = damaged_copy(saved_run, tmp_path)
    (model / file).write_text("{oops")
    sample_refused(run, good_h5, tmp_path, *words)


def test_weights_of_another_shape_are_a_data_error(saved_run: Path, good_h5: Path, tmp_path: Path) -> None:
    run, model = damaged_copy(saved_run, tmp_path)
    config = json.loads((model / "unet" / "config.json").read_text())
    config["block_out_channels"] = [2 * c for c in config["block_out_channels"]]
    (model / "unet" / "config.json").write_text(json.dumps(config))
    sample_refused(run, good_h5, tmp_path, "cannot load the denoiser weights", "size mismatch")


@pytest.mark.parametrize(("text", "words"), [
    ("{torn", ("progress.json is damaged: not valid JSON",)),
    (json.dumps({"step": "two"}), ("'step' is 'two', not an integer",)),
    (json.dumps({"step": 2, "lesion_labels": "tumour"}), ("'lesion_labels' is 'tumour'",)),
])
def test_a_damaged_progress_record_is_a_data_error(saved_run: Path, good_h5: Path, tmp_path: Path, text,
                                                   words) -> None:
    run, _ = damaged_copy(saved_run, tmp_path)
    (run / runs.LAST / runs.PROGRESS).write_text(text)
    sample_refused(run, good_h5, tmp_path, *words)
