"""Sample-quality metrics over arrays, in float64: FCD, PRDC, the memorization ratio and class balance."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import scipy.linalg
import torch

from mnist_ldm.evaluator.model import cdist, distances_to_train, rows_per_block


def _sqrtm(a: np.ndarray) -> np.ndarray:
    """The principal square root, as the reference FID code takes it, without SciPy's singular-matrix warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        return scipy.linalg.sqrtm(a)


def _float64(x: Any) -> np.ndarray:
    return np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float64)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """d^2 = ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)) (Heusel et al. 2017), with
    the numerics of the reference FID code: `eps * I` added if the root is not finite, a complex root accepted
    only if its diagonal's imaginary part is within 1e-3 of 0."""
    mu1, mu2 = np.atleast_1d(_float64(mu1)), np.atleast_1d(_float64(mu2))
    sigma1, sigma2 = np.atleast_2d(_float64(sigma1)), np.atleast_2d(_float64(sigma2))
    d, diff = mu1.shape[0], mu1 - mu2
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
    f = _float64(features)
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_classifier_distance(feats_a: Any, feats_b: Any) -> float:
    """FCD of two feature sets (N, D) and (M, D) (biased by D / N: compare at equal sizes)."""
    return frechet_distance(*feature_statistics(feats_a), *feature_statistics(feats_b))


def _kth_neighbour_radii(x: torch.Tensor, k: int, block_rows: int | None) -> torch.Tensor:
    """Each row's distance to its k-th nearest neighbour in x, itself excluded (the (k+1)-th smallest)."""
    n, step = x.shape[0], rows_per_block(x.shape[0], block_rows)
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, step):
        radii[start:start + step] = torch.kthvalue(cdist(x[start:start + step], x), k + 1, dim=1).values
    return radii


def prdc(real_features: Any, fake_features: Any, k: int = 5, *, block_rows: int | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) as in their reference code, the distance
    matrices in row blocks of `block_rows`."""
    real, fake = _float64(real_features), _float64(fake_features)
    centre = real.mean(axis=0)  # keeps ||x||^2 small in `cdist`
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
    """Median distance of generated samples to their nearest training item over the test items' (`test_to_train`,
    or computed): near 1 for a model that generalizes, 0 for copies."""
    gen, tr, te = _float64(generated), _float64(train), _float64(test)
    median_gen = float(np.median(distances_to_train(gen, tr, block_rows=block_rows)))
    test_d = distances_to_train(te, tr, block_rows=block_rows) if test_to_train is None else test_to_train
    median_test = float(np.median(np.asarray(test_d, dtype=np.float64)))
    if median_test == 0.0:
        raise ValueError("median distance from test to train is 0 (test items duplicate training items); "
                         "the ratio is undefined")
    return {"median_gen_to_train": median_gen, "median_test_to_train": median_test, "ratio": median_gen / median_test}


def class_balance(probs: Any, num_classes: int = 10) -> dict[str, Any]:
    """From softmax outputs (N, C): the argmax histogram, its total variation distance to uniform, the classes
    holding at least a tenth of their uniform share, and the mean top probability."""
    p = _float64(probs)
    n, c = len(p), num_classes
    counts = np.bincount(p.argmax(axis=1), minlength=c)
    return {
        "class_counts": [int(v) for v in counts],
        "tv_to_uniform": float(0.5 * np.abs(counts / n - 1.0 / c).sum()),
        "classes_present": int((counts >= max(1.0, 0.1 * n / c)).sum()),
        "mean_top_confidence": float(p.max(axis=1).mean()),
    }
