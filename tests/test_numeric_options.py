"""Every number every command takes: NaN, ±inf, negative, zero, huge and out-of-range values are refused up front
(exit 2, 3 or 4) with one error and no traceback, and leave nothing behind; a size or count the machine cannot
hold is refused with the memory estimate and the largest value that fits, and an allocation that fails anyway is
"out of memory" (exit 4), never a --resume hint.

The option-parser cases run in this process (CliRunner: each costs milliseconds); the memory cases run the
command in a subprocess under an address-space cap (RLIMIT_AS), so a command that tried to take the machine down
could only fail, and the cap is what the test's own estimate of "this machine" sees.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import typer.main
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from lawder_cli.main import app
from lawder_core import numbers
from lawder_core.config import build_config
from lawder_core.errors import EXIT_DATA, EXIT_ENVIRONMENT, EXIT_USAGE, UsageError
from lawder_core.files import json_text
from lawder_core.train.configs import DiffusionTrainConfig, SegTrainConfig
from tests.helpers import runner

pytestmark = pytest.mark.faults

# What each command needs besides the option under test, so that the option is what it fails on. {d}: a prepared
# HDF5 file; {r}: a run folder; {o}: a folder that must stay empty.
REQUIRED = {
    ("prepare",): ["synthetic", "-o", "{o}/x.h5"],
    ("train-order",): ["--data", "{d}", "--out", "{o}/run"],
    ("train-law",): ["--data", "{d}", "--out", "{o}/run"],
    ("sample",): ["--run", "{r}", "--masks", "{d}", "-o", "{o}/s.h5"],
    ("predict",): ["{d}", "--run", "{r}", "-o", "{o}/p"],
    ("tune",): ["order", "--data", "{d}", "--out", "{o}/t"],
    ("evaluate",): ["--profile", "--model", "mkunet-t", "-o", "{o}/e"],
    ("pipeline",): ["--out", "{o}/pipe"],
    ("export", "onnx"): ["--run", "{r}", "-o", "{o}/m.onnx"],
    ("export", "nnunet"): ["{d}", "-o", "{o}/n", "--name", "X", "--dataset-id", "1"],
    ("compare",): ["A={o}/a/summary.json", "B={o}/b/summary.json"],
}
# Options that carry numbers in text: (command, flag, a valid value, a bad member to put in it).
TEXT_NUMBERS = [
    (("prepare",), "--split", "0.8,0.1,0.1", ["nan", "inf", "-inf", "-2", "1e308"]),
    (("prepare",), "--window", "-79,304", ["nan", "inf", "-inf"]),
    (("predict",), "--window", "-79,304", ["nan", "inf", "-inf"]),
]


def numeric_kind(annotation: typing.Any) -> type | None:
    """int or float for a numeric option (`int`, `float | None`), else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [a for a in typing.get_args(annotation) if a in (int, float)]
        return kinds[0] if kinds else None
    return annotation if annotation in (int, float) else None


def commands(command: typing.Any = None, path: tuple[str, ...] = ()
             ) -> typing.Iterator[tuple[tuple[str, ...], typing.Any]]:
    command = command or typer.main.get_command(app)
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield path, command


def numeric_options() -> list[tuple[tuple[str, ...], str, type, typing.Any]]:
    """(command, flag, int or float, its callback) for every numeric option of every command."""
    found = []
    for path, command in commands():
        for param in command.params:
            kind = numeric_kind(param.type_descriptor.annotation)
            if kind is not None and param.param_type_name == "option":
                found.append((path, max(param.opts, key=len), kind, param.callback))
    return found


OPTIONS = numeric_options()


def test_every_numeric_option_of_every_command_has_a_range():
    assert len(OPTIONS) >= 40  # the walk found the commands' options, not nothing
    missing = [f"lawder {' '.join(path)} {flag}" for path, flag, _, callback in OPTIONS
               if not isinstance(getattr(callback, "allowed", None), numbers.Range)]
    assert missing == []
    assert {path for path, *_ in OPTIONS} <= set(REQUIRED)


