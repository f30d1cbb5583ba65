"""Input checks shared by the sample-quality metrics: finite float64 arrays of the expected shapes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_float64(x: Any, name: str, ndim: int | None = None) -> np.ndarray:
    """`x` (array-like or torch tensor) as a float64 numpy array of finite values, `ndim` dims if given."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def feature_matrix(x: Any, name: str, min_samples: int) -> np.ndarray:
    """A (N, D) float64 feature matrix with N >= min_samples and D >= 1."""
    a = as_float64(x, name, ndim=2)  # (N, D)
    if a.shape[1] < 1:
        raise ValueError(f"{name} has no feature dimensions: shape {a.shape}")
    if a.shape[0] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples, got {a.shape[0]}")
    return a


def same_dim(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {name_a} has {a.shape[1]}, {name_b} has {b.shape[1]}")


def probabilities(probs: Any, num_classes: int | None = None) -> np.ndarray:
    """A (N, C) float64 matrix of class probabilities: non-negative rows that sum to 1 (+-1e-3)."""
    p = as_float64(probs, "probs", ndim=2)  # (N, C)
    if p.shape[0] < 1:
        raise ValueError("probs holds no samples")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"probs has {p.shape[1]} classes per row, expected num_classes={num_classes}")
    if (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, rtol=0.0, atol=1e-3):
        raise ValueError("probs rows must be probabilities (non-negative, summing to 1); "
                         "pass softmax outputs, not logits")
    return p
