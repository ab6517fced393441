import json

import pytest

from lawder_cli.main import app
from lawder_core.errors import DataError, EnvironmentProblem, TrainingError, UsageError
from tests.helpers import runner, write_pair_folder


def test_version_and_env_json():
    assert runner.invoke(app, ["--version"]).output.startswith("lawder ")
    result = runner.invoke(app, ["env", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["torch"] and "gpus" in report


def test_prepare_synthetic_then_inspect_json(tmp_path):
    out = tmp_path / "s.h5"
    result = runner.invoke(app, ["prepare", "synthetic", "-o", str(out), "--n", "12", "--size", "32", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["samples"] == 12
    inspected = runner.invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(inspected.stdout)["splits"]["train"]["samples"] == 10


def test_errors_are_one_paragraph_with_exit_codes(tmp_path):
    result = runner.invoke(app, ["prepare", "kvasir", str(tmp_path / "nope"), "-o", str(tmp_path / "o.h5")])
    assert result.exit_code == 3
    assert "does not exist" in result.output and "Traceback" not in result.output
    images, masks = write_pair_folder(tmp_path / "raw", 3)
    args = ["prepare", "folder", "-o", str(tmp_path / "o.h5"), "--images", str(images), "--masks", str(masks)]
    assert runner.invoke(app, args).exit_code == 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
    bad_split = runner.invoke(app, [*args, "--force", "--split", "0.5,0.5"])
    assert bad_split.exit_code == 2 and "0.8,0.1,0.1" in bad_split.output
    corrupt = tmp_path / "c.h5"
    corrupt.write_bytes(b"not hdf5")
    res = runner.invoke(app, ["inspect", str(corrupt)])
    assert res.exit_code == 3 and "corrupt" in res.output


@pytest.mark.parametrize(("raised", "code"), [
    (UsageError("bad"), 2), (DataError("bad"), 3), (EnvironmentProblem("bad"), 4), (TrainingError("bad"), 5),
    (KeyboardInterrupt(), 130),
])
def test_exit_codes_are_the_readme_table(tmp_path, monkeypatch, raised, code):
    """README "Exit codes": every LawderError maps to its documented code, Ctrl-C to 130, in one paragraph."""
    from lawder_core.data import fingerprint

    def fail(path):
        raise raised

    monkeypatch.setattr(fingerprint, "compute_fingerprint", fail)
    result = runner.invoke(app, ["inspect", str(tmp_path / "any.h5")])
    assert result.exit_code == code
    assert "Traceback" not in result.output
    assert ("interrupted" if code == 130 else "error: bad") in result.output
    assert "--resume" not in result.output  # `inspect` has no --resume to suggest
