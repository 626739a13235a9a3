"""Initial means: k-means|| over all rows, k-means++ on a uniform sample of rows, random rows,
or given means.

Everything random is drawn from ``numpy.random.default_rng(seed)`` over global row indices, or
(k-means||) from a counter-based hash of (seed, round, global row index), never over chunks or
task order, so the same data and seed give the same initial means however the rows are split
into files and chunks.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import dask
import dask.array as da
import numba
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph

from . import kernel
from .passes import RETRIES, DaskData, gather_rows, tree_reduce

__all__ = [
    "KMeansParallelInfo",
    "kmeans_parallel",
    "kmeans_plusplus",
    "random_rows",
    "sample_rows",
    "uniform_hash",
    "weighted_lloyd",
]


def sample_rows(data: DaskData, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` distinct rows (in row order) and their weights.

    One pass over the chunks that hold a sampled row; memory is ``size x d`` on the client.
    """
    n = data.n_rows
    size = min(size, n)
    index = np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))
    return gather_rows(data, index)


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


# ---------------------------------------------------------------------------------------------
# k-means|| (Bahmani, Moseley, Vattani, Kumar & Vassilvitskii 2012)
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
#: Stream of the hash that picks the first centre; rounds use streams 0, 1, 2, ...
_FIRST_STREAM = _MASK64
#: Extra sampling rounds allowed when the rounds found fewer than k distinct candidates.
MAX_EXTRA_ROUNDS = 10
#: Per-row state of k-means|| between rounds: squared distance to the nearest candidate
#: (float32) and that candidate's index (int32): 8 bytes per row. (Squared distances above
#: float32's 3.4e38, i.e. features beyond ~1e19, would overflow to inf.)
STATE_DTYPE = np.dtype([("d2", "<f4"), ("nearest", "<i4")])


@numba.njit(nogil=True, cache=True)
def _splitmix64(z):  # pragma: no cover
    """splitmix64 of one uint64 (Steele, Lea & Flood 2014); arithmetic wraps modulo 2**64."""
    z = z + np.uint64(_GOLDEN)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(nogil=True, cache=True)
def _uniform(row, key):  # pragma: no cover
    """The uniform number in (0, 1) of one global row index under a stream's key."""
    z = _splitmix64(np.uint64(row) ^ key)
    return (np.float64(z >> np.uint64(11)) + 0.5) * (1.0 / 9007199254740992.0)  # 2**-53


@numba.njit(nogil=True, cache=True)
def _uniforms(rows, key):  # pragma: no cover
    out = np.empty(rows.shape[0])
    for i in range(rows.shape[0]):
        out[i] = _uniform(rows[i], key)
    return out


def _stream_key(seed: int, stream: int) -> int:
    return _splitmix64(_splitmix64(np.uint64(int(seed) & _MASK64)) ^ np.uint64(int(stream) & _MASK64))


def uniform_hash(seed: int, stream: int, rows: np.ndarray) -> np.ndarray:
    """A uniform number in (0, 1) for each global row index, a pure function of
    (seed, stream, row): the same whatever chunk or task computes it."""
    return _uniforms(np.asarray(rows, dtype=np.uint64), np.uint64(_stream_key(seed, stream)))


@dataclass
class _Pool:
    """Rows that may join the candidates: global index, l*w*d2, the uniform u, the row."""

    index: np.ndarray
    lwd2: np.ndarray
    u: np.ndarray
    rows: np.ndarray

    @classmethod
    def empty(cls, d: int) -> _Pool:
        return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros((0, d)))

    def keep(self, mask: np.ndarray) -> _Pool:
        return _Pool(self.index[mask], self.lwd2[mask], self.u[mask], self.rows[mask])


@dataclass
class _RoundPartial:
    """What one chunk (or a subtree of chunks) returns from a round's pass."""

    phi: float  # sum of w * d2 over the rows, after the distance update
    counts: np.ndarray  # total weight of the rows nearest to each candidate
    pool: _Pool  # rows with l*w*d2 > u*phi for this (partial, hence smaller) phi


