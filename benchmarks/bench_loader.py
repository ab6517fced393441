"""Images per second: lawder's HDF5 Dataset vs decoding the same images from a JPEG folder.

Both sides serve the same (image float C×H×W, mask) pairs through a DataLoader, in one run, with
num_workers 0 and 2; the HDF5 side lzf-compressed or not, read lazily per sample or held in memory (the default
for splits that fit; its first-epoch ratio includes reading the split), as float or as uint8 batches (what
train-order uses). Every batch is turned into float images by the consumer, as a training step does.
With workers, every batch also crosses a process boundary through a newly allocated shared-memory tensor: on a
2-core machine that transfer, not reading, bounds both sides of the 2-worker rows.
Usage: python benchmarks/bench_loader.py [--data DIR_OF_images_masks] [--n 600]

--pipeline measures instead what a train-order step waits for, at 256 px and batch 32 (MK-UNet-T/ORDER):
data time per batch of the per-sample DataLoader (0 loader processes: the old path), of the same DataLoader
with loader processes (persistent, prefetching), and of DeviceBatches (batch gathered and augmented whole on
the training device; also its host-only share, what the CPU still does when the device is a GPU), against the
training step time of each model on the same device and threads (`train_one_epoch` on batches already there).
Usage: python benchmarks/bench_loader.py --pipeline [--data DIR] [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lawder_core.data.batch_augment import draw
from lawder_core.data.dataset import SegDataset, to_model_input
from lawder_core.data.device_batches import DeviceBatches
from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.prepare_folder import prepare_folder
from lawder_core.data.synthetic import synthetic_sample


class JpegFolderDataset(Dataset):
    """The baseline: decode image and mask files on every access, as a folder-based loader does."""

    def __init__(self, images: Path, masks: Path) -> None:
        self.images = sorted(images.iterdir())
        self.masks = [masks / p.name for p in self.images]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = np.array(Image.open(self.images[i]).convert("RGB"))
        mask = (np.array(Image.open(self.masks[i]).convert("L")) >= 128).astype(np.int64)
        return torch.from_numpy(image).permute(2, 0, 1).float().div_(255), torch.from_numpy(mask)


def images_per_second(dataset: Dataset, workers: int, repeats: int = 3) -> float:
    loader = DataLoader(dataset, batch_size=16, num_workers=workers, persistent_workers=workers > 0)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for batch in loader:  # what a training step receives: float images, whichever form the loader sends
            n += len(to_model_input(*batch, torch.device("cpu"))[0])
        best = max(best, n / (time.perf_counter() - start))
    return best


def synthetic_folder(root: Path, n: int, size: int) -> Path:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = synthetic_sample(0, i, size)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.jpg", quality=90)
        Image.fromarray(mask * 255).save(root / "masks" / f"{i:05d}.jpg", quality=90)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ms_per_batch(batches, device: torch.device, count: int, warm: int = 2) -> float:
    """Mean wall time of `count` batches after `warm` (start-up excluded), each made a float batch on `device`."""
    iterator = iter(batches)
    for _ in range(warm):
        to_model_input(*next(iterator), device)
    sync(device)
    start = time.perf_counter()
    for _ in range(count):
        image, _ = to_model_input(*next(iterator), device)
    sync(device)
    return 1000 * (time.perf_counter() - start) / count


def endless(make):
    """Epoch after epoch of an iterable (a loader runs out after one epoch)."""
    while True:
        yield from make()


def step_ms(model_name: str, batches: list, device: torch.device, steps: int) -> float:
    """One train-order optimiser step (forward, loss, backward, AdamW), timed by `train_one_epoch` itself."""
    from lawder_core.models.configs import OrderConfig
    from lawder_core.models.factory import build_segmenter
    from lawder_core.train.configs import SegTrainConfig
    from lawder_core.train.losses import boundary_kernel
    from lawder_core.train.runtime import WorkerContext
    from lawder_core.train.seg import build_optimizer, train_one_epoch

    size = batches[0][0].shape[-1]
    cfg = SegTrainConfig(data="", out="", model=model_name, size=size, batch_size=len(batches[0][0]))
    ctx = WorkerContext(rank=0, world_size=1, device=device)
    model = build_segmenter(model_name, num_classes=1, in_channels=3, order=OrderConfig()).to(device)
    optimizer, _ = build_optimizer(model, cfg, epochs=1)
    lookup = torch.tensor([0, 1], device=device)
    kernel = boundary_kernel(size)
    train_one_epoch(model, batches, optimizer, cfg, ctx, 0, lookup, 2, kernel)  # warm-up (cudnn.benchmark, caches)
    sync(device)
    start = time.perf_counter()
    done = 0
    while done < steps:
        chunk = min(steps - done, len(batches))
        train_one_epoch(model, batches, optimizer, cfg, ctx, 0, lookup, chunk, kernel)  # ends with one sync
        done += chunk
    sync(device)
    return 1000 * (time.perf_counter() - start) / steps


def pipeline(args: argparse.Namespace) -> None:
    """Data time per batch vs step time (see the module docstring)."""
    from torch.utils.data import RandomSampler

    from lawder_core.train.runtime import enable_cuda_speedups

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        enable_cuda_speedups()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or synthetic_folder(Path(tmp) / "jpeg", args.n, args.size)
        h5 = Path(tmp) / "data.h5"
        prepare_folder("kvasir", folder, h5, PrepareOptions(size=args.size, fractions=(1.0, 0.0, 0.0)))
        dataset = SegDataset(h5, split=None, size=args.size, augment=True, seed=0, raw=True)
        sampler = lambda: RandomSampler(dataset, generator=torch.Generator().manual_seed(0))  # noqa: E731
        batch = args.batch

        def loader(workers: int) -> DataLoader:
            return DataLoader(dataset, batch_size=batch, sampler=sampler(), drop_last=True, num_workers=workers,
                              persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                              pin_memory=device.type == "cuda")

        data: dict[str, float] = {}
        data["old: per-sample DataLoader, 0 loader processes"] = ms_per_batch(
            endless(lambda: loader(0)), device, args.batches)
        if args.loader_workers:
            kept = loader(args.loader_workers)  # persistent: its processes start once
            data[f"(a) per-sample DataLoader, {args.loader_workers} loader processes"] = ms_per_batch(
                endless(lambda: kept), device, args.batches)
        fast = DeviceBatches(dataset, sampler(), batch, True, device)
        data[f"(b) DeviceBatches on {device.type}"] = ms_per_batch(endless(lambda: fast), device, args.batches)
        keys = [(0, 0, i) for i in range(batch)]
        start = time.perf_counter()
        for _ in range(args.batches):
            draw(keys, args.size)
        data["(b) host-only share (the per-sample draws)"] = 1000 * (time.perf_counter() - start) / args.batches
        fixed = [tuple(x for x in fast.batch(np.arange(k * batch, (k + 1) * batch) % len(dataset)))
                 for k in range(4)]
        steps = {name: step_ms(name, fixed, device, args.steps) for name in args.models.split(",")}
    rows = {}
    for source, ms in data.items():
        rows[source] = {"data_ms_per_batch": round(ms, 2),
                        **{f"ratio_to_{name}": round(ms / step, 3) for name, step in steps.items()}}
        print(f"{source:>50}: {ms:8.2f} ms/batch  " + "  ".join(
            f"{ms / step:.3f}x {name}'s step" for name, step in steps.items()), flush=True)
    for name, step in steps.items():
        print(f"{'step ' + name:>50}: {step:8.2f} ms", flush=True)
    result = {"benchmark": "loader_pipeline", "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "threads": args.threads, "size": args.size, "batch": batch, "images": len(dataset),
              "data": str(args.data or f"synthetic {args.size}px JPEG q90"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "step_ms": {name: round(step, 2) for name, step in steps.items()}, "rows": rows,
              "goal": "data time <= 0.2x MK-UNet-T's step time"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="folder with images/ and masks/ (default: synthetic JPEGs)")
    parser.add_argument("--n", type=int, default=600, help="synthetic images when --data is not given")
    parser.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/bench_loader.json, "
                        "with --pipeline bench_loader_pipeline_DEVICE.json)")
    parser.add_argument("--pipeline", action="store_true", help="data time vs train-order step time (see above)")
    parser.add_argument("--device", default="cpu", help="--pipeline: cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="--pipeline: torch threads (a Ray GPU worker has 1)")
    parser.add_argument("--size", type=int, default=256, help="--pipeline: image size")
    parser.add_argument("--batch", type=int, default=32, help="--pipeline: batch size")
    parser.add_argument("--batches", type=int, default=20, help="--pipeline: batches timed per data source")
    parser.add_argument("--steps", type=int, default=5, help="--pipeline: training steps timed per model")
    parser.add_argument("--loader-workers", type=int, default=2, help="--pipeline: loader processes for (a)")
    parser.add_argument("--models", default="mkunet-t,mkunet-t-order", help="--pipeline: models whose step to time")
    args = parser.parse_args()
    if args.pipeline:
        args.out = args.out or Path(f"benchmarks/results/bench_loader_pipeline_{torch.device(args.device).type}.json")
        pipeline(args)
        return
    args.out = args.out or Path("benchmarks/results/bench_loader.json")
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data or synthetic_folder(Path(tmp) / "jpeg", args.n, 256)
        jpeg_set = JpegFolderDataset(folder / "images", folder / "masks")
        jpeg_rate = {workers: images_per_second(jpeg_set, workers) for workers in (0, 2)}
        for workers, rate in jpeg_rate.items():
            print(f"JPEG folder num_workers={workers}: {rate:8.1f} img/s", flush=True)
        rows = {}
        for compression in ("lzf", None):
            h5 = Path(tmp) / f"data-{compression}.h5"
            options = PrepareOptions(size=None, fractions=(1.0, 0.0, 0.0), compression=compression)
            prepare_folder("kvasir", folder, h5, options)
            for cache, raw in ((False, False), (True, False), (True, True)):
                start = time.perf_counter()
                h5_set = SegDataset(h5, split=None, cache=cache, raw=raw)
                load_s = time.perf_counter() - start
                for workers in (0, 2):
                    h5_rate = images_per_second(h5_set, workers)
                    # an epoch that includes reading the split into memory: what one pass costs
                    first_epoch_rate = len(h5_set) / (load_s + len(h5_set) / h5_rate)
                    mode = ("cached" if cache else "lazy") + ("+uint8" if raw else "")
                    name = f"{compression or 'none'}/{mode}/workers={workers}"
                    rows[name] = {"hdf5_img_s": round(h5_rate, 1), "jpeg_img_s": round(jpeg_rate[workers], 1),
                                  "ratio": round(h5_rate / jpeg_rate[workers], 2),
                                  "ratio_first_epoch": round(first_epoch_rate / jpeg_rate[workers], 2),
                                  "load_s": round(load_s, 3)}
                    print(f"{name:>24}: HDF5 {h5_rate:8.1f} img/s  ratio {h5_rate / jpeg_rate[workers]:.2f}x  "
                          f"(first epoch incl. {load_s:.2f} s load: {first_epoch_rate / jpeg_rate[workers]:.2f}x)",
                          flush=True)
    result = {"benchmark": "loader", "images": len(h5_set), "data": str(args.data or "synthetic 256px JPEG q90"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
              "default": "lzf/cached+uint8 (what train-order uses)", "rows": rows, "goal": ">= 3x"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
