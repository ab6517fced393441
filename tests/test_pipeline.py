"""`lawder pipeline`: usage errors before anything runs, and the whole loop on a tiny synthetic set (slow)."""

import json

import pytest

from lawder_cli.main import app
from lawder_core.errors import EXIT_DATA, EXIT_USAGE
from tests.helpers import runner, tiny_fid_weights


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--preset", "nope"], EXIT_USAGE, "unknown --preset 'nope'"),
    (["--source", "nope"], EXIT_USAGE, "unknown --source 'nope'"),
    (["--source", "folder"], EXIT_USAGE, "lawder prepare folder"),
    (["--source", "kits"], EXIT_USAGE, "needs the KiTS folder"),
    (["--source", "synthetic", "--data", "d.h5"], EXIT_USAGE, "exclude each other"),
    (["--data", "missing.h5"], EXIT_DATA, "does not exist"),
])
def test_bad_requests_fail_before_anything_is_written(tmp_path, args, code, message):
    out = tmp_path / "pipe"
    result = runner.invoke(app, ["pipeline", "--out", str(out), *args])
    assert result.exit_code == code, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.slow
def test_tiny_pipeline_writes_every_artefact_and_resumes(tmp_path, monkeypatch):
    from dataclasses import replace

    from lawder_core import pipeline
    from lawder_core.data.h5 import read_info
    from lawder_core.runs import read_metrics

    # a sampling budget below the number of training masks: each synthetic set holds exactly that many; full
    # epochs, so that real + synthetic arms have more steps per epoch than real-only ones
    monkeypatch.setitem(pipeline.PRESETS, "tiny", replace(pipeline.PRESETS["tiny"], sample_limit=7,
                                                          max_steps_per_epoch=None))
    out = tmp_path / "pipe"
    weights = tiny_fid_weights(tmp_path / "fid.pt")
    args = ["pipeline", "--out", str(out), "--preset", "tiny", "--fid-weights", str(weights), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["report"] == str(out / "report.md")
    assert json.loads((out / "summary.json").read_text())["report"] == summary["report"]
    for weighting in ("uniform", "law"):
        assert (out / "law" / weighting / "last" / "denoiser_ema").is_dir()
        assert read_info(out / "synthetic" / f"{weighting}.h5").n == 7
    assert len(list((out / "seg").glob("*/best/model.safetensors"))) == 6
    # Claim 2 at equal optimiser steps: real-only arms train more epochs to take as many steps as real + synthetic.
    last = {m.parent.name: read_metrics(m.parent)[-1] for m in (out / "seg").glob("*/metrics.jsonl")}
    assert len(last) == 6
    assert len({record["steps"] for record in last.values()}) == 1
    assert last["mkunet-t__real__s0"]["epoch"] > last["mkunet-t__real_law__s0"]["epoch"]

    # Every evaluation is a summary.json in `lawder evaluate`'s shape, one per comparison.
    assert len(summary["evaluations"]) == 2 + 6 + 2
    evaluations = {path.parent.name: json.loads(path.read_text()) for path in (out / "evaluate").glob("*/summary.json")}
    for name, evaluation in evaluations.items():
        assert {"metric_per_case", "mean", "foreground_mean", "metadata", "gates"} <= set(evaluation), name
        assert evaluation["metadata"]["command"] == "pipeline"
    law = evaluations["synthetic-law"]
    assert law["fid"]["weights_path"] == str(weights.resolve()) and law["fid"]["n_synthetic"] == 7
    assert law["fid"]["n_real"] == evaluations["synthetic-uniform"]["fid"]["n_real"]
    assert 0 <= law["adherence"]["dice_mean"] <= 1
    assert law["adherence"]["segmenter"]["run"].endswith("mkunet-t-order__real__s0")
    assert len([n for n in evaluations if n.startswith("seg-")]) == 6
    assert 0 <= evaluations["seg-mkunet-t__real__s0"]["foreground_mean"]["Dice"] <= 1
    assert evaluations["profile-mkunet-t"]["profile"]["params"] == 27384

    report = (out / "report.md").read_text()
    for claim in ("Claim 1", "Claim 2", "Claim 3", "52.28", "81.3", "optimiser steps"):
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


@pytest.mark.slow
def test_tiny_pipeline_on_kits_reports_the_three_nested_regions(tmp_path, monkeypatch, request):
    """`--source kits --in DIR`: multi-class segmenters scored per case volume on kidney_and_masses, masses and
    tumor, in every segmenter's summary.json, in the claims and in both reports (issue 15)."""
    from dataclasses import replace

    import torch

    from lawder_core import pipeline
    from tests.helpers import write_kits_folder

    # one torch thread: toy-sized steps gain nothing from two, and beside other jobs two are several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    monkeypatch.setitem(pipeline.PRESETS, "tiny", replace(pipeline.PRESETS["tiny"], sample_limit=4,
                                                          profile_repeats=1))
    monkeypatch.setattr(pipeline, "PROFILE_SIZE", 32)
    regions = ["kidney_and_masses", "masses", "tumor"]
    raw = write_kits_folder(tmp_path / "kits")
    out = tmp_path / "pipe"
    weights = tiny_fid_weights(tmp_path / "fid.pt")
    result = runner.invoke(app, ["pipeline", "--source", "kits", "--in", str(raw), "--out", str(out),
                                 "--preset", "tiny", "--fid-weights", str(weights), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)

    for path in (out / "evaluate").glob("seg-*/summary.json"):
        evaluation = json.loads(path.read_text())
        assert list(evaluation["mean"]) == regions, path
        assert evaluation["metadata"]["segmenter"]["num_classes"] == 4  # background, kidney, tumour, cyst
        assert evaluation["metric_per_case"] and all(list(c["metrics"]) == regions
                                                     for c in evaluation["metric_per_case"])
        assert evaluation["dice_settings"]["n_cases"] == len(evaluation["metric_per_case"])
    by_region = summary["claims"]["test_dice_by_region"]
    assert set(by_region) == {"mkunet-t", "mkunet-t-order"}
    assert all(list(scores) == regions and all(0 <= v <= 1 for v in scores.values())
               for by_data in by_region.values() for scores in by_data.values())

    report, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    header = "| model | training data | kidney_and_masses | masses | tumor | mean |"
    assert "Test Dice per region" in report and header in report
    assert all(f"<th>{region}</th>" in html for region in regions) and "Test Dice per region" in html


def test_a_presets_segmenter_learning_rate_reaches_every_segmenter(tmp_path):
    from lawder_core.pipeline import PRESETS, PipelineConfig, Stages
    from lawder_core.train.configs import SegTrainConfig

    def first_config(preset: str) -> SegTrainConfig:
        stages = Stages(PipelineConfig(out=str(tmp_path / preset), preset=preset))
        stages.__dict__["seg_steps"] = 240  # what the synthetic sets would give: not needed to build a config
        return stages.seg_config("mkunet-t", "real", 0)

    # cpu-small's 3e-3: at train-order's 1e-3 its 240 steps left real-only arms predicting background
    assert PRESETS["cpu-small"].seg_lr == 3e-3 and first_config("cpu-small").lr == 3e-3
    assert PRESETS["tiny"].seg_lr is None and first_config("tiny").lr == SegTrainConfig.lr


def test_resume_refuses_a_folder_made_with_other_settings_and_keeps_it(tmp_path):
    from dataclasses import asdict, replace

    from lawder_core.pipeline import PRESETS, PipelineConfig, check_same_settings
    from lawder_core.runs import write_config

    out = tmp_path / "pipe"
    cfg = PipelineConfig(out=str(out), preset="tiny")
    # as an older lawder wrote it: the tiny preset without seg_lr, and on another GPU count
    old_preset = {k: v for k, v in asdict(PRESETS["tiny"]).items() if k != "seg_lr"}
    write_config(out, {"config": asdict(replace(cfg, gpus=2)), "preset": old_preset})
    before = (out / "config.json").read_text()
    result = runner.invoke(app, ["pipeline", "--out", str(out), "--preset", "tiny", "--resume"])
    assert result.exit_code == EXIT_USAGE
    assert "preset.seg_lr 'not recorded' (now None)" in " ".join(result.output.split())
    assert (out / "config.json").read_text() == before and sorted(p.name for p in out.iterdir()) == ["config.json"]

    write_config(out, {"config": asdict(replace(cfg, gpus=2, seed=1)), "preset": asdict(PRESETS["tiny"])})
    with pytest.raises(Exception, match=r"config\.seed 1 \(now 0\)"):
        check_same_settings(cfg, PRESETS["tiny"])
    write_config(out, {"config": asdict(replace(cfg, gpus=2, workers=3)), "preset": asdict(PRESETS["tiny"])})
    check_same_settings(cfg, PRESETS["tiny"])  # where it runs may change
