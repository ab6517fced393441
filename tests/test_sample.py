"""train → sample round trip: synthetic pairs from the EMA weights into a valid lawder HDF5 file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.errors import DataError, UsageError
from lawder_core.models.law import LAWConfig
from lawder_core.sample import run_info, sample_pairs, write_synthetic_h5
from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion
from tests.helpers import synthetic_h5


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sample")
    data = synthetic_h5(root / "synth.h5", n=8, size=32)
    run = root / "run"
    train_diffusion(DiffusionTrainConfig(data=str(data), out=str(run), size=32, steps=2, batch_size=4, preset="tiny",
                                         sample_every=0, law=LAWConfig(warmup_frac=0.0)))
    return data, run


def test_round_trip_writes_a_valid_synthetic_h5(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained
    _, masks, cases = load_arrays(data, "train", limit=5)
    seen: list[int] = []
    images = sample_pairs(run, masks, steps=3, batch_size=2, seed=7, progress=seen.append)
    assert images.shape == (5, 32, 32, 3) and images.dtype == np.uint8 and seen == [2, 2, 1]
    assert images.std() > 0

    info = run_info(run)
    out = tmp_path / "synthetic.h5"
    provenance = {"run": str(run), "step": info.step, "scheduler": "ddim", "seed": 7}
    write_synthetic_h5(out, images, masks, [f"syn_{c}" for c in cases], provenance,
                       label_names=info.spec.label_names)
    h5 = read_info(out)
    assert (h5.n, h5.height, h5.width, h5.channels) == (5, 32, 32, 3)
    assert h5.attrs["step"] == 2 and h5.attrs["scheduler"] == "ddim" and h5.attrs["seed"] == 7
    assert h5.attrs["run"] == str(run) and h5.label_names == ("background", "lesion")
    back_images, back_masks, back_cases = load_arrays(out, "train")
    assert np.array_equal(back_images, images) and np.array_equal(back_masks, masks)
    assert back_cases[0] == f"syn_{cases[0]}"
    assert out.with_suffix(".png").stat().st_size > 500
    with pytest.raises(UsageError, match="--force"):
        write_synthetic_h5(out, images, masks, list(cases), provenance)  # refuses to overwrite without force
    write_synthetic_h5(out, images, masks, list(cases), provenance, force=True)


def test_samples_depend_only_on_seed_and_index(trained: tuple[Path, Path]) -> None:
    data, run = trained
    _, masks, _ = load_arrays(data, "train", limit=4)
    whole = sample_pairs(run, masks, steps=2, batch_size=2, seed=3)
    shard = sample_pairs(run, masks[2:], steps=2, batch_size=2, seed=3, first_index=2)
    # workers split the masks into whole batches (distributed.sample.chunk_ranges), and then they agree bit for bit;
    # other batch sizes may pick other conv kernels, which round differently
    assert np.array_equal(whole[2:], shard)
    other = sample_pairs(run, masks[:1], steps=2, seed=4)
    assert not np.array_equal(whole[:1], other)


def test_guidance_and_dpm_solver(trained: tuple[Path, Path]) -> None:
    data, run = trained
    _, masks, _ = load_arrays(data, "train", limit=2)
    plain = sample_pairs(run, masks, steps=2, scheduler="dpm")
    guided = sample_pairs(run, masks, steps=2, scheduler="dpm", guidance=3.0)
    assert plain.shape == guided.shape and not np.array_equal(plain, guided)


def test_bad_inputs_fail_with_clear_errors(trained: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained
    with pytest.raises(UsageError, match="32×32"):
        sample_pairs(run, np.zeros((1, 64, 64), np.uint8), steps=1)
    with pytest.raises(DataError, match="label"):
        sample_pairs(run, np.full((1, 32, 32), 3, np.uint8), steps=1)
    with pytest.raises(UsageError, match="scheduler"):
        sample_pairs(run, np.zeros((1, 32, 32), np.uint8), scheduler="euler")
    with pytest.raises(DataError, match="no trained diffusion model"):
        sample_pairs(tmp_path, np.zeros((1, 32, 32), np.uint8))


def test_a_run_folder_of_the_first_build_samples_as_before(tmp_path: Path) -> None:
    """Old runs: epsilon target, linear betas, leading spacing, `checkpoint/` and `train_config.json` on disk."""
    import json
    import shutil

    data = synthetic_h5(tmp_path / "synth.h5", n=8, size=32)
    run = tmp_path / "run"
    train_diffusion(DiffusionTrainConfig(data=str(data), out=str(run), size=32, steps=2, batch_size=4, preset="tiny",
                                         sample_every=0, weighting="uniform", prediction="epsilon",
                                         beta_schedule="linear", timestep_spacing="leading"))
    _, masks, _ = load_arrays(data, "train", limit=3)
    today = sample_pairs(run, masks, steps=3, seed=1)
    old = tmp_path / "old"
    shutil.copytree(run, old)
    (old / "last").rename(old / "checkpoint")
    (old / "config.json").rename(old / "train_config.json")
    for folder in ("denoiser", "denoiser_ema"):  # specs written before the recipe fields existed
        spec_file = old / "checkpoint" / folder / "lawder_denoiser.json"
        spec = json.loads(spec_file.read_text())
        for key in ("prediction", "timestep_spacing"):
            spec.pop(key)
        spec_file.write_text(json.dumps(spec))
    info = run_info(old)
    assert (info.spec.prediction, info.spec.beta_schedule, info.spec.timestep_spacing) == ("epsilon", "linear",
                                                                                           "leading")
    assert np.array_equal(sample_pairs(old, masks, steps=3, seed=1), today)
