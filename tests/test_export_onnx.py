"""`lawder export onnx` and `lawder predict --onnx`: ONNX Runtime gives PyTorch's logits and masks (issue 17)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lawder_cli.main import app
from lawder_core.errors import UsageError
from lawder_core.export.onnx import export_onnx, onnx_session, read_metadata
from lawder_core.models.configs import available_models
from lawder_core.models.factory import build_segmenter, save_segmenter
from tests.helpers import runner, synthetic_h5

# ONNX Runtime must agree with PyTorch to 1e-4 of the logit scale beyond PyTorch's own float32 rounding on the
# model (measured against the same model in float64): two float32 implementations cannot agree more closely than
# either is exact. That own error is 2e-5–9e-5 here (mkunet-l, unet-mbv2 at 96 px: 6.2e-5, 9.1e-5), so a wrong op,
# which gives 1e-2 and more, still fails.
TOLERANCE = 1e-4


def saved_run(tmp_path: Path, name: str, size: int = 64) -> Path:
    """A run folder whose BatchNorm layers hold real statistics (so folding is exercised) and whose ORDER update
    is non-zero, as after training."""
    torch.manual_seed(0)
    model = build_segmenter(name, encoder_weights=None)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average: one pass sets the statistics of this batch
        model.train()(torch.rand(4, 3, size, size))
        for name_, p in model.named_parameters():
            if "to_out" in name_:
                p.normal_(0, 0.1)
    model.eval()
    run = tmp_path / name
    save_segmenter(model, run / "best", extra={"train_config": {"size": size}})
    return run


def onnx_vs_torch(path: Path, run: Path, size: int) -> float:
    """|ONNX − PyTorch| beyond PyTorch's own float32 error (|float32 − float64|), relative to the logit scale."""
    from lawder_core.models.factory import load_segmenter

    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size))
    session = onnx_session(path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    model = load_segmenter(run / "best").eval()
    with torch.no_grad():
        expected = model(x).numpy()
        exact = model.double()(x.double()).numpy()
    scale = max(1.0, float(np.abs(exact).max()))
    return float(np.abs(got - expected).max() - np.abs(expected - exact).max()) / scale


def check_model(tmp_path: Path, name: str) -> dict[int, Path]:
    """Two input sizes: one dynamic file, or (ORDER, whose graph depends on the size) one file per size."""
    run = saved_run(tmp_path, name)
    if name.endswith("-order"):
        files = {}
        for size in (64, 96):
            files[size] = tmp_path / f"{name}-{size}.onnx"
            result = export_onnx(run, files[size], size=size, dynamic=True)
            assert result["dynamic_size"] is False
            assert onnx_vs_torch(files[size], run, size) < TOLERANCE
        return files
    out = tmp_path / f"{name}.onnx"
    result = export_onnx(run, out, dynamic=True)
    assert result["dynamic_size"] is True and result["batchnorms_folded"] > 0
    for size in (64, 96):
        assert onnx_vs_torch(out, run, size) < TOLERANCE
    return {64: out, 96: out}


@functools.cache
def exported_order(root: Path) -> tuple[Path, dict[int, Path]]:
    root.mkdir()
    return root / "mkunet-t-order", check_model(root, "mkunet-t-order")


@pytest.fixture
def order_files(tmp_path_factory) -> tuple[Path, dict[int, Path]]:
    """Exported once per test process: an xdist worker may tear module fixtures down between tests."""
    return exported_order(tmp_path_factory.getbasetemp() / "order-onnx")


def test_mkunet_t_onnx_equals_pytorch_at_two_sizes_from_one_dynamic_file(tmp_path):
    check_model(tmp_path, "mkunet-t")


def test_order_onnx_equals_pytorch_at_two_sizes(order_files):
    _, files = order_files
    assert set(files) == {64, 96} and all(f.exists() for f in files.values())


# One model per distinct graph: the MK-UNet and ORDER widths (s, base, m, l, t-wide; s- and base-order) are the
# same modules with other channel counts, exported through mkunet-t and mkunet-t-order above (and their shapes,
# gradients and save/load are checked for every width in test_model_contract.py); each smp architecture and
# encoder is its own graph. A model added to the factory must be placed here or below.
ONE_GRAPH_EACH = ("unet-r34", "unet-r18", "unet-mbv2", "unetpp-r34")
SAME_GRAPH_AS_T = {"mkunet-s", "mkunet-base", "mkunet-m", "mkunet-l", "mkunet-t-wide", "mkunet-s-order",
                   "mkunet-base-order"}


def test_every_factory_model_is_exported_by_a_test():
    assert set(available_models()) == {"mkunet-t", "mkunet-t-order", *ONE_GRAPH_EACH, *SAME_GRAPH_AS_T}


@pytest.mark.slow
@pytest.mark.parametrize("name", ONE_GRAPH_EACH)
def test_every_distinct_factory_graph_exports(tmp_path, name):
    check_model(tmp_path, name)


def test_cli_export_metadata_overwrite_and_size_rules(tmp_path):
    run = saved_run(tmp_path, "mkunet-t")
    out = tmp_path / "m.onnx"
    exported = runner.invoke(app, ["export", "onnx", "--run", str(run), "-o", str(out), "--json"])
    assert exported.exit_code == 0, exported.output
    assert json.loads(exported.stdout)["max_abs_diff"] < 1e-3  # absolute, on logits up to ~10
    meta = read_metadata(out)
    assert meta["model"] == "mkunet-t" and meta["size"] == 64 and meta["num_classes"] == 1
    assert meta["dynamic_size"] is False  # the default: the training size
    again = runner.invoke(app, ["export", "onnx", "--run", str(run), "-o", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    with pytest.raises(UsageError, match="multiple of 32"):
        export_onnx(run, tmp_path / "n.onnx", size=50)


def test_predict_with_onnx_writes_the_masks_predict_with_the_run_writes(order_files, tmp_path):
    from PIL import Image

    run, files = order_files
    data = synthetic_h5(tmp_path / "d.h5", n=12, size=64)
    for flag, value, out in (("--run", run, "by-run"), ("--onnx", files[64], "by-onnx")):
        result = runner.invoke(app, ["predict", str(data), flag, str(value), "-o", str(tmp_path / out),
                                     "--split", "all", "--mode", "eager"])
        assert result.exit_code == 0, result.output
    masks = sorted((tmp_path / "by-run" / "masks").glob("*.png"))
    assert len(masks) == 12
    for path in masks:
        a = np.asarray(Image.open(path))
        b = np.asarray(Image.open(tmp_path / "by-onnx" / "masks" / path.name))
        assert np.mean(a != b) < 1e-3  # a pixel whose logit is ~0 may flip at a 1e-6 difference
    both = runner.invoke(app, ["predict", str(data), "--run", str(run), "--onnx", str(files[64]), "-o",
                               str(tmp_path / "x")])
    assert both.exit_code == 2 and "exactly one" in both.output
