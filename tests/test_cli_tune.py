"""`lawder tune` hands --resume and --force to the sweep runner, and refuses an existing --out without either."""

from __future__ import annotations

import pytest

from lawder_cli.main import app
from lawder_core.distributed import tune as distributed_tune
from lawder_core.errors import EXIT_USAGE
from tests.helpers import runner, synthetic_h5


@pytest.fixture()
def data(tmp_path):
    return synthetic_h5(tmp_path / "s.h5", n=12, size=32)


@pytest.mark.parametrize(("flags", "resume", "force"), [([], False, False), (["--resume"], True, False),
                                                         (["--force"], False, True)])
def test_resume_and_force_reach_the_runner(tmp_path, data, monkeypatch, flags, resume, force):
    seen = {}

    def fake_run_tune(kind, base, space, out, opts, *, resume=False, force=False):
        seen.update(kind=kind, out=out, resume=resume, force=force, seed=opts.seed)
        return {"kind": kind, "trials": 0, "rows": [], "metric": "val_dice", "best": {}, "out": str(out)}

    monkeypatch.setattr(distributed_tune, "run_tune", fake_run_tune)
    result = runner.invoke(app, ["tune", "order", "--data", str(data), "--out", str(tmp_path / "t"), *flags, "--json"])
    assert result.exit_code == 0, result.output
    assert seen == {"kind": "order", "out": tmp_path / "t", "resume": resume, "force": force, "seed": 0}


def test_an_existing_sweep_needs_resume_or_force(tmp_path, data):
    out = tmp_path / "t"
    (out / distributed_tune.EXPERIMENT).mkdir(parents=True)
    result = runner.invoke(app, ["tune", "order", "--data", str(data), "--out", str(out)])
    assert result.exit_code == EXIT_USAGE
    assert "--resume" in result.output and "--force" in result.output
    assert (out / distributed_tune.EXPERIMENT).is_dir()  # nothing was deleted


def test_resume_without_a_sweep_is_a_usage_error(tmp_path, data):
    result = runner.invoke(app, ["tune", "order", "--data", str(data), "--out", str(tmp_path / "t"), "--resume"])
    assert result.exit_code == EXIT_USAGE
    assert "holds no sweep" in " ".join(result.output.split())


def test_a_sweep_killed_before_its_first_trial_resumes(tmp_path, data, monkeypatch):
    """Killed after config.json, before Ray made experiment/: neither a plain rerun nor --resume may dead-end."""
    from lawder_core import runs

    out = tmp_path / "t"
    runs.write_config(out, {"kind": "order"})
    plain = runner.invoke(app, ["tune", "order", "--data", str(data), "--out", str(out)])
    assert plain.exit_code == EXIT_USAGE and "already holds a sweep" in " ".join(plain.output.split())

    class ReachedRay(Exception):
        pass

    def reached(address):
        raise ReachedRay

    monkeypatch.setattr(distributed_tune, "ensure_ray", reached)
    resumed = runner.invoke(app, ["tune", "order", "--data", str(data), "--out", str(out), "--resume"])
    assert "ReachedRay" in resumed.output, resumed.output  # past every check, about to start the trials
