"""The recipes in examples/ stay in step with the CLI: configs load, every flag they use exists."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from lawder_cli.main import app
from lawder_core.config import build_config
from lawder_core.train.diffusion import DiffusionTrainConfig
from lawder_core.train.seg import SegTrainConfig
from tests.helpers import runner

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_example_configs_load():
    seg = build_config(SegTrainConfig, EXAMPLES / "order_kvasir.yaml", data="d.h5", out="o")
    assert seg.model == "mkunet-t-order" and seg.order.kv_grid == 16
    law = build_config(DiffusionTrainConfig, EXAMPLES / "law_small.yaml", data="d.h5", out="o")
    assert law.weighting == "law" and law.law.w_max == 5.0 and law.law.objective == "hardness"
    assert (law.prediction, law.hflip) == ("v", True)  # the example names the default explicitly
    from lawder_core.sweeps import LawTuneConfig

    clamp = build_config(LawTuneConfig, EXAMPLES / "law_clamp_small.yaml", data="d.h5", out="o")
    assert clamp.init_from and clamp.steps_per_round == 250 and clamp.weighting == "law"


def test_the_clamp_example_sweeps_every_built_in_range_and_replicates_the_default():
    from lawder_core.models.configs import LAWConfig
    from lawder_core.sweeps import CLAMP_RANGES, flatten_params, load_sweep_space

    grid = load_sweep_space("law-clamp", EXAMPLES / "law_clamp_space.yaml")["clamp"]["grid"]
    ranges = [(p["law.w_min"], p["law.w_max"]) for p in map(flatten_params, grid)]
    assert ranges[:-1] == CLAMP_RANGES
    default = (LAWConfig().w_min, LAWConfig().w_max)
    assert ranges[-1] == default and grid[-1]["seed"] == 1 and all("seed" not in p for p in grid[:-1])


def lawder_calls(script: Path) -> list[list[str]]:
    text = script.read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("lawder "):
            calls.append(shlex.split(line.split(">")[0])[1:])
    return calls


@pytest.mark.parametrize("script", sorted(EXAMPLES.glob("*.sh")), ids=lambda p: p.name)
def test_example_scripts_use_only_existing_commands_and_flags(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    calls = lawder_calls(script)
    assert calls
    for call in calls:
        command = call[0]
        shown = runner.invoke(app, [command, "--help"], terminal_width=200)
        assert shown.exit_code == 0, f"{script.name}: lawder {command} does not exist"
        help_text = shown.output
        for flag in (a.split("=")[0] for a in call if a.startswith("--")):
            assert re.search(re.escape(flag) + r"\b", help_text), f"{script.name}: {command} has no {flag}"
