"""Every model the factory builds keeps the same contract, so the training loop, predict and export never ask
which model they have: logits at the input size for 1 and C classes, a list of auxiliary logits, a gradient for
every parameter, and a save/load round trip that gives the same outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lawder_core.models.configs import ORDER_MODELS, SMP_MODELS, available_models
from lawder_core.models.factory import build_segmenter, load_segmenter, read_segmenter_config, save_segmenter


@pytest.fixture(scope="module", params=available_models())
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("classes", [1, 3])
def test_logits_come_back_at_the_input_size_with_a_list_of_auxiliary_logits(name: str, classes: int) -> None:
    model = build_segmenter(name, num_classes=classes).eval()
    x = torch.randn(2, 3, 64, 96)  # not square: a height/width mix-up would show
    with torch.no_grad():
        logits = model(x)
        again, aux = model(x, return_aux=True)
    assert logits.shape == (2, classes, 64, 96)
    torch.testing.assert_close(logits, again)
    assert isinstance(aux, list) and all(a.shape[:2] == (2, classes) for a in aux)
    assert (aux == []) == (name in SMP_MODELS)  # the MK-UNets supervise their decoder stages


def test_every_parameter_gets_a_gradient(name: str) -> None:
    torch.manual_seed(0)
    model = build_segmenter(name, num_classes=2).train()
    logits, aux = model(torch.randn(2, 3, 64, 64), return_aux=True)
    (logits.square().mean() + sum(a.square().mean() for a in aux)).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == [], f"{name}: no gradient reaches {missing[:5]}"


def test_a_saved_model_loads_back_with_the_same_outputs(name: str, tmp_path: Path) -> None:
    model = build_segmenter(name, num_classes=2, in_channels=1)
    with torch.no_grad():  # BatchNorm statistics off their defaults, so a round trip that drops buffers shows
        model.train()(torch.randn(2, 1, 64, 64) * 3 + 1)
    save_segmenter(model.eval(), tmp_path)
    back = load_segmenter(tmp_path)
    config = read_segmenter_config(tmp_path)
    assert (config["name"], config["num_classes"], config["in_channels"]) == (name, 2, 1)
    assert not back.training and (config.get("order") is not None) == (name in ORDER_MODELS)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x))
