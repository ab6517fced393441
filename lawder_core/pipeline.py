"""`lawder pipeline`: the paper's whole cycle, as stages that hand over files (and resume).

prepare → train-law (uniform, law) → sample one synthetic set from each → train-order for
{mkunet-t, mkunet-t-order} × {real, real + LAW synthetic, real + uniform synthetic} × seeds → evaluate
(FID/KID, Dice, mask adherence, profile) → report. A stage whose output is complete is skipped, so an
interrupted pipeline picks up where it stopped. Stages call the same core functions as the commands.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.distributed.train import LaunchConfig, train_law, train_order
from lawder_core.errors import EnvironmentProblem, UsageError
from lawder_core.files import write_json
from lawder_core.runs import read_metrics
from lawder_core.train.diffusion import DiffusionTrainConfig
from lawder_core.train.seg import SegTrainConfig

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "law")
SEG_MODELS = ("mkunet-t", "mkunet-t-order")
SEG_DATA = ("real", "real+law", "real+uniform")


@dataclass(frozen=True)
class Preset:
    """Budgets of one pipeline run; `tiny` is for tests, `cpu-small` for the demo, `gpu-paper` for the paper."""

    size: int
    synthetic_n: int  # samples of the built-in data set when no data is given
    denoiser: str  # UNet2DModel preset
    law_steps: int
    law_batch: int
    sample_steps: int
    seg_epochs: int
    seg_batch: int
    seeds: tuple[int, ...]
    workers: int = 1  # CPU workers per training (gpus take precedence)
    gpus: int = 0
    max_steps_per_epoch: int | None = None
    previews: int = 3  # LAW weight-map / sample grids written during each diffusion training
    sample_limit: int | None = None  # synthetic images per set: one per training mask, at most this many


PRESETS = {
    "tiny": Preset(size=32, synthetic_n=24, denoiser="tiny", law_steps=2, law_batch=4, sample_steps=2,
                   seg_epochs=1, seg_batch=4, seeds=(0,), workers=0, max_steps_per_epoch=2, previews=1),
    # cpu-small is sized so `make demo` finishes in ~13 minutes on 2 idle cores (measured, README)
    "cpu-small": Preset(size=64, synthetic_n=240, denoiser="small", law_steps=200, law_batch=8, sample_steps=15,
                        seg_epochs=10, seg_batch=16, seeds=(0,), workers=1, sample_limit=192),
    "gpu-paper": Preset(size=256, synthetic_n=1000, denoiser="base", law_steps=3000, law_batch=32,
                        sample_steps=50, seg_epochs=200, seg_batch=16, seeds=(0, 1, 2), workers=1, gpus=1),
}


@dataclass(frozen=True)
class PipelineConfig:
    out: str
    preset: str = "cpu-small"
    data: str | None = None  # a prepared HDF5; None: build the synthetic set
    seed: int = 0
    fid_weights: str | None = None
    gpus: int | None = None  # override the preset
    workers: int | None = None
    ray_address: str | None = None


def preset_of(cfg: PipelineConfig) -> Preset:
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown --preset {cfg.preset!r}; expected one of {sorted(PRESETS)}.")
    preset = PRESETS[cfg.preset]
    overrides = {k: v for k, v in (("gpus", cfg.gpus), ("workers", cfg.workers)) if v is not None}
    return replace(preset, **overrides)


class Stages:
    """Paths of every artefact, and one method per stage that does nothing when its output is complete."""

    def __init__(self, cfg: PipelineConfig, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.preset = preset_of(cfg)
        self.out = Path(cfg.out)
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.timings: dict[str, float] = {}

    # ---------------------------------------------------------------- paths
    @property
    def data(self) -> Path:
        return Path(self.cfg.data) if self.cfg.data else self.out / "data" / "synthetic.h5"

    def law_run(self, weighting: str) -> Path:
        return self.out / "law" / weighting

    def synthetic(self, weighting: str) -> Path:
        return self.out / "synthetic" / f"{weighting}.h5"

    def seg_run(self, model: str, data: str, seed: int) -> Path:
        return self.out / "seg" / f"{model}__{data.replace('+', '_')}__s{seed}"

    def launch_config(self, name: str) -> LaunchConfig:
        return LaunchConfig(gpus=self.preset.gpus, workers=self.preset.workers, ray_address=self.cfg.ray_address,
                            name=name)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        tic = time.perf_counter()
        result = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - tic
        return result

    # ---------------------------------------------------------------- stages
    def prepare(self) -> None:
        if self.data.exists():
            read_info(self.data)  # a clear error now if it is not a lawder file
            return
        if self.cfg.data:
            raise UsageError(f"--data {self.data} does not exist.")
        from lawder_core.data.prepare import PrepareOptions
        from lawder_core.data.synthetic import prepare_synthetic

        self.say(f"prepare: {self.preset.synthetic_n} synthetic samples at {self.preset.size} px")
        prepare_synthetic(self.data, n=self.preset.synthetic_n, size=self.preset.size, seed=self.cfg.seed,
                          options=PrepareOptions(seed=self.cfg.seed))

    def train_law(self, weighting: str) -> None:
        run = self.law_run(weighting)
        records = read_metrics(run)
        if records and records[-1].get("step") == self.preset.law_steps and "checkpoint" in records[-1]:
            return
        self.say(f"train-law --weighting {weighting}: {self.preset.law_steps} steps")
        cfg = DiffusionTrainConfig(data=str(self.data), out=str(run), size=self.preset.size,
                                   steps=self.preset.law_steps, batch_size=self.preset.law_batch,
                                   weighting=weighting, preset=self.preset.denoiser, seed=self.cfg.seed,
                                   save_every=max(1, self.preset.law_steps // 3),
                                   sample_every=max(1, self.preset.law_steps // self.preset.previews),
                                   log_every=max(1, self.preset.law_steps // 20), resume=True)
        train_law(cfg, self.launch_config(f"law-{weighting}"))

    def sample(self, weighting: str) -> None:
        out = self.synthetic(weighting)
        if out.exists():
            return
        from lawder_core.sample import sample_pairs, write_synthetic_h5

        _, masks, cases = load_arrays(self.data, "train")
        if self.preset.sample_limit is not None and len(masks) > self.preset.sample_limit:
            # a seeded subset of the training masks, in file order: the CPU preset's sampling budget
            keep = np.sort(np.random.default_rng(self.cfg.seed).permutation(len(masks))[:self.preset.sample_limit])
            masks, cases = masks[keep], cases[keep]
        self.say(f"sample: {len(masks)} synthetic images from the {weighting} model, "
                 f"DDIM {self.preset.sample_steps} steps")
        images = sample_pairs(self.law_run(weighting), masks, steps=self.preset.sample_steps, seed=self.cfg.seed)
        info = read_info(self.data)
        write_synthetic_h5(out, images, masks, [f"syn_{c}" for c in cases],
                           provenance={"run": str(self.law_run(weighting)), "scheduler": "ddim",
                                       "steps": self.preset.sample_steps, "seed": self.cfg.seed},
                           label_names=info.label_names)

    def train_order(self, model: str, data: str, seed: int) -> None:
        run = self.seg_run(model, data, seed)
        records = read_metrics(run)
        if records and records[-1]["epoch"] + 1 >= self.preset.seg_epochs:
            return
        synthetic = None if data == "real" else str(self.synthetic(data.split("+")[1]))
        self.say(f"train-order {model} on {data}, seed {seed}: {self.preset.seg_epochs} epochs")
        cfg = SegTrainConfig(data=str(self.data), out=str(run), model=model, synthetic=synthetic,
                             synthetic_ratio=1.0, size=self.preset.size, epochs=self.preset.seg_epochs,
                             batch_size=self.preset.seg_batch, seed=seed, resume=True,
                             max_steps_per_epoch=self.preset.max_steps_per_epoch)
        train_order(cfg, self.launch_config(run.name))

    def evaluate(self) -> dict[str, Any]:
        path = self.out / "evaluation.json"
        if path.exists():
            return json.loads(path.read_text())
        self.say("evaluate: FID/KID, Dice, mask adherence, profile")
        results = {"fid": self.evaluate_fid(), "dice": self.evaluate_dice(), "adherence": self.evaluate_adherence(),
                   "profile": self.evaluate_profile()}
        write_json(path, results)
        return results

    def evaluate_fid(self) -> dict[str, Any]:
        from lawder_core.metrics.fid import compute_fid_kid

        results: dict[str, Any] = {}
        first = None  # its real-side features are reused: the real training split is read once
        for weighting in WEIGHTINGS:
            try:
                fid = compute_fid_kid(self.data, self.synthetic(weighting), real_split="train",
                                      weights=self.cfg.fid_weights, allow_download=False,
                                      kid_subset_size=1000, keep_features=True, reuse_real=first)
            except EnvironmentProblem as err:
                return {"skipped": err.message, "hint": err.hint}
            first = first or fid
            results[weighting] = fid.to_dict()
        return results

    def evaluate_dice(self) -> dict[str, Any]:
        from lawder_core.evaluate import dice_for_run

        results: dict[str, Any] = {}
        for model in SEG_MODELS:
            for data in SEG_DATA:
                for seed in self.preset.seeds:
                    report, _ = dice_for_run(self.seg_run(model, data, seed), self.data, "test")
                    results[f"{model}|{data}|{seed}"] = {"model": model, "data": data, "seed": seed,
                                                        "dice": report.foreground_mean["Dice"],
                                                        "iou": report.foreground_mean["IoU"]}
        return results

    def evaluate_adherence(self) -> dict[str, Any]:
        from lawder_core.evaluate import adherence_for_run

        judge = self.seg_run("mkunet-t-order", "real", self.preset.seeds[0])
        results = {}
        for weighting in WEIGHTINGS:
            result = adherence_for_run(judge, self.synthetic(weighting))
            results[weighting] = {k: result[k] for k in ("dice_mean", "dice_sd", "iou_mean", "n_images")}
        return {**results, "judge": str(judge)}

    def evaluate_profile(self) -> dict[str, Any]:
        from lawder_core.evaluate import profile_model

        return {model: profile_model(model, size=256, repeats=2) for model in SEG_MODELS}

    # ---------------------------------------------------------------- all
    def run_all(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "pipeline_config.json", {"config": vars(self.cfg), "preset": vars(self.preset)})
        self.timed("prepare", self.prepare)
        for weighting in WEIGHTINGS:
            self.timed("train-law", lambda w=weighting: self.train_law(w))
            self.timed("sample", lambda w=weighting: self.sample(w))
        for seed in self.preset.seeds:
            for model in SEG_MODELS:
                for data in SEG_DATA:
                    self.timed("train-order", lambda m=model, d=data, s=seed: self.train_order(m, d, s))
        results = self.timed("evaluate", self.evaluate)
        from lawder_core.report import write_report

        report = write_report(self, results)
        write_json(self.out / "timings.json", self.timings)
        return {"out": str(self.out), "report": str(report), "timings": self.timings}


def run_pipeline(cfg: PipelineConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    return Stages(cfg, progress).run_all()
