"""FCD, the Frechet classifier distance: the Frechet distance of Heusel et al. 2017 ("GANs Trained by a
Two Time-Scale Update Rule Converge to a Local Nash Equilibrium") between Gaussians fitted to the features
of an MNIST classifier.

It is computed with the numerics of the reference FID code (TTUR, pytorch-fid), but it is not FID: the
features are not Inception's, so its values are comparable only across runs that use the same classifier.
Shapes: N and M samples, D feature dims; statistics are float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy
import scipy.linalg

from mnist_ldm.evaluation.metrics.inputs import as_float64, feature_matrix, same_dim

# SciPy 1.16 deprecated `disp` of sqrtm (it is removed in 1.18); it only chooses whether an error
# estimate is returned and never changed the square root itself.
_SQRTM_TAKES_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """The principal square root of `a` by scipy.linalg.sqrtm (Schur method), as the FID code calls it."""
    if _SQRTM_TAKES_DISP:
        return scipy.linalg.sqrtm(a, disp=False)[0]
    return scipy.linalg.sqrtm(a)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """The Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

        d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2))

    (Dowson & Landau 1982; used as FID by Heusel et al. 2017.) The numerics follow the reference
    implementations (TTUR, pytorch-fid): the square root is scipy.linalg.sqrtm of sigma1 @ sigma2;
    if that is not finite, `eps * I` is added to both covariances and it is taken again; a complex
    result is accepted only if the imaginary part of its diagonal is within 1e-3 of 0, and its real
    part is used. Everything is float64.

    Raises ValueError on mismatched shapes, non-finite inputs, a square root that is still not
    finite after the eps retry, or a significant imaginary component.
    """
    mu1 = np.atleast_1d(as_float64(mu1, "mu1"))  # (D,)
    mu2 = np.atleast_1d(as_float64(mu2, "mu2"))  # (D,)
    sigma1 = np.atleast_2d(as_float64(sigma1, "sigma1"))  # (D, D)
    sigma2 = np.atleast_2d(as_float64(sigma2, "sigma2"))  # (D, D)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, "
                         f"got {sigma1.shape} and {sigma2.shape}")

    diff = mu1 - mu2  # (D,)
    covmean = _sqrtm(sigma1 @ sigma2)  # (D, D), possibly complex
    if not np.isfinite(covmean).all():
        # Product nearly singular: regularize both covariances, as the reference code does.
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite, even with eps={eps} added "
                             "to the covariances")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a significant imaginary component: {m}")
        covmean = covmean.real

    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), N >= 2, in float64."""
    f = feature_matrix(features, "features", min_samples=2)  # (N, D)
    mu = f.mean(axis=0)  # (D,)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))  # (D, D)
    return mu, sigma


def frechet_classifier_distance(feats_a: Any, feats_b: Any) -> float:
    """FCD: the Frechet distance between Gaussians fitted to two sets of classifier features.

    feats_a (N, D) and feats_b (M, D), each with at least 2 samples. Symmetric and >= 0 (up to
    rounding); 0 for identical sets. Its small-sample bias grows with D / N, so compare values
    computed with equal sample sizes.
    """
    a = feature_matrix(feats_a, "feats_a", min_samples=2)  # (N, D)
    b = feature_matrix(feats_b, "feats_b", min_samples=2)  # (M, D)
    same_dim(a, b, "feats_a", "feats_b")
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
