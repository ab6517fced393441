"""One factory for every segmenter lawder trains, and the save/load contract of its run folders.

Names (`models/configs.py: available_models`): `mkunet-{t,s,base,m,l}` and `mkunet-t-wide` (MK-UNet-T
widened to ORDER's parameter count, its fair control), `mkunet-{t,s,base}-order`, and segmentation-models-pytorch
baselines (`unet-r34`, `unet-r18`, `unet-mbv2`, `unetpp-r34`). Every model answers `model(x)` with logits
and `model(x, return_aux=True)` with (logits, aux_logits), so the training loop never asks which one it has.

A saved segmenter is a folder in the `from_pretrained` style: `config.json` (name, classes, input channels,
ORDER config, free-form extra) and `model.safetensors`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lawder_core.config import from_dict
from lawder_core.errors import DataError, EnvironmentProblem, UsageError
from lawder_core.files import atomic_save
from lawder_core.models.configs import CHECKPOINT_CONFIG as CONFIG_FILE
from lawder_core.models.configs import MKUNET_MODELS, ORDER_MODELS, SMP_MODELS, OrderConfig, available_models
from lawder_core.models.mkunet import MKUNet
from lawder_core.models.order import MKUNetOrder

WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1
CORRUPT_HINT = "The checkpoint is corrupt; retrain or restore it."

class SMPSegmenter(nn.Module):
    """A segmentation-models-pytorch network behind lawder's forward signature (no auxiliary outputs)."""

    def __init__(self, net: nn.Module, name: str, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.net = net
        self.name, self.num_classes, self.in_channels = name, num_classes, in_channels

    def forward(
        self, x: torch.Tensor, return_aux: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        logits = self.net(x)
        return (logits, []) if return_aux else logits


def _build_smp(name: str, num_classes: int, in_channels: int, encoder_weights: str | None) -> nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as err:  # the package is a declared dependency; this only fires in broken envs
        raise EnvironmentProblem(
            f"{name} needs segmentation-models-pytorch, which cannot be imported: {err}",
            "Install it with `pip install segmentation-models-pytorch`.",
        ) from err
    architecture, encoder = SMP_MODELS[name]
    try:
        net = getattr(smp, architecture)(
            encoder_name=encoder, encoder_weights=encoder_weights, in_channels=in_channels, classes=num_classes
        )
    except (OSError, RuntimeError, ValueError, KeyError) as err:
        if encoder_weights is None:
            raise
        raise EnvironmentProblem(
            f"could not load {encoder_weights!r} weights for the {encoder} encoder of {name}: {err}",
            "Pretrained encoders are downloaded on first use: run once on a connected machine (the weights are "
            "cached), or train without --encoder-weights.",
        ) from err
    return SMPSegmenter(net, name, num_classes, in_channels)


def build_segmenter(
    name: str,
    num_classes: int = 1,
    in_channels: int = 3,
    encoder_weights: str | None = None,
    order: OrderConfig | None = None,
) -> nn.Module:
    """Build a segmenter by name; `order` configures `*-order` models (defaults when None), others ignore it."""
    if name not in available_models():
        raise UsageError(f"unknown model {name!r}.", f"Known models: {', '.join(available_models())}.")
    if num_classes < 1 or in_channels < 1:
        raise UsageError(f"num_classes ({num_classes}) and in_channels ({in_channels}) must be at least 1.")
    # `order` is ignored by models without the adapter, so one training config serves every model.
    if name in SMP_MODELS:
        return _build_smp(name, num_classes, in_channels, encoder_weights)
    if encoder_weights is not None:
        raise UsageError(
            f"{name} has no pretrained encoder weights (asked for {encoder_weights!r}).",
            "MK-UNet models train from scratch: drop --encoder-weights.",
        )
    if name in ORDER_MODELS:
        return MKUNetOrder(ORDER_MODELS[name], num_classes, in_channels, order or OrderConfig())
    return MKUNet(MKUNET_MODELS[name], num_classes, in_channels)


def segmenter_spec(model: nn.Module) -> dict[str, Any]:
    """What `build_segmenter` needs to rebuild `model`: name, num_classes, in_channels, order."""
    if isinstance(model, SMPSegmenter):
        return {"name": model.name, "num_classes": model.num_classes, "in_channels": model.in_channels, "order": None}
    if isinstance(model, MKUNetOrder):
        name, order = f"mkunet-{model.variant}-order", dataclasses.asdict(model.order_config)
        return {"name": name, "num_classes": model.num_classes, "in_channels": model.in_channels, "order": order}
    if isinstance(model, MKUNet):
        name = f"mkunet-{model.variant}"
        return {"name": name, "num_classes": model.num_classes, "in_channels": model.in_channels, "order": None}
    raise UsageError(f"{type(model).__name__} was not built by build_segmenter and cannot be saved.")


def save_segmenter(model: nn.Module, folder: Path, extra: dict[str, Any] | None = None) -> None:
    """Write `config.json` and `model.safetensors` into `folder`, each atomically (weights first)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    config = {**segmenter_spec(model), "extra": extra or {}, "format_version": FORMAT_VERSION}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_save(lambda p: save_file(state, str(p), metadata={"format": "pt"}), folder / WEIGHTS_FILE)
    atomic_save(lambda p: p.write_text(json.dumps(config, indent=2)), folder / CONFIG_FILE)


def read_segmenter_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise DataError(
            f"{folder} holds no {CONFIG_FILE}: it is not a saved segmenter.",
            "Point at a folder written by `lawder train-order` (its best/ or last/ checkpoint).",
        )
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}", CORRUPT_HINT) from err
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object.", CORRUPT_HINT)
    missing = {"name", "num_classes", "in_channels"} - set(config)
    if missing:
        raise DataError(f"{path} lacks {sorted(missing)}.", CORRUPT_HINT)
    wrong = [f"'{key}' is {config[key]!r}, not {kind}" for key, kind, ok in (
        ("name", "a string", isinstance(config["name"], str)),
        ("num_classes", "an integer", _is_int(config["num_classes"])),
        ("in_channels", "an integer", _is_int(config["in_channels"])),
        ("order", "an object", config.get("order") is None or isinstance(config.get("order"), dict)),
    ) if not ok]
    if wrong:
        raise DataError(f"{path} is damaged: {'; '.join(wrong)}.", CORRUPT_HINT)
    return config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_segmenter(folder: Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the model described by `folder/config.json` and load `folder/model.safetensors` into it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    config = read_segmenter_config(folder)
    try:
        order = from_dict(OrderConfig, config["order"]) if config.get("order") else None
        model = build_segmenter(config["name"], config["num_classes"], config["in_channels"], None, order)
    except UsageError as err:
        raise DataError(
            f"{folder / CONFIG_FILE} describes a model this version cannot build: {err.message}",
            "It was written by another lawder version or edited by hand.",
        ) from err
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise DataError(f"{folder} has a {CONFIG_FILE} but no {WEIGHTS_FILE}.", "The checkpoint is incomplete.")
    device = str(map_location) if isinstance(map_location, torch.device) else map_location
    try:
        state = load_file(str(weights), device=device)
    except (SafetensorError, OSError) as err:
        raise DataError(f"{weights} cannot be read: {err}", CORRUPT_HINT) from err
    if any(k.startswith("order_fusions.") and ".fuse." in k for k in state):
        raise DataError(
            f"{weights} holds a first-build ORDER (a 1×1 fusion in place of the gate), which this version "
            "replaced by ORDER revision 2 (an update on top of MK-UNet-T's fusion).",
            f"Retrain it: lawder train-order --model {config['name']} ... (same data and flags).",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise DataError(
            f"{weights} does not match the {config['name']} described in {CONFIG_FILE}: {err}",
            "The weights and config come from different models.",
        ) from err
    return model.to(map_location).eval()