def bad_values(allowed: numbers.Range, kind: type) -> st.SearchStrategy[str]:
    """What a user or a script might pass that the range does not allow, as command-line text."""
    fixed = ["nan", "-nan", "inf", "-inf", "Infinity", "1e308", "-1e308", str(2**63), str(-(2**63)), "1e400"]
    numbers_ = [st.sampled_from(fixed)]
    if allowed.low > -math.inf:
        below = st.integers(max_value=math.ceil(allowed.low) - 1) if kind is int else \
            st.floats(max_value=allowed.low, allow_nan=False, allow_infinity=False)
        numbers_.append(below.map(str))
    if allowed.high < math.inf:
        above = st.integers(min_value=math.floor(allowed.high) + 1) if kind is int else \
            st.floats(min_value=allowed.high, allow_nan=False, allow_infinity=False, exclude_min=True)
        numbers_.append(above.map(str))
    if allowed.step > 1:
        numbers_.append(st.integers(1, allowed.step - 1).map(lambda k: str(int(allowed.low) + k)))
    numbers_.append(st.sampled_from(["0", "-0", "-1", "0.5", "1e-320"]))
    return st.one_of(numbers_)


def refused(text: str, kind: type, allowed: numbers.Range) -> bool:
    """Whether the option parser must refuse `text`: not a number of its kind, or outside the range."""
    try:
        value = kind(text) if kind is float else int(text)
    except ValueError:
        return True
    return allowed.problem(value) is not None


def one_error(output: str) -> bool:
    """One error: lawder's `error: ...` line (and its hint) or the option parser's one Error box; no traceback."""
    markers = sum(line.startswith("error:") for line in output.splitlines()) + output.count("╭─ Error")
    return markers == 1 and "Traceback" not in output


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("numbers")
    prepare_synthetic(root / "d.h5", n=8, size=32, seed=0, options=PrepareOptions(size=32))
    (root / "run").mkdir()
    return {"d": root / "d.h5", "r": root / "run", "root": root}


def invoke(path: tuple[str, ...], extra: list[str], files: dict[str, Path], out: Path) -> typing.Any:
    args = [a.format(d=files["d"], r=files["r"], o=out) for a in REQUIRED[path]]
    return runner.invoke(app, [*path, *args, *extra])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_out_of_range_numbers_are_refused_before_anything_runs(data, files, tmp_path_factory):
    path, flag, kind, callback = data.draw(st.sampled_from(OPTIONS), label="option")
    text = data.draw(bad_values(callback.allowed, kind), label="value")
    assume(refused(text, kind, callback.allowed))
    out = tmp_path_factory.mktemp("out")
    result = invoke(path, [f"{flag}={text}"], files, out)
    assert result.exit_code == EXIT_USAGE, (path, flag, text, result.output)
    assert flag in result.output and one_error(result.output), result.output
    assert list(out.iterdir()) == []  # no run folder, no file, no lock


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_numbers_inside_text_options_are_checked_too(data, files, tmp_path_factory):
    path, flag, valid, bad = data.draw(st.sampled_from(TEXT_NUMBERS), label="option")
    parts = valid.split(",")
    parts[data.draw(st.integers(0, len(parts) - 1), label="member")] = data.draw(st.sampled_from(bad), label="bad")
    out = tmp_path_factory.mktemp("out")
    extra = [f"{flag}={','.join(parts)}"] + (["--in", str(files["d"])] if path == ("predict",) else [])
    if path == ("predict",):  # a CT window applies to volumes: give it one, so the window is what is checked
        volume = out.parent / "ct.nii.gz"
        if not volume.exists():
            import nibabel as nib

            nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.int16), np.eye(4)), volume)
        extra = [f"{flag}={','.join(parts)}", "--in", str(volume)]
        result = runner.invoke(app, ["predict", "--run", str(files["r"]), "-o", str(out / "p"), *extra])
    else:
        result = invoke(path, extra, files, out)
    assert result.exit_code == EXIT_USAGE, (path, flag, parts, result.output)
    assert one_error(result.output) and flag in result.output, result.output
    assert list(out.iterdir()) == []


