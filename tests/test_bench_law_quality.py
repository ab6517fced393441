"""benchmarks/bench_law_quality.py: the decision rule on fixed numbers, and the whole benchmark at toy scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark


def load_bench():
    return load_benchmark("bench_law_quality")


def row(hit: float, spurious: float, kid: float, small_kid: float | None = None,
        background_kid: float | None = None) -> dict:
    kids = {"all": kid, **({"<3%": small_kid} if small_kid is not None else {})}
    return {"bins": {"all": {"n": 10, "hit_rate": hit, "spurious_area": spurious}}, "lesion_kid": kids,
            "background_kid": background_kid}


def test_decision_rule_needs_twice_the_replicate_spread_and_one_sign_on_every_seed():
    bench = load_bench()
    uniform = {s: row(0.50, 0.010, 0.20) for s in range(4)}
    table = {
        "uniform": uniform,
        # the noise floor: |replicate − uniform| = 0.02 on every seed → RMS 0.02
        "uniform-rep": {s: row(0.50 + (0.02 if s % 2 else -0.02), 0.010, 0.20) for s in range(4)},
        "law": {s: row(0.56 + 0.01 * s, 0.004, 0.15) for s in range(4)},  # +0.06..+0.09 > 2 × 0.02
        "ratio": {s: row(0.50 + (0.08 if s else -0.01), 0.010, 0.20) for s in range(4)},  # one seed the other way
    }
    result = bench.verdicts(table, ["uniform", "uniform-rep", "ratio", "law"])
    law, ratio = result["law"], result["ratio"]
    assert law["hit_rate"]["all"]["noise_floor"] == pytest.approx(0.02)
    assert law["hit_rate"]["all"]["per_seed"] == pytest.approx([0.06, 0.07, 0.08, 0.09])
    assert law["hit_rate"]["all"]["verdict"] == "beats uniform"
    assert ratio["hit_rate"]["all"]["verdict"] == "no call"  # the mean clears the floor, the signs do not agree
    # lower is better for spurious area and lesion KID: LAW's decrease is a win there too; no floor, no call
    assert law["spurious_area"]["all"]["better_direction"] == "lower"
    assert law["lesion_kid"]["all"]["mean"] == pytest.approx(-0.05)
    assert law["lesion_kid"]["all"]["noise_floor"] == 0.0 and law["lesion_kid"]["all"]["verdict"] == "beats uniform"
    low, high = law["hit_rate"]["all"]["ci95"]
    assert low < 0.075 < high
    assert result["uniform-rep"]["hit_rate"]["all"]["verdict"] == "no call"


def smoke_run(root: Path) -> tuple[object, list[str], Path, Path, Path]:
    """The benchmark at toy scale, one seed, three arms: (module, its arguments, work folder, result, KID weights)."""
    from tests.helpers import tiny_fid_weights

    bench = load_bench()
    weights = tiny_fid_weights(root / "fid.pt")
    work, out = root / "work", root / "result.json"
    args = ["--smoke", "--seeds", "1", "--arms", "uniform,uniform-rep,law-influence", "--work", str(work),
            "--out", str(out), "--fid-weights", str(weights)]
    assert bench.main(args) == 0
    return bench, args, work, out, weights


@pytest.mark.slow  # every stage at toy scale: ~5 min on a shared 2-core machine
def test_smoke_run_writes_per_arm_summaries_and_a_result_and_resumes(tmp_path):
    bench, args, work, out, _ = smoke_run(tmp_path)
    result = json.loads(out.read_text())
    assert result["complete"] and set(result["means"]) == {"uniform", "uniform-rep", "law-influence"}
    summary = json.loads((work / "eval" / "law-influence" / "seed0" / "summary.json").read_text())
    assert len(summary["adherence"]["per_case"]) == 8 and "kid_se" in summary["lesion_kid"]
    assert summary["metadata"]["train"]["init_from"]["run"] == str(work / "base")
    config = json.loads((work / "runs" / "law-influence" / "seed0" / "config.json").read_text())
    assert config["law"]["objective"] == "influence" and config["init_from"] == str(work / "base")
    assert json.loads((work / "base" / "config.json").read_text())["cond_dropout"] == 1.0
    assert (work / "compare.yaml").exists()
    kid_bins = json.loads((work / "eval" / "uniform" / "seed0" / "lesion_kid_bins.json").read_text())
    assert kid_bins["all"] == pytest.approx(summary_of(work, "uniform")["lesion_kid"]["kid"], rel=1e-6)
    assert "<3%" in {label for label, _, _ in bench.kid_bins()}
    assert kid_bins["background"]["n_synthetic"] > 0  # the lesion-free control, scored with the bins
    stamp = (work / "eval" / "uniform" / "seed0" / "summary.json").stat().st_mtime
    assert bench.main(args) == 0  # complete: nothing is trained, sampled or scored again
    assert (work / "eval" / "uniform" / "seed0" / "summary.json").stat().st_mtime == stamp


def summary_of(work: Path, arm: str) -> dict:
    return json.loads((work / "eval" / arm / "seed0" / "summary.json").read_text())


def load_diagnostic():
    return load_benchmark("law_background_diagnostic")


def pixels(path: Path):
    from lawder_core.data.h5 import load_arrays

    return load_arrays(path, None)[0].astype(int)


@pytest.mark.slow  # the benchmark at toy scale, then four toy samplings and scorings
def test_the_background_diagnostic_scores_the_base_and_uniform_moved_less_beside_every_arm(tmp_path):
    _, _, work, _, weights = smoke_run(tmp_path)
    diagnostic = load_diagnostic()
    out = tmp_path / "diagnostic"
    args = diagnostic.parse_args(["--work", str(work), "--alphas", "0,1", "--out", str(out), "--fid-weights",
                                  str(weights)])
    result = diagnostic.diagnose(args)
    rows, channels = result["rows"], result["base_mask_channels"]
    assert set(rows) == {"base", "uniform-raw", "uniform-a000", "uniform-a100", "uniform", "uniform-rep",
                         "law-influence"}
    # displacement x 0 is the base, x 1 the uniform arm that the benchmark sampled: same masks, noise and sampler
    assert (pixels(out / "uniform-a000" / "synthetic.h5") == pixels(out / "base" / "synthetic.h5")).all()
    moved_fully = pixels(out / "uniform-a100" / "synthetic.h5")
    assert abs(moved_fully - pixels(work / "synthetic" / "uniform" / "seed0.h5")).max() <= 1  # float rounding
    assert not (pixels(out / "base" / "synthetic.h5") == moved_fully).all()
    assert rows["uniform"]["w_background"] == 1.0 and rows["law-influence"]["w_background"] < 1.0
    assert rows["uniform-a000"]["background_kid"] == pytest.approx(rows["base"]["background_kid"])
    assert set(channels["relative_change_of_v_real_mask_vs_null"]) == {"t999", "t500", "t100"}
    assert channels["conv_in_abs_weight_mean"]["mask"] > 0  # the base's untrained mask inputs, as they were saved
    assert json.loads((out / "law_background_diagnostic.json").read_text()) == result
    stamp = (out / "base" / "synthetic.h5").stat().st_mtime
    diagnostic.diagnose(args)  # a rerun samples and scores nothing again
    assert (out / "base" / "synthetic.h5").stat().st_mtime == stamp


def test_lesion_kid_per_bin_comes_from_the_rescored_file_and_all_from_the_summary(tmp_path):
    bench = load_bench()
    summary = {"lesion_kid": {"kid": 0.05, "bins": {"<1%": {"kid": 0.5}}}}
    scored = tmp_path / "lesion_kid_bins.json"
    # no rescored file: the summary's bins (and no lesion-free control in a summary from before it)
    assert bench.kid_bins_of(summary, scored) == ({"<1%": 0.5, "all": 0.05}, None)
    scored.write_text(json.dumps({"all": 0.05, "bins": {"<1%": {"kid": 0.1}, "<3%": {"kid": None}},
                                  "background": {"kid": 0.02}}))
    assert bench.kid_bins_of(summary, scored) == ({"<1%": 0.1, "<3%": None, "all": 0.05}, 0.02)


def test_lesion_kid_is_called_per_bin_and_shown_in_that_bins_table():
    bench = load_bench()
    table = {"uniform": {s: row(0.5, 0.0, 0.20, 0.30) for s in range(3)},
             "uniform-rep": {s: row(0.5, 0.0, 0.20, 0.30 + (0.01 if s % 2 else -0.01)) for s in range(3)},
             "law": {s: row(0.5, 0.0, 0.20, 0.25 - 0.01 * s) for s in range(3)}}
    arms = ["uniform", "uniform-rep", "law"]
    calls = bench.verdicts(table, arms)["law"]["lesion_kid"]
    assert calls["<3%"]["per_seed"] == pytest.approx([-0.05, -0.06, -0.07])
    assert calls["<3%"]["verdict"] == "beats uniform" and calls["all"]["verdict"] == "no call"
    text = bench.markdown_tables(bench.arm_means(table), bench.verdicts(table, arms))
    assert "**Lesions <3%**" in text and "240.00 (-60.00 [" in text


def test_the_lesion_free_control_is_called_over_all_pairs_only():
    bench = load_bench()
    table = {"uniform": {s: row(0.5, 0.0, 0.20, background_kid=0.10) for s in range(3)},
             "uniform-rep": {s: row(0.5, 0.0, 0.20, background_kid=0.10 + 0.002 * (-1) ** s) for s in range(3)},
             "law": {s: row(0.5, 0.0, 0.15, background_kid=0.13 + 0.01 * s) for s in range(3)}}
    calls = bench.verdicts(table, ["uniform", "uniform-rep", "law"])["law"]["background_kid"]
    assert set(calls) == {"all"} and calls["all"]["per_seed"] == pytest.approx([0.03, 0.04, 0.05])
    assert calls["all"]["verdict"] == "worse than uniform"  # the whole image got worse while the lesion improved
    text = bench.markdown_tables(bench.arm_means(table), bench.verdicts(table, ["uniform", "uniform-rep", "law"]))
    header = next(line for line in text.splitlines() if line.startswith("| arm"))
    assert "lesion-free KID ×10³ (control)" in header and "140.00 (+40.00 [" in text


def test_the_goals_small_lesion_bin_pools_the_pairs_under_3_percent():
    bench = load_bench()
    per_case = [{"lesion_frac": f, "size_bin": b, "hit": h, "contrast_rel": c, "dice": d, "spurious_area": 0.0}
                for f, b, h, c, d in ((0.005, "<1%", 1.0, 0.8, 0.9), (0.02, "1-3%", 0.0, 0.4, 0.5),
                                      (0.029, "1-3%", 1.0, 1.2, 0.7), (0.05, "3-10%", 0.0, 2.0, 0.1))]
    bins = bench.bins_of({"adherence": {"bins": {"all": {"n": 4}}, "per_case": per_case}})
    assert bins["<3%"]["n"] == 3
    assert bins["<3%"]["hit_rate"] == pytest.approx(2 / 3) and bins["<3%"]["contrast_rel"] == pytest.approx(0.8)
    assert bins["<3%"]["dice"] == pytest.approx(0.7) and bins["all"] == {"n": 4}


def test_the_markdown_table_gives_each_arm_its_paired_difference_ci_and_call():
    bench = load_bench()
    uniform = {s: row(0.50, 0.010, 0.20) for s in range(4)}
    table = {"uniform": uniform,
             "uniform-rep": {s: row(0.50 + (0.02 if s % 2 else -0.02), 0.010, 0.20) for s in range(4)},
             "law": {s: row(0.56 + 0.01 * s, 0.004, 0.15) for s in range(4)}}
    arms = ["uniform", "uniform-rep", "law"]
    text = bench.markdown_tables(bench.arm_means(table), bench.verdicts(table, arms))
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ")}
    assert "**Lesions all** (10 pairs per run)" in text
    assert lines["| uniform"].startswith("| uniform | 4 | 0.500 | ")  # the reference: its mean, no difference
    law_ci = bench.verdicts(table, arms)["law"]["hit_rate"]["all"]["ci95"]
    assert f"0.575 (+0.075 [{law_ci[0]:+.3f}, {law_ci[1]:+.3f}]) ✓" in lines["| law"]
    assert "150.00 (-50.00" in lines["| law"]  # lesion KID ×10³, lower is better: a win
    assert "(+0.000 [" in lines["| uniform-rep"] and "✓" not in lines["| uniform-rep"]


def test_one_seed_gets_no_call_however_large_the_difference():
    bench = load_bench()
    table = {"uniform": {0: row(0.50, 0.010, 0.20)}, "uniform-rep": {0: row(0.49, 0.010, 0.20)},
             "law": {0: row(0.90, 0.0, 0.05)}}
    calls = bench.verdicts(table, ["uniform", "uniform-rep", "law"])["law"]
    assert calls["hit_rate"]["all"]["mean"] == pytest.approx(0.40)
    assert {calls[m]["all"]["verdict"] for m in ("hit_rate", "spurious_area", "lesion_kid")} == {"no call"}


def test_law_is_also_called_against_its_prior_map_with_the_replicates_floor():
    bench = load_bench()
    table = {"uniform": {s: row(0.50, 0.0, 0.20) for s in range(3)},
             "uniform-rep": {s: row(0.50 + (0.01 if s % 2 else -0.01), 0.0, 0.20) for s in range(3)},
             "ratio": {s: row(0.60, 0.0, 0.10) for s in range(3)},
             "law": {s: row(0.60 + 0.03 + 0.01 * s, 0.0, 0.11) for s in range(3)}}
    calls = bench.verdicts(table, ["ratio", "law"], reference="ratio")
    assert set(calls) == {"law"}
    hit = calls["law"]["hit_rate"]["all"]
    assert hit["per_seed"] == pytest.approx([0.03, 0.04, 0.05]) and hit["noise_floor"] == pytest.approx(0.01)
    assert hit["verdict"] == "beats ratio"
    assert calls["law"]["lesion_kid"]["all"]["verdict"] == "worse than ratio"  # 0.11 vs 0.10, floor 0
    text = bench.prior_table(calls)
    assert "| law | all | +0.040 [" in text and "] ✓" in text and "+10.00 [+10.00, +10.00] ✗" in text


def test_a_spurious_area_call_needs_more_than_its_resolution_when_the_replicates_never_differ():
    bench = load_bench()
    pixel = bench.resolutions(64)["spurious_area"]
    table = {"uniform": {s: row(0.5, 0.0, 0.2) for s in range(3)},
             "uniform-rep": {s: row(0.5, 0.0, 0.2) for s in range(3)},  # no spurious pixel anywhere: spread 0
             "law": {s: row(0.5, 0.25 * pixel, 0.2) for s in range(3)},  # a pixel in every fourth image
             "ratio": {s: row(0.5, 3 * pixel, 0.2) for s in range(3)}}  # three pixels per image
    calls = bench.verdicts(table, ["uniform", "uniform-rep", "law", "ratio"], resolution=bench.resolutions(64))
    law, ratio = calls["law"]["spurious_area"]["all"], calls["ratio"]["spurious_area"]["all"]
    assert law["replicate_spread"] == 0.0 and law["noise_floor"] == pixel and law["verdict"] == "no call"
    assert ratio["verdict"] == "worse than uniform"
    unguarded = bench.verdicts(table, ["uniform", "uniform-rep", "law"])["law"]["spurious_area"]["all"]
    assert unguarded["verdict"] == "worse than uniform"  # what the rule alone would have said
