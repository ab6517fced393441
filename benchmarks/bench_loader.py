"""Images per second: lawder's HDF5 Dataset vs decoding the same images from a JPEG folder.

Both sides serve the same (image float C×H×W, mask) pairs through a DataLoader, in one run, with
num_workers 0 and 2; the HDF5 side lzf-compressed or not, read lazily per sample or held in memory (the default
for splits that fit; its first-epoch ratio includes reading the split), as float or as uint8 batches (what
train-order uses). Every batch is turned into float images by the consumer, as a training step does.
With workers, every batch also crosses a process boundary through a newly allocated shared-memory tensor: on a
2-core machine that transfer, not reading, bounds both sides of the 2-worker rows.
Usage: python benchmarks/bench_loader.py [--data DIR_OF_images_masks] [--n 600]
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

from lawder_core.data.dataset import SegDataset, to_model_input
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, help="folder with images/ and masks/ (default: synthetic JPEGs)")
    parser.add_argument("--n", type=int, default=600, help="synthetic images when --data is not given")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bench_loader.json"))
    args = parser.parse_args()
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