CONFIG_FLOATS = [(SegTrainConfig, "lr"), (SegTrainConfig, "synthetic_ratio"), (SegTrainConfig, "weight_decay"),
                 (DiffusionTrainConfig, "lr"), (DiffusionTrainConfig, "max_grad_norm"),
                 (DiffusionTrainConfig, "ema_decay"), (DiffusionTrainConfig, "law.gamma"),
                 (DiffusionTrainConfig, "law.w_max"), (DiffusionTrainConfig, "law.lambda_prior"),
                 (SegTrainConfig, "order.rho"), (SegTrainConfig, "order.aux_weight")]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CONFIG_FLOATS), value=st.sampled_from([".nan", ".inf", "-.inf", "1.0e+400"]))
def test_non_finite_values_in_a_config_file_are_refused(case, value, tmp_path_factory):
    cls, key = case
    folder = tmp_path_factory.mktemp("cfg")
    nested = key.split(".")
    text = f"{nested[0]}: {value}\n" if len(nested) == 1 else f"{nested[0]}:\n  {nested[1]}: {value}\n"
    (folder / "c.yaml").write_text(text)
    with pytest.raises(UsageError, match="finite"):
        build_config(cls, folder / "c.yaml", data="d.h5", out=str(folder / "run"))


def test_gamma_inf_never_reaches_config_json(files, tmp_path):
    """The issue's reproduction: `--gamma inf`, on the command line or in --config, is refused before the run
    folder (and its config.json) exists."""
    (tmp_path / "c.yaml").write_text("law:\n  gamma: .inf\n")
    for extra in (["--gamma", "inf"], ["--config", str(tmp_path / "c.yaml")]):
        result = runner.invoke(app, ["train-law", "--data", str(files["d"]), "--out", str(tmp_path / "run"), *extra])
        assert result.exit_code == EXIT_USAGE and one_error(result.output), result.output
        assert not (tmp_path / "run").exists()


def test_json_is_written_strictly_with_non_finite_values_as_null(tmp_path):
    from lawder_core.files import write_json

    data = {"dice": float("nan"), "rows": [1.5, float("inf"), (float("-inf"), 2)], "ok": 0.25}
    text = json_text(data)
    assert json.loads(text) == {"dice": None, "rows": [1.5, None, [None, 2]], "ok": 0.25}
    assert "NaN" not in text and "Infinity" not in text
    write_json(tmp_path / "x.json", data)
    json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the file"))


# ---------------------------------------------------------------- memory, in a subprocess under a cap

CAP = 6 * 2**30  # address space: Python, h5py and torch's import (~3.3 GB of it) and a little work
COMMAND = "import sys; from lawder_cli.main import app; sys.argv[0] = 'lawder'; app()"


def capped(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CAP, CAP))

    return subprocess.run([sys.executable, "-c", COMMAND, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, preexec_fn=limit, env={**os.environ, "COLUMNS": "200", **(env or {})})


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory) -> Path:
    """The issue's reproductions: four 40×40 Kvasir-like pairs, and a 32 px prepared set."""
    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("memory")
    for sub in ("images", "masks"):
        (root / "kv" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "kv" / "images" / f"{i}.png")
        Image.fromarray(((rng.random((40, 40)) > 0.5) * 255).astype(np.uint8)).save(root / "kv" / "masks" / f"{i}.png")
    prepare_synthetic(root / "s32.h5", n=24, size=32, seed=0, options=PrepareOptions(size=32))
    return root


