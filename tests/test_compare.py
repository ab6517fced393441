"""`lawder compare`: paired hierarchical bootstrap CIs and Wilcoxon p against plain NumPy/SciPy, pairing by case
set, A/A, refusals, replicates as the noise floor, gates, and the CLI's JSON, table and plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lawder_cli.main import app
from lawder_core.errors import EXIT_DATA, EXIT_GATE_FAILED, EXIT_OK, EXIT_USAGE, DataError, UsageError
from lawder_core.metrics.arms import ArmSpec, read_run
from lawder_core.metrics.compare import CompareRequest, compare, parse_pair
from lawder_core.metrics.dice import segmentation_metrics
from lawder_core.metrics.paired import hierarchical_bootstrap, paired_difference, percentile_interval
from lawder_core.metrics.summary import build_summary, write_metric_summary
from tests.helpers import runner

# Fixed numbers: three run pairs (e.g. folds) of unequal size, per-case differences B − A.
DIFFERENCES = [np.array([0.12, -0.03, 0.05, 0.20, 0.01, -0.07, 0.09]),
               np.array([0.04, 0.02, -0.01, 0.15, 0.06]),
               np.array([-0.02, 0.08, 0.11, 0.03, 0.00, 0.07])]


def flat(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- the statistics, against plain computations


def loop_bootstrap(differences: list[np.ndarray], resamples: int, seed: int) -> np.ndarray:
    """The hierarchical bootstrap written as loops over the same draws: runs, then cases within each run."""
    rng = np.random.default_rng(seed)
    n_runs = len(differences)
    n_max = max(len(d) for d in differences)
    chosen = rng.integers(0, n_runs, size=(resamples, n_runs))
    u = rng.random((resamples, n_runs, n_max))
    out = []
    for b in range(resamples):
        drawn = []
        for k in range(n_runs):
            run = differences[chosen[b, k]]
            for j in range(len(run)):
                drawn.append(run[min(int(u[b, k, j] * len(run)), len(run) - 1)])
        out.append(sum(drawn) / len(drawn))
    return np.array(out)


def test_hierarchical_bootstrap_equals_a_plain_loop():
    fast = hierarchical_bootstrap(DIFFERENCES, resamples=3000, seed=7)
    slow = loop_bootstrap(DIFFERENCES, resamples=3000, seed=7)
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    low, high = percentile_interval(fast)
    assert (low, high) == pytest.approx(tuple(np.percentile(slow, [2.5, 97.5])), abs=1e-12)
    assert low < np.concatenate(DIFFERENCES).mean() < high


def test_one_run_bootstrap_agrees_with_scipy_percentile_interval():
    d = np.random.default_rng(3).normal(0.02, 0.1, 60)
    ours = percentile_interval(hierarchical_bootstrap([d], resamples=10_000, seed=0))
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=10_000, rng=np.random.default_rng(1))
    width = ref.confidence_interval.high - ref.confidence_interval.low
    # two Monte Carlo estimates of the same interval: they agree to a few percent of its width
    assert ours[0] == pytest.approx(ref.confidence_interval.low, abs=0.05 * width)
    assert ours[1] == pytest.approx(ref.confidence_interval.high, abs=0.05 * width)


def test_paired_difference_mean_runs_and_wilcoxon_on_case_means():
    case_means = np.array([0.05, -0.01, 0.07, 0.02, 0.10, 0.03, -0.04])
    result = paired_difference(DIFFERENCES, case_means, resamples=2000, seed=1)
    assert result.mean == pytest.approx(np.concatenate(DIFFERENCES).mean(), abs=1e-15)
    assert result.run_means == pytest.approx([d.mean() for d in DIFFERENCES])
    assert result.n_runs == 3 and result.n_values == 18
    assert result.p_wilcoxon == pytest.approx(stats.wilcoxon(case_means).pvalue)
    assert (result.ci_low, result.ci_high) == pytest.approx(
        percentile_interval(loop_bootstrap(DIFFERENCES, resamples=2000, seed=1)), abs=1e-12)


# ---------------------------------------------------------------- summaries the tests write


def summary_json(scores: dict[str, float | None | dict[str, float | None]], *, run: Path | None = None,
                 policy: str = "one", **sections) -> dict:
    """A summary of `lawder evaluate`'s shape: case -> Dice (one region) or {region: Dice}."""
    per_case = []
    for case, value in scores.items():
        regions = value if isinstance(value, dict) else {"foreground": value}
        per_case.append({"case": case, "n_images": 1, "metrics": {
            region: {"Dice": dice, "IoU": None if dice is None else dice / (2 - dice), "TP": 3, "FP": 1, "FN": 1,
                     "TN": 9, "n_ref": 4, "n_pred": 4} for region, dice in regions.items()}})
    summary = {"metric_per_case": per_case, "dice_settings": {"empty_policy": policy},
               "metadata": {"inputs": {"run": str(run)} if run else {}}}
    summary.update(sections)
    return summary


