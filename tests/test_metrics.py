"""Tests for mnist_ldm.evaluation.metrics: FCD against an independent eigendecomposition, PRDC against a
brute-force full-matrix version and its known calibration, class balance, memorization."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from mnist_ldm.evaluation.metrics import (
    class_balance,
    feature_statistics,
    frechet_classifier_distance,
    frechet_distance,
    memorization_ratio,
    prdc,
)
from mnist_ldm.evaluation import metrics
from mnist_ldm.evaluator.model import nearest_distances


# --------------------------------------------------------------------------- independent references

def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix via eigh (negative rounding noise clipped to 0)."""
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def reference_frechet(mu1, s1, mu2, s2) -> float:
    """Frechet distance without sqrtm of a non-symmetric product.

    sigma1 sigma2 is similar to the symmetric PSD matrix A = sigma1^(1/2) sigma2 sigma1^(1/2), so
    tr((sigma1 sigma2)^(1/2)) = sum_i sqrt(lambda_i(A)).
    """
    r = _psd_sqrt(s1)
    lam = np.linalg.eigvalsh(r @ s2 @ r)
    tr_covmean = np.sqrt(np.clip(lam, 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def reference_stats(x: np.ndarray):
    mu = x.sum(axis=0) / len(x)
    c = x - mu
    return mu, c.T @ c / (len(x) - 1)


def brute_force_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict:
    """Full-matrix PRDC, following the reference code (clovaai/generative-evaluation-prdc)."""
    def dist(x, y):
        return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))

    real_radii = np.partition(dist(real, real), k, axis=1)[:, k]
    fake_radii = np.partition(dist(fake, fake), k, axis=1)[:, k]
    d = dist(real, fake)  # (N, M)
    return {
        "precision": (d < real_radii[:, None]).any(axis=0).mean(),
        "recall": (d < fake_radii[None, :]).any(axis=1).mean(),
        "density": (1.0 / k) * (d < real_radii[:, None]).sum(axis=0).mean(),
        "coverage": (d.min(axis=1) < real_radii).mean(),
    }


def _low_rank_features(rng, n, d, rank, noise):
    return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d)) + noise * rng.normal(size=(n, d))


# --------------------------------------------------------------------------- FCD

@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dim", [8, 64])
def test_fcd_matches_eigendecomposition_reference(seed, dim):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(500, dim))
    b = rng.normal(size=(500, dim)) @ rng.normal(size=(dim, dim)) * 0.5 + 0.3
    expected = reference_frechet(*reference_stats(a), *reference_stats(b))
    assert frechet_classifier_distance(a, b) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("noise", [1e-1, 1e-3, 0.0])
def test_fcd_matches_reference_on_low_rank_features(noise):
    # Classifier features concentrate near a low-dimensional subspace: rank 4 in 64 dims, so the
    # covariances are ill-conditioned (noise > 0) or exactly singular (noise = 0).
    rng = np.random.default_rng(10)
    a = _low_rank_features(rng, 500, 64, rank=4, noise=noise)
    b = _low_rank_features(rng, 500, 64, rank=4, noise=noise)
    got = frechet_classifier_distance(a, b)
    assert np.isfinite(got)
    assert got == pytest.approx(reference_frechet(*reference_stats(a), *reference_stats(b)), rel=1e-6)


def test_fcd_singular_covariance_is_finite():
    # Fewer samples than dims: both covariances have rank < D, so sigma1 @ sigma2 is singular.
    rng = np.random.default_rng(3)
    a = rng.normal(size=(20, 64))
    b = rng.normal(size=(30, 64)) + 0.2
    got = frechet_classifier_distance(a, b)
    assert np.isfinite(got)
    assert got == pytest.approx(reference_frechet(*reference_stats(a), *reference_stats(b)), rel=1e-6)


