import numpy as np

from lawder_core.data import fingerprint
from lawder_core.data.h5 import H5Writer


def test_block_reads_give_the_per_sample_figures(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.h5"
    images = rng.integers(0, 256, (23, 8, 6, 3), dtype=np.uint8)
    masks = (rng.random((23, 8, 6)) < rng.random((23, 1, 1)) * 0.5).astype(np.uint8) * rng.integers(1, 3, (23, 1, 1))
    masks[4] = 0
    with H5Writer(path, height=8, width=6, channels=3, label_names=["background", "kidney", "tumor"],
                  source="test") as w:
        for i in range(23):
            w.add(images[i], masks[i].astype(np.uint8), f"c{i // 2}", "train" if i < 20 else "test")
    # Blocks of 5 masks, so the last block is partial; every 4th image for the intensities.
    real_blocks = fingerprint._blocks
    monkeypatch.setattr(fingerprint, "_blocks", lambda n, b: real_blocks(n, b, budget=5 * b))
    fp = fingerprint.compute_fingerprint(path, max_intensity_samples=5)
    fractions = (masks > 0).reshape(23, -1).mean(axis=1)
    assert fp["lesion_fraction"]["mean"] == round(float(fractions.mean()), 6)
    assert fp["lesion_fraction"]["p50"] == round(float(np.percentile(fractions, 50)), 6)
    assert fp["lesion_fraction"]["empty_masks"] == int((fractions == 0).sum()) >= 1
    assert fp["labels_present"] == sorted(np.unique(masks).tolist())
    subset = images[::4].astype(np.float64)
    assert fp["intensity"]["mean_per_channel"] == [round(float(v), 3) for v in subset.mean(axis=(0, 1, 2))]
    assert fp["intensity"]["std_per_channel"] == [round(float(v), 3) for v in subset.std(axis=(0, 1, 2))]
    assert fp["splits"]["train"] == {"samples": 20, "cases": 10}