def write(path: Path, summary: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "summary.json").write_text(json.dumps(summary))
    return path / "summary.json"


def seeded_arm(root: Path, name: str, shift: float, *, runs: int = 3, cases: int = 30, noise: float = 0.02,
               config: dict | None = None) -> str:
    """`runs` seeds of one arm on the same cases; each run folder has a config.json when `config` is given."""
    base = np.linspace(0.3, 0.9, cases)
    for seed in range(runs):
        rng = np.random.default_rng([seed, *map(ord, name)])  # str hash() differs between processes
        run = None
        if config is not None:
            run = root / "runs" / name / f"seed{seed}"
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps({**config, "seed": seed + 100 * len(name), "out": str(run)}))
        values = np.clip(base + shift + rng.normal(0, noise, cases), 0, 1)
        write(root / "eval" / name / f"seed{seed}", summary_json(
            {f"img{i:02d}": float(v) for i, v in enumerate(values)}, run=run))
    return f"{name}={root}/eval/{name}/*/summary.json"


def request(*args: str, **options) -> CompareRequest:
    from lawder_core.metrics.arms import specs_from_args

    return CompareRequest(arms=tuple(specs_from_args(args)), resamples=options.pop("resamples", 2000), **options)


def rows(result: dict, metric: str = "Dice/foreground") -> dict[str, dict]:
    return {row["name"]: row for row in result["comparisons"] if row["metric"] == metric}


def invoke(*args: str | Path):
    return runner.invoke(app, ["compare", *map(str, args)])


# ---------------------------------------------------------------- comparing arms


def test_compare_matches_an_independent_computation(tmp_path):
    """Folds given in another order pair by case set; the figures equal a direct NumPy/SciPy computation."""
    rng = np.random.default_rng(0)
    folds = [[f"case{f}_{i}" for i in range(n)] for f, n in enumerate((8, 6, 7))]
    a_scores = [rng.uniform(0.4, 0.9, len(f)) for f in folds]
    b_scores = [a + rng.normal(0.03, 0.05, len(a)) for a in a_scores]
    for f, cases in enumerate(folds):
        write(tmp_path / "a" / f"fold{f}", summary_json(dict(zip(cases, map(float, a_scores[f]), strict=True))))
        # B's folds are named so that path order differs from A's: pairing must follow the cases, not the names
        write(tmp_path / "b" / f"fold{2 - f}", summary_json(dict(zip(cases, map(float, b_scores[f]), strict=True))))
    result = compare(request(f"A={tmp_path}/a/*", f"B={tmp_path}/b/*", seed=5))
    row = rows(result)["B - A"]
    assert row["pairs"] == [[0, 2], [1, 1], [2, 0]]
    diffs = [np.array(sorted(zip(c, b - a, strict=True)))[:, 1].astype(float)
             for c, a, b in zip(folds, a_scores, b_scores, strict=True)]
    assert row["difference"] == pytest.approx(np.concatenate(b_scores).mean() - np.concatenate(a_scores).mean())
    assert row["mean_a"] == pytest.approx(np.concatenate(a_scores).mean())
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(
        percentile_interval(loop_bootstrap(diffs, resamples=2000, seed=5)), abs=1e-12)
    # every case is in one fold only, so its mean over run pairs is its one difference
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(np.concatenate(diffs)).pvalue)
    assert row["run_differences"] == pytest.approx([(b - a).mean() for a, b in zip(a_scores, b_scores, strict=True)])
    assert row["holds_on_every_replicate"] == all(np.sign(d.mean()) == np.sign(row["difference"]) for d in diffs)
    assert (row["n_runs"], row["n_cases"], row["n_values"], row["n_left_out"]) == (3, 21, 21, 0)
    assert row["kind"] == "difference" and row["noise_floor"] is None and row["exceeds_noise_floor"] is None


