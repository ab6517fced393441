"""The fast inference paths give the eager outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lawder_core.models import fast
from lawder_core.models.factory import build_segmenter
from lawder_core.models.fast import fold_batchnorms, fold_conv_bn, optimize_for_inference
from tests.helpers import ONE_PER_FAMILY

TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}


def with_trained_batchnorm(model: nn.Module) -> nn.Module:
    """Non-default BatchNorm statistics, so folding has something to get wrong."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64) * 2 + 0.5)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def reference(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_fold_conv_bn_is_exact_in_eval_mode() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(fold_conv_bn(conv, bn)(x), bn(conv(x)), **TOLERANCE)


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_channels_last_matches_eager(name: str) -> None:
    model = with_trained_batchnorm(build_segmenter(name))
    x = torch.randn(2, 3, 64, 64)
    fast_model = optimize_for_inference(model, "channels_last")
    torch.testing.assert_close(fast_model(x), reference(model, x), **TOLERANCE)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast_model.modules()), "every BatchNorm is folded"


def test_auxiliary_outputs_survive_the_fast_path() -> None:
    model = with_trained_batchnorm(build_segmenter("mkunet-t-order"))
    x = torch.randn(1, 3, 64, 64)
    logits, aux = optimize_for_inference(model, "auto")(x, return_aux=True)
    with torch.no_grad():
        ref_logits, ref_aux = model(x, return_aux=True)
    torch.testing.assert_close(logits, ref_logits, **TOLERANCE)
    for got, want in zip(aux, ref_aux, strict=True):
        torch.testing.assert_close(got, want, **TOLERANCE)


def test_the_original_model_is_left_alone() -> None:
    model = build_segmenter("mkunet-t").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorms(model)
    assert model.training and not folded.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_eager_mode_is_the_reference() -> None:
    model = with_trained_batchnorm(build_segmenter("mkunet-t"))
    x = torch.randn(1, 3, 64, 64)
    out = optimize_for_inference(model, "eager")(x)
    assert torch.equal(out, reference(model, x))


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown inference mode"):
        optimize_for_inference(build_segmenter("mkunet-t"), "turbo")


def test_compile_without_a_compiler_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fast, "compiler_available", lambda: False)
    with pytest.warns(UserWarning, match="C compiler"):
        wrapped = optimize_for_inference(build_segmenter("mkunet-t"), "compile")
    assert wrapped.mode == "channels_last"


def test_a_failing_compile_falls_back_at_the_first_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_compile(module: nn.Module, **kwargs: object):
        def run(*args: object, **kw: object):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(fast, "compiler_available", lambda: True)
    monkeypatch.setattr(torch, "compile", broken_compile)
    model = with_trained_batchnorm(build_segmenter("mkunet-t"))
    x = torch.randn(1, 3, 64, 64)
    with pytest.warns(UserWarning, match="inductor exploded"):
        wrapped = optimize_for_inference(model, "compile", example=x)
    assert wrapped.mode == "channels_last"
    torch.testing.assert_close(wrapped(x), reference(model, x), **TOLERANCE)


@pytest.mark.slow
@pytest.mark.timeout(1200)  # inductor builds C++ kernels: minutes on a busy 2-core machine, cached afterwards
def test_torch_compile_matches_eager() -> None:
    """With a C compiler: compiled output equals eager. Without one: the documented fallback, with a warning."""
    model = with_trained_batchnorm(build_segmenter("mkunet-t-order"))
    x = torch.randn(1, 3, 64, 64)
    if fast.compiler_available():
        wrapped = optimize_for_inference(model, "compile", example=x)
        assert wrapped.mode == "compile"
    else:
        with pytest.warns(UserWarning, match="C compiler"):
            wrapped = optimize_for_inference(model, "compile", example=x)
        assert wrapped.mode == "channels_last"
    torch.testing.assert_close(wrapped(x), reference(model, x), **TOLERANCE)