def test_fcd_of_features_a_network_never_activates_is_exact_and_quiet():
    # ReLU features that are 0 for every image (dead units, as in the evaluators' 128-unit layer) make both
    # covariances exactly singular; SciPy's sqrtm then warns "Matrix is singular", yet its result is exact.
    rng = np.random.default_rng(5)
    shift = np.linspace(-1, 6, 128)  # the units past about 4 standard deviations never fire in 1,000 rows
    a, b = (np.maximum(rng.normal(size=(1000, 128)) - shift, 0) for _ in range(2))
    assert (a.std(axis=0) == 0).sum() > 20
    with pytest.warns(scipy.linalg.LinAlgWarning, match="singular"):
        scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = frechet_classifier_distance(a, b)
    assert got == pytest.approx(reference_frechet(*reference_stats(a), *reference_stats(b)), rel=1e-6)


def test_fcd_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    # Whether sqrtm of a singular product comes back non-finite depends on the SciPy version
    # (the Schur algorithm was rewritten in 1.16), so force the first attempt to fail.
    rng = np.random.default_rng(4)
    mu1, s1 = feature_statistics(_low_rank_features(rng, 500, 16, rank=3, noise=0.0))
    mu2, s2 = feature_statistics(_low_rank_features(rng, 500, 16, rank=3, noise=0.0))
    real_sqrtm = metrics._sqrtm
    seen = []

    def first_call_fails(a):
        seen.append(a.copy())
        return np.full_like(a, np.nan) if len(seen) == 1 else real_sqrtm(a)

    monkeypatch.setattr(metrics, "_sqrtm", first_call_fails)
    eps = 1e-6
    got = frechet_distance(mu1, s1, mu2, s2, eps=eps)

    assert len(seen) == 2
    offset = eps * np.eye(16)
    np.testing.assert_array_equal(seen[1], (s1 + offset) @ (s2 + offset))
    assert np.isfinite(got)
    # The traces of the unregularized covariances enter the result, only covmean is regularized.
    r = _psd_sqrt(s1 + offset)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(r @ (s2 + offset) @ r), 0, None)).sum()
    diff = mu1 - mu2
    expected = diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    assert got == pytest.approx(expected, rel=1e-6)


def test_fcd_still_not_finite_after_eps_raises(monkeypatch):
    monkeypatch.setattr(metrics, "_sqrtm", lambda a: np.full_like(a, np.inf))
    with pytest.raises(ValueError, match="not finite"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3))


def test_fcd_rejects_large_imaginary_component():
    # sigma1 @ sigma2 with a negative eigenvalue has no real square root: diag(-1, 1) -> imag 1.
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))


@pytest.mark.parametrize("n, dim", [(500, 64), (20, 64)])
def test_fcd_of_a_set_with_itself_is_zero(n, dim):
    rng = np.random.default_rng(5)
    a = rng.normal(size=(n, dim)) * 3.0 + 1.0
    scale = np.trace(np.cov(a, rowvar=False))
    assert abs(frechet_classifier_distance(a, a)) < 1e-6 * scale


def test_fcd_is_symmetric():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(500, 32))
    b = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 - 0.5
    ab, ba = frechet_classifier_distance(a, b), frechet_classifier_distance(b, a)
    assert ab == pytest.approx(ba, rel=1e-9)
    assert ab > 0


def test_fcd_mean_shift_gives_squared_norm():
    rng = np.random.default_rng(7)
    a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
    d = rng.normal(size=16)
    mu, sigma = feature_statistics(a)
    tol = 1e-9 * (d @ d + np.trace(sigma))
    assert abs(frechet_distance(mu, sigma, mu + d, sigma) - d @ d) < tol
    # The same through features: a shifted copy has the same covariance up to rounding.
    assert abs(frechet_classifier_distance(a, a + d) - d @ d) < 1e-6 * (d @ d + np.trace(sigma))


def test_fcd_one_dimensional_features():
    rng = np.random.default_rng(8)
    a = rng.normal(0.0, 1.0, size=(400, 1))
    b = rng.normal(2.0, 3.0, size=(400, 1))
    # 1-D closed form: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    expected = (a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2
    assert frechet_classifier_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_feature_statistics_float64():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    mu, sigma = feature_statistics(torch.from_numpy(x))
    assert mu.dtype == np.float64 and sigma.dtype == np.float64
    assert mu.shape == (3,) and sigma.shape == (3, 3)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))


