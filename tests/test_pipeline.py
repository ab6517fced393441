"""The whole loop on a tiny synthetic set (slow: two diffusion trainings, six segmenters, evaluation)."""

import json

import pytest
from typer.testing import CliRunner

from lawder_cli.main import app
from tests.helpers import tiny_fid_weights

runner = CliRunner()


@pytest.mark.slow
def test_tiny_pipeline_writes_every_artefact_and_resumes(tmp_path, monkeypatch):
    from dataclasses import replace

    from lawder_core import pipeline
    from lawder_core.data.h5 import read_info

    # a sampling budget below the number of training masks: each synthetic set holds exactly that many
    monkeypatch.setitem(pipeline.PRESETS, "tiny", replace(pipeline.PRESETS["tiny"], sample_limit=7))
    out = tmp_path / "pipe"
    weights = tiny_fid_weights(tmp_path / "fid.pt")
    args = ["pipeline", "--out", str(out), "--preset", "tiny", "--fid-weights", str(weights), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["report"] == str(out / "report.md")
    for weighting in ("uniform", "law"):
        assert (out / "law" / weighting / "checkpoint" / "denoiser_ema").is_dir()
        assert read_info(out / "synthetic" / f"{weighting}.h5").n == 7
    assert len(list((out / "seg").glob("*/best/model.safetensors"))) == 6
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert set(evaluation["fid"]) == {"uniform", "law"}
    assert evaluation["fid"]["law"]["feature_extractor"].startswith("torchscript") or \
        evaluation["fid"]["law"]["weights_path"] == str(weights.resolve())
    assert len(evaluation["dice"]) == 6
    assert 0 <= evaluation["adherence"]["law"]["dice_mean"] <= 1
    assert evaluation["profile"]["mkunet-t"]["params"] == 27384
    report = (out / "report.md").read_text()
    for claim in ("Claim 1", "Claim 2", "Claim 3", "52.28", "81.3"):
        assert claim in report
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3

    # Everything is complete: a resumed run redoes nothing and leaves the checkpoints untouched.
    stamp = (out / "seg" / "mkunet-t__real__s0" / "last" / "model.safetensors").stat().st_mtime
    again = runner.invoke(app, [*args, "--resume"])
    assert again.exit_code == 0, again.output
    assert (out / "seg" / "mkunet-t__real__s0" / "last" / "model.safetensors").stat().st_mtime == stamp
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2 and "--resume" in refused.output
