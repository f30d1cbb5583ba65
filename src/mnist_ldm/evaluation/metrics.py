"""Sample-quality metrics over arrays (no I/O; statistics in float64): FCD, PRDC, the memorization ratio and
class balance, computed in a classifier's feature space or from its softmax outputs."""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg
import torch

from mnist_ldm.evaluator.nearest import cdist, distances_to_train, rows_per_block

_sqrtm = scipy.linalg.sqrtm  # the principal square root (Schur method), as the reference FID code takes it


def _float64(x: Any, name: str, ndim: int | None = None, min_samples: int = 0) -> np.ndarray:
    """`x` as a finite float64 array (`ndim` dims; 2: N >= `min_samples` rows and D >= 1 columns)."""
    a = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if ndim == 2 and a.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions: shape {a.shape}")
    if ndim == 2 and a.shape[0] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples, got {a.shape[0]}")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {name_a} has {a.shape[1]}, {name_b} has {b.shape[1]}")


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)) between two Gaussians
    (Heusel et al. 2017), with the numerics of the reference FID code (TTUR, pytorch-fid): a non-finite
    square root is taken again with `eps * I` added to both covariances, and a complex one is accepted only
    if the imaginary part of its diagonal is within 1e-3 of 0. FCD is this on classifier features, so it is
    comparable only across runs that use the same classifier."""
    mu1, mu2 = np.atleast_1d(_float64(mu1, "mu1")), np.atleast_1d(_float64(mu2, "mu2"))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1, "sigma1")), np.atleast_2d(_float64(sigma2, "sigma2"))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}) to match the means, got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a nearly singular product
        offset = np.eye(d) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError(f"sqrtm(sigma1 @ sigma2) is not finite, even with eps={eps} added to the covariances")
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm(sigma1 @ sigma2) has a significant imaginary component: "
                             f"{np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D)."""
    f = _float64(features, "features", 2, min_samples=2)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_classifier_distance(feats_a: Any, feats_b: Any) -> float:
    """FCD of two feature sets (N, D) and (M, D); its small-sample bias grows with D / N, so compare values
    at equal sample sizes."""
    a, b = _float64(feats_a, "feats_a", 2, min_samples=2), _float64(feats_b, "feats_b", 2, min_samples=2)
    _same_dim(a, b, "feats_a", "feats_b")
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def _kth_neighbour_radii(x: torch.Tensor, k: int, block_rows: int | None) -> torch.Tensor:
    """Each row's distance to its k-th nearest neighbour in x, itself excluded (the (k+1)-th smallest)."""
    n, step = x.shape[0], rows_per_block(x.shape[0], block_rows)
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, step):
        radii[start:start + step] = torch.kthvalue(cdist(x[start:start + step], x), k + 1, dim=1).values
    return radii


def prdc(real_features: Any, fake_features: Any, k: int = 5, *, block_rows: int | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) as in their reference code
    (clovaai/generative-evaluation-prdc): each sample's ball reaches its k-th nearest neighbour in its own set,
    "inside" is strictly closer. The distance matrices are computed in row blocks of `block_rows`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    real = _float64(real_features, "real_features", 2, min_samples=k + 1)
    fake = _float64(fake_features, "fake_features", 2, min_samples=k + 1)
    _same_dim(real, fake, "real_features", "fake_features")
    centre = real.mean(axis=0)  # distances do not change under a shift; centring keeps ||x||^2 small in `cdist`
    r, f = torch.from_numpy(real - centre), torch.from_numpy(fake - centre)
    real_radii, fake_radii = _kth_neighbour_radii(r, k, block_rows), _kth_neighbour_radii(f, k, block_rows)
    n, m = r.shape[0], f.shape[0]
    step = rows_per_block(m, block_rows)
    balls_containing_fake = torch.zeros(m, dtype=torch.long)
    real_in_fake_ball, real_covered = torch.empty(n, dtype=torch.bool), torch.empty(n, dtype=torch.bool)
    for start in range(0, n, step):
        d = cdist(r[start:start + step], f)  # (B, M) real-to-fake
        radii = real_radii[start:start + step, None]
        balls_containing_fake += (d < radii).sum(dim=0)
        real_in_fake_ball[start:start + step] = (d < fake_radii[None, :]).any(dim=1)
        real_covered[start:start + step] = d.min(dim=1).values < radii[:, 0]
    return {
        "precision": float((balls_containing_fake > 0).double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(balls_containing_fake.double().mean() / k),
        "coverage": float(real_covered.double().mean()),
    }


def memorization_ratio(generated: Any, train: Any, test: Any, *, block_rows: int | None = None,
                       test_to_train: np.ndarray | None = None) -> dict[str, float]:
    """The median distance of generated samples to their nearest training item over that of held-out test items
    (given as `test_to_train`, or computed): near 1 for a model that generalizes, 0 for exact copies."""
    gen, tr, te = (_float64(x, name, 2, min_samples=1) for x, name in ((generated, "generated"), (train, "train"),
                                                                       (test, "test")))
    _same_dim(gen, tr, "generated", "train")
    _same_dim(te, tr, "test", "train")
    median_gen = float(np.median(distances_to_train(gen, tr, block_rows=block_rows)))
    test_d = distances_to_train(te, tr, block_rows=block_rows) if test_to_train is None else test_to_train
    median_test = float(np.median(np.asarray(test_d, dtype=np.float64)))
    if median_test == 0.0:
        raise ValueError("median distance from test to train is 0 (test items duplicate training items); "
                         "the ratio is undefined")
    return {"median_gen_to_train": median_gen, "median_test_to_train": median_test, "ratio": median_gen / median_test}


def class_balance(probs: Any, num_classes: int = 10) -> dict[str, Any]:
    """How evenly samples spread over the classes, from softmax outputs (N, C): the argmax histogram, the total
    variation distance of its frequencies to uniform, the classes holding at least a tenth of their uniform
    share (so a few stray predictions do not count), and the mean top probability."""
    p = _float64(probs, "probs", 2)
    if p.shape[0] < 1:
        raise ValueError("probs holds no samples")
    if p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} classes per row, expected num_classes={num_classes}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0.0, atol=1e-3):
        raise ValueError("probs rows must be probabilities (non-negative, summing to 1); pass softmax outputs, "
                         "not logits")
    n, c = p.shape
    counts = np.bincount(p.argmax(axis=1), minlength=c)
    return {
        "class_counts": [int(v) for v in counts],
        "tv_to_uniform": float(0.5 * np.abs(counts / n - 1.0 / c).sum()),
        "classes_present": int((counts >= max(1.0, 0.1 * n / c)).sum()),
        "mean_top_confidence": float(p.max(axis=1).mean()),
    }