def _combine_round(a: _RoundPartial, b: _RoundPartial) -> _RoundPartial:
    """Add two partials and drop the pooled rows the larger (still lower-bound) phi rejects.

    A row joins the candidates when ``l w d2 > u phi`` for the total ``phi``; a partial phi is
    never larger than the total (sums of non-negative floats are monotone, also in floating
    point), so a row rejected by a partial phi is rejected by the total, and each subtree
    keeps in expectation at most ``l`` rows.
    """
    phi = a.phi + b.phi
    pool = _Pool(
        np.concatenate([a.pool.index, b.pool.index]),
        np.concatenate([a.pool.lwd2, b.pool.lwd2]),
        np.concatenate([a.pool.u, b.pool.u]),
        np.concatenate([a.pool.rows, b.pool.rows]),
    )
    return _RoundPartial(phi, a.counts + b.counts, pool.keep(pool.lwd2 > pool.u * phi))


@numba.njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _lower_to(X, centers, labels, base, d2, nearest):  # pragma: no cover
    """Lower ``d2`` (float32) and ``nearest`` in place with each row's exact squared distance
    to the candidate ``labels`` names: ``sum_f (x_f - c_f)^2`` in float64 (summed in an order
    fixed by the number of features, so vectorised), compared with ``d2`` in float64."""
    n, d = X.shape
    for i in range(n):
        j = labels[i]
        s = 0.0
        for f in range(d):
            t = np.float64(X[i, f]) - centers[j, f]
            s += t * t
        if s < np.float64(d2[i]):
            d2[i] = s
            nearest[i] = base + j


def _lower_nearest(
    X: np.ndarray, xsq: np.ndarray | None, centers: np.ndarray, base: int, d2: np.ndarray,
    nearest: np.ndarray,
) -> None:
    """Lower ``d2`` (float32) and ``nearest`` in place with the squared distances to
    ``centers`` (float64), whose indices start at ``base``.

    The nearest of the new candidates is found by the matrix-product kernel (the same as a
    fit's passes), then its distance is recomputed exactly as ``sum_f (x_f - c_f)^2`` in
    float64: a row equal to a candidate has distance exactly 0 and is never sampled again, and
    both steps are functions of the row alone, so independent of chunking. (The exact
    distances to every candidate, one scalar loop, took 136 s of a 154 s fit of 10M x 32 rows.)
    """
    labels, _ = kernel.assign_labels(X, centers, xsq)
    _lower_to(X, centers, labels, base, d2, nearest)


@numba.njit(nogil=True, cache=True)
def _sampled_rows(d2, w, has_w, key, offset, ell, phi):  # pragma: no cover
    """Local indices of the rows with ``ell * (w * d2) > u * phi``, ``u`` being
    ``uniform_hash`` of the row's global index: the same test, in the same arithmetic, as
    on the pooled rows afterwards, in one loop instead of a dozen array temporaries."""
    n = d2.shape[0]
    out = np.empty(n, dtype=np.int64)
    m = 0
    for i in range(n):
        wi = w[i] if has_w else 1.0
        lwd2 = ell * (wi * np.float64(d2[i]))
        if lwd2 > _uniform(offset + i, key) * phi:
            out[m] = i
            m += 1
    return out[:m]


