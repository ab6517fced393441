"""`sample` holds its output's lock from its first step, as a training holds its run folder: a second `sample -o`
the same file is refused while the first is still sampling, not after both have sampled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lawder_cli.main import app
from lawder_core.locks import lock_path
from lawder_core.sample import SampleConfig, generate_here, sample_to_file
from tests.helpers import runner, synthetic_h5

pytestmark = pytest.mark.faults

TRY_LOCK = """
import sys
from lawder_core.errors import DataError
from lawder_core.locks import hold_output_lock
try:
    hold_output_lock(sys.argv[1])
except DataError as err:
    print(err.message)
    sys.exit(3)
"""


def second_writer(out: Path) -> subprocess.CompletedProcess:
    """Another process asks for the output's lock, as a second `lawder sample -o OUT --force` does first."""
    return subprocess.run([sys.executable, "-c", TRY_LOCK, str(out)], capture_output=True, text=True, timeout=60)


def test_a_second_sampler_is_refused_while_the_first_samples(law_run: Path, tmp_path: Path):
    data = synthetic_h5(tmp_path / "s.h5", n=4, size=32)
    out = tmp_path / "x.h5"
    seen: list[subprocess.CompletedProcess] = []

    def generate_and_meet_a_second_writer(cfg: SampleConfig, masks: np.ndarray, progress) -> np.ndarray:
        seen.append(second_writer(out))  # while sampling: nothing written yet
        assert not out.exists()
        return generate_here(cfg, masks, progress)

    cfg = SampleConfig(run=str(law_run), masks=str(data), out=str(out), split="all", steps=1, force=True)
    sample_to_file(cfg, generate_images=generate_and_meet_a_second_writer)
    assert seen[0].returncode == 3, seen[0].stderr
    assert f"{out} is being written by lawder" in seen[0].stdout
    assert out.exists() and not lock_path(out).exists()  # written, and the lock given back
    assert second_writer(out).returncode == 0


def test_a_refused_sample_releases_its_lock(law_run: Path, tmp_path: Path):
    data = synthetic_h5(tmp_path / "s.h5", n=4, size=32)
    out = tmp_path / "x.h5"
    result = runner.invoke(app, ["sample", "--run", str(law_run), "--masks", str(data), "-o", str(out),
                                 "--split", "nonesuch"])
    assert result.exit_code == 3, result.output
    assert not lock_path(out).exists() and second_writer(out).returncode == 0
