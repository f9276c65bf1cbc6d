"""Metric code checked on cases with known answers, and against independent computations."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from harmonica import evaluate as ev


def _scipy_fid(mu1, s1, mu2, s2):
    # The textbook formula with a general matrix square root: a different algorithm from
    # frechet_distance's symmetric eigendecomposition.
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_features(seed, n=400, d=16, shift=0.0, scale=1.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / math.sqrt(d)
    return (rng.normal(size=(n, d)) @ mix) * scale + shift


def test_feature_statistics_matches_numpy():
    f = _random_features(0)
    mu, sigma = ev.feature_statistics(torch.from_numpy(f).float())
    np.testing.assert_allclose(mu, f.astype(np.float32).astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float32).astype(np.float64), rowvar=False), atol=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        ev.feature_statistics(np.zeros((1, 4)))


def test_fid_of_identical_statistics_is_zero():
    mu, sigma = ev.feature_statistics(_random_features(1))
    assert abs(ev.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.5, 1.0), (0.0, 1.7), (-0.3, 0.6)])
def test_fid_matches_scipy_sqrtm(shift, scale):
    mu1, s1 = ev.feature_statistics(_random_features(2))
    mu2, s2 = ev.feature_statistics(_random_features(3, shift=shift, scale=scale))
    expected = _scipy_fid(mu1, s1, mu2, s2)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8, abs=1e-9)


def test_fid_one_dimensional_closed_form():
    # For 1-D Gaussians the Frechet distance is (m1 - m2)^2 + (s1 - s2)^2.
    got = ev.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-0.5]), np.array([[0.25]]))
    assert got == pytest.approx(1.5 ** 2 + (2.0 - 0.5) ** 2, rel=1e-12)


def test_fid_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        ev.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def _images(seed, n=6):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g) * 2 - 1


def test_psnr_identical_is_infinite_and_known_offset():
    x = _images(0)
    assert torch.isinf(ev.psnr(x, x)).all()
    # A uniform error of 0.1 on the [-1, 1] range: 10 log10(2^2 / 0.01).
    assert torch.allclose(ev.psnr(x + 0.1, x), torch.full((6,), 10 * math.log10(400.0), dtype=torch.float64))


def test_psnr_ssim_range_conventions_agree():
    a, b = _images(1), _images(2)
    a01, b01 = (a + 1) / 2, (b + 1) / 2
    torch.testing.assert_close(ev.psnr(a01, b01, value_range=(0, 1)), ev.psnr(a, b))
    torch.testing.assert_close(ev.ssim(a01, b01, value_range=(0, 1)), ev.ssim(a, b))


def test_ssim_identical_is_one_and_drops_with_noise():
    x = _images(3)
    torch.testing.assert_close(ev.ssim(x, x), torch.ones(6, dtype=torch.float64))
    g = torch.Generator().manual_seed(4)
    noise = torch.randn(x.shape, generator=g)
    values = [ev.ssim((x + s * noise).clamp(-1, 1), x).mean().item() for s in (0.01, 0.1, 0.3, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[0] > 0.99 and values[-1] < 0.5


def test_ssim_single_window_matches_formula():
    # An 11x11 image has exactly one valid window: compare with the SSIM formula written out in numpy.
    g = torch.Generator().manual_seed(5)
    x, y = torch.rand(2, 1, 1, 11, 11, generator=g)
    coords = np.arange(11) - 5.0
    w1 = np.exp(-coords ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    xn, yn = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    mx, my = (w * xn).sum(), (w * yn).sum()
    vx, vy = (w * (xn - mx) ** 2).sum(), (w * (yn - my) ** 2).sum()
    cxy = (w * (xn - mx) * (yn - my)).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ev.ssim(x, y, value_range=(0, 1)).item() == pytest.approx(expected, rel=1e-10)


def test_pair_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="one shape"):
        ev.psnr(_images(0, 2), _images(0, 3))


# ------------------------------------------------------------------ bundled classifier and statistics

@pytest.fixture(scope="module")
def test_slice():
    from harmonica.testbed.data import load_tensors

    images, labels = load_tensors("test")
    return images[:2000], labels[:2000]


def test_classifier_accuracy_on_test_slice(test_slice):
    images, labels = test_slice
    assert ev.classifier_accuracy(images, labels) >= 0.90


def test_shuffled_labels_collapse_accuracy_to_chance(test_slice):
    images, labels = test_slice
    perm = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(0))
    acc = ev.classifier_accuracy(images, labels[perm])
    # Chance is 0.1; with 2000 images the binomial standard deviation is ~0.007.
    assert 0.06 < acc < 0.14


def test_fid_fmnist_separates_real_from_noise(test_slice):
    images, _ = test_slice
    real = ev.fid_fmnist(images)
    noise = ev.fid_fmnist(torch.rand(2000, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real < 0.05 * noise, (real, noise)
    # The test images are the reference set: their own statistics must give exactly zero.
    mu, sigma = ev.reference_statistics()
    assert ev.fid_fmnist(images, reference=ev.feature_statistics(ev.classifier_features(images))) < 1e-6
    assert mu.shape == (sigma.shape[0],)


def test_classifier_inputs_are_validated():
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        ev.classifier_features(torch.zeros(2, 3, 28, 28))


# ------------------------------------------------------------------------------- precision / recall

def _brute_force_precision_recall(gen, real, k):
    # Loops over points, written independently of evaluate's vectorised version.
    def radii(x):
        out = []
        for i in range(len(x)):
            d = sorted(np.linalg.norm(x - x[i], axis=1))
            out.append(d[k])  # d[0] is the point itself
        return np.array(out)

    r_real, r_gen = radii(real), radii(gen)
    precision = np.mean([any(np.linalg.norm(real[j] - g) <= r_real[j] for j in range(len(real))) for g in gen])
    recall = np.mean([any(np.linalg.norm(gen[i] - r) <= r_gen[i] for i in range(len(gen))) for r in real])
    return precision, recall


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k):
    real = _random_features(10, n=60, d=5)
    gen = _random_features(11, n=50, d=5, shift=0.7, scale=1.3)
    got = ev.precision_recall(torch.from_numpy(gen), torch.from_numpy(real), k=k)
    assert got == pytest.approx(_brute_force_precision_recall(gen, real, k), abs=1e-12)


def test_precision_recall_known_cases():
    real = _random_features(12, n=200, d=4)
    assert ev.precision_recall(real, real) == (1.0, 1.0)
    assert ev.precision_recall(real + 100.0, real) == (0.0, 0.0)
    # Samples from one half of the real points only: realistic (precision 1) but half the variety missing.
    half = real[real[:, 0] > np.median(real[:, 0])]
    precision, recall = ev.precision_recall(half, real)
    assert precision == 1.0 and 0.4 < recall < 0.75, recall
    with pytest.raises(ValueError, match="more than k=3"):
        ev.precision_recall(real[:3], real)


# -------------------------------------------------------------------------------- strict classifier

def test_strict_classifier_is_the_recipe_and_its_recorded_accuracy_holds(test_slice):
    from harmonica.testbed.classifier import RECIPES, FlatCNN, FMNISTClassifier

    assert RECIPES["strict"].max_shift == 0 and RECIPES["strict"].label_smoothing == 0.0
    images, labels = test_slice
    strict = ev.load_classifier("cpu", "strict")
    # An independent judge: another architecture than the FID classifier, not just other weights.
    assert isinstance(strict, FlatCNN) and isinstance(ev.load_classifier("cpu", "fid"), FMNISTClassifier)
    acc = ev.classifier_accuracy(images, labels, strict)
    # The metadata holds the accuracy on all 10,000 test images; 2,000 of them agree to sampling error.
    assert abs(acc - ev.classifier_test_accuracy("strict")) < 0.02
    assert ev.classifier_test_accuracy("strict") > 0.9 and ev.classifier_test_accuracy("fid") > 0.9
    with pytest.raises(ValueError, match="not a bundled classifier"):
        ev.load_classifier("cpu", "lenient")


def test_quality_of_real_images(test_slice):
    images, labels = test_slice
    q = ev.quality(images[:500], labels[:500], reference=images[:500])
    assert q["num_samples"] == 500
    # Real test images: FID near the small-N floor, accuracies near each classifier's own test accuracy.
    assert q["fid_fmnist"] < 1.0
    assert 0.9 < q["accuracy_rel"] < 1.1 and 0.9 < q["strict_accuracy_rel"] < 1.1
    assert q["accuracy_rel"] == pytest.approx(q["accuracy"] / ev.classifier_test_accuracy("fid"))
    assert q["precision"] > 0.6 and q["recall"] > 0.6
    assert q["psnr"] == 1e3 and q["ssim"] == pytest.approx(1.0)
    noise = torch.rand(500, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    qn = ev.quality(noise, labels[:500], precision_recall_k=None, strict=False)
    assert qn["fid_fmnist"] > 20 * q["fid_fmnist"] and "precision" not in qn and "strict_accuracy" not in qn
