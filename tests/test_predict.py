import numpy as np
import pytest
import torch
from PIL import Image

from lawder_cli.main import app
from lawder_core.errors import DataError
from lawder_core.models.factory import build_segmenter, save_segmenter
from lawder_core.predictor import load_predictor, predict_images
from tests.helpers import runner, synthetic_h5, write_pair_folder


@pytest.fixture()
def run(tmp_path):
    torch.manual_seed(0)
    model = build_segmenter("mkunet-t")
    save_segmenter(model.eval(), tmp_path / "run" / "best", extra={"train_config": {"size": 32}})
    return tmp_path / "run"


def test_predictions_come_back_at_the_input_size_and_match_eager(run, tmp_path):
    predictor = load_predictor(run, mode="channels_last")
    images = np.random.default_rng(0).integers(0, 255, (3, 48, 40, 3), dtype=np.uint8)
    labels = predict_images(predictor, images)
    assert labels.shape == (3, 48, 40) and labels.dtype == np.uint8
    eager = predict_images(load_predictor(run, mode="eager"), images)
    assert (labels == eager).mean() > 0.99


def test_cli_predict_from_hdf5_and_folder(run, tmp_path):
    data = synthetic_h5(tmp_path / "s.h5", n=10, size=32)
    result = runner.invoke(app, ["predict", str(data), "--run", str(run), "-o", str(tmp_path / "p"), "--json"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "p" / "masks").glob("*.png"))) == 1  # the test split of 10 samples
    again = runner.invoke(app, ["predict", str(data), "--run", str(run), "-o", str(tmp_path / "p")])
    assert again.exit_code == 2  # not empty, and no --force
    images, _ = write_pair_folder(tmp_path / "raw", 2, size=(40, 30))
    result = runner.invoke(app, ["predict", str(images), "--run", str(run), "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "q" / "masks" / "img00.png"))
    assert mask.shape == (30, 40) and set(np.unique(mask)) <= {0, 255}


def test_missing_checkpoint_is_explained(tmp_path):
    with pytest.raises(DataError, match="train-order"):
        load_predictor(tmp_path)
