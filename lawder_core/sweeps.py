"""What `lawder tune` sweeps (its sweep spaces) and how a trial is scored, without Ray (the runner is
`distributed/tune.py`).

Search spaces are plain data (every LAW and ORDER knob marked for sweeping). A space maps a dotted config path
(`law.w_min`, `order.rho`) to a distribution:
  {"choice": [...]}, {"grid": [...]}, {"uniform": [low, high]}, {"loguniform": [low, high]},
  {"randint": [low, high]}. A key may also name a group: {"choice": [{"law.w_min": 0.5, "law.w_max": 2}, ...]}
sets several fields together (a clamp range is one choice, not two independent ones).
`--space FILE.yaml` replaces the built-in space with the same format.

A LAW trial is scored on generation quality, on a small fixed mask set, at every checkpoint (lower is better):
    val_score = 100 · KID(synthetic, real images) + (1 − mask adherence Dice)
KID uses the FID Inception features (`--fid-weights` or any file `lawder evaluate` finds); adherence segments
the synthetic images with a segmenter trained on real data (`--segmenter RUN`) and scores them against the
masks they were generated from. With only one of the two available, the score is that term alone; with
neither, the sweep refuses to start. 100 · KID and 1 − Dice both fall roughly in [0, 1] on small sets.
Adherence is judged on the lesion labels the trials train LAW with (`--lesion-labels`; KiTS: tumour and cyst).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lawder_core.config import build_config, from_dict, to_dict
from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.labels import lesion_labels
from lawder_core.errors import EnvironmentProblem, UsageError
from lawder_core.train.configs import DiffusionTrainConfig, SegTrainConfig

DISTRIBUTIONS = ("choice", "grid", "uniform", "loguniform", "randint")

CLAMP_RANGES = [(0.5, 2.0), (0.25, 4.0), (0.2, 5.0), (0.1, 10.0)]

SWEEP_SPACES: dict[str, dict[str, dict[str, Any]]] = {
    "law-clamp": {
        "clamp": {"grid": [{"law.w_min": lo, "law.w_max": hi} for lo, hi in CLAMP_RANGES]},
    },
    "law-reg": {
        "law.gamma": {"uniform": [0.0, 1.0]},
        "law.lambda_prior": {"loguniform": [0.5, 10.0]},
        "law.lambda_tv": {"uniform": [0.0, 1.0]},
        "law.beta_kl": {"loguniform": [0.001, 0.1]},
    },
    "order": {
        "order.rho": {"uniform": [0.1, 0.5]},
        "order.kv_grid": {"choice": [8, 16]},
        "order.aux_weight": {"uniform": [0.1, 0.4]},
    },
}


def load_sweep_space(kind: str, space_file: str | Path | None) -> dict[str, dict[str, Any]]:
    if kind not in SWEEP_SPACES:
        raise UsageError(f"unknown sweep {kind!r}; expected one of {sorted(SWEEP_SPACES)}.")
    if space_file is None:
        return SWEEP_SPACES[kind]
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
        (name, values), = dist.items()
        if name in RANGES and isinstance(values, list):
            dist[name] = [as_number(v) for v in values]
    return space


RANGES = ("uniform", "loguniform", "randint")


def as_number(value: Any) -> Any:
    """YAML 1.1 (PyYAML) reads 1e-3, without a dot, as text: a range's ends are numbers, so read such text as one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


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
        node, leaf = field_node(data, path, config)
        node[leaf] = value
    return from_dict(type(config), data)


def field_node(data: dict[str, Any], path: str, config: Any) -> tuple[dict[str, Any], str]:
    """The dict holding the field a dotted path names in `data` (a config as a dict), and the field's name."""
    node = data
    *parents, leaf = path.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            raise UsageError(f"search-space key {path!r} does not name a field of {type(config).__name__}.")
        node = node[part]
    if leaf not in node:
        raise UsageError(f"search-space key {path!r} does not name a field of {type(config).__name__}.")
    return node, leaf


def is_range(name: str, values: list[Any]) -> bool:
    numeric = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return name in RANGES and numeric and values[0] < values[1] and (name != "loguniform" or values[0] > 0)


MAX_CHECKED_POINTS = 4096


