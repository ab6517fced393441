"""`--lesion-labels` (issue 15): which stored labels LAW treats as lesion, while the denoiser and `lawder sample`
keep every label (KiTS: the lesion is tumour + cyst, not the kidney around them)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from lawder_cli.main import app
from lawder_core.data.h5 import load_arrays, read_info
from lawder_core.data.labels import default_lesion_labels, label_map, lesion_labels
from lawder_core.errors import UsageError
from lawder_core.metrics.adherence import mask_adherence, segmenter_classes
from lawder_core.models.law import lesion_at, prior_map, weight_stats
from lawder_core.train.configs import DiffusionTrainConfig, run_lesion_labels
from tests.helpers import KITS_LABELS, kits_like_h5, runner, synthetic_h5

POLYPS = ("background", "lesion")


@pytest.fixture(scope="module")
def kits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return kits_like_h5(tmp_path_factory.mktemp("kits") / "kits.h5", cases=4, slices=6, size=32)


def train_masks(path: Path) -> np.ndarray:
    return load_arrays(path, "train")[1]


# ---------------------------------------------------------------- the label set


def test_default_lesion_set_is_tumour_and_cyst_on_kits_and_every_label_elsewhere() -> None:
    assert lesion_labels(KITS_LABELS) == (2, 3)
    assert lesion_labels(POLYPS) == (1,)
    assert lesion_labels(("background", "Kidney", "Tumour")) == (2,)  # KiTS19: no cyst label
    assert default_lesion_labels(("background", "liver", "tumor")) == (1, 2)  # not KiTS: every label > 0
    assert lesion_labels(KITS_LABELS, "kidney+tumor") == (1, 2)
    assert lesion_labels(KITS_LABELS, "3+2") == lesion_labels(KITS_LABELS, "tumor,cyst") == (2, 3)
    assert lesion_labels(KITS_LABELS, " ") == (2, 3)
    for bad in ("liver", "0", "4", "tumor+"):
        with pytest.raises(UsageError, match="--lesion-labels"):
            lesion_labels(KITS_LABELS, bad)


def test_lesion_map_counts_only_the_lesion_labels_and_the_prior_weights_them() -> None:
    mask = torch.zeros(1, 8, 8, dtype=torch.long)
    mask[0, 1:7, 1:7] = 1  # kidney
    mask[0, 2:4, 2:4] = 2  # tumour
    mask[0, 5, 5] = 3  # cyst
    lesion = lesion_at(mask, (8, 8), (2, 3))
    assert lesion.shape == (1, 1, 8, 8) and float(lesion.sum()) == 5
    assert torch.equal(lesion_at(mask, (8, 8)), (mask > 0).float()[:, None])  # None: every label > 0, as before
    assert float(lesion_at(mask, (4, 4), (2, 3)).sum()) == pytest.approx(5 / 4)  # area pooling keeps the share
    w = prior_map(lesion, 0.5)
    assert float(w[0, 0, 2, 2]) > float(w[0, 0, 1, 1]) == pytest.approx(float(w[0, 0, 0, 0]))  # kidney = background
    stats = weight_stats(w, lesion)
    assert stats["w_lesion"] > stats["w_background"]


def test_a_resumed_run_keeps_its_lesion_set_and_an_old_run_keeps_every_label(kits: Path, tmp_path: Path) -> None:
    names = read_info(kits).label_names
    checkpoint = tmp_path / "run" / "last"
    checkpoint.mkdir(parents=True)
    cfg = DiffusionTrainConfig(data=str(kits), out=str(tmp_path / "run"), resume=True)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 3}))  # a run from before --lesion-labels
    assert run_lesion_labels(cfg, names) == (1, 2, 3)
    assert run_lesion_labels(replace(cfg, resume=False), names) == (2, 3)
    (checkpoint / "progress.json").write_text(json.dumps({"step": 3, "lesion_labels": [2, 3]}))
    assert run_lesion_labels(cfg, names) == run_lesion_labels(replace(cfg, lesion_labels="cyst+tumor"), names)
    with pytest.raises(UsageError, match="lesion labels"):
        run_lesion_labels(replace(cfg, lesion_labels="kidney"), names)


# ---------------------------------------------------------------- train-law and sample on KiTS-like data


@pytest.fixture(scope="module")
def kits_run(kits: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Two steps of the tiny preset; one batch is the whole train split, so its statistics are the split's."""
    out = tmp_path_factory.mktemp("runs") / "law"
    batch = len(train_masks(kits))
    result = runner.invoke(app, ["train-law", "--data", str(kits), "--out", str(out), "--size", "32", "--steps", "2",
                                 "--batch-size", str(batch), "--preset", "tiny", "--workers", "0", "--log-every", "1",
                                 "--sample-every", "0", "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_train_law_on_kits_computes_the_lesion_statistics_on_tumour_and_cyst(kits: Path,
                                                                            kits_run: tuple[Path, dict]) -> None:
    out, summary = kits_run
    masks = train_masks(kits)
    masses, kidney_and_masses = np.isin(masks, [2, 3]).mean(), (masks > 0).mean()
    assert 0 < masses < kidney_and_masses / 2  # the test can tell them apart
    assert summary["lesion_labels"] == [2, 3]
    assert summary["law"]["lesion_frac"] == pytest.approx(masses, rel=1e-5)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lesion_frac"] for r in records] == pytest.approx([masses, masses], rel=1e-5)
    assert summary["law"]["w_lesion"] > summary["law"]["w_background"]  # the prior favours tumour and cyst
    assert json.loads((out / "last" / "progress.json").read_text())["lesion_labels"] == [2, 3]
    assert json.loads((out / "config.json").read_text())["lesion_labels"] is None  # the default, resolved per data
    spec = json.loads((out / "last" / "denoiser_ema" / "lawder_denoiser.json").read_text())
    assert tuple(spec["label_names"]) == KITS_LABELS  # conditioned on every label: one one-hot channel each


def test_sample_keeps_every_label_and_the_label_names(kits: Path, kits_run: tuple[Path, dict],
                                                      tmp_path: Path) -> None:
    out, _ = kits_run
    syn = tmp_path / "syn.h5"
    result = runner.invoke(app, ["sample", "--run", str(out), "--masks", str(kits), "--steps", "1",
                                 "--batch-size", "12", "-o", str(syn), "--json"])
    assert result.exit_code == 0, result.output
    _, masks, _ = load_arrays(syn, "train")
    assert np.array_equal(masks, train_masks(kits)) and set(np.unique(masks)) == {0, 1, 2, 3}
    info = read_info(syn)
    assert info.label_names == KITS_LABELS
    assert info.attrs["lesion_labels"] == [2, 3] and info.attrs["lesion_names"] == "tumor+cyst"
    kidney = tmp_path / "kidney.h5"
    result = runner.invoke(app, ["sample", "--run", str(out), "--masks", str(kits), "--steps", "1", "--n", "2",
                                 "--lesion-labels", "kidney+tumor+cyst", "-o", str(kidney), "--json"])
    assert result.exit_code == 0, result.output
    assert read_info(kidney).attrs["lesion_labels"] == [1, 2, 3]


@pytest.mark.parametrize("command", ["train-law", "sample", "tune"])
def test_a_bad_lesion_label_exits_2_before_anything_runs(command: str, kits: Path, kits_run: tuple[Path, dict],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = {
        "train-law": ["train-law", "--data", str(kits), "--out", str(out), "--size", "32", "--steps", "1",
                      "--batch-size", "2", "--preset", "tiny", "--workers", "0"],
        "sample": ["sample", "--run", str(kits_run[0]), "--masks", str(kits), "--steps", "1", "-o", str(out)],
        "tune": ["tune", "law-clamp", "--data", str(kits), "--out", str(out), "--segmenter", str(tmp_path)],
    }[command]
    result = runner.invoke(app, [*args, "--lesion-labels", "tumor+liver"])
    assert result.exit_code == 2, result.output
    assert "--lesion-labels" in result.output and "liver" in result.output and "tumor" in result.output
    assert not out.exists()


def test_resuming_with_another_lesion_set_is_refused(kits_run: tuple[Path, dict]) -> None:
    out, _ = kits_run
    result = runner.invoke(app, ["train-law", "--out", str(out), "--resume", "--steps", "3", "--workers", "0",
                                 "--lesion-labels", "kidney"])
    assert result.exit_code == 2 and "lesion labels" in result.output
    assert json.loads((out / "last" / "progress.json").read_text())["step"] == 2


# ---------------------------------------------------------------- adherence judges the lesion


def label_levels(batch: torch.Tensor) -> torch.Tensor:
    """A 'segmenter' that reads the label back from the grey level (label k drawn at 60·k): 4-class logits."""
    level = batch[:, :1] * 255 / 60
    return torch.cat([-(level - k).abs() * 10 for k in range(4)], dim=1)


def test_adherence_judges_the_lesion_labels_through_the_segmenter_classes() -> None:
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[:, 2:14, 2:14] = 1
    masks[:, 4:8, 4:8] = 2
    drawn = masks.copy()
    drawn[1, 4:8, 4:8] = 1  # the second image lost its tumour; the kidney is intact
    images = np.repeat((drawn * 60)[..., None], 3, axis=-1).astype(np.uint8)
    everything = mask_adherence(label_levels, images, masks)
    assert everything["dice_per_image"] == pytest.approx([1.0, 1.0]) and everything["lesion_labels"] is None
    identity = segmenter_classes(label_map(KITS_LABELS), 4, KITS_LABELS)
    lesion = mask_adherence(label_levels, images, masks, lesion_labels=(2, 3), classes=identity)
    assert lesion["dice_per_image"] == pytest.approx([1.0, 0.0]) and lesion["lesion_labels"] == [2, 3]
    merged = label_map(KITS_LABELS, "kidney,tumor+cyst")  # class 2 is written back as label 2: still lesion
    assert mask_adherence(label_levels, images, masks, lesion_labels=(2, 3),
                          classes=merged)["dice_per_image"] == pytest.approx([1.0, 0.0])
    legacy_binary = segmenter_classes(None, 1, KITS_LABELS)  # every label > 0 as one class: cannot see tumours
    assert legacy_binary.groups == ((1, 2, 3),)
    with pytest.raises(UsageError, match="cannot tell"):
        mask_adherence(label_levels, images, masks, lesion_labels=(2, 3), classes=legacy_binary)


def test_polyp_data_keeps_its_meaning(tmp_path: Path) -> None:
    data = synthetic_h5(tmp_path / "p.h5", n=4, size=16)
    names = read_info(data).label_names
    assert run_lesion_labels(DiffusionTrainConfig(data=str(data), out=str(tmp_path / "r")), names) == (1,)
    masks = torch.from_numpy(train_masks(data).astype(np.int64))
    assert torch.equal(lesion_at(masks, (16, 16), (1,)), lesion_at(masks, (16, 16)))