# --------------------------------------------------------------------------- PRDC

def test_prdc_identical_sets():
    rng = np.random.default_rng(20)
    x = rng.normal(size=(500, 16))
    got = prdc(x, x, k=5)
    assert got["precision"] == 1.0 and got["recall"] == 1.0 and got["coverage"] == 1.0
    # Each real ball contains exactly k points strictly inside (the point itself and its k-1
    # nearest neighbours; the k-th lies on the boundary), so density is exactly 1 in exact
    # arithmetic. Whether a boundary point counts as inside is decided by rounding; each flipped
    # comparison moves density by 1/(k N), so the tolerance allows flips in half of the balls.
    assert abs(got["density"] - 1.0) <= 0.1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prdc_two_samples_of_one_gaussian(seed):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(1000, 16))
    fake = rng.normal(size=(1000, 16))
    k = 5
    got = prdc(real, fake, k=k)
    # Coverage (Naeem et al. 2020, Sec. 4): for identical distributions,
    # E[coverage] = 1 - prod_{i=1..k} (N - i) / (N + M - i) ~= 1 - 2^-k = 0.969 for M = N.
    n = m = 1000
    expected_coverage = 1.0 - np.prod([(n - i) / (n + m - i) for i in range(1, k + 1)])
    assert abs(got["coverage"] - expected_coverage) < 0.025
    # Density: E[density] = 1 for identical distributions; its spread is wide because a fake
    # sample in a dense region is counted by many balls (0.94..1.14 over seeds 0..9 here).
    assert 0.8 < got["density"] < 1.25
    # k-NN precision/recall (Kynkaanniemi et al. 2019) underestimate 1 even for identical
    # distributions, increasingly with dimension; at D=16, k=5, N=1000 they lie near 0.87
    # (0.83..0.90 over seeds 0..9), well above what a mismatched distribution scores.
    assert 0.75 < got["precision"] < 0.95
    assert 0.75 < got["recall"] < 0.95


def test_prdc_detects_mode_dropping_and_shrinking():
    rng = np.random.default_rng(21)
    real = rng.normal(size=(800, 8))
    # Fake samples concentrated in a small region of the real support: high fidelity, poor diversity.
    fake = 0.2 * rng.normal(size=(800, 8))
    got = prdc(real, fake, k=5)
    assert got["precision"] > 0.95
    assert got["recall"] < 0.2 and got["coverage"] < 0.3


def test_prdc_far_away_fake_set_scores_zero():
    rng = np.random.default_rng(22)
    real = rng.normal(size=(400, 16))
    fake = rng.normal(size=(400, 16)) + 100.0
    got = prdc(real, fake, k=5)
    assert got == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


@pytest.mark.parametrize("k, block_rows", [(5, 37), (3, None), (1, 300)])
def test_prdc_matches_brute_force(k, block_rows):
    rng = np.random.default_rng(23)
    real = rng.normal(size=(300, 8))
    fake = 1.2 * rng.normal(size=(250, 8)) + 0.3
    got = prdc(real, fake, k=k, block_rows=block_rows)
    expected = brute_force_prdc(real, fake, k)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key


def test_prdc_accepts_float32_tensors():
    rng = np.random.default_rng(24)
    real = rng.normal(size=(200, 8)).astype(np.float32)
    fake = rng.normal(size=(200, 8)).astype(np.float32)
    assert prdc(torch.from_numpy(real), torch.from_numpy(fake)) == prdc(real, fake)


# --------------------------------------------------------------------------- class balance

def _one_hot(labels, num_classes=10):
    return np.eye(num_classes)[labels]


