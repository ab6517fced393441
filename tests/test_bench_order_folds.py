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


def result_file(path, rows, arms=("t", "t-rep")):
    path.write_text(json.dumps({"benchmark": "order_folds", "size": 32, "arms": {a: {} for a in arms},
                                "runs": [{"arm": a, "fold": k, "fold_dice": f, "test_dice": t}
                                         for a, k, f, t in rows]}))
    return path


def test_merge_keeps_one_row_per_arm_and_fold_lists_reruns_and_adds_the_fold_level_table(tmp_path):
    from scipy import stats

    bench = load_bench()
    old = result_file(tmp_path / "old.json", [("t", 0, 0.60, 0.50), ("t-rep", 0, 0.58, 0.52), ("t", 1, 0.70, 0.61)])
    new = result_file(tmp_path / "new.json", [("t", 0, 0.60, 0.50), ("t", 1, 0.71, 0.61), ("t-rep", 1, 0.66, 0.60),
                                              ("t", 2, 0.65, 0.55), ("t-rep", 2, 0.64, 0.56)])
    out = tmp_path / "merged.json"
    bench.main(["--merge", str(old), str(new), "--out", str(out)])
    merged = json.loads(out.read_text())
    assert [(r["arm"], r["fold"], r["fold_dice"]) for r in merged["runs"]] == [
        ("t", 0, 0.60), ("t-rep", 0, 0.58), ("t", 1, 0.71), ("t-rep", 1, 0.66), ("t", 2, 0.65), ("t-rep", 2, 0.64)]
    assert [r["source"] for r in merged["runs"]] == ["old.json", "old.json"] + ["new.json"] * 4
    # fold 0's T, reported again unchanged, is no rerun and keeps its first source
    assert merged["reproduced"] == [{"arm": "t", "fold": 1, "fold_dice": [0.70, 0.71], "test_dice": [0.61, 0.61]}]
    [held_out, test] = [row for row in merged["fold_level"] if (row["b"], row["a"]) == ("t-rep", "t")]
    differences = [-0.02, -0.05, -0.01]
    assert held_out["score"] == "fold_dice" and held_out["per_fold"] == pytest.approx(
        {"0": -0.02, "1": -0.05, "2": -0.01})
    assert held_out["mean"] == pytest.approx(sum(differences) / 3)
    half = stats.t.ppf(0.975, 2) * stats.tstd(differences) / 3 ** 0.5
    assert held_out["t_ci"] == pytest.approx([held_out["mean"] - half, held_out["mean"] + half])
    # resampling three folds: the CI lies within the extreme fold differences and holds the mean
    low, high = held_out["bootstrap_ci"]
    assert -0.05 <= low < held_out["mean"] < high <= -0.01 + 1e-12
    assert held_out["every_fold"] == "b < a"
    assert test["score"] == "test_dice" and test["every_fold"] == "mixed"  # +0.02, -0.01, +0.01


def test_merge_needs_an_out_file(tmp_path, capsys):
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(result_file(tmp_path / "a.json", []))])
    assert "--merge needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--merge", str(tmp_path / "gone.json"), "--out", str(tmp_path / "m.json")])
    assert "no result file: " in capsys.readouterr().err and not (tmp_path / "m.json").exists()
