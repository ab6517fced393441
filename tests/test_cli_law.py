"""`lawder train-law` and `lawder sample` through the CLI and Ray: round trip, resume, refusal, configs, sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from lawder_cli.main import app
from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.resize import resize_masks
from lawder_core.runs import read_metrics
from lawder_core.sample import dihedral, sample_pairs
from tests.helpers import runner, synthetic_h5

SYNTHETIC = {"n": 10}  # images in the module's `data` (conftest)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train-law", "--data", str(data), "--out", str(out), "--size", "32", "--steps", "2", "--batch-size", "4",
            "--preset", "tiny", "--workers", "0", "--log-every", "1", "--sample-every", "0", "--seed", "1", *extra]


def invoke(args: list[str]) -> dict:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # --json: nothing but the result on stdout


@pytest.fixture(scope="module")
def run(ray_local, data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("runs") / "law"
    summary = invoke(train_args(data, out, "--weighting", "law", "--objective", "descent", "--w-min", "0.25",
                                "--w-max", "4", "--sample-every", "2", "--json"))
    return out, summary


def test_train_law_summarises_the_run_folder(run: tuple[Path, dict]) -> None:
    out, summary = run
    assert summary["step"] == 2 and summary["weighting"] == "law" and summary["checkpoint_step"] == 2
    assert Path(summary["checkpoint"]) == out / "last" and Path(summary["preview"]).exists()
    assert summary["loss"] > 0 and summary["law"]["law_active"] is True
    assert 0 < summary["law"]["w_background"] < summary["law"]["w_lesion"] <= summary["law"]["w_max"]
    saved = json.loads((out / "config.json").read_text())
    assert (saved["prediction"], saved["hflip"]) == (None, False)  # None: the unet's v
    assert json.loads((out / "last" / "denoiser" / "lawder_denoiser.json").read_text())["prediction"] == "v"
    assert saved["law"]["objective"] == "descent" and (saved["law"]["w_min"], saved["law"]["w_max"]) == (0.25, 4.0)


def test_sample_round_trip_writes_pairs_with_provenance(run: tuple[Path, dict], data: Path, tmp_path: Path) -> None:
    out, _ = run
    syn = tmp_path / "syn.h5"
    result = invoke(["sample", "--run", str(out), "--masks", str(data), "--steps", "2", "--batch-size", "3",
                     "--seed", "5", "-o", str(syn), "--json"])
    _, real_masks, cases = load_arrays(data, "train")
    assert result["n"] == len(real_masks) and result["step"] == 2 and result["weighting"] == "law"
    info = read_info(syn)
    assert (info.n, info.height, info.channels) == (len(real_masks), 32, 3)
    assert info.attrs["scheduler"] == "ddim" and info.attrs["seed"] == 5 and info.attrs["steps"] == 2
    assert info.attrs["run"] == str(out.resolve()) and info.attrs["weighting"] == "law"
    images, masks, syn_cases = load_arrays(syn, "train")
    assert np.array_equal(masks, real_masks) and list(syn_cases) == [f"syn_{c}" for c in cases]
    assert np.array_equal(images, sample_pairs(out, real_masks, steps=2, batch_size=3, seed=5))
    assert syn.with_suffix(".png").stat().st_size > 500
    again = runner.invoke(app, ["sample", "--run", str(out), "--masks", str(data), "--steps", "1", "-o", str(syn)])
    assert again.exit_code != 0 and "--force" in again.output


def test_sample_mask_aug_exceeds_the_mask_count_and_resizes(run: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = run
    big = synthetic_h5(tmp_path / "big.h5", n=6, size=64)  # masks at 64 px for a 32 px model: resized
    _, masks64, cases = load_arrays(big, "train")
    m = len(masks64)
    refused = runner.invoke(app, ["sample", "--run", str(out), "--masks", str(big), "--n", str(2 * m + 1),
                                  "-o", str(tmp_path / "x.h5")])
    assert refused.exit_code == 2 and "--mask-aug" in refused.output
    syn = tmp_path / "aug.h5"
    result = invoke(["sample", "--run", str(out), "--masks", str(big), "--n", str(2 * m + 1), "--mask-aug",
                     "--steps", "1", "--batch-size", "8", "-o", str(syn), "--json"])
    assert result["n"] == 2 * m + 1 and result["masks_size"] == [64, 64] and result["mask_aug"] is True
    _, masks, syn_cases = load_arrays(syn, "train")
    assert masks.shape == (2 * m + 1, 32, 32)
    small = resize_masks(masks64, 32)
    for i, name in enumerate(syn_cases):  # each sample is a flip/rotation of the mask its case id names
        j, (use, k) = i % m, (int(p[1:]) for p in name.rsplit("_", 2)[1:])
        assert name.startswith(f"syn_{cases[j]}_r") and use == i // m
        assert np.array_equal(masks[i], dihedral(small[j], k))
    first, second = (syn_cases[j].rsplit("_", 1)[1] for j in (0, m))
    assert first != second  # the second use of a mask gets another transform


def test_existing_run_is_refused_without_resume_or_force(run: tuple[Path, dict], data: Path) -> None:
    out, _ = run
    again = runner.invoke(app, train_args(data, out))
    assert again.exit_code == 2 and "--resume" in again.output and "--force" in again.output


def test_resume_continues_at_the_right_step_with_the_saved_config(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    invoke(train_args(data, out, "--weighting", "ratio", "--json"))
    summary = invoke(["train-law", "--out", str(out), "--resume", "--steps", "4", "--workers", "0", "--json"])
    assert summary["step"] == 4 and summary["checkpoint_step"] == 4 and summary["weighting"] == "ratio"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
    assert json.loads((out / "config.json").read_text())["seed"] == 1  # the saved config, not the defaults
    restarted = invoke(train_args(data, out, "--weighting", "uniform", "--force", "--json"))
    assert restarted["step"] == 2 and restarted["weighting"] == "uniform"
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_best_yaml_of_a_law_sweep_is_accepted_as_config(data: Path, tmp_path: Path) -> None:
    from lawder_core.distributed.tune import write_results
    from lawder_core.sweeps import LawTuneConfig

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    base = LawTuneConfig(data=str(data), out=str(sweep), size=32, batch_size=4, preset="tiny", rounds=2)
    write_results([{"trial": "t0", "best_val_score": 0.5}], sweep, base, {"law.w_min": 0.5, "law.w_max": 2.0})
    best = yaml.safe_load((sweep / "best.yaml").read_text())
    assert isinstance(best["law"], dict) and "rounds" not in best
    summary = invoke(["train-law", "--config", str(sweep / "best.yaml"), "--data", str(data), "--out",
                      str(tmp_path / "final"), "--steps", "1", "--workers", "0", "--sample-every", "0", "--json"])
    assert summary["step"] == 1
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert (saved["law"]["w_min"], saved["law"]["w_max"], saved["preset"]) == (0.5, 2.0, "tiny")


@pytest.mark.parametrize(("extra", "message"), [
    (["--size", "30", "--preset", "small"], "divisible by 8"),
    (["--batch-size", "64"], "batch-size"),
    (["--weighting", "focal"], "weighting"),
    (["--w-min", "2"], "factor range"),
    (["--prediction", "x0"], "prediction"),
    (["--snr-gamma", "strong"], "--snr-gamma 'strong'"),
    (["--snr-gamma", "0"], "--snr-gamma: 0 is outside > 0"),
    (["--objective", "vibes"], "objective"),
    (["--cond-dropout", "1.5"], "--cond-dropout"),
])
def test_bad_requests_fail_before_workers_start(data: Path, tmp_path: Path, extra: list[str], message: str) -> None:
    result = runner.invoke(app, train_args(data, tmp_path / "bad", *extra))
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "bad" / "last").exists()


def test_init_from_and_snr_gamma_none_through_the_cli(data: Path, tmp_path: Path) -> None:
    base = invoke(train_args(data, tmp_path / "base", "--weighting", "uniform", "--cond-dropout", "1", "--json"))
    tuned = invoke(train_args(data, tmp_path / "tuned", "--init-from", str(tmp_path / "base"), "--snr-gamma", "none",
                              "--objective", "influence", "--json"))
    assert tuned["init_from"]["run"] == str((tmp_path / "base").resolve())
    assert tuned["init_from"]["step"] == base["step"] == 2
    assert tuned["init_from"]["mask_inputs_zeroed"] is True  # the base never saw a mask
    saved = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert saved["snr_gamma"] is None and saved["law"]["objective"] == "influence"
    assert json.loads((tmp_path / "base" / "config.json").read_text())["cond_dropout"] == 1.0
    missing = runner.invoke(app, train_args(data, tmp_path / "x", "--init-from", str(tmp_path / "nowhere")))
    assert missing.exit_code == 3 and "holds no trained denoiser" in missing.output


def test_missing_data_is_a_data_error(tmp_path: Path) -> None:
    result = runner.invoke(app, train_args(tmp_path / "nope.h5", tmp_path / "run"))
    assert result.exit_code not in (0, 2) and "nope.h5" in result.output


@pytest.mark.slow  # two Ray worker processes importing torch: ~20 s on a shared 2-core machine
def test_sharded_sampling_on_cpu_workers_equals_one_process(run: tuple[Path, dict], data: Path) -> None:
    from lawder_core.distributed.sample import chunk_ranges, sample_distributed

    out, _ = run
    _, masks, _ = load_arrays(data, "train")
    masks = np.concatenate([masks] * 3)  # chunks of 4 masks: several chunks per worker
    seen: list[int] = []
    stats: dict = {}
    sharded = sample_distributed(out, masks, gpus=0, workers=2, steps=2, batch_size=1, seed=9, progress=seen.append,
                                 stats=stats)
    local = sample_pairs(out, masks, steps=2, batch_size=1, seed=9)
    # Same noise and batches, but a Ray worker runs fewer torch threads than this process, which reorders float
    # sums: the images may differ by a rounding step, never by more.
    assert np.abs(sharded.astype(np.int16) - local.astype(np.int16)).max() <= 2
    assert sum(seen) == len(masks) and len(seen) >= 2
    # one model load per worker, however many chunks it sampled (a process per chunk would load it each time)
    assert stats == {"workers": 2, "chunks": len(chunk_ranges(len(masks), 2, 1)), "model_loads": 2}
    assert stats["chunks"] >= 4


def test_chunks_are_whole_batches_covering_every_mask() -> None:
    from lawder_core.distributed.sample import chunk_ranges

    assert chunk_ranges(10, 2, 2) == [(0, 6), (6, 10)]
    assert chunk_ranges(100, 2, 4) == [(s, s + 16) for s in range(0, 96, 16)] + [(96, 100)]
    assert chunk_ranges(3, 4, 8) == [(0, 3)]


@pytest.mark.slow
def test_two_gloo_workers_through_ray_train(ray_local, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    args = train_args(data, out, "--weighting", "law", "--json")
    args[args.index("--workers") + 1] = "2"
    args[args.index("--batch-size") + 1] = "2"
    summary = invoke(args)
    assert summary["step"] == 2 and summary["checkpoint_step"] == 2
    assert [r["step"] for r in read_metrics(out)] == [1, 2]


def test_mask_plan_cycles_with_distinct_transforms_and_resizes_labels() -> None:
    from lawder_core.sample import plan_masks

    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, :2, :3] = 1  # an asymmetric blob: all 8 dihedral transforms differ
    masks[1, 5:, 6:] = 2
    plan = plan_masks(masks, np.array(["a", "b"]), 16, augment=True, seed=3)
    assert plan.masks.shape == (16, 8, 8) and list(plan.source_index) == [0, 1] * 8
    assert sorted(plan.transform[plan.source_index == 0]) == list(range(8))  # 8 uses, 8 different layouts
    assert len({plan.masks[i].tobytes() for i in range(0, 16, 2)}) == 8
    assert np.array_equal(plan.transform, plan_masks(masks, np.array(["a", "b"]), 16, True, 3).transform)
    plain = plan_masks(masks, np.array(["a", "b"]), None, augment=False, seed=3)
    assert np.array_equal(plain.masks, masks) and plain.case_ids == ["syn_a", "syn_b"]
    big = resize_masks(np.kron(masks, np.ones((4, 4), np.uint8)), 8)  # nearest: labels survive exactly
    assert np.array_equal(big, masks) and set(np.unique(resize_masks(masks, 13))) == {0, 1, 2}
