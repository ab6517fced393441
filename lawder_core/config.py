"""Frozen dataclass configs, loadable from YAML/TOML/JSON with CLI overrides.

Every training command takes `--config FILE`; values given on the command line win over the file,
and the file wins over the dataclass defaults. Unknown keys are an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib
import yaml

from lawder_core.errors import UsageError

C = TypeVar("C")


def read_config_file(path: str | Path) -> dict[str, Any]:
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
    return cls(**{k: _coerce(hints[k], v) for k, v in data.items()})  # type: ignore[call-arg]


def build_config(cls: type[C], config_file: str | Path | None = None, **overrides: Any) -> C:
    """Defaults < config file < explicit overrides (None means 'not given')."""
    data: dict[str, Any] = read_config_file(config_file) if config_file else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


PATH_FIELDS = ("data", "out", "synthetic", "pretrained", "segmenter", "fid_weights")


def with_absolute_paths(config: C) -> C:
    """Ray workers run in their own working directory: relative paths must be resolved by the driver."""
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value and "://" not in value and not Path(value).is_absolute():
            changes[name] = str(Path(value).resolve())
    return dataclasses.replace(config, **changes) if changes else config  # type: ignore[type-var]