MEMORY_CASES = {
    "prepare": (["prepare", "kvasir", "kv", "-o", "out/o.h5", "--size"], 16_384, 65_536),
    "train-order": (["train-order", "--data", "s32.h5", "--out", "out/run", "--size"], 4096, 65_536),
    "evaluate": (["evaluate", "--profile", "--model", "mkunet-t-order", "-o", "out/e", "--size"], 16_384, 65_536),
}


@pytest.mark.slow
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(sorted(MEMORY_CASES)), fraction=st.floats(0, 1))
def test_sizes_the_machine_cannot_hold_are_refused_with_the_largest_that_fits(case, fraction, tiny_sets):
    args, low, high = MEMORY_CASES[case]
    size = int(low + fraction * (high - low)) // 32 * 32
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    done = capped([*args, str(size)], tiny_sets)
    output = done.stdout + done.stderr
    assert done.returncode == EXIT_USAGE, output
    assert one_error(output) and "needs about" in output and "The largest that fits: --size" in output, output
    largest = int(output.split("The largest that fits: --size ")[1].split()[0].rstrip(".;"))
    assert 0 < largest < size
    assert not (tiny_sets / "out").exists()
    # the command stayed small: the refusal came from the estimate, not from memory running out
    assert max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024) < CAP


@pytest.mark.slow
@pytest.mark.parametrize("args", [
    ["prepare", "kvasir", "kv", "-o", "out/o.h5", "--size", "50000"],
    ["train-order", "--data", "s32.h5", "--out", "out/run", "--size", "4096", "--epochs", "1"],
], ids=["prepare", "train-order"])
def test_an_allocation_that_fails_during_the_work_is_out_of_memory(args, tiny_sets):
    """With the estimate switched off the work itself runs out of the capped memory: exit 4, "out of memory", a
    smaller-size hint and no --resume advice (there is nothing to resume)."""
    done = capped(args, tiny_sets, env={"LAWDER_NO_MEMORY_CHECK": "1"})
    output = done.stdout + done.stderr
    assert done.returncode in (EXIT_ENVIRONMENT,), output
    assert one_error(output) and "out of memory" in output and "smaller --size" in output, output
    assert "--resume" not in output
    assert done.returncode != EXIT_DATA


# ---------------------------------------------------------------- the estimate and the out-of-memory mapping, fast


def test_the_largest_value_that_fits_is_the_largest(monkeypatch):
    from lawder_core import limits

    monkeypatch.setattr(limits, "available_memory", lambda: 10 * 2**30)
    need = lambda s: s * s * 1000.0  # noqa: E731
    choice = limits.Choice("--size", 4096, need, 32, 32)
    largest = limits.largest_fitting(choice, limits.SHARE * 10 * 2**30)
    assert largest % 32 == 0 and need(largest) <= limits.SHARE * 10 * 2**30 < need(largest + 32)
    with pytest.raises(UsageError) as refused:
        limits.check_fits("train-order", [choice])
    assert f"--size {largest}" in refused.value.hint and "needs about 15.6 GiB" in refused.value.message
    monkeypatch.setenv("LAWDER_NO_MEMORY_CHECK", "1")
    limits.check_fits("train-order", [choice])  # skipped on request


def test_allocation_failures_are_out_of_memory_wherever_they_are_wrapped():
    from lawder_core.distributed.train import run_here
    from lawder_core.errors import EnvironmentProblem, out_of_memory

    torch_message = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes."
    wrapped = RuntimeError("Training failed due to controller error")
    wrapped.__cause__ = RuntimeError(torch_message)
    for error in (MemoryError(), RuntimeError(torch_message), wrapped, OSError(12, "Cannot allocate memory")):
        found = out_of_memory(error)
        assert isinstance(found, EnvironmentProblem) and found.exit_code == EXIT_ENVIRONMENT
        assert "--resume" not in found.hint and "smaller --size" in found.hint
    assert out_of_memory(ValueError("height and width must be > 0")) is None

    def train(cfg, report):
        raise RuntimeError(torch_message)

    with pytest.raises(EnvironmentProblem, match="out of memory"):
        run_here(train, None)
