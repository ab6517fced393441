"""A pickle planted where lawder reads a checkpoint is refused, never executed (issue 16, item 1)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lawder_core import runs
from lawder_core.errors import DataError
from lawder_core.models.factory import build_segmenter, load_segmenter, save_segmenter

pytestmark = pytest.mark.faults


class Payload:
    """Unpickling this would create the marker file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({"optimizer": Payload(marker)}, f)


def test_a_planted_training_state_is_refused_with_a_way_out_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "run" / "last"
    plant(checkpoint / runs.STATE, marker)
    with pytest.raises(DataError, match="not a training state lawder wrote") as refused:
        runs.load_state(checkpoint)
    assert "--force" in str(refused.value) and refused.value.exit_code == 3
    assert not marker.exists()


def test_planted_weights_are_refused_and_run_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = tmp_path / "best"
    save_segmenter(build_segmenter("mkunet-t"), folder)
    weights = next(folder.glob("*.safetensors"))
    plant(weights, marker)
    with pytest.raises(DataError, match="cannot be read"):
        load_segmenter(folder)
    assert not marker.exists()


def test_a_torn_training_state_is_refused_too(tmp_path: Path) -> None:
    checkpoint = tmp_path / "last"
    checkpoint.mkdir()
    torch.save({"epoch": 3}, checkpoint / runs.STATE)
    data = (checkpoint / runs.STATE).read_bytes()
    (checkpoint / runs.STATE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a training state"):
        runs.load_state(checkpoint)
