"""Run every benchmarks/bench_*.py in turn and merge their JSON into benchmarks/results.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    results, failed = {}, []
    for script in sorted(HERE.glob("bench_*.py")):
        out = HERE / "results" / f"{script.stem}.json"
        print(f"== {script.name}", flush=True)
        if subprocess.call([sys.executable, str(script), "--out", str(out)]) != 0:
            failed.append(script.name)
            continue
        results[script.stem] = json.loads(out.read_text())
    (HERE / "results.json").write_text(json.dumps(results, indent=1))
    print(f"wrote {HERE / 'results.json'}" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
