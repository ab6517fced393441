"""The CLI starts at once: --help, --version, inspect and usage errors never import torch (or other heavy libraries).

The checks run in a fresh interpreter (this test process has long imported torch) and assert on what was
imported, not on wall-clock time, which depends on the machine's load. Shared options have one default each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from lawder_core.errors import EXIT_DATA, EXIT_OK, EXIT_USAGE

HEAVY = ("torch", "diffusers", "ray", "matplotlib", "cleanfid", "segmentation_models_pytorch")
# Nothing but Typer, Rich and the standard library for these two: not even numpy.
BARE = ("numpy", "h5py", "yaml", "PIL")



def every_command() -> list[tuple[str, ...]]:
    """Every command line's command words, read from the app itself (groups such as `export` and their commands)."""
    import typer.main

    from lawder_cli.main import app

    def walk(group: object, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, command in group.commands.items():  # type: ignore[attr-defined]
            found.append((*prefix, name))
            if hasattr(command, "commands"):  # a group (Typer carries its own Click: no isinstance check)
                found += walk(command, (*prefix, name))
        return found

    return walk(typer.main.get_group(app), ())


COMMANDS = tuple(words[0] for words in every_command() if len(words) == 1)

# (arguments, exit code, a piece of the message): one usage error per command, in the order they run.
USAGE_ERRORS: list[tuple[list[str], int, str]] = [
    (["prepare", "nope", "-o", "{tmp}/x.h5"], EXIT_USAGE, "unknown source 'nope'"),
    (["prepare", "kits", "-o", "{tmp}/x.h5"], EXIT_USAGE, "needs the KiTS folder"),
    (["prepare", "kits", "{tmp}", "-o", "{tmp}/x.h5", "--window=300,-79"], EXIT_USAGE, "LOW must be below HIGH"),
    (["prepare", "synthetic", "-o", "{tmp}/x.h5", "--resize", "crop"], EXIT_USAGE, "--resize must be one of"),
    (["prepare", "folder", "--images", "{tmp}", "-o", "{tmp}/x.h5"], EXIT_USAGE, "needs --images DIR and --masks DIR"),
    (["inspect", "{tmp}/missing.h5"], EXIT_DATA, "missing.h5"),
    (["env", "--nope"], EXIT_USAGE, "No such option"),
    (["train-order", "--data", "d.h5", "--out", "{tmp}/o", "--workers", "-1"], EXIT_USAGE, "--workers"),
    (["train-law", "--data", "d.h5", "--out", "{tmp}/o", "--gpus", "-2"], EXIT_USAGE, "--gpus"),
    (["sample", "--masks", "m.h5", "-o", "{tmp}/s.h5"], EXIT_USAGE, "--run"),
    (["predict", "--run", "r", "-o", "{tmp}/p"], EXIT_USAGE, "Missing argument 'INPUT'"),
    (["tune", "everything", "--data", "d.h5", "--out", "{tmp}/t"], EXIT_USAGE, "everything"),
    (["evaluate", "-o", "{tmp}/e"], EXIT_USAGE, "Nothing to evaluate"),
    (["evaluate", "--fid", "--real", "r", "--synthetic", "s", "--min-dice", "0.8", "-o", "{tmp}/e"], EXIT_USAGE,
     "--min-dice 0.8 was given without --dice"),
    (["compare", "A={tmp}/a"], EXIT_USAGE, "needs at least two arms"),
    (["compare", "A={tmp}/none", "B={tmp}/none"], EXIT_DATA, "matches no file"),
    (["pipeline", "--preset", "nope", "--out", "{tmp}/p"], EXIT_USAGE, "unknown --preset 'nope'"),
    (["pipeline", "--source", "nope", "--out", "{tmp}/p"], EXIT_USAGE, "unknown --source 'nope'"),
    (["pipeline", "--source", "kvasir", "--out", "{tmp}/p"], EXIT_USAGE, "needs the input folder"),
    (["pipeline", "--data", "{tmp}/none.h5", "--out", "{tmp}/p"], EXIT_DATA, "does not exist"),
    (["export", "onnx", "--run", "{tmp}/none", "-o", "{tmp}/x.onnx"], EXIT_DATA, "holds no segmenter checkpoint"),
    (["export", "nnunet", "{tmp}/none.h5", "--out", "{tmp}/n"], EXIT_USAGE, "--dataset-id"),
]

# Runs each case through Typer's CliRunner in one fresh interpreter and records, after each, which of the
# watched modules are loaded: the first case that pulls in torch is the one that shows it.
PROBE = textwrap.dedent("""
    import json, sys
    from typer.testing import CliRunner
    from lawder_cli.main import app

    watched = {watched!r}
    results = []
    for args in json.loads(sys.argv[1]):
        result = CliRunner().invoke(app, args, terminal_width=200)
        results.append({{"args": args, "exit_code": result.exit_code, "output": result.output,
                         "loaded": sorted(m for m in watched if m in sys.modules)}})
    print(json.dumps(results))
""")


def probe(cases: list[list[str]]) -> list[dict]:
    code = PROBE.format(watched=HEAVY + BARE)
    done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_help_and_version_import_only_typer_and_rich():
    results = probe([["--help"], ["--version"]])
    for result in results:
        assert result["exit_code"] == EXIT_OK, result["output"]
        assert result["loaded"] == [], f"lawder {' '.join(result['args'])} imported {result['loaded']}"
    assert results[1]["output"].startswith("lawder ")
    for command in COMMANDS:
        assert command in results[0]["output"]


def test_the_startup_checks_cover_every_command():
    assert {"prepare", "train-order", "train-law", "export"} <= set(COMMANDS)
    assert {args[0] for args, _, _ in USAGE_ERRORS} == set(COMMANDS)  # one usage error (at least) per command


def test_every_command_help_starts_without_torch():
    for result in probe([[*words, "--help"] for words in every_command()]):
        heavy = [m for m in result["loaded"] if m in HEAVY]
        assert result["exit_code"] == EXIT_OK, result["output"]
        assert heavy == [], f"lawder {' '.join(result['args'])} imported {heavy}"


def test_usage_errors_and_inspect_come_back_without_torch(tmp_path):
    data = tmp_path / "small.h5"
    cases = [[a.format(tmp=tmp_path) for a in args] for args, _, _ in USAGE_ERRORS]
    cases += [["prepare", "synthetic", "-o", str(data), "--n", "6", "--size", "16"], ["inspect", str(data), "--json"]]
    results = probe(cases)
    for (args, code, message), result in zip(USAGE_ERRORS, results, strict=False):
        assert result["exit_code"] == code, f"lawder {' '.join(args)}: {result['output']}"
        assert message in flat(result["output"]), result["output"]
        assert "Traceback" not in result["output"]
    for result in results:
        heavy = [m for m in result["loaded"] if m in HEAVY]
        assert heavy == [], f"lawder {' '.join(result['args'])} imported {heavy}"
    prepared, inspected = results[-2:]
    assert prepared["exit_code"] == EXIT_OK, prepared["output"]
    assert inspected["exit_code"] == EXIT_OK and json.loads(inspected["output"])["samples"] == 6
    assert not (tmp_path / "p").exists()  # the pipeline refused before writing anything


def test_the_installed_entry_point_answers_version():
    lawder = Path(sys.executable).with_name("lawder")
    assert lawder.exists(), "`pip install -e .` installs the lawder console script beside the interpreter"
    done = subprocess.run([str(lawder), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("lawder ")


# ---------------------------------------------------------------- one default per shared option

SHARED_DEFAULTS = {"--seed": None, "--gpus": 0, "--workers": 0, "--json": False, "--force": False, "--resume": False,
                   "--ray-address": None, "--storage": None, "--config": None}


def test_shared_options_have_one_default_and_one_help_text():
    import typer.main

    from lawder_cli.main import app

    group = typer.main.get_group(app)
    seen: dict[str, set] = {name: set() for name in SHARED_DEFAULTS}
    for name, command in group.commands.items():
        for param in command.params:
            for flag in param.opts:
                if flag in SHARED_DEFAULTS:
                    assert param.default == SHARED_DEFAULTS[flag], f"lawder {name} {flag} defaults to {param.default}"
                    seen[flag].add(param.help)
    assert all(len(helps) == 1 for helps in seen.values()), seen
    assert seen["--seed"] and seen["--workers"] and seen["--resume"]


def test_evaluate_help_names_the_fid_weights_variable():
    from lawder_cli.evaluate import WEIGHTS_ENV
    from lawder_core.metrics.fid import WEIGHTS_ENV as CORE_WEIGHTS_ENV

    assert WEIGHTS_ENV == CORE_WEIGHTS_ENV


# Requests that are well-formed for the option parser but wrong for lawder: still refused before torch loads.
SEMANTIC_ERRORS: list[tuple[list[str], int, str]] = [
    (["train-order", "--data", "{data}", "--out", "{tmp}/o", "--model", "mkunet-typo"], EXIT_USAGE,
     "unknown model 'mkunet-typo'"),
    (["train-order", "--data", "{data}", "--out", "{tmp}/o", "--size", "30"], EXIT_USAGE, "divisible by 32"),
    (["train-order", "--data", "{tmp}/none.h5", "--out", "{tmp}/o"], EXIT_DATA, "none.h5"),
    (["train-law", "--data", "{data}", "--out", "{tmp}/l", "--size", "30"], EXIT_USAGE, "divisible by 8"),
    (["train-law", "--data", "{data}", "--out", "{tmp}/l", "--w-min", "2"], EXIT_USAGE, "factor range"),
    (["train-law", "--data", "{data}", "--out", "{tmp}/l", "--prediction", "x0"], EXIT_USAGE, "prediction"),
    (["sample", "--run", "{tmp}/norun", "--masks", "{data}", "-o", "{tmp}/s.h5"], EXIT_DATA, "no trained"),
    (["sample", "--run", "{tmp}/norun", "--masks", "{data}", "-o", "{tmp}/s.h5", "--scheduler", "nope"], EXIT_USAGE,
     "--scheduler"),
    (["tune", "order", "--data", "{data}", "--out", "{tmp}/t", "--scheduler", "hyperband"], EXIT_USAGE,
     "--scheduler"),
    (["evaluate", "--profile", "--model", "mkunet-typo", "-o", "{tmp}/e"], EXIT_USAGE, "mkunet-typo"),
    (["predict", "{data}", "--run", "{tmp}/norun", "-o", "{tmp}/p"], EXIT_DATA, "no segmenter checkpoint"),
    (["predict", "{data}", "--run", "{tmp}/norun", "-o", "{tmp}/p", "--mode", "turbo"], EXIT_USAGE, "turbo"),
    (["predict", "{tmp}/none.h5", "--run", "{tmp}/norun", "-o", "{tmp}/p"], EXIT_DATA, "none.h5"),
    (["evaluate", "--dice", "--run", "{tmp}", "--data", "{data}", "--mode", "turbo", "-o", "{tmp}/e"], EXIT_USAGE,
     "turbo"),
]


def test_requests_wrong_for_lawder_are_refused_without_torch(tmp_path):
    data = tmp_path / "small.h5"
    cases = [["prepare", "synthetic", "-o", str(data), "--n", "6", "--size", "16"]]
    cases += [[a.format(tmp=tmp_path, data=data) for a in args] for args, _, _ in SEMANTIC_ERRORS]
    results = probe(cases)
    assert results[0]["exit_code"] == EXIT_OK, results[0]["output"]
    for (args, code, message), result in zip(SEMANTIC_ERRORS, results[1:], strict=True):
        assert result["exit_code"] == code, f"lawder {' '.join(args)}: {result['output']}"
        assert message in flat(result["output"]), result["output"]
        heavy = [m for m in result["loaded"] if m in HEAVY]
        assert heavy == [], f"lawder {' '.join(args)} imported {heavy}"
    assert not any((tmp_path / name).exists() for name in ("o", "l", "t", "s.h5", "p"))
