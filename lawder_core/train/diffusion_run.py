"""The layout of a `lawder train-law` run folder, shared by the trainer and the sampler.

    RUN/train_config.json           the DiffusionTrainConfig
    RUN/metrics.jsonl               one JSON line per logged step
    RUN/samples/step_000500.png     preview grids: image, mask, weight map, EMA sample
    RUN/checkpoint/                 replaced atomically at every save
        denoiser/                   trained weights, diffusers save_pretrained layout (+ lawder_denoiser.json)
        denoiser_ema/               the EMA weights in the same layout: what `lawder sample` uses
        law.safetensors, law.json   LAW's weights and config (weighting 'law' only)
        training_state.pt           optimiser / LR-schedule / scaler state, tensors only (weights_only loading)
        progress.json               {"step": ..., "ema_updates": ...}
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from lawder_core.errors import DataError
from lawder_core.models.denoiser import SPEC_FILE, DenoiserSpec, read_spec

METRICS = "metrics.jsonl"
SAMPLES = "samples"
CHECKPOINT = "checkpoint"
DENOISER = "denoiser"
DENOISER_EMA = "denoiser_ema"
LAW_WEIGHTS = "law.safetensors"
LAW_CONFIG = "law.json"
TRAINING_STATE = "training_state.pt"
PROGRESS = "progress.json"

_PARTIAL = ".partial"
_OLD = ".old"


def find_checkpoint(run: Path) -> Path | None:
    """The run's checkpoint, including one left as `.old` by a crash in the middle of a swap."""
    final = run / CHECKPOINT
    if (final / PROGRESS).exists():
        return final
    old = run / (CHECKPOINT + _OLD)
    if (old / PROGRESS).exists():
        return old
    return None


def partial_checkpoint(run: Path) -> Path:
    """A fresh folder to write the next checkpoint into."""
    tmp = run / (CHECKPOINT + _PARTIAL)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(tmp: Path, run: Path) -> Path:
    """Swap the finished folder in: at every instant either the old or the new checkpoint is complete."""
    final, old = run / CHECKPOINT, run / (CHECKPOINT + _OLD)
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def read_progress(checkpoint: Path) -> dict:
    return json.loads((checkpoint / PROGRESS).read_text())


@dataclass(frozen=True)
class RunInfo:
    """What `lawder sample` needs to know about a trained run."""

    model_folder: Path  # the EMA denoiser, loadable with load_denoiser
    step: int
    spec: DenoiserSpec


def run_info(run: str | os.PathLike) -> RunInfo:
    """Accepts a run folder, its checkpoint folder, or a saved denoiser folder."""
    run = Path(run)
    if (run / SPEC_FILE).exists():
        checkpoint = run.parent
        model = run
    else:
        checkpoint = find_checkpoint(run) or run
        model = checkpoint / DENOISER_EMA
    if not (model / SPEC_FILE).exists():
        raise DataError(f"{run} holds no trained diffusion model (looked for {model}).",
                        "Train one with `lawder train-law --out RUN`, then pass --run RUN.")
    step = read_progress(checkpoint)["step"] if (checkpoint / PROGRESS).exists() else -1
    return RunInfo(model_folder=model, step=int(step), spec=read_spec(model))
