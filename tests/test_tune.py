"""Ray Tune sweeps (slow: each runs real trials through Ray)."""

import json
import os
import pickle

import numpy as np
import pytest
import yaml

from lawder_cli.main import app
from lawder_core.config import build_config
from lawder_core.errors import UsageError
from lawder_core.sweeps import SWEEP_SPACES, apply_params, load_sweep_space
from lawder_core.train.seg import SegTrainConfig, train_segmenter
from tests.helpers import runner, synthetic_h5, tiny_fid_weights


class Planted:
    """A pickle that runs a shell command when it is loaded."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_apply_params_sets_nested_fields_and_groups():
    base = SegTrainConfig(data="d.h5", out="o")
    cfg = apply_params(base, {"order.rho": 0.4, "order.late_stages": 2})
    assert cfg.order.rho == 0.4 and cfg.order.late_stages == 2 and base.order.rho == 0.25
    with pytest.raises(UsageError, match="order.nope"):
        apply_params(base, {"order.nope": 1})
    assert set(SWEEP_SPACES) == {"law-clamp", "law-reg", "order"}
    assert len(SWEEP_SPACES["law-clamp"]["clamp"]["grid"]) == 4


def test_space_file_is_validated(tmp_path):
    good = tmp_path / "s.yaml"
    good.write_text("order.rho: {uniform: [0.1, 0.2]}\n")
    assert load_sweep_space("order", good) == {"order.rho": {"uniform": [0.1, 0.2]}}
    bad = tmp_path / "b.yaml"
    bad.write_text("order.rho: {normal: [0, 1]}\n")
    with pytest.raises(UsageError, match="uniform"):
        load_sweep_space("order", bad)


def test_yaml_text_numbers_in_a_range_are_read_as_numbers(tmp_path):
    space = tmp_path / "s.yaml"
    space.write_text("law.lr: {loguniform: [1e-5, 1e-3]}\n")  # PyYAML reads 1e-5 (no dot) as text
    assert load_sweep_space("law-reg", space) == {"law.lr": {"loguniform": [1e-5, 1e-3]}}


@pytest.mark.parametrize("space, message", [
    ({"clamp": {"grid": [{"law.w_min": 0.5, "law.w_max": 2.0}, {"law.w_min": 5, "law.w_max": 2}]}},
     r"point \{'law.w_min': 5, 'law.w_max': 2\} is not a valid configuration: --w-min: 5 is outside"),
    ({"law.nope": {"grid": [1, 2]}}, "'law.nope' does not name a field of LawTuneConfig"),
    ({"clamp": {"grid": [{"law.w_mn": 0.5}]}}, "'law.w_mn' does not name a field"),
    ({"clamp": {"grid": [{"law.w_min": 0.5}, {"law.w_mx": 4.0}]}, "law.lr": {"uniform": [1e-4, 1e-3]}},
     "'law.w_mx' does not name a field"),  # the second point, in a space too continuous to enumerate
    ({"law.lr": {"uniform": [1e-3, 1e-4]}}, r"uniform needs \[low, high\] with low < high"),
    ({"law.lambda_prior": {"loguniform": [0, 1]}}, "and low > 0"),
    ({"law.gamma": {"grid": []}}, "needs a list of values"),
])
def test_a_space_that_would_fail_every_trial_is_refused_before_ray_starts(tmp_path, space, message):
    from lawder_core.sweeps import LawTuneConfig, check_space

    with pytest.raises(UsageError, match=message):
        check_space(LawTuneConfig(data="d.h5"), space)


def test_every_built_in_space_and_an_allowed_combination_pass(tmp_path):
    from lawder_core.sweeps import LawTuneConfig, check_space

    for kind, space in SWEEP_SPACES.items():
        check_space(SegTrainConfig(data="d.h5", out="o") if kind == "order" else LawTuneConfig(data="d.h5"), space)
    check_space(LawTuneConfig(data="d.h5"), {"law.w_min": {"grid": [0.5, 0.1]}, "law.w_max": {"grid": [2.0, 10.0]},
                                             "law.lr": {"loguniform": [1e-5, 1e-3]}})


def test_a_failed_trial_is_summed_up_by_its_cause_not_by_rays_actor_line():
    from lawder_core.distributed.tune import trial_error
    from lawder_core.errors import DataError

    wrapped = RuntimeError("ray::ImplicitFunc.train() (pid=1, ip=127.0.0.1, actor_id=ab, repr=law_trial)\n"
                           "  File \"x.py\", line 3, in f\nValueError: the mask is empty")
    assert trial_error(wrapped) == "ValueError: the mask is empty"
    cause = DataError("d.h5 has no val split.", "Prepare it again.")
    try:
        raise RuntimeError("ray::ImplicitFunc.train() (pid=1)") from cause
    except RuntimeError as err:
        assert trial_error(err) == "d.h5 has no val split."


@pytest.mark.slow
def test_order_sweep_finishes_resumes_and_best_yaml_trains(ray_local, tmp_path):
    data = synthetic_h5(tmp_path / "s.h5", n=24, size=32)
    base = tmp_path / "base.yaml"
    base.write_text("size: 32\nbatch_size: 8\nmax_steps_per_epoch: 1\nmodel: mkunet-t-order\n")
    out = tmp_path / "sweep"
    args = ["tune", "order", "--data", str(data), "--out", str(out), "--trials", "4", "--budget", "2",
            "--config", str(base), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["trials"] == 4 and summary["errors"] == 0
    assert len(json.loads((out / "results.json").read_text())) == 4
    assert (out / "results.csv").read_text().count("\n") == 5
    stamps = {p: p.stat().st_mtime for p in out.glob("trials/*/metrics.jsonl")}
    assert len(stamps) == 4

    assert len(list(out.glob("trials/*/trial.json"))) == 4

    # A sweep folder from someone else: Ray's restore would unpickle this and run the command.
    marker = tmp_path / "planted-code-ran"
    (out / "experiment" / "tuner.pkl").write_bytes(pickle.dumps(Planted(f"touch {marker}")))
    again = runner.invoke(app, [*args, "--resume"])  # resumed from lawder's files: no trial is redone
    assert again.exit_code == 0, again.output
    assert not marker.exists()
    assert json.loads(again.stdout)["trials"] == 4
    assert {p: p.stat().st_mtime for p in out.glob("trials/*/metrics.jsonl")} == stamps
    assert json.loads(again.stdout)["best"] == summary["best"]

    best = yaml.safe_load((out / "best.yaml").read_text())
    assert "out" not in best and best["order"]["rho"] == pytest.approx(summary["best"]["order.rho"])
    cfg = build_config(SegTrainConfig, out / "best.yaml", data=str(data), out=str(tmp_path / "final"), epochs=1)
    assert train_segmenter(cfg)["epochs"] == 1


@pytest.mark.slow
def test_law_clamp_sweep_scores_generation_and_best_yaml_is_a_train_law_config(ray_local, tmp_path):
    from lawder_core.models.factory import build_segmenter, save_segmenter
    from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion

    data = synthetic_h5(tmp_path / "s.h5", n=16, size=32)
    save_segmenter(build_segmenter("mkunet-t").eval(), tmp_path / "seg" / "best",
                   extra={"train_config": {"size": 32}})
    base = tmp_path / "base.yaml"
    base.write_text("size: 32\nbatch_size: 2\npreset: tiny\nsteps_per_round: 1\neval_masks: 2\n"
                    "eval_sampling_steps: 2\n")
    out = tmp_path / "sweep"
    weights = tiny_fid_weights(tmp_path / "fid.pt")
    space = tmp_path / "space.yaml"  # two of the four built-in clamp ranges keep the test short
    space.write_text("clamp: {grid: [{law.w_min: 0.5, law.w_max: 2.0}, {law.w_min: 0.1, law.w_max: 10.0}]}\n")
    result = runner.invoke(app, ["tune", "law-clamp", "--data", str(data), "--out", str(out), "--trials", "2",
                                 "--budget", "2", "--config", str(base), "--segmenter", str(tmp_path / "seg"),
                                 "--fid-weights", str(weights), "--space", str(space), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["trials"] == 2 and summary["errors"] == 0
    assert {(r["law.w_min"], r["law.w_max"]) for r in summary["rows"]} == {(0.5, 2.0), (0.1, 10.0)}
    # val_score = 100·KID + (1 − adherence): both terms were computed for every trial
    history = [json.loads(line) for p in out.glob("experiment/*/result.json") for line in p.read_text().splitlines()]
    assert history and all("val_kid" in h and "val_adherence" in h for h in history)
    assert all(h["val_score"] == pytest.approx(100 * h["val_kid"] + 1 - h["val_adherence"]) for h in history)
    # each trial reports how far its map left the prior: clamp ranges can only differ once it has
    assert all(h["law_departure"] is not None for h in history)
    assert all(isinstance(r["law_departure"], float) for r in summary["rows"])
    cfg = build_config(DiffusionTrainConfig, out / "best.yaml", data=str(data), out=str(tmp_path / "final"),
                       steps=1, sample_every=0)
    assert (cfg.law.w_min, cfg.law.w_max) == (summary["best"]["law.w_min"], summary["best"]["law.w_max"])
    assert train_diffusion(cfg)["step"] == 1


def test_law_sweep_without_any_score_refuses_to_start(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LAWDER_FID_WEIGHTS", raising=False)
    import lawder_core.metrics.fid as fid

    monkeypatch.setattr(fid, "clean_fid_cache_path", lambda: tmp_path / "none.pt")
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: None)
    from lawder_core.sweeps import LawTuneConfig, scoring_terms

    with pytest.raises(UsageError, match="--segmenter"):
        scoring_terms(LawTuneConfig(data="d.h5"))


def test_law_trial_scores_on_images_and_masks_at_the_model_size(tmp_path):
    """Regression: on a file larger than the model, the masks were left at the file's size and every trial failed."""
    from lawder_core.sweeps import LawTuneConfig, evaluation_set

    data = synthetic_h5(tmp_path / "s.h5", n=8, size=64)
    images, masks = evaluation_set(LawTuneConfig(data=str(data), out=str(tmp_path), size=32, eval_masks=4))
    assert images.shape[1:3] == masks.shape[1:3] == (32, 32)
    assert set(np.unique(masks)) <= {0, 1} and masks.any()
