"""Sample-quality metrics for generated digits, computed in a classifier's feature space.

Pure functions over arrays (numpy, scipy, torch; no I/O). Statistics are float64.

* FCD, the Frechet classifier distance: the Frechet distance of Heusel et al. 2017 ("GANs
  Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium") between
  Gaussians fitted to the features of an MNIST classifier. It is computed with the numerics of
  the reference FID code (TTUR, pytorch-fid), but it is not FID: the features are not
  Inception's, so its values are comparable only across runs that use the same classifier.
* PRDC: precision, recall, density and coverage of Naeem et al. 2020 ("Reliable Fidelity and
  Diversity Metrics for Generative Models"), as in their reference code
  (clovaai/generative-evaluation-prdc), with the distance matrices computed in row blocks.
* Class balance and per-digit accuracy from the classifier's softmax outputs.
* A memorization ratio: how close generated samples lie to training items, relative to how
  close held-out test items lie to them.

Shapes: N real / reference samples, M generated samples, D feature dims, C classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy
import scipy.linalg
import torch

from .metric_inputs import _as_float64, _features, _probabilities, _same_dim

# Row blocks of a distance matrix hold at most this many float64 entries (64 MiB).
_BLOCK_ELEMENTS = 1 << 23

# Nearest-neighbour candidates kept from the float32 search, then compared in float64.
_NN_CANDIDATES = 8

# SciPy 1.16 deprecated `disp` of sqrtm (it is removed in 1.18); it only chooses whether an error
# estimate is returned and never changed the square root itself.
_SQRTM_TAKES_DISP = tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 16)


# --------------------------------------------------------------------------- Frechet distance

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
    mu1 = np.atleast_1d(_as_float64(mu1, "mu1"))  # (D,)
    mu2 = np.atleast_1d(_as_float64(mu2, "mu2"))  # (D,)
    sigma1 = np.atleast_2d(_as_float64(sigma1, "sigma1"))  # (D, D)
    sigma2 = np.atleast_2d(_as_float64(sigma2, "sigma2"))  # (D, D)
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
    f = _features(features, "features", min_samples=2)  # (N, D)
    mu = f.mean(axis=0)  # (D,)
    sigma = np.atleast_2d(np.cov(f, rowvar=False))  # (D, D)
    return mu, sigma


def frechet_classifier_distance(feats_a: Any, feats_b: Any) -> float:
    """FCD: the Frechet distance between Gaussians fitted to two sets of classifier features.

    feats_a (N, D) and feats_b (M, D), each with at least 2 samples. Symmetric and >= 0 (up to
    rounding); 0 for identical sets. Its small-sample bias grows with D / N, so compare values
    computed with equal sample sizes.
    """
    a = _features(feats_a, "feats_a", min_samples=2)  # (N, D)
    b = _features(feats_b, "feats_b", min_samples=2)  # (M, D)
    _same_dim(a, b, "feats_a", "feats_b")
    mu_a, sigma_a = feature_statistics(a)
    mu_b, sigma_b = feature_statistics(b)
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


# --------------------------------------------------------------------------- distances in blocks

def _block_rows(n_cols: int, block_rows: int | None) -> int:
    if block_rows is None:
        return max(1, _BLOCK_ELEMENTS // max(1, n_cols))
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return int(block_rows)


def _cdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, M) between rows of x (B, D) and y (M, D), in their dtype.

    Uses ||x||^2 + ||y||^2 - 2 x.y (as sklearn's pairwise_distances in the PRDC reference code);
    inputs are centred by the caller so the cancellation error stays small.
    """
    return torch.cdist(x, y, compute_mode="use_mm_for_euclid_dist")


