"""Peak memory per input pixel of every segmenter and diffusion preset, training and inference, on the CPU.

What `lawder_core/limits.py`'s estimates are built from. Each measurement runs in a fresh process: lawder's real
training loop (`train_segmenter`, two steps of one epoch; `train_diffusion`, two steps) or inference (a segmenter's
forward pass; `sample_pairs`, two sampling steps) at two sizes, and the growth of the peak resident set between
the two sizes, divided by the pixels added (batch × (large² − small²)), is the bytes per pixel. The fixed part
(imports, weights, optimiser) cancels out.

Usage: python benchmarks/bench_memory.py [--out benchmarks/results/bench_memory.json] [--only mkunet-t ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SEGMENTERS = ["mkunet-t", "mkunet-t-order", "mkunet-t-wide", "mkunet-s", "mkunet-s-order", "mkunet-base",
              "mkunet-base-order", "mkunet-m", "mkunet-l", "unet-r18", "unet-r34", "unet-mbv2", "unetpp-r34"]
PRESETS = ["tiny", "small", "base"]
SEG_SIZES = (64, 192)
LAW_SIZES = (32, 96)
BATCH = 4
DEFAULT_OUT = Path(__file__).parent / "results" / "bench_memory.json"


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def one(kind: str, name: str, size: int, folder: Path) -> int:
    """In this process: one measurement; returns the peak resident set in bytes."""
    import torch

    from lawder_core.data.prepare import PrepareOptions
    from lawder_core.data.synthetic import prepare_synthetic

    torch.set_num_threads(1)
    data = folder / f"s{size}.h5"
    if not data.exists():
        prepare_synthetic(data, n=2 * BATCH + 4, size=size, seed=0, options=PrepareOptions(size=size))
    if kind == "seg-train":
        from lawder_core.train.configs import SegTrainConfig
        from lawder_core.train.seg import train_segmenter

        train_segmenter(SegTrainConfig(data=str(data), out=str(folder / f"seg-{name}-{size}"), model=name, size=size,
                                       epochs=1, batch_size=BATCH, max_steps_per_epoch=2))
    elif kind == "seg-infer":
        from lawder_core.models.factory import build_segmenter

        model = build_segmenter(name).eval()
        with torch.inference_mode():
            model(torch.rand(BATCH, 3, size, size))
    elif kind == "law-train":
        from lawder_core.train.configs import DiffusionTrainConfig
        from lawder_core.train.diffusion import train_diffusion

        train_diffusion(DiffusionTrainConfig(data=str(data), out=str(folder / f"law-{name}-{size}"), size=size,
                                             steps=2, batch_size=BATCH, preset=name, save_every=0, sample_every=0,
                                             lr_warmup_steps=1))
    elif kind == "law-sample":
        import numpy as np

        from lawder_core.sample import sample_pairs

        run = folder / f"law-{name}-{size}"
        masks = np.zeros((BATCH, size, size), np.uint8)
        masks[:, size // 4: size // 2, size // 4: size // 2] = 1
        sample_pairs(run, masks, steps=2, batch_size=BATCH, device="cpu")
    return peak_bytes()


def measure(kind: str, name: str, size: int, folder: Path) -> int:
    done = subprocess.run([sys.executable, __file__, "--one", kind, name, str(size), str(folder)],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {name} {size}: {done.stderr[-2000:]}")
    return int(done.stdout.split()[-1])


def per_pixel(kind: str, name: str, sizes: tuple[int, int], folder: Path) -> dict[str, Any]:
    small, large = (measure(kind, name, s, folder) for s in sizes)
    pixels = BATCH * (sizes[1] ** 2 - sizes[0] ** 2)
    return {"sizes": list(sizes), "batch": BATCH, "peak_bytes": [small, large],
            "bytes_per_pixel": round(max(large - small, 0) / pixels, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", default=None, help="Segmenter names or diffusion presets to measure.")
    parser.add_argument("--one", nargs=4, metavar=("KIND", "NAME", "SIZE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        kind, name, size, folder = args.one
        print(one(kind, name, int(size), Path(folder)))
        return
    results: dict[str, Any] = {"machine": platform.platform(), "python": platform.python_version(), "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name in SEGMENTERS:
            if args.only is None or name in args.only:
                results["rows"][name] = {kind: per_pixel(kind, name, SEG_SIZES, folder)
                                         for kind in ("seg-train", "seg-infer")}
                print(name, json.dumps(results["rows"][name]), flush=True)
        for preset in PRESETS:
            if args.only is None or preset in args.only:
                results["rows"][f"law-{preset}"] = {kind: per_pixel(kind, preset, LAW_SIZES, folder)
                                                    for kind in ("law-train", "law-sample")}
                print(preset, json.dumps(results["rows"][f"law-{preset}"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
