"""Metrics from nearest-neighbour distances in a feature space.

* PRDC: precision, recall, density and coverage of Naeem et al. 2020 ("Reliable Fidelity and Diversity
  Metrics for Generative Models"), as in their reference code (clovaai/generative-evaluation-prdc), with
  the distance matrices computed in row blocks.
* A memorization ratio: how close generated samples lie to training items, relative to how close
  held-out test items lie to them.

Shapes: N real / reference samples, M generated samples, D feature dims; distances are float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mnist_ldm.evaluator.nearest import cdist, distances_to_train, rows_per_block
from mnist_ldm.evaluation.metrics.inputs import feature_matrix, same_dim


# --------------------------------------------------------------------------- PRDC

def _kth_neighbour_radii(x: torch.Tensor, k: int, block_rows: int | None) -> torch.Tensor:
    """For each row of x (N, D): the distance to its k-th nearest neighbour in x, self excluded (N,).

    As in the PRDC reference: the (k+1)-th smallest entry of the row of self-distances, whose
    smallest entry is the point itself.
    """
    n = x.shape[0]
    step = rows_per_block(n, block_rows)
    radii = torch.empty(n, dtype=torch.float64)
    for start in range(0, n, step):
        d = cdist(x[start:start + step], x)  # (B, N)
        radii[start:start + step] = torch.kthvalue(d, k + 1, dim=1).values
    return radii


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
    real = feature_matrix(real_features, "real_features", min_samples=k + 1)  # (N, D)
    fake = feature_matrix(fake_features, "fake_features", min_samples=k + 1)  # (M, D)
    same_dim(real, fake, "real_features", "fake_features")

    # Distances do not change under a common shift; centring keeps ||x||^2 small in `cdist`.
    centre = real.mean(axis=0)  # (D,)
    r = torch.from_numpy(real - centre)  # (N, D)
    f = torch.from_numpy(fake - centre)  # (M, D)
    real_radii = _kth_neighbour_radii(r, k, block_rows)  # (N,)
    fake_radii = _kth_neighbour_radii(f, k, block_rows)  # (M,)

    n, m = r.shape[0], f.shape[0]
    step = rows_per_block(m, block_rows)
    balls_containing_fake = torch.zeros(m, dtype=torch.long)  # (M,) real balls around each fake
    real_in_fake_ball = torch.empty(n, dtype=torch.bool)  # (N,)
    real_covered = torch.empty(n, dtype=torch.bool)  # (N,)
    for start in range(0, n, step):
        d = cdist(r[start:start + step], f)  # (B, M) real-to-fake
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


# --------------------------------------------------------------------------- memorization

def memorization_ratio(generated: Any, train: Any, test: Any, *, block_rows: int | None = None,
                       test_to_train: np.ndarray | None = None) -> dict[str, float]:
    """Nearest-training-item distances of generated samples against those of held-out test items.

    generated (M, D), train (N, D), test (T, D): features or flattened pixels, one space for all.
    For each generated sample and each test item, the Euclidean distance to its nearest training
    item (`distances_to_train`; the test items' may be given as `test_to_train` (T,)); returns their
    medians `median_gen_to_train`, `median_test_to_train` and `ratio` = median_gen_to_train /
    median_test_to_train. A model that generalizes puts its samples about as far from the training set
    as unseen real data (ratio near 1); a ratio far below 1 suggests it reproduces training images
    (exact copies give 0).
    """
    gen = feature_matrix(generated, "generated", min_samples=1)  # (M, D)
    tr = feature_matrix(train, "train", min_samples=1)  # (N, D)
    te = feature_matrix(test, "test", min_samples=1)  # (T, D)
    same_dim(gen, tr, "generated", "train")
    same_dim(te, tr, "test", "train")
    gen_d = distances_to_train(gen, tr, block_rows=block_rows)  # (M,)
    if test_to_train is None:
        test_d = distances_to_train(te, tr, block_rows=block_rows)  # (T,)
    elif np.shape(test_to_train) != (len(te),):
        raise ValueError(f"test_to_train has shape {np.shape(test_to_train)}; expected ({len(te)},), one per test item")
    else:
        test_d = np.asarray(test_to_train, dtype=np.float64)

    median_gen = float(np.median(gen_d))
    median_test = float(np.median(test_d))
    if median_test == 0.0:
        raise ValueError("median distance from test to train is 0 (test items duplicate training "
                         "items); the ratio is undefined")
    return {
        "median_gen_to_train": median_gen,
        "median_test_to_train": median_test,
        "ratio": median_gen / median_test,
    }