def _kth_neighbour_radii(x: torch.Tensor, k: int, block_rows: int | None) -> torch.Tensor:
    """For each row of x (N, D): the distance to its k-th nearest neighbour in x, self excluded (N,).

    As in the PRDC reference: the (k+1)-th smallest entry of the row of self-distances, whose
    smallest entry is the point itself.
    """
    n = x.shape[0]
    step = _block_rows(n, block_rows)
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, step):
        d = _cdist(x[start:start + step], x)  # (B, N)
        radii[start:start + step] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


def _nearest_neighbour_distances(queries: torch.Tensor, reference: torch.Tensor,
                                 block_rows: int | None) -> torch.Tensor:
    """For each row of queries (Q, D): its distance to the nearest row of reference (R, D) -> (Q,).

    The search runs in blocks, in float32 (about 10x faster than float64 here), and keeps the
    `_NN_CANDIDATES` closest rows; their distances are then recomputed in float64 directly from the
    difference vectors and the smallest is taken, so the result is the float64 answer unless more
    than that many rows tie within float32 rounding, and an exact copy gives exactly 0.
    """
    q, r = queries.shape[0], reference.shape[0]
    keep = min(_NN_CANDIDATES, r)
    step = _block_rows(r, block_rows)
    ref32 = reference.float()
    out = torch.empty(q, dtype=queries.dtype)
    for start in range(0, q, step):
        block = queries[start:start + step]  # (B, D)
        candidates = _cdist(block.float(), ref32).topk(keep, dim=1, largest=False).indices  # (B, keep)
        exact = torch.linalg.vector_norm(block[:, None, :] - reference[candidates], dim=2)  # (B, keep)
        out[start:start + step] = exact.min(dim=1).values
    return out  # (Q,)


# --------------------------------------------------------------------------- PRDC