def _round_chunk(
    X: np.ndarray,
    weights: np.ndarray | None,
    xsq: np.ndarray | None,
    state: np.ndarray | None,
    new_centers: np.ndarray,
    base: int,
    seed: int,
    stream: int,
    oversampling_l: float,
    sample: bool,
    offset: int,
) -> tuple[np.ndarray, _RoundPartial]:
    """One chunk's part of a round: update the per-row state with the candidates added last
    round, then pool the rows this chunk's own phi (a lower bound of the total) would sample."""
    n, d = X.shape
    new_state = np.empty(n, dtype=STATE_DTYPE)
    if state is None:
        new_state["d2"] = np.inf
        new_state["nearest"] = 0
    else:
        new_state[...] = state
    d2, nearest = new_state["d2"], new_state["nearest"]
    if new_centers.shape[0]:
        centers = np.ascontiguousarray(new_centers, dtype=np.float64)
        _lower_nearest(X, xsq, centers, base, d2, nearest)
    # everything downstream uses the stored (float32) distances, as the next round will
    w = None if weights is None else np.asarray(weights, dtype=np.float64)
    wd2 = d2.astype(np.float64) if w is None else w * d2
    phi = float(wd2.sum())
    counts = np.bincount(nearest, weights=w, minlength=base + new_centers.shape[0])
    pool = _Pool.empty(d)
    if sample and phi > 0:
        key = np.uint64(_stream_key(seed, stream))
        local = _sampled_rows(d2, np.empty(0) if w is None else w, w is not None, key, offset,
                              oversampling_l, phi)  # fmt: skip
        rows = offset + local
        lwd2 = oversampling_l * wd2[local]
        pool = _Pool(rows, lwd2, uniform_hash(seed, stream, rows), np.asarray(X[local], dtype=np.float64))
    return new_state, _RoundPartial(phi, counts.astype(np.float64), pool)


def _first_key_chunk(weights: np.ndarray, seed: int, offset: int) -> tuple[float, int]:
    """Exponential race (Efraimidis & Spirakis 2006): the row with the smallest
    ``-log(u) / w`` is drawn with probability proportional to ``w``; weight 0 never wins."""
    w = np.asarray(weights, dtype=np.float64)
    if w.size == 0:
        return np.inf, -1
    rows = offset + np.arange(w.size, dtype=np.int64)
    with np.errstate(divide="ignore"):
        key = np.where(w > 0, -np.log(uniform_hash(seed, _FIRST_STREAM, rows)) / w, np.inf)
    i = int(np.argmin(key))
    return float(key[i]), int(rows[i])


def _min_key(a: tuple[float, int], b: tuple[float, int]) -> tuple[float, int]:
    return min(a, b)


def _first_center(data: DaskData, seed: int) -> tuple[np.ndarray, int]:
    """The first centre: a row drawn uniformly (by sample weight when there are weights).

    Without weights the row index is a hash of the seed, and only the chunk holding that row
    is read. With weights, one pass over the weights runs the exponential race."""
    if data.weights is None:
        index = _stream_key(seed, _FIRST_STREAM) % data.n_rows
    else:
        parts = [
            delayed(_first_key_chunk, pure=True)(w, seed, off)
            for w, off in zip(data.weights.to_delayed().ravel(), data.offsets, strict=True)
        ]
        ((key, index),) = dask.compute(tree_reduce(parts, _min_key), retries=RETRIES)
        if not np.isfinite(key):
            raise ValueError("every row has sample weight 0; no centre can be chosen.")
    (row,) = dask.compute(data.X[int(index)], retries=RETRIES)
    return np.asarray(row, dtype=np.float64), int(index)


def _combine_many(parts: list[_RoundPartial]) -> _RoundPartial:
    result = parts[0]
    for part in parts[1:]:
        result = _combine_round(result, part)
    return result


def _keys(array: da.Array | None, n: int) -> list[Any]:
    """The block keys of a row-chunked array (1-D or one column chunk), or Nones."""
    if array is None:
        return [None] * n
    keys = array.__dask_keys__()
    return [k[0] if isinstance(k, list) else k for k in keys]


