"""Frozen dataclass configs, loadable from YAML/TOML/JSON with CLI overrides.

Every training command takes `--config FILE`; values given on the command line win over the file,
and the file wins over the dataclass defaults. Unknown keys are an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from lawder_core.errors import UsageError

C = TypeVar("C")


def read_config_file(path: str | Path) -> dict[str, Any]:
    import yaml  # here, not at import: the CLI reads its help defaults from the configs without it

    path = Path(path)
    if not path.exists():
        raise UsageError(f"config file {path} does not exist.")
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UsageError(f"config file {path} must end in .yaml, .yml, .toml or .json.")
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"config file {path} cannot be parsed: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a mapping of option names to values.")
    return data


def _coerce(tp: Any, value: Any) -> Any:
    """Turn YAML lists into tuples for tuple-typed fields and build nested dataclasses."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()  # a NumPy scalar from a search space: a plain int/float/bool
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            return _coerce(arg, value) if value is not None else None
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if tp is float and isinstance(value, int):
        return float(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build `cls` from a mapping, refusing unknown keys with the list of known ones."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} for {cls.__name__}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(hints[k], v) for k, v in data.items()}
    for key, value in values.items():
        _check_type(cls.__name__, key, hints[key], value)
    return cls(**values)  # type: ignore[call-arg]


SIMPLE_TYPES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check_type(owner: str, key: str, tp: Any, value: Any) -> None:
    """Refuse `size: "abc"`, `size: [64]` or `lr: .nan` in a config file before any work (not a TypeError
    mid-run)."""
    if _matches(tp, value):
        if isinstance(value, float) and not math.isfinite(value):  # YAML's .nan/.inf, JSON's NaN/Infinity
            raise UsageError(f"option {key!r} of {owner} must be a finite number, not {value}.",
                             "Fix the value in the config file or on the command line.")
        return
    raise UsageError(f"option {key!r} of {owner} must be {_describe(tp)}, not {value!r} ({type(value).__name__}).",
                     "Fix the value in the config file or on the command line.")


def _matches(tp: Any, value: Any) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(arg, value) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return isinstance(value, tuple) and all(any(_matches(a, v) for a in args) for v in value)
    return True  # nested dataclasses (checked by their own from_dict), Literal, Any, ...


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return "empty (null)"
    if origin is tuple:
        return "a list"
    return SIMPLE_TYPES.get(tp, getattr(tp, "__name__", str(tp)))


def build_config(cls: type[C], config_file: str | Path | None = None, **overrides: Any) -> C:
    """Defaults < config file < explicit overrides (None means 'not given')."""
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


PATH_FIELDS = ("data", "out", "synthetic", "pretrained", "segmenter", "fid_weights", "init_from")


def with_absolute_paths(config: C) -> C:
    """Ray workers run in their own working directory: relative paths must be resolved by the driver."""
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(config, **changes) if changes else config  # type: ignore[type-var]
