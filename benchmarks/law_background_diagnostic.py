"""Where does a weighted arm's lesion-crop KID gain come from? A diagnostic over a `bench_law_quality.py` (revision 3)
work folder, for one seed, scored as the benchmark's stage 6b scores an arm (KID on lesion-centred crops per size
bin, and on lesion-free crops, the control for a change of the whole image):

  base         the denoiser every arm is fine-tuned from, with the same masks and noise. It never saw a mask, so
               it shows the realism a fine-tune starts from (and draws no lesion at the mask).
  uniform-raw  the uniform arm from its raw weights instead of its EMA: is the EMA the cause?
  uniform-aNN  the uniform arm with its fine-tuning displacement scaled, θ = θ_base + α (θ_uniform − θ_base), for
               each --alphas (uniform-a068: α 0.68; uniform-a100 is the arm itself). To first order this is
               uniform trained with α × its learning rate: a uniform arm that moved less. If moving less from the
               base alone gave the weighted arms' scores, their points would lie on this curve.

Every arm's own score for the seed (its `lesion_kid_bins.json`) and background weight are set beside these, and the
base's mask-channel input weights are measured (untrained when the base always dropped the condition) with how
far a real mask moves its prediction from the null condition's. Samples and scores are kept under --out and reused
on a rerun. One process, one thread; ~8 min of sampling and ~6 min of scoring per row at the default budget.

    python benchmarks/law_background_diagnostic.py --work /work/bench/law3 --seed 0 --alphas 0.4,0.68
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_law_quality as bench  # noqa: E402

log = logging.getLogger("law_background_diagnostic")
MASK_TIMESTEPS = (999, 500, 100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", required=True, help="A bench_law_quality.py work folder with the base and the arms.")
    p.add_argument("--seed", type=int, default=0, help="The seed whose arms are compared (sampling noise included).")
    p.add_argument("--alphas", default="0.4,0.68", help="Comma-separated scales of uniform's displacement.")
    p.add_argument("--out", default=None, help="Samples, scores and the JSON (default WORK/diagnostic/seedN).")
    p.add_argument("--guidance", type=float, default=1.0, help="As the benchmark sampled (its default).")
    p.add_argument("--fid-weights", default=None, help="Inception weights; default: whatever resolves offline.")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def alpha_name(alpha: float) -> str:
    return f"uniform-a{round(alpha * 100):03d}"


def interpolated(base: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """`tuned` with its displacement from `base` scaled by alpha (floating-point tensors; counters kept)."""
    start = base.state_dict()
    tuned.load_state_dict({k: start[k] + alpha * (v - start[k]) if v.is_floating_point() else v
                           for k, v in tuned.state_dict().items()})
    return tuned


def train_masks(data: Path, n: int) -> tuple[np.ndarray, list[str]]:
    """The first n training masks: the ones the benchmark samples (stage 5)."""
    from lawder_core.data.h5 import load_arrays

    _, masks, cases = load_arrays(data, "train")
    return masks[:n], [str(c) for c in cases[:n]]


def sample_model(load: Any, run: Path, data: Path, b: bench.Budget, seed: int, guidance: float,
                 out: Path) -> Path:
    """Sample `load()`'s model as the benchmark does (same masks, DDIM steps, guidance, batch and paired noise); a
    complete file is kept and nothing is loaded."""
    from lawder_core.data.h5 import read_info
    from lawder_core.sample import LoadedSampler, run_info, sample_loaded, write_synthetic_h5

    if out.exists() and read_info(out).n == b.n_sample:
        return out
    log.info("sample %d images into %s", b.n_sample, out)
    masks, cases = train_masks(data, b.n_sample)
    images = sample_loaded(LoadedSampler(run_info(run), load().eval(), torch.device("cpu")), masks,
                           steps=b.sample_steps, scheduler="ddim", guidance=guidance, batch_size=32, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_synthetic_h5(out, images, masks.astype(np.uint8), cases, {"diagnostic": out.parent.name},
                              force=True)


def kid_row(scored: dict[str, Any]) -> dict[str, Any]:
    small = scored["bins"].get("<3%") or {}
    return {"lesion_kid_all": scored["all"], "lesion_kid_all_se": scored["all_se"],
            "lesion_kid_small": small.get("kid"), "lesion_kid_small_se": small.get("kid_se"),
            "background_kid": scored["background"]["kid"], "background_kid_se": scored["background"]["kid_se"]}


def arm_rows(work: Path, seed: int) -> dict[str, dict[str, Any]]:
    """Every scored arm of the seed: its KIDs (stage 6b) and the background weight its training ended with."""
    rows = {}
    for arm in bench.ARMS:
        scored = work / "eval" / arm / f"seed{seed}" / "lesion_kid_bins.json"
        job = work / "jobs" / f"{arm}-seed{seed}.json"
        if scored.exists() and job.exists():
            law = json.loads(job.read_text())["train"]["law"]
            rows[arm] = {"kind": "the benchmark's arm", "w_background": law["w_background"],
                         **kid_row(json.loads(scored.read_text()))}
    return rows


def mask_channels(base: torch.nn.Module, data: Path, seed: int) -> dict[str, Any] | None:
    """The base's input weights on the image and on the mask channels (mean |w|), and |v(real mask) − v(null)| /
    |v(null)| on 16 training masks and fixed noise; None where the masks do not enter through the first conv."""
    weight, image_channels = base.denoising_unet().conv_in.weight.detach(), base.spec.image_channels
    if weight.shape[1] == image_channels:
        return None
    masks = torch.as_tensor(train_masks(data, 16)[0].astype(np.int64))
    noisy = torch.randn((len(masks), *base.loss_shape()), generator=torch.Generator().manual_seed(seed))
    moved = {}
    with torch.no_grad():
        for t in MASK_TIMESTEPS:
            steps = torch.full((len(masks),), t)
            real = base(noisy, steps, base.condition(masks))
            null = base(noisy, steps, base.null_condition(masks))
            moved[f"t{t}"] = round(float((real - null).norm() / null.norm()), 4)
    return {"conv_in_abs_weight_mean": {"image": round(float(weight[:, :image_channels].abs().mean()), 4),
                                        "mask": round(float(weight[:, image_channels:].abs().mean()), 4)},
            "relative_change_of_v_real_mask_vs_null": moved}


def candidates(work: Path, seed: int, alphas: list[float]) -> dict[str, tuple[str, Path, Any]]:
    """name -> (what it is, the run whose recipe samples it, a loader of its weights)."""
    from lawder_core.models.denoiser import load_denoiser
    from lawder_core.runs import DENOISER, DENOISER_EMA

    base, uniform = work / "base" / "last", work / "runs" / "uniform" / f"seed{seed}"
    found = {"base": ("the base every arm starts from (EMA)", base.parent, lambda: load_denoiser(base / DENOISER_EMA)),
             "uniform-raw": ("uniform, raw weights (not the EMA)", uniform,
                             lambda: load_denoiser(uniform / "last" / DENOISER))}
    for alpha in alphas:
        found[alpha_name(alpha)] = (f"uniform, displacement x {alpha:g}", uniform, lambda alpha=alpha: interpolated(
            load_denoiser(base / DENOISER_EMA), load_denoiser(uniform / "last" / DENOISER_EMA), alpha))
    return found


def diagnose(args: argparse.Namespace) -> dict[str, Any]:
    from lawder_core.files import write_text

    work = Path(args.work)
    b = bench.Budget(**json.loads((work / "budget.json").read_text()))
    data = bench.prepare_data(work, b)  # the benchmark's file: already there
    out = Path(args.out or work / "diagnostic" / f"seed{args.seed}")
    found = candidates(work, args.seed, [float(a) for a in args.alphas.split(",") if a.strip()])
    rows: dict[str, dict[str, Any]] = {}
    cache: dict = {}
    for name, (what, run, load) in found.items():
        synthetic = sample_model(load, run, data, b, args.seed, args.guidance, out / name / "synthetic.h5")
        rows[name] = {"kind": what, **kid_row(bench.score_kid_bins(synthetic, data, out / name, args, args.seed,
                                                                   cache))}
    rows.update(arm_rows(work, args.seed))
    result = {"what": "bench_law_quality revision 3: lesion-crop and lesion-free KID of the base, of uniform's raw "
                      "weights and of uniform's displacement scaled by alpha, beside every arm (same masks, noise "
                      "seed, DDIM steps, guidance; the train split as reference)",
              "work": str(work), "seed": args.seed, "budget": b.__dict__, "rows": rows,
              "base_mask_channels": mask_channels(found["base"][2](), data, args.seed),
              "command": "python benchmarks/law_background_diagnostic.py " + " ".join(sys.argv[1:])}
    write_text(out / "law_background_diagnostic.json", json.dumps(result, indent=1))
    print(markdown(rows))
    return result


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    def kid(value: float | None) -> str:
        return "–" if value is None else f"{value * 1e3:.1f}"

    lines = ["| row | w_background | lesion-free KID ×10³ | lesion-crop KID ×10³ (all) | (<3 %) |",
             "|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: item[1]["background_kid"]):
        weight = f"{row['w_background']:.2f}" if "w_background" in row else "–"
        lines.append(f"| {name} | {weight} | {kid(row['background_kid'])} | {kid(row['lesion_kid_all'])} | "
                     f"{kid(row['lesion_kid_small'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    diagnose(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