def _round_graph(
    data: DaskData, state: da.Array | None, pending: np.ndarray, base: int, seed: int,
    stream: int, ell: float, sample: bool, split_every: int = 8,
) -> tuple[da.Array, Delayed]:  # fmt: skip
    """The graph of one round: per chunk one task (update + pool), the new per-row state as a
    Dask array, and the partials reduced in a fixed tree (adjacent groups, in chunk order).

    Built as a plain task graph rather than with ``dask.delayed``: the delayed machinery
    spends far longer building a graph of many chunks than the round spends computing it."""
    n_chunks = len(data.X.chunks[0])
    token = tokenize(data.X.name, None if data.weights is None else data.weights.name,
                     None if state is None else state.name, pending, base, seed, stream, ell,
                     sample)  # fmt: skip
    name = f"kmeans-parallel-round-{token}"
    state_name = f"kmeans-parallel-state-{token}"
    centers_key = f"kmeans-parallel-centers-{token}"
    layer: dict[Any, Any] = {centers_key: pending}
    xs, ws, qs = _keys(data.X, n_chunks), _keys(data.weights, n_chunks), _keys(data.xsq, n_chunks)
    ss = _keys(state, n_chunks)
    for i, off in enumerate(data.offsets):
        layer[(name, i)] = (_round_chunk, xs[i], ws[i], qs[i], ss[i], centers_key, base, seed,
                            stream, ell, sample, off)  # fmt: skip
        layer[(state_name, i)] = (operator.getitem, (name, i), 0)
    level = []
    for i in range(n_chunks):
        layer[(name + "-partial", 0, i)] = (operator.getitem, (name, i), 1)
        level.append((name + "-partial", 0, i))
    depth = 0
    while len(level) > 1:
        depth += 1
        groups = [level[j : j + split_every] for j in range(0, len(level), split_every)]
        level = []
        for j, group in enumerate(groups):
            layer[(name + "-partial", depth, j)] = (_combine_many, list(group))
            level.append((name + "-partial", depth, j))
    dependencies = [a for a in (data.X, data.weights, data.xsq, state) if a is not None]
    graph = HighLevelGraph.from_collections(name, layer, dependencies=dependencies)
    new_state = da.Array(graph, state_name, chunks=(data.X.chunks[0],), dtype=STATE_DTYPE)
    return new_state, Delayed(level[0], graph, layer=name)


@dataclass
class KMeansParallelInfo:
    """What a run of :func:`kmeans_parallel` did, for logs and tests."""

    passes: int  # full passes over the rows (the first centre's single chunk not counted)
    weight_passes: int  # passes over the sample weights alone, to draw the first centre
    rounds: int  # sampling rounds run (more than asked only in the fallback)
    n_candidates: int
    candidate_weights: np.ndarray
    candidates: np.ndarray
    candidate_index: np.ndarray  # global row index of each candidate
    phi: list[float]  # cost of the candidates after each pass
    notes: list[str]


def weighted_lloyd(
    X: np.ndarray, weights: np.ndarray, centers: np.ndarray, max_iter: int = 300
) -> tuple[np.ndarray, float]:
    """Weighted Lloyd iterations on rows held in memory, until no label changes.

    A mean left with no weight keeps its position. Returns the means and their weighted loss.
    """
    centers = np.array(centers, dtype=np.float64)
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        dist = _sq_dist(X, centers)
        new_labels = np.argmin(dist, axis=1)
        if labels is not None and np.array_equal(new_labels, labels):
            break
        labels = new_labels
        counts = np.bincount(labels, weights=weights, minlength=k)
        sums = np.zeros_like(centers)
        np.add.at(sums, labels, weights[:, None] * X)
        has = counts > 0
        centers[has] = sums[has] / counts[has, None]
    dist = _sq_dist(X, centers)
    return centers, float(weights @ dist.min(axis=1))


