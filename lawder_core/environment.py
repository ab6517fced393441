"""Versions and devices of this installation (for `lawder env` and run metadata)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

PACKAGES = ("lawder", "torch", "torchvision", "ray", "diffusers", "segmentation-models-pytorch", "h5py",
            "torchmetrics", "clean-fid", "nibabel", "numpy")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment_report() -> dict[str, Any]:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        **{name: package_version(name) for name in PACKAGES},
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "cpu_threads": torch.get_num_threads(),
    }