def test_seeds_on_one_split_pair_in_order_and_wilcoxon_sees_case_means(tmp_path):
    cases = [f"img{i}" for i in range(12)]
    a = np.random.default_rng(1).uniform(0.3, 0.8, (2, 12))
    b = a + np.random.default_rng(2).normal(0.02, 0.04, (2, 12))
    for seed in range(2):
        write(tmp_path / "a" / f"s{seed}", summary_json(dict(zip(cases, map(float, a[seed]), strict=True))))
        write(tmp_path / "b" / f"s{seed}", summary_json(dict(zip(cases, map(float, b[seed]), strict=True))))
    row = rows(compare(request(f"A={tmp_path}/a/*", f"B={tmp_path}/b/*")))["B - A"]
    assert row["pairs"] == [[0, 0], [1, 1]] and row["n_cases"] == 12 and row["n_values"] == 24
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon((b - a).mean(axis=0)).pvalue)


def test_identical_arms_differ_by_exactly_zero(tmp_path):
    arm = seeded_arm(tmp_path, "A", 0.0)
    result = compare(request(arm, "B" + arm[1:]))
    for row in result["comparisons"]:
        assert row["difference"] == 0.0 and row["mean_a"] == row["mean_b"]
        assert row["ci_low"] <= 0.0 <= row["ci_high"]
        assert row["p_wilcoxon"] == 1.0 and row["verdict"] == "undecided"
        assert not row["holds_on_every_replicate"]
    assert result["replicates"] == {}  # the same run folders twice are one arm, not a replicate


def test_mismatched_case_sets_and_run_counts_are_refused_with_exit_3(tmp_path):
    write(tmp_path / "a", summary_json({"x1": 0.5, "x2": 0.6, "x3": 0.7}))
    write(tmp_path / "b", summary_json({"x1": 0.5, "x2": 0.6, "x9": 0.7}))
    result = invoke(f"A={tmp_path}/a", f"B={tmp_path}/b")
    assert result.exit_code == EXIT_DATA, result.output
    message = flat(result.output)
    assert "cannot pair arm" in message and "'x9' only in B's" in message and "'x3' only in A's" in message
    assert "Traceback" not in result.output

    write(tmp_path / "a2", summary_json({"x1": 0.5, "x2": 0.6, "x3": 0.7}))
    with pytest.raises(DataError, match="2 run\\(s\\) of A .* and 1 of B"):
        compare(request(f"A={tmp_path}/a", f"A={tmp_path}/a2", f"B={tmp_path}/a"))


def test_undefined_values_are_left_out_for_both_arms_and_counted(tmp_path):
    write(tmp_path / "a", summary_json({"x1": 0.5, "x2": None, "x3": 0.7, "x4": 0.2}, policy="nan"))
    write(tmp_path / "b", summary_json({"x1": 0.6, "x2": 0.9, "x3": None, "x4": 0.4}, policy="nan"))
    result = compare(request(f"A={tmp_path}/a", f"B={tmp_path}/b"))
    row = rows(result)["B - A"]
    assert (row["n_cases"], row["n_left_out"]) == (2, 2)
    assert row["mean_a"] == pytest.approx(0.35) and row["mean_b"] == pytest.approx(0.5)
    assert row["difference"] == pytest.approx(0.15)
    assert any("2 case value(s) left out" in note for note in result["notes"])


def test_different_empty_policies_are_refused(tmp_path):
    write(tmp_path / "a", summary_json({"x1": 0.5}, policy="one"))
    write(tmp_path / "b", summary_json({"x1": 0.5}, policy="nan"))
    with pytest.raises(DataError, match="score empty masks differently"):
        compare(request(f"A={tmp_path}/a", f"B={tmp_path}/b"))


