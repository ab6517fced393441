"""Config files are checked against the dataclass schema before any work (issue 16, item 8)."""

from __future__ import annotations

import numpy as np
import pytest

from lawder_cli.main import app
from lawder_core.config import from_dict
from lawder_core.errors import EXIT_USAGE, UsageError
from lawder_core.train.configs import SegTrainConfig
from tests.helpers import runner, synthetic_h5

pytestmark = pytest.mark.faults


@pytest.mark.parametrize(("bad", "message"), [
    ({"size": "abc"}, "'size' of SegTrainConfig must be an integer"),
    ({"size": [64]}, "'size' of SegTrainConfig must be an integer"),
    ({"lr": "fast"}, "'lr' of SegTrainConfig must be a number"),
    ({"augment": 1}, "'augment' of SegTrainConfig must be true or false"),
    ({"synthetic": 3}, "'synthetic' of SegTrainConfig must be a string or empty"),
    ({"order": {"rho": "a"}}, "'rho' of OrderConfig must be a number"),
])
def test_a_wrong_type_is_refused_with_the_field_and_the_expected_type(bad, message) -> None:
    with pytest.raises(UsageError, match=message):
        from_dict(SegTrainConfig, {"data": "d.h5", "out": "o", **bad})


def test_numbers_from_yaml_and_search_spaces_are_accepted() -> None:
    cfg = from_dict(SegTrainConfig, {"data": "d.h5", "out": "o", "lr": 1, "size": np.int64(64),
                                     "order": {"rho": np.float64(0.2)}})
    assert cfg.lr == 1.0 and cfg.size == 64 and type(cfg.size) is int and cfg.order.rho == 0.2


def test_train_order_with_a_mistyped_config_exits_2_and_leaves_no_run_folder(tmp_path) -> None:
    data = synthetic_h5(tmp_path / "s.h5", n=8, size=32)
    config = tmp_path / "bad.yaml"
    config.write_text("size: abc\n")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train-order", "--data", str(data), "--out", str(out), "--config", str(config)])
    assert result.exit_code == EXIT_USAGE
    assert "'size'" in result.output and "Traceback" not in result.output
    assert not out.exists()
