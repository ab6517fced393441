"""Versions and devices of this installation (for `lawder env` and run metadata)."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import TYPE_CHECKING, Any

from lawder_core.errors import EnvironmentProblem, UsageError

if TYPE_CHECKING:
    import torch

# On a joined Ray cluster, how long a command waits for the resources it asks for before it gives up (exit 4):
# long enough for another job's trial to end or an autoscaler to add a node, short enough that a wrong request ends.
DEFAULT_WAIT_S = 300.0

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


def check_device_name(device: str) -> None:
    """auto, cpu, cuda or cuda:N (checked without PyTorch, so a typo is refused before it loads)."""
    kind, colon, index = str(device).partition(":")
    if kind not in ("auto", "cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N.")


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """None or 'auto': the first GPU when there is one; an unavailable 'cuda' is an error, not a silent CPU run."""
    import torch

    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, torch.device):
        check_device_name(device)
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EnvironmentProblem(f"--device {device} was asked for but PyTorch sees no GPU.",
                                 "Use --device cpu (or auto), or install a CUDA build of PyTorch.")
    return device