def test_class_balance_uniform():
    probs = _one_hot(np.repeat(np.arange(10), 100))
    got = class_balance(probs)
    assert got["class_counts"] == [100] * 10
    assert got["tv_to_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert got["classes_present"] == 10
    assert got["mean_top_confidence"] == pytest.approx(1.0)


def test_class_balance_one_class_missing():
    # 9 classes with share 1/9 each: tv = 0.5 * (9 * (1/9 - 1/10) + 1/10) = 0.1.
    probs = _one_hot(np.repeat(np.arange(9), 100))
    got = class_balance(probs)
    assert got["class_counts"] == [100] * 9 + [0]
    assert got["tv_to_uniform"] == pytest.approx(0.1, abs=1e-12)
    assert got["classes_present"] == 9


def test_class_balance_presence_threshold():
    # N = 1000, C = 10: a class is present from 0.1 * N / C = 10 samples on.
    labels = np.concatenate([np.repeat(np.arange(8), 120), np.full(30, 8), np.full(10, 9)])
    assert class_balance(_one_hot(labels))["classes_present"] == 10
    labels = np.concatenate([np.repeat(np.arange(8), 120), np.full(31, 8), np.full(9, 9)])
    assert class_balance(_one_hot(labels))["classes_present"] == 9


def test_class_balance_single_class_and_confidence():
    rng = np.random.default_rng(30)
    logits = rng.normal(size=(200, 10))
    logits[:, 3] += 10.0  # every sample predicted as 3
    probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    got = class_balance(probs)
    assert got["class_counts"] == [0, 0, 0, 200, 0, 0, 0, 0, 0, 0]
    assert got["tv_to_uniform"] == pytest.approx(0.9)  # 1 - 1/C
    assert got["classes_present"] == 1
    assert got["mean_top_confidence"] == pytest.approx(probs.max(axis=1).mean())


# --------------------------------------------------------------------------- memorization

def test_memorization_exact_copies():
    rng = np.random.default_rng(40)
    train = rng.random(size=(1000, 64))
    test = rng.random(size=(200, 64))
    got = memorization_ratio(train[rng.permutation(1000)[:300]], train, test, block_rows=64)
    assert got["median_gen_to_train"] == 0.0
    assert got["ratio"] == 0.0
    assert got["median_test_to_train"] > 0


def test_memorization_fresh_samples_ratio_near_one():
    rng = np.random.default_rng(41)
    train = rng.normal(size=(2000, 32))
    test = rng.normal(size=(500, 32))
    gen = rng.normal(size=(500, 32))
    got = memorization_ratio(gen, train, test, block_rows=128)
    # Nearest-neighbour distances concentrate in 32 dims: medians over 500 draws agree to ~2%.
    assert 0.9 < got["ratio"] < 1.1
    brute = np.sqrt(((test[:, None] - train[None]) ** 2).sum(-1)).min(axis=1)
    assert got["median_test_to_train"] == pytest.approx(np.median(brute), rel=1e-12)


def test_nearest_neighbour_search_in_float32_returns_the_float64_distances():
    """The float32 search keeps candidates and decides in float64: every distance equals brute force,
    even where the nearest rows differ from each other by far less than float32 resolves."""
    rng = np.random.default_rng(42)
    reference = rng.normal(size=(3000, 16)) * 10
    queries = rng.normal(size=(400, 16)) * 10
    near = reference[:50] + 1e-9 * rng.normal(size=(50, 16))  # near-ties: equal in float32
    reference = np.concatenate([reference, near])
    queries = np.concatenate([queries, reference[:50] + 1e-10])
    got = nearest_distances(torch.from_numpy(queries), torch.from_numpy(reference), 97).numpy()
    brute = np.sqrt(((queries[:, None] - reference[None]) ** 2).sum(-1)).min(axis=1)
    np.testing.assert_allclose(got, brute, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("call, match", [
    (lambda: prdc(np.zeros((10, 4)), np.zeros((10, 4)), block_rows=0), "block_rows"),
    (lambda: memorization_ratio(np.zeros((4, 8)), np.zeros((4, 8)), np.zeros((2, 8))), "undefined"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
