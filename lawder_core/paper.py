"""What the LAW/ORDER paper reports, as its abstract states it: the one table lawder quotes the paper from.

The abstract is all this project knows of the paper. It gives the numbers below and names the kind of data it
evaluates on (polyps and kidney tumours); it names no diffusion backbone, no image size, no epoch count and no
training budget, and it does not say which segmenter the synthetic-data result was measured with or what its 78.3
was trained on. Whatever lawder sets beyond these numbers (the diffusion recipe, the pipeline presets, epochs,
image sizes) is lawder's own choice, and the report and the README label it so.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = "the LAW/ORDER paper's abstract"


@dataclass(frozen=True)
class PaperNumber:
    """One number of the abstract, with what the abstract says it is."""

    value: float
    text: str  # how the report and the README may quote it
    unit: str = ""


PAPER: dict[str, PaperNumber] = {
    # Claim 1: LAW improves mask-conditioned synthesis.
    "fid_law": PaperNumber(52.28, "FID with LAW"),
    "fid_uniform": PaperNumber(65.60, "FID with uniform weighting"),
    # Claim 2: LAW's synthetic data helps segmenters (the abstract's "83.2 vs 78.3").
    "dice_law_synthetic": PaperNumber(83.2, "Dice with LAW's synthetic data"),
    "dice_law_synthetic_baseline": PaperNumber(78.3, "the Dice it is compared with"),
    # Claim 3: ORDER improves MK-UNet at a tiny cost.
    "dice_mkunet": PaperNumber(75.3, "MK-UNet Dice"),
    "dice_mkunet_order": PaperNumber(81.3, "MK-UNet with ORDER Dice"),
    "order_gflops": PaperNumber(0.56, "GFLOPs of MK-UNet with ORDER", "GFLOPs"),
    "order_params_k": PaperNumber(42, "parameters of MK-UNet with ORDER, in thousands", "K"),
    "nnunet_size_ratio": PaperNumber(730, "times smaller than nnU-Net", "×"),
}

DATA_SETS = ("polyp", "kidney tumour")  # the kinds of data the abstract names


def value(key: str) -> float:
    return PAPER[key].value


def quoted(key: str, digits: int | None = None) -> str:
    """A paper number as the report prints it: the abstract's own digits, its unit where it has one."""
    number = PAPER[key]
    text = f"{number.value:.{digits}f}" if digits is not None else f"{number.value:g}"
    return f"{text}{number.unit}" if number.unit in ("K", "×") else f"{text} {number.unit}".rstrip()