def prdc(real_features: Any, fake_features: Any, k: int = 5, *,
         block_rows: int | None = None) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020), as in their reference code.

    Each sample gets a ball whose radius is the distance to its k-th nearest neighbour within its
    own set (the sample itself excluded); "inside" means strictly closer than the radius.

    * precision: fraction of fake samples inside at least one real ball (Kynkaanniemi et al. 2019);
    * recall:    fraction of real samples inside at least one fake ball;
    * density:   (1/k) * mean over fake samples of the number of real balls containing them
                 (about 1 when fake and real follow one distribution; it can exceed 1);
    * coverage:  fraction of real samples whose nearest fake sample is inside their own ball.

    real_features (N, D) and fake_features (M, D) need at least k + 1 samples each. Distances are
    float64 and computed in row blocks of `block_rows` rows (default: about 8M entries a block),
    so 10,000 x 10,000 never needs the full matrix in memory.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    real = _features(real_features, "real_features", min_samples=k + 1)  # (N, D)
    fake = _features(fake_features, "fake_features", min_samples=k + 1)  # (M, D)
    _same_dim(real, fake, "real_features", "fake_features")

    # Distances do not change under a common shift; centring keeps ||x||^2 small in _cdist.
    centre = real.mean(axis=0)  # (D,)
    r = torch.from_numpy(real - centre)  # (N, D)
    f = torch.from_numpy(fake - centre)  # (M, D)
    real_radii = _kth_neighbour_radii(r, k, block_rows)  # (N,)
    fake_radii = _kth_neighbour_radii(f, k, block_rows)  # (M,)

    n, m = r.shape[0], f.shape[0]
    step = _block_rows(m, block_rows)
    balls_containing_fake = torch.zeros(m, dtype=torch.long)  # (M,) real balls around each fake
    real_in_fake_ball = torch.empty(n, dtype=torch.bool)  # (N,)
    real_covered = torch.empty(n, dtype=torch.bool)  # (N,)
    for start in range(0, n, step):
        d = _cdist(r[start:start + step], f)  # (B, M) real-to-fake
        radii = real_radii[start:start + step, None]  # (B, 1)
        balls_containing_fake += (d < radii).sum(dim=0)
        real_in_fake_ball[start:start + step] = (d < fake_radii[None, :]).any(dim=1)
        real_covered[start:start + step] = d.min(dim=1).values < radii[:, 0]

    return {
        "precision": float((balls_containing_fake > 0).double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(balls_containing_fake.double().mean() / k),
        "coverage": float(real_covered.double().mean()),
    }


# --------------------------------------------------------------------------- classifier outputs

def class_balance(probs: Any, num_classes: int = 10) -> dict[str, Any]:
    """How evenly generated samples spread over the classes, from softmax outputs probs (N, C).

    Returns
      class_counts:        predicted-class (argmax) histogram, a list of C ints;
      tv_to_uniform:       total variation distance 0.5 * sum_c |p_c - 1/C| between the predicted
                           class frequencies p and the uniform distribution (0 = balanced,
                           1 - 1/C = a single class);
      classes_present:     number of classes holding at least a tenth of their uniform share,
                           count >= max(1, 0.1 * N / C) (1% of all samples when C = 10), so a
                           few stray predictions do not count as covering a class;
      mean_top_confidence: mean over samples of the largest class probability.
    """
    p = _probabilities(probs, num_classes)  # (N, C)
    n, c = p.shape
    counts = np.bincount(p.argmax(axis=1), minlength=c)  # (C,)
    freq = counts / n  # (C,)
    threshold = max(1.0, 0.1 * n / c)
    return {
        "class_counts": [int(v) for v in counts],
        "tv_to_uniform": float(0.5 * np.abs(freq - 1.0 / c).sum()),
        "classes_present": int((counts >= threshold).sum()),
        "mean_top_confidence": float(p.max(axis=1).mean()),
    }


def accuracy_on_digit(probs: Any, digit: int) -> float:
    """Fraction of samples, probs (N, C), whose most probable class is `digit`.

    For class-conditional samples all generated for one digit, this is the classifier's agreement
    with the requested label.
    """
    p = _probabilities(probs)  # (N, C)
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit < p.shape[1]:
        raise ValueError(f"digit must be an integer class index in [0, {p.shape[1]}), got {digit!r}")
    return float((p.argmax(axis=1) == int(digit)).mean())


# --------------------------------------------------------------------------- memorization

def memorization_ratio(generated: Any, train: Any, test: Any, *,
                       block_rows: int | None = None) -> dict[str, float]:
    """Nearest-training-item distances of generated samples against those of held-out test items.

    generated (M, D), train (N, D), test (T, D): features or flattened pixels, one space for all.
    For each generated sample and each test item, the Euclidean distance to its nearest training
    item; returns their medians `median_gen_to_train`, `median_test_to_train` and
    `ratio` = median_gen_to_train / median_test_to_train. A model that generalizes puts its samples
    about as far from the training set as unseen real data (ratio near 1); a ratio far below 1
    suggests it reproduces training images (exact copies give 0).
    """
    gen = _features(generated, "generated", min_samples=1)  # (M, D)
    tr = _features(train, "train", min_samples=1)  # (N, D)
    te = _features(test, "test", min_samples=1)  # (T, D)
    _same_dim(gen, tr, "generated", "train")
    _same_dim(te, tr, "test", "train")

    centre = tr.mean(axis=0)  # (D,)
    tr_t = torch.from_numpy(tr - centre)  # (N, D)
    gen_d = _nearest_neighbour_distances(torch.from_numpy(gen - centre), tr_t, block_rows)  # (M,)
    test_d = _nearest_neighbour_distances(torch.from_numpy(te - centre), tr_t, block_rows)  # (T,)

    median_gen = float(np.median(gen_d.numpy()))
    median_test = float(np.median(test_d.numpy()))
    if median_test == 0.0:
        raise ValueError("median distance from test to train is 0 (test items duplicate training "
                         "items); the ratio is undefined")
    return {
        "median_gen_to_train": median_gen,
        "median_test_to_train": median_test,
        "ratio": median_gen / median_test,
    }
