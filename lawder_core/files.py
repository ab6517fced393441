"""Writing files so that a killed process never leaves half of one, and reading JSON-lines logs back.

Every writer in lawder goes through `atomic_save`: write under a temporary name in the same folder, then
rename, which POSIX makes atomic. Readers therefore see the old file or the new one, never a torn one.

JSON is written as JSON: a NaN or infinity (a Dice left out by `--empty-policy nan`, a metric that is undefined)
becomes null on purpose (`json_text`), never the `NaN`/`Infinity` other parsers refuse; configs refuse such
values before they get here (`numbers.py`, `config.py`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTIAL_SUFFIX = ".partial"


def atomic_save(save: Callable[[Path], None], path: str | os.PathLike) -> Path:
    """Call `save(tmp)` then rename tmp to `path`; a unique tmp name lets two writers race without tearing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_save(lambda p: p.write_text(text), path)


def finite(data: Any) -> Any:
    """`data` with every non-finite float (NaN, ±inf) replaced by None, through dicts, lists and tuples."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(v) for v in data]
    return data


def json_text(data: Any, indent: int | None = None) -> str:
    """Strict JSON (`allow_nan=False`): non-finite floats as null, anything else unknown as its str()."""
    return json.dumps(finite(data), indent=indent, default=str, allow_nan=False)


def write_json(path: str | os.PathLike, data: Any, indent: int = 1) -> Path:
    return write_text(path, json_text(data, indent) + "\n")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> Path:
    return write_text(path, "".join(json_text(r) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json_text(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every complete line; a line torn by a kill mid-append is skipped, not fatal."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
