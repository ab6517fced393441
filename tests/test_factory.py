"""The segmenter factory: every name builds, answers the shared forward contract, and round-trips to disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lawder_core.errors import DataError, UsageError
from lawder_core.models.factory import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    available_models,
    build_segmenter,
    load_segmenter,
    save_segmenter,
    segmenter_spec,
)
from lawder_core.models.mkunet import MKUNet
from lawder_core.models.order import MKUNetOrder, OrderConfig


def with_trained_batchnorm(model: torch.nn.Module, channels: int = 3) -> torch.nn.Module:
    """Move BatchNorm running stats off their defaults, so a round trip that drops buffers would show."""
    model.train()
    with torch.no_grad():
        model(torch.randn(2, channels, 64, 64) * 3 + 1)
    return model.eval()


def test_available_models_cover_the_documented_names() -> None:
    names = available_models()
    for name in ["mkunet-t", "mkunet-s", "mkunet-base", "mkunet-m", "mkunet-l", "mkunet-t-order",
                 "unet-r34", "unet-r18", "unet-mbv2", "unetpp-r34"]:
        assert name in names


def test_heavy_baselines_build_offline() -> None:
    for name in ("unet-r34", "unetpp-r34"):
        model = build_segmenter(name, in_channels=1)
        assert sum(p.numel() for p in model.parameters()) > 20_000_000


def test_mkunet_names_build_the_right_variants() -> None:
    assert isinstance(build_segmenter("mkunet-l"), MKUNet)
    order = build_segmenter("mkunet-t-order", order=OrderConfig(rho=0.1))
    assert isinstance(order, MKUNetOrder) and order.order_config.rho == 0.1
    # One training config serves every model: an ORDER config is ignored where there is no adapter.
    assert not isinstance(build_segmenter("mkunet-t", order=OrderConfig()), MKUNetOrder)


def test_bad_requests_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="unknown model"):
        build_segmenter("resnet-9000")
    with pytest.raises(UsageError, match="pretrained"):
        build_segmenter("mkunet-t", encoder_weights="imagenet")
    with pytest.raises(UsageError):
        build_segmenter("mkunet-t", num_classes=0)


@pytest.mark.parametrize(
    ("name", "order", "channels"),
    [("mkunet-t-order", OrderConfig(rho=0.1, late_stages=2, attn_dim=16, heads=1), 1), ("mkunet-s", None, 3),
     ("unet-mbv2", None, 3)],
)
def test_save_load_round_trip_is_exact(tmp_path: Path, name: str, order: OrderConfig | None, channels: int) -> None:
    torch.manual_seed(0)
    model = with_trained_batchnorm(build_segmenter(name, num_classes=2, in_channels=channels, order=order), channels)
    save_segmenter(model, tmp_path / "best", extra={"epoch": 3, "val_dice": 0.5})
    loaded = load_segmenter(tmp_path / "best")
    assert segmenter_spec(loaded) == segmenter_spec(model)
    assert not loaded.training
    x = torch.randn(2, channels, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    config = json.loads((tmp_path / "best" / CONFIG_FILE).read_text())
    assert config["extra"] == {"epoch": 3, "val_dice": 0.5}
    assert not list((tmp_path / "best").glob("*.partial"))


def test_missing_folder_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="config.json"):
        load_segmenter(tmp_path / "nowhere")


def test_missing_or_corrupt_weights_are_data_errors(tmp_path: Path) -> None:
    save_segmenter(build_segmenter("mkunet-t"), tmp_path)
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(DataError, match="cannot be read"):
        load_segmenter(tmp_path)
    weights.unlink()
    with pytest.raises(DataError, match="no model.safetensors"):
        load_segmenter(tmp_path)


def test_corrupt_config_is_a_data_error(tmp_path: Path) -> None:
    save_segmenter(build_segmenter("mkunet-t"), tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_segmenter(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps({"name": "mkunet-t"}))
    with pytest.raises(DataError, match="lacks"):
        load_segmenter(tmp_path)


def test_weights_of_another_model_are_a_data_error(tmp_path: Path) -> None:
    save_segmenter(build_segmenter("mkunet-t"), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**config, "name": "mkunet-s"}))
    with pytest.raises(DataError, match="does not match"):
        load_segmenter(tmp_path)


def test_unknown_order_option_in_config_is_refused(tmp_path: Path) -> None:
    save_segmenter(build_segmenter("mkunet-t-order"), tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["order"]["bogus"] = 1
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(DataError, match="bogus"):
        load_segmenter(tmp_path)


def test_a_first_build_order_checkpoint_is_refused_with_a_retrain_hint(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_segmenter(build_segmenter("mkunet-t-order"), tmp_path)
    # The first ORDER fused [decoder, skip] with a 1×1 conv + BatchNorm instead of keeping the gate.
    first_build = {k: v for k, v in MKUNet("t").state_dict().items() if not k.startswith("gates.1")}
    first_build["order_fusions.0.fuse.0.weight"] = torch.zeros(16, 32, 1, 1)
    save_file(first_build, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(DataError, match="first-build ORDER") as err:
        load_segmenter(tmp_path)
    assert "lawder train-order --model mkunet-t-order" in err.value.hint
