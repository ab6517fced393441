"""KiTS's three regions from a CPU run: multi-class MK-UNet-T and ORDER on a KiTS-like CT set (issue 15).

No KiTS data lies on this machine, so the benchmark writes a KiTS-like raw folder with nibabel: `--cases` CT
volumes (int16 HU, 0.8 × 0.8 × 3 mm voxels, a flipped, shifted affine as scanners write them), each with one
kidney (an ellipsoid, ~150 HU, textured), a tumour of random size at its rim (~90 HU) and, in half the cases, a
cyst (~10 HU), in soft tissue (~40 HU) with noise. It then runs what a KiTS user runs: `prepare kits` (area-priority
label downsampling, case-level splits, every slice of the test cases), `train-order` with the default labels
(kidney, tumor, cyst: a 4-output softmax model) and `evaluate --dice` on the test cases, scored per case volume
on nnU-Net's regions kidney_and_masses, masses and tumor. The numbers show the loop works end to end on volumes;
they say nothing about real KiTS accuracy.

Usage: python benchmarks/bench_kits_regions.py --work benchmarks/work/kits_regions --epochs 40
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_kits import KitsOptions, prepare_kits
from lawder_core.evaluate import dice_for_run
from lawder_core.train.seg import SegTrainConfig, train_segmenter

MODELS = ("mkunet-t", "mkunet-t-order")
REGIONS = ("kidney_and_masses", "masses", "tumor")


def ball(shape: tuple[int, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1.0


def write_case(folder: Path, shape: tuple[int, int, int], rng: np.random.Generator) -> None:
    labels = np.zeros(shape, np.uint8)
    centre = np.array([rng.uniform(0.35, 0.65) * shape[0], rng.uniform(0.35, 0.65) * shape[1], shape[2] / 2])
    kidney_radii = np.array([rng.uniform(0.12, 0.17) * shape[0], rng.uniform(0.08, 0.12) * shape[1],
                             rng.uniform(0.25, 0.35) * shape[2]])
    labels[ball(shape, centre, kidney_radii)] = 1
    direction = rng.normal(size=3) * np.array([1, 1, 0.3])
    direction /= np.linalg.norm(direction)
    tumour_radius = rng.uniform(5, 12)
    tumour_centre = centre + direction * kidney_radii * 0.8
    labels[ball(shape, tumour_centre, np.array([tumour_radius, tumour_radius, tumour_radius / 3.75]))] = 2
    if rng.random() < 0.5:
        cyst_centre = centre - direction * kidney_radii * 0.5
        radius = rng.uniform(2, 4)
        labels[ball(shape, cyst_centre, np.array([radius, radius, max(radius / 3.75, 1.0)]))] = 3
    hu = np.choose(labels, [40.0, 150.0, 90.0, 10.0]) + rng.normal(0, 18, shape)
    hu += 25 * np.sin(np.indices(shape)[0] / 5.0) * (labels == 1)  # kidney texture
    affine = np.array([[-0.8, 0, 0, 120.0], [0, 0.8, 0, -90.0], [0, 0, 3.0, -400.0], [0, 0, 0, 1]])
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), folder / "imaging.nii.gz")
    nib.save(nib.Nifti1Image(labels, affine), folder / "segmentation.nii.gz")


def kits_like_folder(root: Path, cases: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for case in range(cases):
        folder = root / f"case_{case:05d}"
        if not (folder / "segmentation.nii.gz").exists():
            write_case(folder, (128, 128, 32), rng)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/work/kits_regions"))
    parser.add_argument("--cases", type=int, default=30)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_kits_regions.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    raw = kits_like_folder(args.work / "raw", args.cases, args.seed)
    h5 = args.work / "kits-like.h5"
    if not h5.exists():
        prepare_kits(raw, h5, PrepareOptions(size=args.size, seed=args.seed), KitsOptions())
    rows = []
    for model in MODELS:
        run = args.work / "runs" / model
        tic = time.perf_counter()
        train_segmenter(SegTrainConfig(data=str(h5), out=str(run), model=model, size=args.size, epochs=args.epochs,
                                       batch_size=16, lr=2e-3, seed=args.seed, resume=(run / "last").exists()))
        report, _ = dice_for_run(run, h5, "test")
        rows.append({"model": model, "train_seconds": round(time.perf_counter() - tic, 1),
                     "cases": len(report.per_case),
                     **{region: round(report.mean[region]["Dice"], 4) for region in REGIONS}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "kits_regions", "data": f"KiTS-like, {args.cases} synthetic CT volumes 128×128×32",
              "size": args.size, "epochs": args.epochs, "seed": args.seed, "labels": "kidney, tumor, cyst (default)",
              "machine": f"{platform.machine()}, {args.threads} torch thread(s)", "runs": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| model | kidney_and_masses | masses | tumor |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['kidney_and_masses']:.3f} | {r['masses']:.3f} | {r['tumor']:.3f} |")


if __name__ == "__main__":
    main()
