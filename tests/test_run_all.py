"""benchmarks/run_all.py (`make bench`): the quick measurements by default, the hour-long studies only when asked."""


import pytest

from tests.helpers import BENCHMARKS, load_benchmark


def load():
    return load_benchmark("run_all")


def test_the_long_studies_run_only_when_asked():
    run_all = load()
    scripts = sorted(BENCHMARKS.glob("bench_*.py"))
    assert set(run_all.LONG) <= {s.stem for s in scripts}  # a renamed study cannot slip into the default run
    default = {s.stem for s in run_all.chosen(scripts, None, False)}
    assert default and not default & set(run_all.LONG) and "bench_seg_speed" in default
    assert {s.stem for s in run_all.chosen(scripts, None, True)} == {s.stem for s in scripts}
    assert [s.stem for s in run_all.chosen(scripts, ["bench_order_folds"], False)] == ["bench_order_folds"]
    with pytest.raises(SystemExit, match="no benchmark named bench_nope"):
        run_all.chosen(scripts, ["bench_nope"], False)
