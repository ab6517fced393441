"""`lawder pipeline`: the paper's whole cycle, as stages that hand over files (and resume).

prepare → train-law (uniform, law) → sample one synthetic set from each → train-order for
{mkunet-t, mkunet-t-order} × {real, real + LAW synthetic, real + uniform synthetic} × seeds → evaluate
(FID/KID, Dice, mask adherence, profile) → report. A stage whose output is complete is skipped, so an
interrupted pipeline picks up where it stopped.

Each stage calls the function its command calls: `data.sources.prepare_source` (`lawder prepare`),
`distributed.train.train_law` / `train_order`, `distributed.sample.run_sample` and `evaluate.evaluate`, which
writes one `summary.json` per comparison, each exactly what `lawder evaluate` writes for the same request:

    OUT/config.json                          the pipeline config and its preset
    OUT/data/<source>.h5                     the prepared data (unless --data names a file)
    OUT/law/<weighting>/                     train-law runs          OUT/synthetic/<weighting>.h5   samples
    OUT/seg/<model>__<data>__s<seed>/        train-order runs
    OUT/evaluate/synthetic-<weighting>/summary.json   FID/KID against the real training images + adherence
    OUT/evaluate/seg-<model>__<data>__s<seed>/summary.json   test Dice of one segmenter
    OUT/evaluate/profile-<model>/summary.json          parameters, FLOPs, CPU latency
    OUT/report.md, OUT/report.html, OUT/figures/      the report
    OUT/summary.json                         what `--json` prints: the report, the evaluations, and the seconds
                                             each stage took in this invocation (a resumed run counts what it redid)

Heavy modules (torch, the trainers) are imported by the stages that need them, so a bad --preset or --source
is reported at once.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lawder_core import numbers, runs
from lawder_core.data.sources import SOURCES, SourceOptions, check_source
from lawder_core.distributed.train import LaunchConfig, train_law, train_order
from lawder_core.errors import DataError, EnvironmentProblem, UsageError
from lawder_core.evaluate import EvaluateOptions, EvaluateRequest, Inputs, Metrics
from lawder_core.evaluate import evaluate as evaluate_request
from lawder_core.metrics.summary import SUMMARY_FILE
from lawder_core.report import ReportInputs, SegScore, claims, write_report

log = logging.getLogger(__name__)

WEIGHTINGS = ("uniform", "law")
SEG_MODELS = ("mkunet-t", "mkunet-t-order")
SEG_DATA = ("real", "real+law", "real+uniform")
JUDGE = "mkunet-t-order"  # the real-data segmenter that judges mask adherence
PROFILE_SIZE = 256  # lawder reports model cost at 256×256 (the paper's abstract names no size)
# Raw sources the pipeline can prepare by itself (a generic folder needs --images/--masks: prepare it first).
PIPELINE_SOURCES = tuple(s for s in SOURCES if s != "folder")


@dataclass(frozen=True)
class Preset:
    """Budgets of one pipeline run (lawder's own): `tiny` for tests, `cpu-small` for the demo, `gpu-paper` lawder's
    full-scale budget for the paper's three claims.

    Hardware is not part of a preset: --gpus and --workers mean what they mean for every command.
    """

    size: int
    synthetic_n: int  # samples of the built-in data set when no data is given
    denoiser: str  # UNet2DModel preset
    law_steps: int
    law_batch: int
    sample_steps: int
    seg_epochs: int
    seg_batch: int
    seeds: tuple[int, ...]
    max_steps_per_epoch: int | None = None
    previews: int = 3  # LAW weight-map / sample grids written during each diffusion training
    sample_limit: int | None = None  # synthetic images per set: one per training mask, at most this many
    profile_repeats: int = 2  # latency of the profile stage: best of this many timed runs
    seg_size: int | None = None  # segmenters (and the prepared data) at this size; None: `size` as the diffusion
    seg_lr: float | None = None  # segmenters' AdamW learning rate; None: train-order's default

    @property
    def data_size(self) -> int:
        return max(self.size, self.seg_size or self.size)


PRESETS = {
    "tiny": Preset(size=32, synthetic_n=24, denoiser="tiny", law_steps=2, law_batch=4, sample_steps=2,
                   seg_epochs=1, seg_batch=4, seeds=(0,), max_steps_per_epoch=2, previews=1),
    # cpu-small is sized for a `make demo` of under 15 minutes on 2 idle cores (the measured time: README)
    "cpu-small": Preset(size=64, synthetic_n=240, denoiser="small", law_steps=200, law_batch=8, sample_steps=15,
                        seg_epochs=10, seg_batch=16, seeds=(0,), sample_limit=192,
                        # 240 steps at train-order's 1e-3 left a real-only MK-UNet-T at Dice 0.02 (seed 0) or 0.90
                        # (seed 1): still at the loss plateau where it predicts background. At 3e-3 both seeds
                        # reach 0.96 (docs/benchmarks.md, "The demo's segmenter budget").
                        seg_lr=3e-3),
    # benchmarks/gpu_claims.sh: the paper's three claims in about 10 minutes on one large GPU (diffusion at 128 px,
    # one synthetic image per training mask, segmenters at 256 px); not yet timed on a GPU
    "gpu-claims": Preset(size=128, synthetic_n=1000, denoiser="small", law_steps=4000, law_batch=64, sample_steps=25,
                         seg_epochs=30, seg_batch=32, seeds=(0,), seg_size=256, profile_repeats=5),
    "gpu-paper": Preset(size=256, synthetic_n=1000, denoiser="base", law_steps=3000, law_batch=32,
                        sample_steps=50, seg_epochs=200, seg_batch=16, seeds=(0, 1, 2)),
}


@dataclass(frozen=True)
class PipelineConfig:
    out: str
    preset: str = "cpu-small"
    data: str | None = None  # a prepared HDF5; None: prepare --source (default: the built-in synthetic set)
    source: str | None = None  # raw data to prepare first: kvasir | cvc | kits | synthetic
    in_dir: str | None = None  # with source: the raw data folder
    seed: int = 0
    fid_weights: str | None = None
    gpus: int = 0  # GPU workers of every training and of sampling
    workers: int = 0  # with gpus 0: 0 runs in this process, N starts N Ray CPU workers
    ray_address: str | None = None


def check_pipeline_config(cfg: PipelineConfig) -> Preset:
    """Every usage error of a pipeline, raised before anything is written; returns the preset."""
    if cfg.preset not in PRESETS:
        raise UsageError(f"unknown --preset {cfg.preset!r}.", f"Choose one of: {', '.join(PRESETS)}.")
    if cfg.data is not None and cfg.source is not None:
        raise UsageError("--data and --source exclude each other.",
                         "Pass a prepared file with --data, or raw data with --source and --in.")
    if cfg.source is not None:
        if cfg.source not in PIPELINE_SOURCES:
            raise UsageError(f"unknown --source {cfg.source!r}.", f"Choose one of: {', '.join(PIPELINE_SOURCES)} "
                             "(prepare a generic folder with `lawder prepare folder` and pass --data).")
        check_source(cfg.source, cfg.in_dir)
    numbers.check_fields(cfg, {"seed": numbers.SEED, "gpus": numbers.GPUS, "workers": numbers.WORKERS})
    if cfg.data is not None and not Path(cfg.data).exists():
        raise DataError(f"--data {cfg.data} does not exist.", "Pass a file written by `lawder prepare`.")
    return PRESETS[cfg.preset]


def seg_name(model: str, data: str, seed: int) -> str:
    return f"{model}__{data.replace('+', '_')}__s{seed}"


class Stages:
    """Paths of every artefact, and one method per stage that does nothing when its output is complete."""

    def __init__(self, cfg: PipelineConfig, progress: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.preset = check_pipeline_config(cfg)
        self.out = Path(cfg.out)
        self.say = progress or (lambda msg: log.info("%s", msg))
        self.timings: dict[str, float] = {}
        # FID features of the real training images, kept while evaluating: embedded once for both synthetic sets
        self.real_features: dict[Any, Any] = {}

    # ---------------------------------------------------------------- paths
    @property
    def data(self) -> Path:
        if self.cfg.data:
            return Path(self.cfg.data)
        return self.out / "data" / f"{self.cfg.source or 'synthetic'}.h5"

    def law_run(self, weighting: str) -> Path:
        return self.out / "law" / weighting

    def synthetic(self, weighting: str) -> Path:
        return self.out / "synthetic" / f"{weighting}.h5"

    def seg_run(self, model: str, data: str, seed: int) -> Path:
        return self.out / "seg" / seg_name(model, data, seed)

    def evaluation(self, name: str) -> Path:
        return self.out / "evaluate" / name / SUMMARY_FILE

    def launch_config(self, name: str) -> LaunchConfig:
        return LaunchConfig(gpus=self.cfg.gpus, workers=self.cfg.workers, ray_address=self.cfg.ray_address, name=name)

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        tic = time.perf_counter()
        result = fn()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - tic
        return result

    # ---------------------------------------------------------------- stages
    def prepare(self) -> None:
        from lawder_core.data.h5 import read_info

        if self.data.exists():
            read_info(self.data)  # a clear error now if it is not a lawder file
            return
        from lawder_core.data.prepare import PrepareOptions
        from lawder_core.data.sources import prepare_source

        source = self.cfg.source or "synthetic"
        self.say(f"prepare {source} at {self.preset.data_size} px")
        prepare_source(source, self.cfg.in_dir, self.data,
                       PrepareOptions(seed=self.cfg.seed, size=self.preset.data_size),
                       SourceOptions(n=self.preset.synthetic_n))

    def train_law(self, weighting: str) -> None:
        from lawder_core.train.configs import DiffusionTrainConfig

        run = self.law_run(weighting)
        records = runs.read_metrics(run)
        if records and records[-1].get("step") == self.preset.law_steps and "checkpoint" in records[-1]:
            return
        self.say(f"train-law --weighting {weighting}: {self.preset.law_steps} steps")
        cfg = DiffusionTrainConfig(data=str(self.data), out=str(run), size=self.preset.size,
                                   steps=self.preset.law_steps, batch_size=self.preset.law_batch,
                                   weighting=weighting, preset=self.preset.denoiser, seed=self.cfg.seed,
                                   save_every=max(1, self.preset.law_steps // 3),
                                   sample_every=max(1, self.preset.law_steps // self.preset.previews),
                                   log_every=max(1, self.preset.law_steps // 20), resume=runs.has_run(run))
        train_law(cfg, self.launch_config(f"law-{weighting}"))

    def sample_count(self) -> int | None:
        """The preset's sampling budget: one image per training mask, the first `sample_limit` in file order."""
        if self.preset.sample_limit is None:
            return None
        from lawder_core.data.h5 import split_indices

        return min(self.preset.sample_limit, len(split_indices(self.data, "train")))

    def sample(self, weighting: str) -> None:
        from lawder_core.distributed.sample import run_sample
        from lawder_core.sample import SampleConfig

        out = self.synthetic(weighting)
        if out.exists():
            return
        cfg = SampleConfig(run=str(self.law_run(weighting)), masks=str(self.data), out=str(out), split="train",
                           n=self.sample_count(), steps=self.preset.sample_steps, seed=self.cfg.seed,
                           gpus=self.cfg.gpus, workers=self.cfg.workers, ray_address=self.cfg.ray_address)
        self.say(f"sample: {cfg.n or 'one per training mask'} synthetic images from the {weighting} model, "
                 f"DDIM {self.preset.sample_steps} steps")
        run_sample(cfg)

    def seg_config(self, model: str, data: str, seed: int) -> Any:
        from lawder_core.train.configs import SegTrainConfig

        run = self.seg_run(model, data, seed)
        synthetic = None if data == "real" else str(self.synthetic(data.split("+")[1]))
        return SegTrainConfig(data=str(self.data), out=str(run), model=model, synthetic=synthetic,
                              synthetic_ratio=1.0, size=self.preset.seg_size or self.preset.size,
                              epochs=self.preset.seg_epochs, steps=self.seg_steps, batch_size=self.preset.seg_batch,
                              lr=SegTrainConfig.lr if self.preset.seg_lr is None else self.preset.seg_lr, seed=seed,
                              resume=runs.has_run(run), max_steps_per_epoch=self.preset.max_steps_per_epoch)

    @functools.cached_property
    def seg_steps(self) -> int:
        """One optimiser-step budget for every segmenter of a comparison: the preset's epochs over the largest
        training set (real + synthetic; read once the synthetic sets exist). Real-only arms then run more epochs,
        not fewer steps."""
        from lawder_core.train.configs import SegTrainConfig, planned_steps_per_epoch

        largest = max(
            planned_steps_per_epoch(SegTrainConfig(
                data=str(self.data), out="", synthetic=None if data == "real" else str(self.synthetic(data[5:])),
                batch_size=self.preset.seg_batch, max_steps_per_epoch=self.preset.max_steps_per_epoch))
            for data in SEG_DATA)
        return self.preset.seg_epochs * largest

    def train_order(self, model: str, data: str, seed: int) -> None:
        cfg = self.seg_config(model, data, seed)
        records = runs.read_metrics(cfg.out)
        if records and records[-1].get("steps", 0) >= cfg.steps:
            return
        self.say(f"train-order {model} on {data}, seed {seed}: {cfg.steps} optimiser steps")
        train_order(cfg, self.launch_config(Path(cfg.out).name))

    # ---------------------------------------------------------------- evaluate: one `lawder evaluate` each
    def evaluate_once(self, name: str, metrics: Metrics, inputs: Inputs, options: EvaluateOptions | None = None,
                      **metadata: Any) -> dict[str, Any]:
        """`lawder evaluate` for one comparison, written to evaluate/<name>/summary.json (read back on resume)."""
        path = self.evaluation(name)
        if path.exists():
            return json.loads(path.read_text())
        request = EvaluateRequest(out=str(path), metrics=metrics, inputs=inputs,
                                  options=options or EvaluateOptions(seed=self.cfg.seed),
                                  metadata={"command": "pipeline", "stage": f"evaluate {name}", **metadata})
        return evaluate_request(request, real_features=self.real_features)

    def evaluate_synthesis(self, weighting: str) -> dict[str, Any]:
        """FID/KID of one synthetic set against the real training images, and its mask adherence.

        Without FID weights (the pipeline never downloads them) FID/KID are left out and the reason is kept
        in the summary's metadata, so the rest of the report is still written.
        """
        name = f"synthetic-{weighting}"
        inputs = Inputs(real=str(self.data), real_split="train", synthetic=str(self.synthetic(weighting)),
                        fid_weights=self.cfg.fid_weights,
                        segmenter=str(self.seg_run(JUDGE, "real", self.preset.seeds[0])))
        options = EvaluateOptions(seed=self.cfg.seed, allow_download=False)
        try:
            return self.evaluate_once(name, Metrics(fid=True, kid=True, adherence=True), inputs, options)
        except EnvironmentProblem as err:
            self.say(f"FID/KID skipped: {err.message}")
            return self.evaluate_once(name, Metrics(adherence=True), inputs, options, fid_skipped=err.message,
                                      fid_hint=err.hint)

    def evaluate_segmenter(self, model: str, data: str, seed: int) -> SegScore:
        inputs = Inputs(run=str(self.seg_run(model, data, seed)), data=str(self.data), split="test")
        summary = self.evaluate_once(f"seg-{seg_name(model, data, seed)}", Metrics(dice=True), inputs)
        records = runs.read_metrics(self.seg_run(model, data, seed))
        steps = records[-1].get("steps") if records else None
        return SegScore(model=model, data=data, seed=seed, summary=summary, steps=steps)

    def evaluate_profile(self, model: str) -> dict[str, Any]:
        options = EvaluateOptions(seed=self.cfg.seed, repeats=self.preset.profile_repeats)
        return self.evaluate_once(f"profile-{model}", Metrics(profile=True),
                                  Inputs(model=model, size=PROFILE_SIZE), options)

    def evaluate(self) -> ReportInputs:
        self.say("evaluate: FID/KID, mask adherence, Dice, profile")
        synthesis = {w: self.evaluate_synthesis(w) for w in WEIGHTINGS}
        segmentation = [self.evaluate_segmenter(model, data, seed) for seed in self.preset.seeds
                        for model in SEG_MODELS for data in SEG_DATA]
        profiles = {model: self.evaluate_profile(model) for model in SEG_MODELS}
        self.real_features.clear()  # Inception features of every real image: let them go
        return ReportInputs(out=self.out, setup=self.setup_note(), law_runs={w: self.law_run(w) for w in WEIGHTINGS},
                            synthetic={w: self.synthetic(w) for w in WEIGHTINGS}, synthesis=synthesis,
                            segmentation=segmentation, profiles=profiles)

    def setup_note(self) -> str:
        p = self.preset
        limit = f" for at most {p.sample_limit} training masks per synthetic set" if p.sample_limit else ""
        lr = f"; learning rate {p.seg_lr:g}" if p.seg_lr is not None else ""
        return (f"Preset `{self.cfg.preset}` (lawder's budget): {p.size} px, diffusion {p.law_steps} steps "
                f"({p.denoiser} UNet), DDIM {p.sample_steps} steps{limit}, segmenters {self.seg_steps} optimiser "
                f"steps each (the preset's {p.seg_epochs} epochs over the largest training set, real + synthetic; "
                f"real-only arms run the same steps in more epochs{lr}), seeds {list(p.seeds)}. Data: `{self.data}`.")

    # ---------------------------------------------------------------- all
    def run_all(self) -> dict[str, Any]:
        runs.write_config(self.out, {"config": asdict(self.cfg), "preset": asdict(self.preset)})
        self.timed("prepare", self.prepare)
        for weighting in WEIGHTINGS:
            self.timed("train-law", lambda w=weighting: self.train_law(w))
            self.timed("sample", lambda w=weighting: self.sample(w))
        for seed in self.preset.seeds:
            for model in SEG_MODELS:
                for data in SEG_DATA:
                    self.timed("train-order", lambda m=model, d=data, s=seed: self.train_order(m, d, s))
        inputs = self.timed("evaluate", self.evaluate)
        report = self.timed("report", lambda: write_report(inputs))
        evaluations = sorted(str(p) for p in (self.out / "evaluate").glob(f"*/{SUMMARY_FILE}"))
        summary = {"out": str(self.out), "report": str(report), "claims": claims(inputs), "evaluations": evaluations,
                   "timings": self.timings}
        runs.write_summary(self.out, summary)
        return summary


def run_pipeline(cfg: PipelineConfig, progress: Callable[[str], None] | None = None, *, resume: bool = False,
                 force: bool = False) -> dict[str, Any]:
    """`lawder pipeline`: validate, open the run folder (--resume / --force), run every stage, write summary.json."""
    stages = Stages(cfg, progress)
    runs.open_run(cfg.out, resume=resume, force=force)
    if resume:
        check_same_settings(cfg, stages.preset)
    return stages.run_all()


# Settings a resumed pipeline may change: where it runs, not what it computes.
HARDWARE_FIELDS = ("out", "gpus", "workers", "ray_address")


def check_same_settings(cfg: PipelineConfig, preset: Preset) -> None:
    """--resume keeps every finished stage, so it must run with the settings that made them: a changed preset (or a
    newer lawder whose preset changed) would mix two budgets in one report without saying so."""
    stored = runs.read_config(cfg.out)
    now = json.loads(json.dumps({"config": asdict(cfg), "preset": asdict(preset)}))
    before = {part: stored.get(part, {}) for part in now}
    changed = [f"{part}.{key} {before[part].get(key, 'not recorded')!r} (now {value!r})"
               for part in now for key, value in now[part].items()
               if key not in HARDWARE_FIELDS and before[part].get(key, "not recorded") != value]
    if changed:
        raise UsageError(f"--resume: {cfg.out} was run with other settings: {'; '.join(changed)}.",
                         "Resume with the settings it was started with, or start over in another --out (or with "
                         "--force, which deletes this one). A folder made by an older lawder whose preset has "
                         "changed since must start over.")
