"""The per-chunk kernel: distances, nearest means and the additive statistics of the loss.

For one chunk of rows and the current means this computes, in one pass, everything an iteration
needs from that chunk: per-cluster weighted sums and counts, the partial loss, how many labels
changed since the previous means, and the rows farthest from their mean (to relocate empty
clusters). Each restart of ``n_init`` is a separate set of ``k`` means; all of them share one
matrix product per block of rows.

Distances use ``||x||^2 - 2 x.mu^T + ||mu||^2``: one float32 (or float64) matrix product per
block, the block sized so the distance block stays in cache while a compiled loop takes its
argmin and accumulates the sums in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

__all__ = [
    "ChunkStats",
    "assign_labels",
    "block_rows_for",
    "chunk_stats",
    "combine_stats",
    "row_sq_norms",
]

#: Bytes of one block's working set (rows of X plus their distances); about half of a
#: typical per-core L2 cache, so the distance block is reduced while it is still in cache.
_BLOCK_BYTES = 1 << 20


def block_rows_for(n_columns: int, n_features: int, itemsize: int) -> int:
    """Rows per block so that a block of X and of its distances fits ``_BLOCK_BYTES``."""
    rows = _BLOCK_BYTES // (itemsize * (n_columns + n_features))
    return int(min(max(rows, 256), 16384))


@dataclass
class ChunkStats:
    """Additive statistics of the loss for ``n_init`` sets of ``k`` means.

    Attributes
    ----------
    sums : ndarray of shape (n_init, k, d), float64
        Weighted sum of the rows nearest to each mean.
    counts : ndarray of shape (n_init, k), float64
        Total weight of the rows nearest to each mean.
    loss : ndarray of shape (n_init,), float64
        Weighted sum of squared distances to the nearest mean.
    changed : ndarray of shape (n_init,), int64
        Rows whose nearest mean differs from their nearest previous mean (-1: no previous).
    far_dist, far_rows, far_index :
        The rows farthest from their own mean, per restart, best first: squared distances
        (n_init, m), the rows themselves (n_init, m, d) and their global indices (n_init, m).
    n_rows : int
        Rows seen.
    sq_total : float
        Weighted sum of squared row norms (with ``sums`` and ``counts`` it gives the variance).
    """

    sums: np.ndarray
    counts: np.ndarray
    loss: np.ndarray
    changed: np.ndarray
    far_dist: np.ndarray
    far_rows: np.ndarray
    far_index: np.ndarray
    n_rows: int = 0
    sq_total: float = 0.0


@numba.njit(nogil=True, cache=True)
def _nearest_and_accumulate(X, G, cn, xsq, w, k, labels, d1, d2, sums, counts, loss):  # pragma: no cover
    """For each row and restart: nearest mean, best and second-best squared distance; add the
    row to that mean's weighted sum and count. ``G`` holds x.mu for all restarts side by side."""
    n, d = X.shape
    n_init = labels.shape[0]
    for i in range(n):
        wi = w[i]
        for r in range(n_init):
            base = r * k
            best = np.inf
            second = np.inf
            arg = 0
            for j in range(k):
                v = cn[base + j] - 2.0 * G[i, base + j]
                if v < best:
                    second = best
                    best = v
                    arg = j
                elif v < second:
                    second = v
            dist = xsq[i] + best
            dist = max(dist, 0.0)
            labels[r, i] = arg
            d1[r, i] = dist
            d2[r, i] = xsq[i] + second
            counts[r, arg] += wi
            loss[r] += wi * dist
            for f in range(d):
                sums[r, arg, f] += wi * X[i, f]


def row_sq_norms(X: np.ndarray) -> np.ndarray:
    """Squared norm of each row, accumulated in float64."""
    return np.einsum("ij,ij->i", X, X, dtype=np.float64)


