"""Initial means: k-means++ on a uniform sample of rows, random rows, or given means.

Everything random is drawn from ``numpy.random.default_rng(seed)`` over global row indices,
never over chunks or task order, so the same data and seed give the same initial means however
the rows are split into files and chunks.
"""

from __future__ import annotations

from typing import Any

import dask
import numpy as np

from .passes import DaskData

__all__ = [
    "kmeans_plusplus",
    "random_rows",
    "sample_rows",
]


def sample_rows(data: DaskData, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` distinct rows (in row order) and their weights.

    One pass over the chunks that hold a sampled row; memory is ``size x d`` on the client.
    """
    n = data.n_rows
    size = min(size, n)
    index = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    rows = data.X[index]
    weights: Any = data.weights[index] if data.weights is not None else None
    rows, weights = dask.compute(rows, weights)
    if weights is None:
        weights = np.ones(size)
    return np.asarray(rows, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def random_rows(X: np.ndarray, weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """``k`` distinct rows of positive weight, chosen uniformly."""
    candidates = np.flatnonzero(weights > 0)
    if candidates.size < k:
        raise ValueError(
            f"n_clusters={k} should be <= the number of sampled rows with positive weight"
            f" ({candidates.size})."
        )
    chosen = np.random.default_rng(seed).choice(candidates, size=k, replace=False)
    return X[np.sort(chosen)].copy()


def _sq_dist(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Squared distances between the rows of A and the rows of B, clipped at 0."""
    d = (A * A).sum(1)[:, None] - 2.0 * A @ B.T + (B * B).sum(1)[None, :]
    return np.maximum(d, 0.0)


def kmeans_plusplus(
    X: np.ndarray, weights: np.ndarray, k: int, seed: int, n_local_trials: int | None = None
) -> np.ndarray:
    """Greedy weighted k-means++ (Arthur & Vassilvitskii 2007; greedy as in scikit-learn).

    Each new centre is the best of ``2 + ln k`` candidates drawn with probability proportional
    to weight times squared distance to the nearest centre so far. Rows of weight 0 are never
    chosen.
    """
    rng = np.random.default_rng(seed)
    n, d = X.shape
    if n_local_trials is None:
        n_local_trials = 2 + int(np.log(k))
    total = weights.sum()
    if not total > 0:
        raise ValueError("every sampled row has weight 0; no centre can be chosen.")
    centers = np.empty((k, d))
    first = rng.choice(n, p=weights / total)
    centers[0] = X[first]
    closest = _sq_dist(X[first : first + 1], X)[0]
    potential = float(closest @ weights)
    for c in range(1, k):
        if potential <= 0:  # fewer distinct rows than k: the rest repeat an existing row
            centers[c:] = centers[0]
            break
        cumulative = np.cumsum(weights * closest)
        targets = rng.uniform(size=n_local_trials) * cumulative[-1]
        ids = np.clip(np.searchsorted(cumulative, targets), 0, n - 1)
        trial = np.minimum(closest[None, :], _sq_dist(X[ids], X))
        trial_potential = trial @ weights
        best = int(np.argmin(trial_potential))
        centers[c] = X[ids[best]]
        closest = trial[best]
        potential = float(trial_potential[best])
    return centers
