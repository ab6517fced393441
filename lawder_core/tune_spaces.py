"""Search spaces of `lawder tune` as plain data (DESIGN §1.1–1.2 sweeps), and how a trial's values enter a config.

A space maps a dotted config path (`law.w_min`, `order.rho`) to a distribution:
  {"choice": [...]}, {"grid": [...]}, {"uniform": [low, high]}, {"loguniform": [low, high]},
  {"randint": [low, high]}. A key may also name a group: {"choice": [{"law.w_min": 0.5, "law.w_max": 2}, ...]}
sets several fields together (a clamp range is one choice, not two independent ones).
`--space FILE.yaml` replaces the built-in space with the same format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from lawder_core.config import from_dict, to_dict
from lawder_core.errors import UsageError

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

CLAMP_RANGES = [(0.5, 2.0), (0.25, 4.0), (0.2, 5.0), (0.1, 10.0)]

SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "law-clamp": {
        "clamp": {"grid": [{"law.w_min": lo, "law.w_max": hi} for lo, hi in CLAMP_RANGES]},
    },
    "law-reg": {
        "law.objective": {"choice": ["joint", "adversarial"]},
        "law.lambda_prior": {"loguniform": [0.01, 1.0]},
        "law.lambda_tv": {"uniform": [0.0, 0.01]},
        "law.entropy_weight": {"loguniform": [0.001, 0.1]},
    },
    "order": {
        "order.rho": {"uniform": [0.1, 0.5]},
        "order.kv_grid": {"choice": [8, 16, 32]},
        "order.attn_dim": {"choice": [32, 48, 64]},
        "order.late_stages": {"choice": [2, 3]},
    },
}


def load_space(kind: str, space_file: str | Path | None) -> dict[str, dict[str, Any]]:
    if kind not in SPACES:
        raise UsageError(f"unknown sweep {kind!r}; expected one of {sorted(SPACES)}.")
    if space_file is None:
        return SPACES[kind]
    try:
        space = yaml.safe_load(Path(space_file).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UsageError(f"cannot read the search space {space_file}: {err}") from err
    if not isinstance(space, dict) or not space:
        raise UsageError(f"{space_file} must map config paths to distributions.",
                         "For example:  order.rho: {uniform: [0.1, 0.5]}")
    for key, dist in space.items():
        if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise UsageError(f"{space_file}: {key} must be one of {DISTRIBUTIONS} with its values, got {dist!r}.")
    return space


def flatten_params(params: dict[str, Any]) -> dict[str, Any]:
    """Expand grouped choices ({'clamp': {'law.w_min': .., 'law.w_max': ..}}) into dotted paths."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def apply_params(config: Any, params: dict[str, Any]) -> Any:
    """A copy of the frozen `config` with dotted paths set (nested dataclasses are rebuilt and re-validated)."""
    data = to_dict(config)
    for path, value in flatten_params(params).items():
        node = data
        *parents, leaf = path.split(".")
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise UsageError(f"search-space key {path!r} does not name a field of {type(config).__name__}.")
            node = node[part]
        if leaf not in node:
            raise UsageError(f"search-space key {path!r} does not name a field of {type(config).__name__}.")
        node[leaf] = value
    return from_dict(type(config), data)
