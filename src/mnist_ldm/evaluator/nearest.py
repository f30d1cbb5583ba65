"""Nearest-neighbour distances between rows of feature matrices, computed in row blocks.

`metrics/neighbours.py` builds PRDC and the memorization ratio on these; the evaluators' stages use
`distances_to_train` for the distances they keep (each test image to its nearest training image). A leaf
module: it imports nothing of the package, so editing a metric does not re-run the evaluators' stages.
"""

from __future__ import annotations

import numpy as np
import torch

# Row blocks of a distance matrix hold at most this many float64 entries (64 MiB).
BLOCK_ELEMENTS = 1 << 23

# Nearest-neighbour candidates kept from the float32 search, then compared in float64.
NN_CANDIDATES = 8


def rows_per_block(n_cols: int, block_rows: int | None) -> int:
    """Rows of a block of a distance matrix with `n_cols` columns: `block_rows`, else about BLOCK_ELEMENTS entries."""
    if block_rows is None:
        return max(1, BLOCK_ELEMENTS // max(1, n_cols))
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    return int(block_rows)


def cdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances (B, M) between rows of x (B, D) and y (M, D), in their dtype.

    Uses ||x||^2 + ||y||^2 - 2 x.y (as sklearn's pairwise_distances in the PRDC reference code);
    inputs are centred by the caller so the cancellation error stays small.
    """
    return torch.cdist(x, y, compute_mode="use_mm_for_euclid_dist")


def nearest_distances(queries: torch.Tensor, reference: torch.Tensor, block_rows: int | None) -> torch.Tensor:
    """For each row of queries (Q, D): its distance to the nearest row of reference (R, D) -> (Q,).

    The search runs in blocks, in float32 (about 10x faster than float64 here), and keeps the
    `NN_CANDIDATES` closest rows; their distances are then recomputed in float64 directly from the
    difference vectors and the smallest is taken, so the result is the float64 answer unless more
    than that many rows tie within float32 rounding, and an exact copy gives exactly 0.
    """
    q, r = queries.shape[0], reference.shape[0]
    keep = min(NN_CANDIDATES, r)
    step = rows_per_block(r, block_rows)
    ref32 = reference.float()
    out = torch.empty(q, dtype=queries.dtype)
    for start in range(0, q, step):
        block = queries[start:start + step]  # (B, D)
        candidates = cdist(block.float(), ref32).topk(keep, dim=1, largest=False).indices  # (B, keep)
        exact = torch.linalg.vector_norm(block[:, None, :] - reference[candidates], dim=2)  # (B, keep)
        out[start:start + step] = exact.min(dim=1).values
    return out  # (Q,)


def distances_to_train(queries: np.ndarray, train: np.ndarray, *, block_rows: int | None = None) -> np.ndarray:
    """For each row of queries (Q, D): the Euclidean distance to its nearest row of train (N, D), float64 (Q,).

    Both are centred on the training mean first (distances do not change; the float32 search stays accurate)."""
    q, tr = np.asarray(queries, dtype=np.float64), np.asarray(train, dtype=np.float64)
    if q.ndim != 2 or tr.ndim != 2 or q.shape[1] != tr.shape[1] or len(tr) == 0:
        raise ValueError(f"queries {q.shape} and train {tr.shape} must be (Q, D) and (N >= 1, D)")
    centre = tr.mean(axis=0)  # (D,)
    return nearest_distances(torch.from_numpy(q - centre), torch.from_numpy(tr - centre), block_rows).numpy()
