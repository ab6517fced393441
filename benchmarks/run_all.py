"""Run the benchmarks/bench_*.py scripts in turn and merge their JSON into benchmarks/results.json.

By default only the measurements that take minutes run (speed and memory ratios against a baseline in the same
run). The evidence studies train dozens of models for hours (`LONG`: the fold comparison alone is about 12
core-hours) and run only when named with --only or with --all; results.json then carries their last committed
result from benchmarks/results/, marked as not rerun.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
LONG = ("bench_kits_regions", "bench_law_quality", "bench_order_folds", "bench_seg_quality")


def chosen(scripts: list[Path], only: list[str] | None, everything: bool) -> list[Path]:
    if only:
        unknown = sorted(set(only) - {s.stem for s in scripts})
        if unknown:
            raise SystemExit(f"run_all.py: no benchmark named {', '.join(unknown)} "
                             f"(there are {', '.join(s.stem for s in scripts)})")
        return [s for s in scripts if s.stem in only]
    return scripts if everything else [s for s in scripts if s.stem not in LONG]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help=f"Also the long studies: {', '.join(LONG)}.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="These benchmarks only (e.g. bench_fid).")
    args = parser.parse_args(argv)
    scripts = sorted(HERE.glob("bench_*.py"))
    results: dict[str, object] = {}
    failed = []
    for script in chosen(scripts, args.only, args.all):
        out = HERE / "results" / f"{script.stem}.json"
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script), "--out", str(out)]) != 0:
            failed.append(script.name)
            continue
        results[script.stem] = json.loads(out.read_text())
    for script in scripts:  # what did not run this time: its last committed result, said so
        committed = HERE / "results" / f"{script.stem}.json"
        if script.stem not in results and script.name not in failed and committed.exists():
            results[script.stem] = {"not_rerun": True, "result": json.loads(committed.read_text())}
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {HERE / 'results.json'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
