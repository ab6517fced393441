"""benchmarks/bench_order_folds.py at toy scale: every default arm on 2 folds, resumable, and its arms file is what
`lawder compare` reads."""

import json

import pytest

from lawder_cli.main import app
from tests.helpers import load_benchmark, runner, write_pair_folder


def load_bench():
    return load_benchmark("bench_order_folds")


@pytest.mark.slow  # twelve toy trainings and 26 evaluations: about a minute
def test_two_folds_of_every_arm_resume_and_compare(tmp_path):
    raw = tmp_path / "kvasir"
    write_pair_folder(raw, 24)
    work, out = tmp_path / "work", tmp_path / "result.json"
    args = ["--data", str(raw), "--size", "32", "--epochs", "1", "--extra", "1", "--folds", "2", "--batch-size", "4",
            "--work", str(work), "--out", str(out)]
    bench = load_bench()
    bench.main(args)
    result = json.loads(out.read_text())
    rows = result["runs"]
    assert [(r["fold"], r["arm"]) for r in rows] == [(k, a) for k in (0, 1) for a in bench.DEFAULT_ARMS]
    epochs = {r["arm"]: r["epochs"] for r in rows}
    assert epochs == {"t": 1, "t-rep": 1, "order-2stage": 1, "t-ext": 2, "order-joint": 2, "wide": 2}
    assert all(0 <= r["fold_dice"] <= 1 and 0 <= r["test_dice"] <= 1 for r in rows)
    two_stage = json.loads((work / "runs" / "order-2stage" / "fold1" / "config.json").read_text())
    assert two_stage["freeze_trunk"] and two_stage["init_from"] == str(work / "runs" / "t" / "fold1")
    assert two_stage["folds"] == 2 and two_stage["fold"] == 1 and two_stage["select"] == "last"

    stamp = (work / "runs" / "wide" / "fold1" / "last" / "model.safetensors").stat().st_mtime_ns
    bench.main(args)  # complete: nothing trained or scored again, the same result
    assert json.loads(out.read_text())["runs"] == [{**r, "train_seconds_this_invocation": 0.0} for r in rows]
    assert (work / "runs" / "wide" / "fold1" / "last" / "model.safetensors").stat().st_mtime_ns == stamp

    compared = runner.invoke(app, ["compare", "--arms", str(work / "arms.yaml"), "--pair", "order-2stage-t",
                                   "--pair", "t-rep-t", "--json"])
    assert compared.exit_code == 0, compared.output
    table = json.loads(compared.stdout)
    assert {r["b"] for r in table["comparisons"]} >= {"order-2stage", "t-rep"}