def kmeans_parallel(
    data: DaskData,
    k: int,
    *,
    seed: int,
    oversampling: float = 2.0,
    rounds: int = 5,
    n_init: int = 1,
    local_trials: int = 5,
    return_info: bool = False,
) -> Any:
    """k-means|| initial means (Bahmani et al. 2012) over all rows, shape (n_init, k, d).

    1. The first candidate is one row drawn uniformly, or with probability proportional to its
       sample weight when there are weights (a row of weight 0 is never drawn).
    2. ``rounds`` sampling rounds, with ``l = oversampling * k``: every row joins the candidates
       independently with probability ``min(1, l w_i d2_i / phi)``, where ``d2_i`` is the
       squared distance of row i to its nearest candidate and ``phi = sum_i w_i d2_i``.
    3. Each candidate is weighted by the total sample weight of the rows nearest to it; the
       candidates (``1 + ~l * rounds`` rows) are reclustered on the client by greedy weighted
       k-means++ (:func:`kmeans_plusplus`) and weighted Lloyd (:func:`weighted_lloyd`). Each
       restart keeps the best, by weighted loss over the candidates, of ``local_trials`` such
       reclusterings, with seeds derived from ``seed``; the restarts share steps 1 and 2. (The
       best of several local reclusterings is free in passes and avoids the bad local minima a
       single one falls into now and then: see tests/test_initialization.py.)

    Passes over the data: exactly ``rounds + 1``, plus reading the one chunk that holds the
    first centre; with sample weights, also one pass over the weights alone to draw the first
    centre (when the weights are read from the same Parquet chunks as the rows, that pass reads
    them too: ``rounds + 2``). Pass ``r`` (``r = 0 .. rounds-1``) updates every row's distance
    with the candidates added by the previous round only (the first centre for ``r = 0``),
    computes ``phi`` and samples the next candidates, all in one ``dask.persist`` of a graph
    that reads each chunk once; the last pass adds the candidates of the last round and
    counts the candidates' weights. Between passes the only per-row state is a Dask array of
    ``(d2 float32, nearest int32)``, 8 bytes per row, persisted where the rows are; the rows
    never come to the client. Fewer passes happen when every row coincides with a candidate
    (``phi = 0``: nothing left to sample) or when the last round sampled nothing.

    Sampling in the same pass as the update: each chunk pools the rows with
    ``l w d2 > u phi_chunk`` for its own (partial) ``phi``, which is a lower bound of the total;
    the reduction tree re-filters with each larger partial sum, and the root with the true
    ``phi``, so exactly the rows with ``l w d2 > u phi`` arrive at the client, and every
    subtree holds in expectation at most ``l`` pooled rows.

    Determinism: ``u`` is a splitmix64 hash of (seed, round, global row index) and the
    candidates are ordered by global row index, so the result does not depend on how the rows
    are chunked nor on task order (up to the last-bit rounding of ``phi``'s sum, which could
    only flip a row whose ``u`` lies within one ulp of its threshold).

    Fallbacks: rows identical to one another that are sampled in the same round are kept once.
    When the rounds found fewer than ``k`` distinct candidates while ``phi > 0``, sampling goes
    on for up to ``MAX_EXTRA_ROUNDS`` more rounds (one pass each), with ``l = max(l, 2k)``,
    until there are ``k`` (one extra round almost always suffices). When
    the data hold fewer than ``k`` distinct rows of positive weight, ``phi`` reaches 0, every
    distinct row is a centre and the remaining centres repeat the first (they stay empty; no
    initialisation can do better).

    Parameters
    ----------
    data : DaskData
    k : int
    seed : int
        Any non-negative integer below 2**64.
    oversampling : float
        ``l / k``: expected candidates per round relative to ``k``.
    rounds : int
        Sampling rounds (>= 1).
    n_init : int
        Restarts of the local reclustering.
    local_trials : int
        Local reclusterings per restart; the one with the lowest weighted loss is kept.
        Client time grows as ``local_trials * k * n_candidates * d``.
    return_info : bool
        Also return a :class:`KMeansParallelInfo`.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k={k!r} should be a positive integer.")
    if not oversampling > 0:
        raise ValueError(f"oversampling={oversampling!r} should be > 0.")
    if int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds={rounds!r} should be an integer >= 1.")
    if int(n_init) != n_init or n_init < 1:
        raise ValueError(f"n_init={n_init!r} should be an integer >= 1.")
    if int(local_trials) != local_trials or local_trials < 1:
        raise ValueError(f"local_trials={local_trials!r} should be an integer >= 1.")
    if data.n_rows < k:
        raise ValueError(f"n_samples={data.n_rows} should be >= n_clusters={k}.")
    seed = int(seed)
    d = data.n_features
    ell = float(oversampling) * k
    weight_passes = int(data.weights is not None)
    first, first_index = _first_center(data, seed)

    candidates = [first[None, :]]
    cand_index = [np.array([first_index], dtype=np.int64)]
    pending = first[None, :]
    base = 0
    state: da.Array | None = None
    counts = np.zeros(1)
    phis: list[float] = []
    notes: list[str] = []
    passes = 0
    r = 0
    while True:
        n_total = base + pending.shape[0]
        sample = r < rounds or (n_total < k and r < rounds + MAX_EXTRA_ROUNDS)
        if not sample and pending.shape[0] == 0:
            break  # the last pass already counted every candidate's weight
        if r >= rounds and sample:
            notes.append(
                f"only {n_total} distinct candidates after {r} rounds; sampling round {r + 1}."
            )
        # an extra round (fallback) samples about 2k rows rather than l
        ell_r = ell if r < rounds else max(ell, 2.0 * k)
        new_state, reduced = _round_graph(data, state, pending, base, seed, r, ell_r, sample)
        if sample:
            # optimize_graph=False: optimised as an array on its own, the state would fuse each
            # chunk's task into its getitem, and the partials would run every task a second time
            state, reduced = dask.persist(
                new_state, reduced, optimize_graph=False, retries=RETRIES
            )
        (part,) = dask.compute(reduced, retries=RETRIES)
        passes += 1
        phi = float(part.phi)
        phis.append(phi)
        counts = np.asarray(part.counts, dtype=np.float64)
        base = n_total
        pending = np.zeros((0, d))
        if not sample or phi <= 0:
            r += int(sample)
            break
        pool = part.pool.keep(part.pool.lwd2 > part.pool.u * phi)
        order = np.argsort(pool.index, kind="stable")
        rows, index = pool.rows[order], pool.index[order]
        if rows.shape[0] > 1:  # identical rows sampled in the same round: keep the first
            _, first_of = np.unique(rows, axis=0, return_index=True)
            keep = np.sort(first_of)
            rows, index = rows[keep], index[keep]
        pending = rows
        candidates.append(rows)
        cand_index.append(index)
        r += 1
    state = None  # release the per-row state on the workers

    cands = np.concatenate(candidates)[:base]
    cand_index_all = np.concatenate(cand_index)[:base]
    weights = counts[:base]
    if base < k:
        why = (
            f"the data hold only {base} distinct rows of positive weight"
            if phis[-1] <= 0
            else f"only {base} distinct candidates after {r} rounds"
        )
        notes.append(f"{why} for k={k}; the remaining centres repeat the first.")
    seeds = np.random.SeedSequence(seed).generate_state(n_init * local_trials)
    out = np.empty((n_init, k, d))
    for i in range(n_init):
        best = np.inf
        for s in seeds[i * local_trials : (i + 1) * local_trials]:
            start = kmeans_plusplus(cands, weights, k, int(s))
            means, loss = weighted_lloyd(cands, weights, start)
            if loss < best:  # ties keep the earlier trial
                best, out[i] = loss, means
    if not return_info:
        return out
    info = KMeansParallelInfo(
        passes=passes, weight_passes=weight_passes, rounds=r, n_candidates=base,
        candidate_weights=weights, candidates=cands, candidate_index=cand_index_all,
        phi=phis, notes=notes,
    )  # fmt: skip
    return out, info
