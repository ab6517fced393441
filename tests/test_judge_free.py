"""Judge-free adherence: inside-vs-ring contrast, hit rate, spurious lesion area, size bins; `evaluate` wiring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lawder_core.errors import UsageError
from lawder_core.metrics.judge_free import (
    RING_GAP,
    bin_summary,
    fit_reference,
    judge_free_adherence,
    pair_contrast,
    ring_width,
    size_bin,
)
from tests.helpers import runner, synthetic_h5

SIDE = 32


def hand_pair(lesion_rgb=(0.6, 0.2, 0.3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A 5×4 lesion of one colour on a background with a horizontal gradient and a little noise."""
    rng = np.random.default_rng(seed)
    lesion = np.zeros((SIDE, SIDE), bool)
    lesion[12:17, 9:13] = True
    ramp = np.linspace(0.6, 0.9, SIDE)[None, :, None]
    image = np.broadcast_to(ramp * np.array([1.0, 0.55, 0.5]), (SIDE, SIDE, 3)).copy()
    image[lesion] = lesion_rgb
    image += rng.normal(0, 0.01, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), lesion


def test_contrast_equals_a_numpy_computation_on_a_hand_made_pair():
    image, lesion = hand_pair()
    x = image.astype(np.float64) / 255
    width = ring_width(SIDE)
    # the ring by brute force: every pixel whose distance to the nearest lesion pixel is in (gap, gap + width]
    lesion_px = np.argwhere(lesion)
    ring = np.zeros_like(lesion)
    for r in range(SIDE):
        for c in range(SIDE):
            d = np.sqrt(((lesion_px - (r, c)) ** 2).sum(1)).min()
            ring[r, c] = RING_GAP < d <= RING_GAP + width
    expected = np.sqrt(((x[lesion].mean(0) - x[ring].mean(0)) ** 2).sum())
    assert pair_contrast(image, lesion) == pytest.approx(expected, rel=1e-12)
    assert width == 2 and ring.sum() > lesion.sum()
    # a lesion painted in the background's own colours has next to no contrast; no lesion: no contrast at all
    faded = image.copy()  # the lesion painted with the background 7 rows up (the same columns of the ramp)
    faded[lesion] = image[lesion.nonzero()[0] - 7, lesion.nonzero()[1]]
    assert pair_contrast(faded, lesion) < 0.1 * pair_contrast(image, lesion)
    assert np.isnan(pair_contrast(image, np.zeros_like(lesion)))


