"""ORDER's training modes: two-stage (--init-from an MK-UNet run, --freeze-trunk) and joint with detached heads."""

import pytest
import torch

from lawder_core.errors import DataError, UsageError
from lawder_core.models.configs import OrderConfig
from lawder_core.models.factory import build_segmenter, load_segmenter
from lawder_core.models.order import is_adapter_parameter
from lawder_core.runs import read_metrics
from lawder_core.train.configs import check_seg_config
from lawder_core.train.losses import segmentation_loss
from lawder_core.train.seg import SegTrainConfig, aux_loss_weights, build_optimizer, train_segmenter
from tests.helpers import quick_seg_config


@pytest.fixture(scope="module")
def trunk_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("t") / "t"
    train_segmenter(quick(data, out, model="mkunet-t"))
    return out


def quick(data, out, **kw):
    return quick_seg_config(data, out, **{"model": "mkunet-t-order", **kw})


def trunk_of(state: dict) -> dict:
    return {k: v for k, v in state.items() if not is_adapter_parameter(k)}


def test_two_stage_order_starts_as_its_trunk_and_never_changes_it(data, trunk_run, tmp_path):
    out = tmp_path / "order"
    train_segmenter(quick(data, out, init_from=str(trunk_run), freeze_trunk=True, epochs=2))
    start = read_metrics(out)[0]
    assert start["epoch"] == -1 and start["steps"] == 0 and start["started_from"].endswith("best")
    trunk = load_segmenter(trunk_run / "best").eval()
    x = torch.rand(3, 3, 32, 32)
    # the start, kept as best/ before any step, predicts exactly what the trunk run does
    first_best = read_metrics(out)[0]["val_dice"]
    assert first_best == max(r["val_dice"] for r in read_metrics(trunk_run))
    order = load_segmenter(out / "last").eval()
    before, after = trunk_of(trunk.state_dict()), trunk_of(order.state_dict())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # BN stats too
    assert any(v.abs().sum() > 0 for k, v in order.state_dict().items() if k.endswith("to_out.weight"))
    with torch.no_grad():
        fresh = build_segmenter("mkunet-t-order").eval()
        fresh.load_state_dict(trunk.state_dict(), strict=False)
        torch.testing.assert_close(fresh(x), trunk(x), rtol=0, atol=0)


def test_init_from_refuses_weights_of_another_width(data, trunk_run, tmp_path):
    cfg = quick(data, tmp_path / "wide", model="mkunet-t-wide", init_from=str(trunk_run))
    with pytest.raises(DataError, match="do not fit"):
        train_segmenter(cfg)


@pytest.mark.parametrize("kw, message", [({"freeze_trunk": True, "model": "mkunet-t"}, "has none"),
                                         ({"freeze_trunk": True}, "needs --init-from")])
def test_freeze_trunk_needs_an_order_model_and_a_start(data, tmp_path, trunk_run, kw, message):
    if message == "has none":
        kw = {**kw, "init_from": str(trunk_run)}
    with pytest.raises(UsageError, match=message):
        check_seg_config(quick(data, tmp_path / "x", **kw))


def test_with_detached_heads_the_trunk_gradient_at_step_0_is_mkunet_t_s():
    """The region heads' losses train the heads only: at step 0 (ORDER's update is zero) every trunk tensor gets
    exactly MK-UNet-T's gradient on the same batch; without the stop-gradient most of them would not."""
    torch.manual_seed(0)
    x, mask = torch.rand(2, 3, 64, 64), (torch.rand(2, 1, 64, 64) > 0.7).float()
    cfg = SegTrainConfig(data="", out="")

    def trunk_grads(model):
        logits, aux = model(x, return_aux=True)
        segmentation_loss(logits, aux, mask, aux_loss_weights(model, len(aux), cfg)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if not is_adapter_parameter(k)}

    torch.manual_seed(1)
    t = build_segmenter("mkunet-t")
    grads_t = trunk_grads(t)
    for detach, same in ((True, True), (False, False)):
        order = build_segmenter("mkunet-t-order", order=OrderConfig(detach_heads=detach))
        order.load_state_dict(t.state_dict(), strict=False)
        grads_o = trunk_grads(order)
        equal = [torch.equal(grads_t[k], grads_o[k]) for k in grads_t]
        assert all(equal) if same else sum(not e for e in equal) > len(equal) // 2


def test_aux_weights_deep_supervision_for_every_mk_unet_region_heads_for_order_only():
    cfg = SegTrainConfig(data="", out="", deep_supervision=0.3, order=OrderConfig(aux_weight=0.1))
    assert aux_loss_weights(build_segmenter("mkunet-t"), 3, cfg) == [0.3] * 3
    assert aux_loss_weights(build_segmenter("mkunet-t-wide"), 3, cfg) == [0.3] * 3
    assert aux_loss_weights(build_segmenter("mkunet-t-order"), 6, cfg) == [0.3] * 3 + [0.1] * 3


def test_the_adapter_has_its_own_group_with_a_warm_up_and_a_lower_rate():
    model = build_segmenter("mkunet-t-order")
    cfg = SegTrainConfig(data="", out="", lr=1e-3, adapter_lr_scale=0.5, adapter_warmup_epochs=2)
    optimizer, scheduler = build_optimizer(model, cfg, epochs=10)
    trunk, adapter = optimizer.param_groups
    assert len(adapter["params"]) == sum(1 for k, _ in model.named_parameters() if is_adapter_parameter(k))
    rates = []
    for _ in range(4):
        rates.append((trunk["lr"], adapter["lr"]))
        scheduler.step()
    assert rates[0][0] == pytest.approx(1e-3) and rates[0][1] == pytest.approx(0.5e-3 / 3)
    assert rates[2][1] == pytest.approx(rates[2][0] * 0.5)  # warm after two epochs: lr × scale on the cosine
    frozen = SegTrainConfig(data="", out="", lr=1e-3, freeze_trunk=True, init_from="x")
    optimizer, _ = build_optimizer(build_segmenter("mkunet-t-order"), frozen, epochs=10)
    assert len(optimizer.param_groups) == 1