def _stack(centers: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All restarts' means as one (n_init*k, d) matrix in X's dtype, and their squared norms."""
    stacked = np.ascontiguousarray(centers.reshape(-1, centers.shape[-1]), dtype=dtype)
    return stacked, row_sq_norms(stacked)


def _count_changed(
    X: np.ndarray,
    labels: np.ndarray,
    d1: np.ndarray,
    d2: np.ndarray,
    xsq: np.ndarray,
    centers: np.ndarray,
    previous: np.ndarray,
) -> np.ndarray:
    """Count rows whose nearest mean differs from their nearest previous mean.

    A row keeps its label for certain when its margin to the second-nearest mean is larger
    than the distance the means moved (triangle inequality); only the other rows get their
    previous label computed, with one small matrix product. Near convergence that is a
    handful of rows, so the count is exact at almost no cost.
    """
    n_init, k, d = centers.shape
    changed = np.zeros(n_init, dtype=np.int64)
    shift = np.sqrt(((centers - previous) ** 2).sum(axis=-1))  # (n_init, k)
    eps = np.finfo(X.dtype).eps * (d + 4)
    prev_stacked, prev_norms = _stack(previous, X.dtype)
    for r in range(n_init):
        slack = eps * (xsq + np.max(prev_norms[r * k : (r + 1) * k]) + 1.0)
        own = np.sqrt(d1[r] + slack) + shift[r][labels[r]]
        other = np.sqrt(np.maximum(d2[r] - slack, 0.0)) - shift[r].max()
        unsure = np.flatnonzero(own >= other)
        if unsure.size == 0:
            continue
        block = prev_stacked[r * k : (r + 1) * k]
        old = np.argmin(prev_norms[r * k : (r + 1) * k] - 2.0 * (X[unsure] @ block.T), axis=1)
        changed[r] = int(np.count_nonzero(old != labels[r][unsure]))
    return changed


def _blocked_pass(
    X: np.ndarray, centers: np.ndarray, xsq: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, ...]:
    """One pass over X in cache-sized blocks: labels, best and second-best squared distances
    per restart, and the weighted sums, counts and loss."""
    n, d = X.shape
    n_init, k, _ = centers.shape
    stacked, cn = _stack(centers, X.dtype)
    labels = np.empty((n_init, n), dtype=np.int32)
    d1 = np.empty((n_init, n), dtype=np.float64)
    d2 = np.empty((n_init, n), dtype=np.float64)
    sums = np.zeros((n_init, k, d), dtype=np.float64)
    counts = np.zeros((n_init, k), dtype=np.float64)
    loss = np.zeros(n_init, dtype=np.float64)
    step = block_rows_for(n_init * k, d, X.dtype.itemsize)
    G = np.empty((min(step, n), n_init * k), dtype=X.dtype)
    for start in range(0, n, step):
        stop = min(start + step, n)
        g = G[: stop - start]
        np.matmul(X[start:stop], stacked.T, out=g)
        _nearest_and_accumulate(
            X[start:stop], g, cn, xsq[start:stop], w[start:stop], k,
            labels[:, start:stop], d1[:, start:stop], d2[:, start:stop], sums, counts, loss,
        )  # fmt: skip
    return labels, d1, d2, sums, counts, loss


def chunk_stats(
    X: np.ndarray,
    centers: np.ndarray,
    *,
    weights: np.ndarray | None = None,
    xsq: np.ndarray | None = None,
    previous: np.ndarray | None = None,
    offset: int = 0,
    n_far: int = 0,
) -> ChunkStats:
    """Statistics of one chunk for ``n_init`` sets of means.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32 or float64
    centers : ndarray of shape (n_init, k, d)
        The current means; cast to X's dtype for the matrix product.
    weights : ndarray of shape (n,), optional
        Sample weights; 1 for every row when omitted.
    xsq : ndarray of shape (n,), optional
        Precomputed squared row norms (float64), kept between iterations when X is cached.
    previous : ndarray like ``centers``, optional
        The previous iteration's means, to count changed labels.
    offset : int
        Global index of the chunk's first row.
    n_far : int
        How many of the rows farthest from their mean to return per restart.
    """
    n = X.shape[0]
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if xsq is None:
        xsq = row_sq_norms(X)
    labels, d1, d2, sums, counts, loss = _blocked_pass(X, centers, xsq, w)
    if previous is None:
        changed = np.full(centers.shape[0], -1, dtype=np.int64)
    else:
        changed = _count_changed(X, labels, d1, d2, xsq, centers, previous)
    far_dist, far_rows, far_index = _farthest(X, d1, w, offset, n_far)
    return ChunkStats(
        sums, counts, loss, changed, far_dist, far_rows, far_index, n, float(w @ xsq)
    )


def _farthest(
    X: np.ndarray, dist: np.ndarray, w: np.ndarray, offset: int, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``m`` rows of positive weight farthest from their mean, per restart."""
    n_init, n = dist.shape
    m = min(m, n)
    far_dist = np.empty((n_init, m))
    far_rows = np.empty((n_init, m, X.shape[1]))
    far_index = np.empty((n_init, m), dtype=np.int64)
    for r in range(n_init):
        score = np.where(w > 0, dist[r], -np.inf)
        top = np.argpartition(-score, m - 1)[:m] if 0 < m < n else np.arange(m)
        # order: farthest first, then lowest row index, so ties never depend on chunking
        top = top[np.lexsort((top, -score[top]))]
        far_dist[r], far_rows[r], far_index[r] = score[top], X[top], top + offset
    return far_dist, far_rows, far_index


def combine_stats(a: ChunkStats, b: ChunkStats) -> ChunkStats:
    """Add two chunks' statistics; keep the overall farthest rows. Order-independent except
    for float64 rounding, which a fixed reduction tree makes repeatable."""
    m = max(a.far_dist.shape[1], b.far_dist.shape[1])
    dist = np.concatenate([a.far_dist, b.far_dist], axis=1)
    index = np.concatenate([a.far_index, b.far_index], axis=1)
    rows = np.concatenate([a.far_rows, b.far_rows], axis=1)
    order = np.lexsort((index, -dist), axis=1)[:, :m]
    take = np.take_along_axis
    changed = np.where((a.changed < 0) | (b.changed < 0), -1, a.changed + b.changed)
    return ChunkStats(
        sums=a.sums + b.sums,
        counts=a.counts + b.counts,
        loss=a.loss + b.loss,
        changed=changed,
        far_dist=take(dist, order, axis=1),
        far_rows=take(rows, order[..., None], axis=1),
        far_index=take(index, order, axis=1),
        n_rows=a.n_rows + b.n_rows,
        sq_total=a.sq_total + b.sq_total,
    )


def assign_labels(X: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest mean (int32) and squared distance to it (float64) for each row, for one set of
    means of shape (k, d)."""
    labels, d1, _, _, _, _ = _blocked_pass(X, centers[None], row_sq_norms(X), np.ones(len(X)))
    return labels[0], d1[0]
