"""Sample-quality metrics for generated digits, computed in a classifier's feature space or from its
softmax outputs. Pure functions over arrays (numpy, scipy, torch; no I/O); statistics are float64.

* `frechet`: FCD, the Frechet distance between Gaussians fitted to classifier features (FID's numerics).
* `neighbours`: PRDC (precision, recall, density, coverage) and the memorization ratio, from
  nearest-neighbour distances.
* `classes`: class balance and per-digit accuracy from softmax outputs.
* `inputs`: the checks every metric applies to its arrays.
"""

from mnist_ldm.evaluation.metrics.classes import accuracy_on_digit, class_balance
from mnist_ldm.evaluation.metrics.frechet import feature_statistics, frechet_classifier_distance, frechet_distance
from mnist_ldm.evaluation.metrics.neighbours import memorization_ratio, prdc

__all__ = ["accuracy_on_digit", "class_balance", "feature_statistics", "frechet_classifier_distance",
           "frechet_distance", "memorization_ratio", "prdc"]