def test_regions_foreground_mean_sections_and_kid(tmp_path):
    a = {"k1": {"kidney": 0.9, "tumor": 0.5}, "k2": {"kidney": 0.8, "tumor": None}}
    b = {"k1": {"kidney": 0.92, "tumor": 0.6}, "k2": {"kidney": 0.86, "tumor": 0.4}}
    adherence_a = {"per_case": [{"case": "p1", "contrast": 0.3, "label": "x", "lesion_frac": 0.01},
                                {"case": "p2", "contrast": 0.5, "lesion_frac": 0.2}]}
    adherence_b = {"per_case": [{"case": "p1", "contrast": 0.4}, {"case": "p2", "contrast": 0.7}]}
    write(tmp_path / "a", summary_json(a, adherence=adherence_a, fid={"kid_subset_values": [0.01, 0.03]}))
    write(tmp_path / "b", summary_json(b, adherence=adherence_b, fid={"kid_subset_values": [0.02, 0.02, 0.05]}))
    run = read_run(tmp_path / "a" / "summary.json")
    assert run.regions == ("kidney", "tumor")
    assert "TP/kidney" not in run.metrics and "n_ref/tumor" not in run.metrics  # counts are not scores
    assert "adherence.lesion_frac" not in run.metrics  # it describes the mask, the same in every arm
    # each case's mean over its defined regions
    assert run.metrics["Dice/foreground_mean"] == pytest.approx({"k1": 0.7, "k2": 0.8})
    result = compare(request(f"A={tmp_path}/a", f"B={tmp_path}/b"))
    assert result["metric"] == "Dice/foreground_mean"  # what plain "Dice" means with several regions
    expected = ((0.76 - 0.7) + (0.63 - 0.8)) / 2
    assert rows(result, "Dice/foreground_mean")["B - A"]["difference"] == pytest.approx(expected)
    assert rows(result, "Dice/tumor")["B - A"]["n_left_out"] == 1
    assert rows(result, "adherence.contrast")["B - A"]["difference"] == pytest.approx(0.15)
    assert set(result["metrics"]) >= {"Dice/kidney", "IoU/tumor", "IoU/foreground_mean", "adherence.contrast"}
    assert result["kid"]["A"] == pytest.approx({"mean": 0.02, "sd": np.std([0.01, 0.03], ddof=1), "n_values": 2,
                                                "n_runs": 1})
    assert result["kid"]["B"]["mean"] == pytest.approx(0.03)
    with pytest.raises(UsageError, match="not among the compared metrics"):
        compare(request(f"A={tmp_path}/a", f"B={tmp_path}/b", metric="HD95"))
    assert compare(request(f"A={tmp_path}/a", f"B={tmp_path}/b", metric="IoU/tumor"))["metric"] == "IoU/tumor"


def test_summary_from_build_summary_is_read_case_by_case(tmp_path):
    rng = np.random.default_rng(0)
    reference = (rng.random((6, 16, 16)) > 0.6).astype(np.uint8)
    arms = {}
    for name, flip in (("A", 0.2), ("B", 0.05)):
        prediction = np.where(rng.random(reference.shape) < flip, 1 - reference, reference).astype(np.uint8)
        report = segmentation_metrics(reference, prediction, case_ids=["c1", "c1", "c2", "c3", "c3", "c4"])
        write_metric_summary(build_summary(dice=report, metadata={"inputs": {"run": f"runs/{name}"}}), tmp_path / name)
        arms[name] = report
    run = read_run(tmp_path / "A" / "summary.json")
    assert run.run == "runs/A" and run.empty_policy == "one"
    assert run.metrics["Dice/foreground"] == pytest.approx({c["case"]: c["metrics"]["foreground"]["Dice"]
                                                           for c in arms["A"].per_case})
    # cases of two images keep their image-mean scores
    assert "Dice_image_mean/foreground" in run.metrics
    row = rows(compare(request(f"A={tmp_path}/A", f"B={tmp_path}/B")))["B - A"]
    assert row["mean_a"] == pytest.approx(arms["A"].mean["foreground"]["Dice"])
    assert row["mean_b"] == pytest.approx(arms["B"].mean["foreground"]["Dice"])
    assert row["n_cases"] == 4


# ---------------------------------------------------------------- replicates and the noise floor


