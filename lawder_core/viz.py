"""PNG grids users look at: synthetic pairs, and LAW's weight maps beside their masks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

LESION_TINT = np.array([255, 40, 40], dtype=np.float32)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H,W), (H,W,1) or (H,W,3) uint8 → (H,W,3) uint8."""
    if image.ndim == 2:
        image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Tint lesion pixels so the layout the image was conditioned on is visible."""
    rgb = to_rgb(image).astype(np.float32)
    on = (mask > 0)[..., None]
    return np.where(on, (1 - alpha) * rgb + alpha * LESION_TINT, rgb).round().astype(np.uint8)


def pair_grid(images: np.ndarray, masks: np.ndarray, max_pairs: int = 16, columns: int = 4,
              pad: int = 2) -> Image.Image:
    """Each tile: the image, then the image with its mask tinted."""
    n = min(len(images), max_pairs)
    h, w = images.shape[1:3]
    rows = max(1, -(-n // columns))
    cols = min(columns, max(n, 1))
    tile_w = 2 * w + pad
    canvas = np.full((rows * (h + pad) + pad, cols * (tile_w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (tile_w + pad)
        canvas[y:y + h, x:x + w] = to_rgb(images[i])
        canvas[y:y + h, x + w + pad:x + 2 * w + pad] = overlay(images[i], masks[i])
    return Image.fromarray(canvas)


def save_pair_grid(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray, max_pairs: int = 16) -> Path:
    path = Path(path)
    pair_grid(images, masks, max_pairs).save(path, format="PNG")
    return path


def colour_bar_labels(low: float, high: float) -> list[str]:
    """The weight-map colour bar's ticks (lowest, 1, highest) to 3 significant digits: 0.181, 1, 5.53."""
    return [f"{low:.3g}", "1", f"{high:.3g}"]


def save_weight_preview(path: str | os.PathLike, images: np.ndarray, masks: np.ndarray, weights: np.ndarray,
                        samples: np.ndarray, w_range: tuple[float, float], title: str) -> Path:
    """Rows of: real image, its mask, the weight map the loss used, an EMA sample for that mask.

    Weights use a log colour scale centred on 1 so up- and down-weighting read symmetrically.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    n = len(images)
    fig, axes = plt.subplots(n, 4, figsize=(8.6, 2.1 * n + 0.4), squeeze=False)
    norm = LogNorm(vmin=max(w_range[0], 1e-2), vmax=w_range[1])
    heads = ("image", "mask", "weight map", "sample (EMA)")
    for i in range(n):
        axes[i, 0].imshow(to_rgb(images[i]))
        axes[i, 1].imshow(masks[i], cmap="gray", vmin=0, vmax=max(1, int(masks.max())), interpolation="nearest")
        im = axes[i, 2].imshow(np.clip(weights[i], norm.vmin, norm.vmax), cmap="magma", norm=norm,
                               interpolation="nearest")
        bar = fig.colorbar(im, ax=axes[i, 2], fraction=0.046, pad=0.04)
        bar.set_ticks([norm.vmin, 1.0, norm.vmax], labels=colour_bar_labels(norm.vmin, norm.vmax))
        bar.ax.minorticks_off()
        axes[i, 3].imshow(to_rgb(samples[i]))
        for j in range(4):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(heads[j], fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