def check_space(base: Any, space: dict[str, dict[str, Any]]) -> None:
    """Refuse, before Ray starts, a space whose keys name no field of the sweep's config, a range that is not
    (low, high), and, when every distribution is discrete and the grid is not huge, any point whose config is
    invalid (e.g. LAW's clamp range with w_min above w_max). Else every trial would fail the same way, later."""
    data = to_dict(base)
    discrete: list[list[Any]] = []
    for key, dist in space.items():
        (name, values), = dist.items()
        if not isinstance(values, list) or not values:
            raise UsageError(f"search space: {key}: {name} needs a list of values, got {values!r}.")
        groups = [v for v in values if isinstance(v, dict)]  # grouped points ({law.w_min: .., law.w_max: ..})
        for path in {p for group in groups for p in group} if groups else {key}:
            field_node(data, path, base)
        if name in ("grid", "choice"):
            discrete.append([{key: v} for v in values])
        elif not is_range(name, values):
            raise UsageError(f"search space: {key}: {name} needs [low, high] with low < high"
                             f"{' and low > 0' if name == 'loguniform' else ''}, got {values!r}.")
    if len(discrete) != len(space) or np.prod([len(d) for d in discrete]) > MAX_CHECKED_POINTS:
        return
    for point in itertools.product(*discrete):
        params = {k: v for part in point for k, v in part.items()}
        try:
            apply_params(base, params)
        except UsageError as err:
            raise UsageError(f"search-space point {flatten_params(params)} is not a valid configuration: "
                             f"{err.message}", err.hint) from err


# ---------------------------------------------------------------- scoring a LAW trial

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


def tune_lesion_labels(cfg: LawTuneConfig) -> tuple[int, ...]:
    """The lesion labels every trial trains LAW with and adherence judges; a bad --lesion-labels is a UsageError
    (the command calls this before the sweep starts)."""
    return lesion_labels(read_info(cfg.data).label_names, cfg.lesion_labels)


def sweep_base_config(kind: str, config_file: str | Path | None, *, data: str, out: str, budget: int,
                      seed: int | None, segmenter: str | None = None, fid_weights: str | None = None,
                      lesion_labels: str | None = None) -> SegTrainConfig | LawTuneConfig:
    """The config every trial of a `kind` sweep starts from: defaults < `config_file` < the sweep's options.
    `budget` is epochs for ORDER and evaluation rounds for LAW. A bad lesion-label name is refused here,
    before Ray starts."""
    if kind == "order":
        if lesion_labels is not None:
            raise UsageError("--lesion-labels applies to the LAW sweeps only.", "Drop it for `lawder tune order`.")
        return build_config(SegTrainConfig, config_file, data=data, out=out, epochs=budget, seed=seed)
    base = build_config(LawTuneConfig, config_file, data=data, out=out, rounds=budget, seed=seed,
                        segmenter=segmenter, fid_weights=fid_weights, lesion_labels=lesion_labels)
    if base.lesion_labels is not None:
        tune_lesion_labels(base)
    return base


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
    """Real images and their masks at the model's size: the masks condition sampling, the images anchor KID."""
    from lawder_core.data.resize import resize_images, resize_masks

    images, masks, _ = load_arrays(cfg.data, cfg.eval_split, limit=cfg.eval_masks)
    if len(masks) < 2:
        images, masks, _ = load_arrays(cfg.data, "train", limit=cfg.eval_masks)
    return resize_images(images, cfg.size), resize_masks(masks, cfg.size)


def generation_score(cfg: LawTuneConfig, run: str, terms: dict[str, bool], images: np.ndarray,
                     masks: np.ndarray, device: str = "auto") -> dict[str, Any]:
    """Sample one image per evaluation mask from the run's latest checkpoint and score it, all on `device`
    ('auto': a GPU when there is one)."""
    from lawder_core.environment import pick_device
    from lawder_core.sample import sample_pairs

    device = str(pick_device(device))
    synthetic = sample_pairs(run, masks, steps=cfg.eval_sampling_steps, seed=cfg.seed, device=device)
    result: dict[str, Any] = {}
    score = 0.0
    if terms["kid"]:
        from lawder_core.metrics.fid import compute_fid_kid

        kid = compute_fid_kid(images, synthetic, fid=False, kid=True, weights=cfg.fid_weights,
                              kid_subset_size=len(masks), allow_download=False, device=device).kid
        result["val_kid"] = kid
        score += KID_SCALE * kid
    if terms["adherence"]:
        from lawder_core.metrics.adherence import mask_adherence, segmenter_classes
        from lawder_core.predictor import load_predictor

        predictor = load_predictor(cfg.segmenter, device=device)  # type: ignore[arg-type]
        classes = segmenter_classes(predictor.label_map, predictor.num_classes, read_info(cfg.data).label_names)
        adherence = mask_adherence(predictor.predict_fn, synthetic, masks, lesion_labels=tune_lesion_labels(cfg),
                                   classes=classes, device=device)["dice_mean"]
        result["val_adherence"] = adherence
        score += 1.0 - adherence
    result["val_score"] = score
    return result