def real_like_pairs(n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    pairs = [hand_pair((0.55 + 0.1 * (i % 3) / 2, 0.2, 0.3), seed=i) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_hits_spurious_area_and_bins_against_a_real_reference():
    images, lesions = real_like_pairs()
    reference = fit_reference(images, lesions)
    assert reference.hit_threshold <= reference.median_contrast
    assert bin_summary(reference.real)["all"]["hit_rate"] == pytest.approx(0.9, abs=0.05)  # by construction
    good, missing, spurious = images[0].copy(), images[0].copy(), images[0].copy()
    missing[lesions[0]] = images[0][lesions[0].nonzero()[0] - 7, lesions[0].nonzero()[1]]  # no lesion drawn
    spurious[2:8, 22:28] = images[0][lesions[0]][0]  # a second, unasked-for lesion far from the mask
    result = judge_free_adherence(np.stack([good, missing, spurious]), lesions[:3], reference, ["a", "b", "c"])
    rows = result["per_case"]
    assert [r["case"] for r in rows] == ["a@0", "b@1", "c@2"]
    assert [r["hit"] for r in rows] == [1.0, 0.0, 1.0]
    assert rows[0]["spurious_area"] == 0.0 and rows[1]["spurious_area"] == 0.0
    # the 6×6 patch: at least its 4×4 core (the score is smoothed over 3×3), at most all of it
    assert 16 / SIDE**2 <= rows[2]["spurious_area"] <= 36 / SIDE**2
    frac = float(lesions[0].mean())  # 20 / 1024 pixels: the 1-3 % bin
    assert rows[0]["size_bin"] == size_bin(frac) == "1-3%" and set(result["bins"]) == {"1-3%", "all"}
    assert result["bins"]["all"]["hit_rate"] == pytest.approx(2 / 3)


def test_size_bins_cover_every_share():
    assert [size_bin(v) for v in (0.0, 0.004, 0.01, 0.029, 0.03, 0.099, 0.1, 1.0)] == [
        None, "<1%", "1-3%", "1-3%", "3-10%", "3-10%", ">=10%", ">=10%"]


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Real pairs and a 'synthetic' file holding the real validation pairs, as `lawder sample` would write it."""
    from lawder_core.data.h5 import load_arrays
    from lawder_core.sample import write_synthetic_h5

    folder = tmp_path_factory.mktemp("jf")
    real = synthetic_h5(folder / "real.h5", n=30, size=32)
    images, masks, cases = load_arrays(real, "train")
    synthetic = write_synthetic_h5(folder / "syn.h5", images[:6], masks[:6], [f"syn_{c}" for c in cases[:6]],
                                   {"lesion_labels": [1]})
    return real, synthetic


def test_evaluate_writes_judge_free_adherence_per_case_and_per_bin(pair_files, tmp_path: Path):
    from lawder_core.data.h5 import load_arrays
    from lawder_core.evaluate import EvaluateRequest, Inputs, Metrics, evaluate

    real, synthetic = pair_files
    cache: dict = {}
    request = EvaluateRequest(out=str(tmp_path), metrics=Metrics(adherence=True),
                              inputs=Inputs(real=str(real), synthetic=str(synthetic)))
    summary = evaluate(request, real_features=cache)
    adherence = json.loads((tmp_path / "summary.json").read_text())["adherence"]
    assert summary["adherence"]["bins"]["all"]["n"] == 6 and "dice_mean" not in adherence
    rows = adherence["per_case"]
    cases = load_arrays(synthetic)[2]
    assert [r["case"] for r in rows] == [f"{case}@{i}" for i, case in enumerate(cases)]
    assert len(set(r["case"] for r in rows)) == 6
    assert all({"contrast", "hit", "spurious_area", "lesion_frac"} <= set(r) for r in rows)
    # the real pairs themselves: hits where the real reference has them
    assert adherence["bins"]["all"]["hit_rate"] >= 0.5
    assert adherence["judge_free"]["reference"]["n_pairs"] > 6
    assert any(key[0] == "judge-free" for key in cache)  # the fitted reference is kept for the next arm


@pytest.mark.parametrize(("inputs", "gates", "needle"), [
    ({}, {}, "--segmenter"),
    ({"real": "REAL_DIR"}, {}, "is a folder"),
    ({"real": "REAL"}, {"min_adherence": 0.5}, "--min-adherence"),
])
def test_adherence_requests_are_checked_before_anything_loads(pair_files, tmp_path, inputs, gates, needle):
    from lawder_core.evaluate import EvaluateRequest, Gates, Inputs, Metrics, check_request

    real, synthetic = pair_files
    given = {k: str(tmp_path) if v == "REAL_DIR" else str(real) for k, v in inputs.items()}
    request = EvaluateRequest(out=str(tmp_path), metrics=Metrics(adherence=True),
                              inputs=Inputs(synthetic=str(synthetic), **given), gates=Gates(**gates))
    with pytest.raises(UsageError, match=needle):
        check_request(request)


def test_cli_shows_judge_free_adherence_and_the_lesion_crop_kid(pair_files, tmp_path: Path):

    from lawder_cli.main import app
    from tests.helpers import tiny_fid_weights

    real, synthetic = pair_files
    weights = tiny_fid_weights(tmp_path / "fid.pt")
    result = runner.invoke(app, ["evaluate", "--adherence", "--lesion-kid", "--kid", "--real", str(real),
                                      "--synthetic", str(synthetic), "--fid-weights", str(weights),
                                      "-o", str(tmp_path / "eval")], terminal_width=200)
    assert result.exit_code == 0, result.output
    for shown in ("judge-free all", "judge-free real pairs", "lesion-crop KID", "half-samples"):
        assert shown in result.output, shown
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metadata"]["metrics"] == ["--kid", "--adherence", "--lesion-kid"]
    assert summary["fid"]["kid_se"] is not None and summary["lesion_kid"]["kid_se"] is not None
    bins = summary["lesion_kid"]["bins"]  # 6 synthetic pairs: each bin is listed, none has enough crops for a KID
    assert bins and all(entry["kid"] is None for entry in bins.values())
    assert sum(entry["n_synthetic"] for entry in bins.values()) == 6 and "too few crops" in result.output
    from lawder_core.data.h5 import load_arrays
    from lawder_core.metrics.fid import background_window

    _, masks, _ = load_arrays(synthetic, None)  # a pair without a lesion-free 16 px window has no control crop
    windows = [background_window(mask == 1, summary["lesion_kid"]["crop"]) for mask in masks]
    assert summary["lesion_kid"]["background"]["n_synthetic"] == sum(w is not None for w in windows) > 0
    assert "lesion-free crops KID" in result.output
    refused = runner.invoke(app, ["evaluate", "--adherence", "--synthetic", str(synthetic), "-o",
                                       str(tmp_path / "no")])
    assert refused.exit_code == 2 and "--segmenter" in refused.output
