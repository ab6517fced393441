"""What a LAW sweep optimises: generation quality on a small fixed mask set, measured during training.

Objective (lower is better), computed at every checkpoint of a trial:
    val_score = 100 · KID(synthetic, real val images) + (1 − mask adherence Dice)
KID uses the FID Inception features (`--fid-weights` or any file `lawder evaluate` finds); adherence segments
the synthetic images with a segmenter trained on real data (`--segmenter RUN`) and scores them against the
masks they were generated from. With only one of the two available, the score is that term alone; with
neither, the sweep refuses to start. 100 · KID and 1 − Dice both fall roughly in [0, 1] on small sets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from lawder_core.data.h5 import load_arrays
from lawder_core.errors import EnvironmentProblem, UsageError
from lawder_core.train.diffusion import DiffusionTrainConfig

KID_SCALE = 100.0


@dataclass(frozen=True)
class LawTuneConfig(DiffusionTrainConfig):
    """A diffusion training config plus how each trial is scored; `rounds` evaluations per trial."""

    rounds: int = 4
    steps_per_round: int = 250
    eval_masks: int = 32
    eval_split: str = "val"
    eval_sampling_steps: int = 25
    segmenter: str | None = None
    fid_weights: str | None = None

    # Left out of best.yaml, which `train-law --config` must accept as is.
    TUNE_ONLY_FIELDS = ("rounds", "steps_per_round", "eval_masks", "eval_split", "eval_sampling_steps",
                        "segmenter", "fid_weights")


def training_config(cfg: LawTuneConfig, out: str, resume: bool) -> DiffusionTrainConfig:
    """The plain training config of one trial: `rounds × steps_per_round` steps, a checkpoint per round."""
    data = {f.name: getattr(cfg, f.name) for f in fields(DiffusionTrainConfig)}
    steps = cfg.rounds * cfg.steps_per_round
    data.update(out=out, resume=resume, steps=steps, save_every=cfg.steps_per_round, sample_every=0,
                log_every=cfg.steps_per_round)
    return DiffusionTrainConfig(**data)


def scoring_terms(cfg: LawTuneConfig) -> dict[str, bool]:
    """Which terms can be computed here; refuse a sweep that could score nothing."""
    from lawder_core.metrics.fid import resolve_fid_weights

    try:
        resolve_fid_weights(cfg.fid_weights, allow_download=False)
        kid = True
    except EnvironmentProblem:
        kid = False
    if not kid and cfg.segmenter is None:
        raise UsageError("a LAW sweep needs something to score generation with: no FID Inception weights were "
                         "found and no --segmenter was given.",
                         "Pass --segmenter RUN (a train-order run on real data) and/or --fid-weights FILE.")
    return {"kid": kid, "adherence": cfg.segmenter is not None}


def evaluation_set(cfg: LawTuneConfig) -> tuple[np.ndarray, np.ndarray]:
    images, masks, _ = load_arrays(cfg.data, cfg.eval_split, limit=cfg.eval_masks)
    if len(masks) < 2:
        images, masks, _ = load_arrays(cfg.data, "train", limit=cfg.eval_masks)
    return images, masks


def generation_score(cfg: LawTuneConfig, run: str, terms: dict[str, bool], images: np.ndarray,
                     masks: np.ndarray) -> dict[str, Any]:
    """Sample one image per evaluation mask from the run's latest checkpoint and score it."""
    from lawder_core.sample import sample_pairs

    synthetic = sample_pairs(run, masks, steps=cfg.eval_sampling_steps, seed=cfg.seed)
    result: dict[str, Any] = {}
    score = 0.0
    if terms["kid"]:
        from lawder_core.metrics.fid import compute_fid_kid

        real = images if cfg.size == images.shape[1] else resize_square(images, cfg.size)
        kid = compute_fid_kid(real, synthetic, fid=False, kid=True, weights=cfg.fid_weights,
                              kid_subset_size=len(masks), allow_download=False).kid
        result["val_kid"] = kid
        score += KID_SCALE * kid
    if terms["adherence"]:
        from lawder_core.inference import load_predictor
        from lawder_core.metrics.adherence import mask_adherence

        predictor = load_predictor(cfg.segmenter)  # type: ignore[arg-type]
        adherence = mask_adherence(predictor.predict_fn, synthetic, masks)["dice_mean"]
        result["val_adherence"] = adherence
        score += 1.0 - adherence
    result["val_score"] = score
    return result


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    from lawder_core.inference import resize_images

    return resize_images(images, size)
