"""Small builders shared by tests: folders of image/mask files and prepared HDF5 sets."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from lawder_core.data.prepare import PrepareOptions
from lawder_core.data.synthetic import prepare_synthetic

runner = CliRunner()  # the one runner every CLI test invokes the app with
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (registered under its name, as its dataclasses need)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module



def write_pair_folder(root: Path, n: int, size: tuple[int, int] = (40, 30), suffix: str = ".png",
                      mask_suffix: str = ".png") -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    rng = np.random.default_rng(0)
    w, h = size
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"img{i:02d}{suffix}")
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4: h // 2, w // 4: w // 2 + i % 3] = 255
        Image.fromarray(mask).save(masks / f"img{i:02d}{mask_suffix}")
    return images, masks


def synthetic_h5(path: Path, n: int = 20, size: int = 32, seed: int = 0) -> Path:
    prepare_synthetic(path, n=n, size=size, seed=seed, options=PrepareOptions(seed=seed))
    return path


class PooledColours(torch.nn.Module):
    """A stand-in FID feature network: 4×4 average-pooled colours (48-d), fast and weight-free."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def tiny_fid_weights(path: Path) -> Path:
    """A TorchScript file usable as `--fid-weights`, created by the test (nothing downloaded)."""
    torch.jit.script(PooledColours().eval()).save(str(path))
    return path


KITS_LABELS = ("background", "kidney", "tumor", "cyst")


def kits_like_h5(path: Path, cases: int = 6, slices: int = 6, size: int = 32, seed: int = 0) -> Path:
    """A small KiTS stand-in (the idea of tests/test_multiclass.py's builder): a bright kidney disc with a darker
    tumour and a brighter cyst inside it; the last two cases validate and test, the others train. Some slices
    have no tumour or no cyst."""
    from lawder_core.data.h5 import H5Writer

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    writer = H5Writer(path, height=size, width=size, channels=1, label_names=KITS_LABELS, source="test")
    for case in range(cases):
        split = "train" if case < cases - 2 else ("val" if case == cases - 2 else "test")
        for z in range(slices):
            cy, cx = rng.integers(10, size - 10, 2)
            mask = np.zeros((size, size), np.uint8)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 <= 49] = 1
            if z % 3:
                mask[(yy - cy) ** 2 + (xx - cx + 2) ** 2 <= 4] = 2
            if z % 2:
                mask[(yy - cy - 3) ** 2 + (xx - cx - 2) ** 2 <= 2] = 3
            image = np.choose(mask, [40, 150, 90, 230]).astype(np.float64) + rng.normal(0, 12, (size, size))
            writer.add(np.clip(image, 0, 255).astype(np.uint8), mask, f"case_{case:05d}", split)
    writer.close()
    return path


def write_kits_folder(root: Path, cases: int = 6, shape: tuple[int, int, int] = (32, 32, 8), seed: int = 0) -> Path:
    """A raw KiTS folder, `case_XXXXX/imaging.nii.gz` + `segmentation.nii.gz` (nibabel, RAS, 0.8×0.8×2.5 mm):
    in each case a kidney on the middle slices (HU 150) with a tumour (HU 60) and a cyst (HU 10) inside it, soft
    tissue (HU 40) and noise around; the first and last slices hold no kidney."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    xx, yy = np.mgrid[:nx, :ny]
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for case in range(cases):
        labels = np.zeros(shape, np.uint8)
        cx, cy = rng.integers(nx // 3, 2 * nx // 3, 2)
        for z in range(1, nz - 1):
            labels[..., z][(xx - cx) ** 2 + (yy - cy) ** 2 <= 36] = 1
            if z % 3:
                labels[..., z][(xx - cx) ** 2 + (yy - cy - 2) ** 2 <= 4] = 2
            if z % 2:
                labels[..., z][(xx - cx - 3) ** 2 + (yy - cy + 2) ** 2 <= 2] = 3
        hu = np.choose(labels, [40, 150, 60, 10]) + rng.normal(0, 15, shape)
        folder = root / f"case_{case:05d}"
        folder.mkdir(parents=True)
        nib.save(nib.Nifti1Image(hu.astype(np.int16), affine), folder / "imaging.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), folder / "segmentation.nii.gz")
    return root


def tiny_law_run(data: Path, run: Path, steps: int = 2) -> Path:
    """A `train-law` run folder in a few seconds: the tiny UNet, a couple of steps, no previews."""
    from lawder_core.models.law import LAWConfig
    from lawder_core.train.diffusion import DiffusionTrainConfig, train_diffusion

    train_diffusion(DiffusionTrainConfig(data=str(data), out=str(run), size=32, steps=steps, batch_size=4,
                                         preset="tiny", sample_every=0, law=LAWConfig(warmup_frac=0.0)))
    return run


def untrained_checkpoint(folder: Path, model: str = "mkunet-t", size: int = 32, channels: int = 3) -> Path:
    """A segmenter checkpoint folder (config.json + model.safetensors) as training writes it, untrained."""
    from lawder_core.models.factory import build_segmenter, save_segmenter

    torch.manual_seed(0)
    save_segmenter(build_segmenter(model, in_channels=channels), folder,
                   extra={"train_config": {"size": size, "model": model}})
    return folder


def quick_seg_config(data: Path, out: Path, **overrides):
    """A segmenter training config that takes seconds: MK-UNet-T, 32 px, 2 epochs of 2 steps at batch 4."""
    from lawder_core.train.configs import SegTrainConfig

    base = dict(data=str(data), out=str(out), model="mkunet-t", size=32, epochs=2, batch_size=4,
                max_steps_per_epoch=2)
    return SegTrainConfig(**{**base, **overrides})


# One model list for the tests: every factory model (the contract), and one of each family where a test needs
# the code paths rather than every size (MK-UNet, MK-UNet + ORDER, an smp baseline).
ONE_PER_FAMILY = ("mkunet-t", "mkunet-t-order", "unet-r18")