def test_replicate_is_found_from_config_and_is_the_noise_floor(tmp_path):
    config = {"model": "mkunet-t", "epochs": 5, "data": "d.h5"}
    t = seeded_arm(tmp_path, "T", 0.0, config=config)
    t2 = seeded_arm(tmp_path, "T2", 0.0, config=config)
    order = seeded_arm(tmp_path, "ORDER", 0.08, config={**config, "model": "mkunet-t-order"})
    result = compare(request(t, order, t2))
    assert result["replicates"] == {"T2": {"original": "T", "how": "same config.json"}}
    found = rows(result)
    assert set(found) == {"ORDER - T", "T2 - T"}
    floor = found["T2 - T"]
    assert floor["kind"] == "noise floor" and floor["verdict"] is None
    diff = found["ORDER - T"]
    assert diff["noise_floor"] == pytest.approx(max(abs(floor["ci_low"]), abs(floor["ci_high"])))
    assert diff["exceeds_noise_floor"] == (abs(diff["difference"]) > diff["noise_floor"]) is True
    assert diff["verdict"] == "ORDER > T" and diff["holds_on_every_replicate"] and diff["ci_low"] > 0
    # --pair replaces the default "against the first arm"; the replicate's noise floor is always reported
    asked = compare(request(t, order, t2, pairs=("ORDER-T2",)))
    assert [row["name"] for row in rows(asked).values()] == ["ORDER - T2", "T2 - T"]


def test_replicate_not_found_when_configs_differ_and_declared_by_option(tmp_path):
    a = seeded_arm(tmp_path, "A", 0.0, config={"model": "m", "lr": 0.001})
    b = seeded_arm(tmp_path, "B", 0.0, config={"model": "m", "lr": 0.002})
    assert compare(request(a, b))["replicates"] == {}
    declared = compare(request(a, b, replicates=(("B", "A"),)))
    assert declared["replicates"] == {"B": {"original": "A", "how": "declared"}}
    assert rows(declared)["B - A"]["kind"] == "noise floor"


def test_arms_file_with_relative_globs_and_replicates(tmp_path):
    seeded_arm(tmp_path, "T", 0.0)
    seeded_arm(tmp_path, "U", 0.0)
    (tmp_path / "arms.yaml").write_text("arms:\n  T: [eval/T/*/summary.json]\n  U: eval/U/*\n"
                                        "replicates:\n  U: T\n")
    result = invoke("--arms", tmp_path / "arms.yaml", "--json")
    assert result.exit_code == EXIT_OK, result.output
    out = json.loads(result.stdout)
    assert out["replicates"]["U"]["how"] == "declared" and len(out["arms"]["U"]["summaries"]) == 3
    assert "noise floor" in result.stderr


# ---------------------------------------------------------------- the CLI: gates, JSON, plot, usage errors


def test_expect_gate_exits_0_when_the_ci_clears_the_margin_and_1_when_not(tmp_path):
    t = seeded_arm(tmp_path, "T", 0.0)
    order = seeded_arm(tmp_path, "ORDER", 0.05)
    held = invoke(t, order, "--expect", "ORDER > T", "--margin", "0.01", "--resamples", "1000")
    assert held.exit_code == EXIT_OK, held.output
    assert "held" in held.stderr
    missed = invoke(t, order, "--expect", "ORDER > T", "--margin", "0.2", "--resamples", "1000")
    assert missed.exit_code == EXIT_GATE_FAILED, missed.output
    assert "ORDER > T on Dice/foreground is not supported" in flat(missed.stderr)
    wrong_way = invoke(t, order, "--expect", "ORDER < T", "--resamples", "1000")
    assert wrong_way.exit_code == EXIT_GATE_FAILED
    # 'T < ORDER' is the same claim, tested on the ORDER − T row the default reports
    reversed_ = invoke(t, order, "--expect", "T < ORDER", "--margin", "0.01", "--resamples", "1000", "--json")
    assert reversed_.exit_code == EXIT_OK, reversed_.output
    gate = json.loads(reversed_.stdout)["gates"][0]
    assert gate["comparison"] == "ORDER - T" and gate["passed"]


def test_cli_json_out_and_plot(tmp_path):
    t = seeded_arm(tmp_path, "T", 0.0)
    order = seeded_arm(tmp_path, "ORDER", 0.03)
    result = invoke(t, order, "--json", "--plot", tmp_path / "diff.png", "-o", tmp_path / "out" / "compare.json",
                    "--resamples", "500", "--seed", "3")

    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    assert result.exit_code == EXIT_OK, result.output
    printed = json.loads(result.stdout, parse_constant=refuse)  # stdout holds the result and nothing else
    assert printed == json.loads((tmp_path / "out" / "compare.json").read_text())
    assert printed["settings"]["seed"] == 3 and printed["settings"]["resamples"] == 500
    assert (tmp_path / "diff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.partial")) and not list((tmp_path / "out").glob("*.partial"))
    assert "lawder compare" in result.stderr and "ORDER − T" in result.stderr
    again = invoke(t, order, "--json", "--resamples", "500", "--seed", "3")
    assert json.loads(again.stdout)["comparisons"] == printed["comparisons"]  # seeded: the same numbers


