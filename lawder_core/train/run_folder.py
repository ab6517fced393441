"""A self-describing run folder (nnU-Net's idea): config, metrics, checkpoints, all in one place."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lawder_core.errors import UsageError
from lawder_core.train.runtime import atomic_save

STATE_FILE = "training_state.pt"


def prepare_run_folder(out: str | Path, resume: bool, force: bool, marker: str = "last") -> Path:
    """Refuse to clobber an earlier run: --resume continues it, --force starts over."""
    out = Path(out)
    started = (out / marker).exists() or (out / "metrics.jsonl").exists()
    if started and not (resume or force):
        raise UsageError(f"{out} already holds a run.",
                         "Pass --resume to continue it, --force to start over, or choose another --out.")
    if started and force and not resume:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_training_state(folder: Path, state: dict[str, Any]) -> None:
    """Optimiser / scheduler / counters: tensors and plain containers only, so weights_only loading works."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(lambda p: torch.save(state, p), folder / STATE_FILE)


def load_training_state(folder: Path) -> dict[str, Any] | None:
    path = folder / STATE_FILE
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, data: Any) -> None:
    atomic_save(lambda p: p.write_text(json.dumps(data, indent=1, default=str)), path)
