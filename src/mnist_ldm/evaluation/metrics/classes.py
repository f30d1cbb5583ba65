"""Class balance and per-digit accuracy of generated samples, from an MNIST classifier's softmax outputs.

Shapes: N samples, C classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mnist_ldm.evaluation.metrics.inputs import probabilities


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
    p = probabilities(probs, num_classes)  # (N, C)
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
    p = probabilities(probs)  # (N, C)
    if isinstance(digit, bool) or not isinstance(digit, (int, np.integer)) or not 0 <= digit < p.shape[1]:
        raise ValueError(f"digit must be an integer class index in [0, {p.shape[1]}), got {digit!r}")
    return float((p.argmax(axis=1) == int(digit)).mean())