@pytest.mark.parametrize(("args", "message"), [
    (["A=x"], "at least two arms"),
    (["A"], "is not NAME=GLOB"),
    (["A/b=x", "B=y"], "arm name"),
    (["A={tmp}/a", "B={tmp}/a", "--pair", "C-A"], "does not name two arms"),
    (["A={tmp}/a", "B={tmp}/a", "--expect", "B >> A"], "is not 'B > A' or 'B < A'"),
    (["A={tmp}/a", "B={tmp}/a", "--expect", "B > Z"], "'Z' is not an arm"),
    (["A={tmp}/a", "B={tmp}/a", "--replicate", "B=Q"], "'Q' is not an arm"),
    (["A={tmp}/a", "B={tmp}/a", "--resamples", "10"], "1000000]"),
    (["A={tmp}/a", "B={tmp}/a", "--margin", "-1"], "--margin"),
    (["A={tmp}/a", "B={tmp}/a", "--metric", "HD95"], "not among the compared metrics"),
])
def test_usage_errors_exit_2(tmp_path, args, message):
    write(tmp_path / "a", summary_json({"x1": 0.5}))
    result = invoke(*[a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == EXIT_USAGE, result.output
    assert message in flat(result.output) and "Traceback" not in result.output


def test_missing_and_unreadable_summaries_exit_3(tmp_path):
    write(tmp_path / "a", summary_json({"x1": 0.5}))
    assert invoke(f"A={tmp_path}/a", f"B={tmp_path}/none/*.json").exit_code == EXIT_DATA
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "summary.json").write_text(json.dumps({"best_dice": 0.7, "epochs": 3}))
    result = invoke(f"A={tmp_path}/a", f"B={tmp_path}/train")
    assert result.exit_code == EXIT_DATA and "holds no per-case scores" in flat(result.output)


@pytest.mark.parametrize("per_case, message", [
    (5, "metric_per_case must be a list of cases"),
    ([{"case": "a", "metrics": {"Dice": float("nan")}}], "gives region 'Dice' a float, not its scores by metric"),
    ([{"case": "a"}], "has no `case` and `metrics`"),
])
def test_a_summary_of_another_shape_exits_3_naming_what_is_wrong(tmp_path, per_case, message):
    write(tmp_path / "a", summary_json({"x1": 0.5}))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({"metric_per_case": per_case}))
    result = invoke(f"A={tmp_path}/a", f"B={tmp_path}/b")
    assert result.exit_code == EXIT_DATA and message in flat(result.output), result.output


def test_pair_names_may_hold_dashes():
    names = ["mkunet-t", "mkunet-t-order", "T"]
    assert parse_pair("mkunet-t-order-mkunet-t", names) == ("mkunet-t-order", "mkunet-t")
    assert parse_pair("T − mkunet-t", names) == ("T", "mkunet-t")
    with pytest.raises(UsageError, match="compares an arm with itself"):
        parse_pair("T-T", names)


def test_spec_tuple_arms_need_no_cli(tmp_path):
    write(tmp_path / "a", summary_json({"x1": 0.5, "x2": 0.7}))
    write(tmp_path / "b", summary_json({"x1": 0.6, "x2": 0.9}))
    result = compare(CompareRequest(arms=(ArmSpec("A", (str(tmp_path / "a"),)), ArmSpec("B", (str(tmp_path / "b"),))),
                                    resamples=500))
    row = rows(result)["B - A"]
    assert row["difference"] == pytest.approx(0.15) and math.isfinite(row["ci_low"])


def test_a_difference_too_small_for_four_decimals_is_printed_in_its_own_digits():
    from lawder_cli.common import number

    assert number(1.6e-05, signed=True) == "+1.60e-05" and number(-3e-07) == "-3.00e-07"
    assert number(0.0, signed=True) == "+0.0000" and number(0.93284) == "0.9328" and number(2500.0) == "2500"
    assert number(None) == "n/a" and number(0.9663, 3) == "0.966" and number(4e-05, 3) == "4.00e-05"
