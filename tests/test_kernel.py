"""Tests for pipeline.kernel against a straightforward NumPy reference.

The reference builds the explicit (n, k) matrix of squared distances in float64 from the rows
and from the means cast to the rows' dtype (the kernel does its matrix product in that dtype),
then takes the argmin and accumulates with ``np.add.at``.
"""

from __future__ import annotations

import itertools
import pickle
from functools import reduce

import numba
import numpy as np
import pytest
from conftest import blobs
from llvmlite import ir

from pipeline import kernel
from pipeline.kernel import (
    ChunkStats,
    add_stats,
    assign_labels,
    chunk_stats,
    combine_stats,
    with_farthest,
)

DTYPES = [np.float32, np.float64]


def _ref_distances(X: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Explicit (n, k) squared distances, float64, means rounded to X's dtype first."""
    X64 = X.astype(np.float64)
    C64 = np.asarray(centers).astype(X.dtype).astype(np.float64)
    return ((X64[:, None, :] - C64[None, :, :]) ** 2).sum(axis=-1)


def _ref_stats(X: np.ndarray, centers: np.ndarray, w: np.ndarray | None = None) -> dict:
    """Reference statistics for one set of means of shape (k, d)."""
    n, d = X.shape
    k = centers.shape[0]
    w = np.ones(n) if w is None else np.asarray(w, dtype=np.float64)
    D = _ref_distances(X, centers)
    labels = D.argmin(axis=1)
    dist = D[np.arange(n), labels]
    sums = np.zeros((k, d))
    np.add.at(sums, labels, w[:, None] * X.astype(np.float64))
    return {
        "labels": labels,
        "dist": dist,
        "sums": sums,
        "counts": np.bincount(labels, weights=w, minlength=k).astype(np.float64),
        "loss": float(w @ dist),
        "sq_total": float(w @ (X.astype(np.float64) ** 2).sum(axis=1)),
        "margin": np.sort(D, axis=1)[:, 1] - dist if k > 1 else np.full(n, np.inf),
    }


def _separated(n: int, d: int, k: int, seed: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Blobs and means near the blob centres, so no row is close to a tie."""
    X = blobs(n=n, d=d, k=k, seed=seed, spread=0.5).astype(dtype)
    true_centers = np.random.default_rng(seed).uniform(-10, 10, size=(k, d))  # as in blobs()
    centers = true_centers + 0.1 * np.random.default_rng(seed + 100).normal(size=(k, d))
    return X, centers


def _assert_no_near_ties(X: np.ndarray, centers: np.ndarray, rel: float = 1e-4) -> None:
    ref = _ref_stats(X, centers)
    scale = 1.0 + (X.astype(np.float64) ** 2).sum(axis=1)
    assert (ref["margin"] > rel * scale).all(), "test data has a near tie; pick another seed"


# --------------------------------------------------------------------------------------------
# chunk_stats and assign_labels against the reference
# --------------------------------------------------------------------------------------------


def test_tiny_hand_computed() -> None:
    X = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    centers = np.array([[[0.0, 1.0], [10.0, 1.0]]])
    s = chunk_stats(X, centers)
    np.testing.assert_array_equal(s.sums, [[[0.0, 2.0], [20.0, 2.0]]])
    np.testing.assert_array_equal(s.counts, [[2.0, 2.0]])
    np.testing.assert_array_equal(s.loss, [4.0])
    np.testing.assert_array_equal(s.changed, [-1])  # no previous means given
    assert s.n_rows == 4
    assert s.sq_total == 0.0 + 4.0 + 100.0 + 104.0
    labels, dist = assign_labels(X, centers[0])
    assert labels.dtype == np.int32 and dist.dtype == np.float64
    np.testing.assert_array_equal(labels, [0, 0, 1, 1])
    np.testing.assert_array_equal(dist, [1.0, 1.0, 1.0, 1.0])


def test_tiny_hand_computed_weighted() -> None:
    X = np.array([[0.0], [2.0], [9.0], [13.0]])
    centers = np.array([[[1.0], [10.0]]])
    w = np.array([1.0, 3.0, 0.5, 0.0])
    s = chunk_stats(X, centers, weights=w)
    np.testing.assert_array_equal(s.sums, [[[6.0], [4.5]]])
    np.testing.assert_array_equal(s.counts, [[4.0, 0.5]])
    # 1*1 + 3*1 + 0.5*1 + 0*9
    np.testing.assert_array_equal(s.loss, [4.5])
    assert s.sq_total == 0.0 + 3 * 4.0 + 0.5 * 81.0


def test_ties_go_to_lowest_mean_index() -> None:
    X = np.array([[1.0], [3.0]])
    centers = np.array([[0.0], [2.0], [4.0]])
    labels, dist = assign_labels(X, centers)
    np.testing.assert_array_equal(labels, [0, 1])
    np.testing.assert_array_equal(dist, [1.0, 1.0])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_chunk_stats_matches_reference(dtype, weighted: bool) -> None:
    X, centers = _separated(n=1500, d=5, k=6, seed=3, dtype=dtype)
    _assert_no_near_ties(X, centers)
    w = np.random.default_rng(1).uniform(0.0, 3.0, size=len(X)) if weighted else None
    s = chunk_stats(X, centers[None], weights=w)
    ref = _ref_stats(X, centers, w)
    assert isinstance(s, ChunkStats)
    assert s.sums.shape == (1, 6, 5) and s.sums.dtype == np.float64
    assert s.counts.shape == (1, 6) and s.loss.shape == (1,)
    # sums and counts are accumulated from the same labels in float64: equal to rounding
    np.testing.assert_allclose(s.sums[0], ref["sums"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.counts[0], ref["counts"], rtol=1e-12)
    # the loss goes through ||x||^2 - 2 x.mu + ||mu||^2 with the product in X's dtype:
    # float32 products carry ~1e-7 relative error on the squared norms (~1e2 here)
    loss_rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(s.loss[0], ref["loss"], rtol=loss_rtol)
    np.testing.assert_allclose(s.sq_total, ref["sq_total"], rtol=1e-12)
    assert s.n_rows == len(X)
    labels, dist = assign_labels(X, centers)
    np.testing.assert_array_equal(labels, ref["labels"])
    np.testing.assert_allclose(
        dist, ref["dist"], rtol=loss_rtol, atol=1e-3 if dtype == np.float32 else 1e-9
    )


def test_weights_equal_repeated_rows() -> None:
    X, centers = _separated(n=300, d=3, k=4, seed=5, dtype=np.float64)
    reps = np.random.default_rng(2).integers(0, 4, size=len(X))
    a = chunk_stats(X, centers[None], weights=reps.astype(np.float64))
    b = chunk_stats(np.repeat(X, reps, axis=0), centers[None])
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    np.testing.assert_allclose(a.sq_total, b.sq_total, rtol=1e-12)


def test_precomputed_xsq_gives_the_same_result() -> None:
    X, centers = _separated(n=400, d=3, k=4, seed=6, dtype=np.float32)
    a = chunk_stats(X, centers[None])
    b = chunk_stats(X, centers[None], xsq=kernel.row_sq_norms(X))
    for name in ("sums", "counts", "loss"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert kernel.row_sq_norms(X).dtype == np.float64


@pytest.mark.parametrize("dtype", DTYPES)
def test_n_init_restarts_equal_separate_calls(dtype) -> None:
    X, base = _separated(n=900, d=4, k=5, seed=7, dtype=dtype)
    rng = np.random.default_rng(8)
    centers = np.stack(
        [base[rng.permutation(5)] + rng.normal(scale=0.2, size=base.shape) for _ in range(3)]
    )
    previous = centers + rng.normal(scale=0.5, size=centers.shape)
    for r in range(3):
        _assert_no_near_ties(X, centers[r])
    w = rng.uniform(0.5, 2.0, size=len(X))
    together = chunk_stats(X, centers, weights=w, previous=previous, offset=40, n_far=7)
    assert together.sums.shape == (3, 5, 4)
    for r in range(3):
        alone = chunk_stats(
            X, centers[r : r + 1], weights=w, previous=previous[r : r + 1], offset=40, n_far=7
        )
        # same labels, same accumulation order: sums and counts are bit-identical
        np.testing.assert_array_equal(together.sums[r], alone.sums[0])
        np.testing.assert_array_equal(together.counts[r], alone.counts[0])
        # float32 products may round differently for a wider matrix (see _assert_stats_equal)
        rtol = 1e-7 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(together.loss[r], alone.loss[0], rtol=rtol)
        assert together.changed[r] == alone.changed[0]
        np.testing.assert_array_equal(together.far_index[r], alone.far_index[0])
        np.testing.assert_array_equal(together.far_rows[r], alone.far_rows[0])
        np.testing.assert_allclose(together.far_dist[r], alone.far_dist[0], rtol=rtol)


# --------------------------------------------------------------------------------------------
# changed labels
# --------------------------------------------------------------------------------------------


def _brute_changed(X: np.ndarray, centers: np.ndarray, previous: np.ndarray) -> int:
    return int(
        np.count_nonzero(
            _ref_distances(X, centers).argmin(1) != _ref_distances(X, previous).argmin(1)
        )
    )


def _far_from_ties(X: np.ndarray, *means: np.ndarray) -> np.ndarray:
    """The rows not close to a tie under any of the sets of means, so float32 rounding cannot
    decide their labels."""
    keep = np.ones(len(X), dtype=bool)
    for C in means:
        ref = _ref_stats(X, C)
        keep &= ref["margin"] > 1e-3 * (1.0 + ref["dist"])
    return X[keep]


@pytest.mark.parametrize("dtype", DTYPES)
def test_changed_large_moves(dtype) -> None:
    rng = np.random.default_rng(11)
    X = blobs(n=3000, d=3, k=6, seed=11, spread=2.0).astype(dtype)
    centers = rng.uniform(-10, 10, size=(2, 6, 3))
    previous = rng.uniform(-10, 10, size=(2, 6, 3))
    X = _far_from_ties(X, *centers, *previous)
    s = chunk_stats(X, centers, previous=previous)
    expected = [_brute_changed(X, centers[r], previous[r]) for r in range(2)]
    assert min(expected) > 100  # the moves really are large
    np.testing.assert_array_equal(s.changed, expected)
    assert s.changed.dtype == np.int64


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("change", ["swap two rows", "copy a row"])
def test_changed_counts_rows_modified_in_place(dtype, change: str) -> None:
    """The labels of the last pass over an array are remembered to count changed labels; an
    array modified in place since is noticed (by its checksum) and counted from scratch."""
    rng = np.random.default_rng(12)
    X = blobs(n=2000, d=4, k=5, seed=12, spread=2.0).astype(dtype)
    previous = rng.uniform(-10, 10, size=(1, 5, 4))
    centers = rng.uniform(-10, 10, size=(1, 5, 4))
    X = np.ascontiguousarray(_far_from_ties(X, *centers, *previous))
    first = chunk_stats(X, previous)  # remembers X's labels under ``previous``
    before = _ref_distances(X, previous[0]).argmin(1)
    after = _ref_distances(X, centers[0]).argmin(1)
    # two rows whose label does not change, with different labels: moved, they change
    stay = np.flatnonzero(before == after)
    i = stay[0]
    j = stay[before[stay] != before[i]][0]
    if change == "swap two rows":
        X[[i, j]] = X[[j, i]]
    else:
        X[i] = X[j]
    s = chunk_stats(X, centers, previous=previous)
    expected = _brute_changed(X, centers[0], previous[0])
    # what the remembered labels would count had the change gone unnoticed
    assert np.count_nonzero(_ref_distances(X, centers[0]).argmin(1) != before) != expected
    assert s.changed[0] == expected
    assert first.changed[0] == -1


@pytest.mark.parametrize("dtype", DTYPES)
def test_changed_from_remembered_labels_pass_after_pass(dtype) -> None:
    """A fit's passes over one array: each pass counts against the labels the pass before
    remembered, overwriting them in place (no new labels array), also when the restarts come
    back reordered or fewer (their labels are then copied out)."""
    rng = np.random.default_rng(14)
    # 32 features: three restarts' labels (12 bytes a row) are worth remembering
    X = np.ascontiguousarray(blobs(n=3000, d=32, k=5, seed=14, spread=2.0).astype(dtype))
    means = [rng.uniform(-10, 10, size=(3, 5, 32)) for _ in range(4)]
    steps = [(means[0], means[1]), (means[1], means[2])]
    steps.append((means[2][[2, 0]], means[3][[2, 0]]))  # restart 1 finished, two swapped
    X = np.ascontiguousarray(_far_from_ties(X, *(m for ms in means for m in ms)))
    assert chunk_stats(X, means[0]).changed.tolist() == [-1, -1, -1]
    held = kernel._LABELS._entries[id(X)][3]
    for previous, centers in steps:
        s = chunk_stats(X, centers, previous=previous)
        expected = [_brute_changed(X, c, p) for c, p in zip(centers, previous, strict=True)]
        assert min(expected) > 100
        assert s.changed.tolist() == expected
        if len(centers) == len(held):
            assert kernel._LABELS._entries[id(X)][3] is held  # overwritten, not reallocated
    np.testing.assert_array_equal(
        kernel._LABELS._entries[id(X)][3], [_ref_distances(X, c).argmin(1) for c in steps[-1][1]]
    )


@pytest.mark.parametrize(
    ("dtype", "shift", "unit"),
    [(np.float64, 1e-7, 1e-8), (np.float32, 1e-2, 1e-3)],
)
def test_changed_tiny_moves(dtype, shift: float, unit: float) -> None:
    """Rows straddle the boundary x=1 between means at x=0 and x=2; the previous means sit
    ``shift`` to the right, so exactly the rows with 1 < x < 1 + shift change label."""
    rng = np.random.default_rng(12)
    offsets = unit * np.array(
        [-35, -7, -3, -1, 1, 2, 3, 5, 7, 9, 11, 13, 25, 150], dtype=np.float64
    )
    n_edge = 40
    t = rng.choice(offsets, size=n_edge)
    edge = np.column_stack([1.0 + t, rng.normal(size=n_edge), rng.normal(size=n_edge)])
    bulk = np.column_stack(
        [rng.choice([-0.5, 2.5], size=500) + 0.2 * rng.normal(size=500), rng.normal(size=(500, 2))]
    )
    far = np.array([[0.0, 40.0, 0.0], [30.0, 30.0, 30.0]])
    X = np.concatenate([bulk[:250], edge, bulk[250:]]).astype(dtype)
    centers = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], *far])[None]
    previous = centers.copy()
    previous[0, :2, 0] += shift
    expected = _brute_changed(X, centers[0], previous[0])
    x0 = X[:, 0].astype(np.float64)
    assert expected == np.count_nonzero((x0 > 1.0) & (x0 < 1.0 + shift)) > 0
    assert chunk_stats(X, centers, previous=previous).changed[0] == expected
    # moving back is symmetric
    assert chunk_stats(X, previous, previous=centers).changed[0] == expected


@pytest.mark.parametrize("dtype", DTYPES)
def test_changed_zero_for_identical_and_minute_moves(dtype) -> None:
    X, centers = _separated(n=800, d=4, k=5, seed=13, dtype=dtype)
    s = chunk_stats(X, centers[None], previous=centers[None])
    assert s.changed[0] == 0
    minute = centers + 1e-9 * np.random.default_rng(0).normal(size=centers.shape)
    assert chunk_stats(X, centers[None], previous=minute[None]).changed[0] == 0
    assert chunk_stats(X, centers[None]).changed[0] == -1


# --------------------------------------------------------------------------------------------
# farthest rows
# --------------------------------------------------------------------------------------------


def test_far_rows_are_the_top_rows_by_distance() -> None:
    X, centers = _separated(n=700, d=3, k=4, seed=14, dtype=np.float64)
    s = chunk_stats(X, centers[None], offset=1000, n_far=9)
    ref = _ref_stats(X, centers)
    order = np.argsort(-ref["dist"], kind="stable")[:9]
    assert s.far_index.shape == (1, 9) and s.far_rows.shape == (1, 9, 3)
    np.testing.assert_array_equal(s.far_index[0], order + 1000)
    np.testing.assert_array_equal(s.far_rows[0], X[order])
    np.testing.assert_allclose(s.far_dist[0], ref["dist"][order], rtol=1e-10)
    assert (np.diff(s.far_dist[0]) <= 0).all()


def test_far_rows_skip_zero_weight_rows() -> None:
    X = np.array([[0.0], [100.0], [1.0], [50.0], [2.0]])
    w = np.array([1.0, 0.0, 1.0, 1.0, 1.0])
    s = chunk_stats(X, np.zeros((1, 1, 1)), weights=w, offset=10, n_far=2)
    np.testing.assert_array_equal(s.far_index, [[13, 14]])
    np.testing.assert_array_equal(s.far_dist, [[2500.0, 4.0]])


def test_far_rows_ties_by_lowest_index_when_all_tied() -> None:
    # every row at squared distance 1; a complete tie is ordered by global index
    X = np.array([[1.0], [-1.0], [1.0], [-1.0], [1.0]])
    s = chunk_stats(X, np.zeros((1, 1, 1)), offset=20, n_far=5)
    np.testing.assert_array_equal(s.far_index, [[20, 21, 22, 23, 24]])


def test_far_rows_ties_at_cutoff_broken_by_lowest_index() -> None:
    X = np.ones((50, 1))
    X[-3:] = 2.0  # three rows at distance 4, then 47 rows tied at distance 1
    s = chunk_stats(X, np.zeros((1, 1, 1)), offset=100, n_far=5)
    np.testing.assert_array_equal(s.far_index, [[147, 148, 149, 100, 101]])


@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("m", [1, 7, 64])
def test_far_rows_found_in_the_pass_match_a_full_sort(ties: bool, m: int, weighted: bool) -> None:
    """The pass's heaps give the farthest rows when they are unique; with ties at the cut-off
    (integer rows: likely) the partition takes over. Either way: the first m rows of positive weight
    by distance, then index, over several tiles and two restarts. Without weights, a tile none of
    whose rows gets into a full heap is passed over whole, so the farthest rows also come late
    (the last tile) and in the middle of a tile."""
    rng = np.random.default_rng(m)
    n = 5000
    X = rng.integers(-3, 4, size=(n, 2)).astype(np.float64) if ties else rng.normal(size=(n, 2))
    X[[2500, 4990]] *= 10  # far from every mean, late in the chunk
    # weighted, a third of the rows weigh nothing
    w = rng.integers(0, 3, size=n).astype(np.float64) if weighted else np.ones(n)
    centers = rng.normal(size=(2, 3, 2))
    s = chunk_stats(X, centers, weights=w if weighted else None, offset=7, n_far=m)
    for r in range(2):
        dist = _ref_distances(X, centers[r]).min(axis=1)
        rows = np.flatnonzero(w > 0)
        expected = rows[np.lexsort((rows, -np.round(dist[rows], 9)))][:m]
        np.testing.assert_array_equal(s.far_index[r], expected + 7)
        np.testing.assert_array_equal(s.far_rows[r], X[expected])
    if not ties:  # the heaps' rows were taken, not the partition's
        labels = np.empty((2, n), np.int32)
        d1 = np.empty((2, n))
        *_, (unique, _) = kernel._pass(X, centers, None, w if weighted else None, labels, d1,
                                       checksum=False, n_far=m)  # fmt: skip
        assert unique.all()


def test_far_rows_fewer_rows_than_requested() -> None:
    X = np.array([[3.0], [1.0]])
    s = chunk_stats(X, np.zeros((1, 1, 1)), offset=5, n_far=4)
    np.testing.assert_array_equal(s.far_index, [[5, 6]])
    np.testing.assert_array_equal(s.far_dist, [[9.0, 1.0]])
    empty = chunk_stats(X, np.zeros((1, 1, 1)))
    assert empty.far_index.shape == (1, 0) and empty.far_rows.shape == (1, 0, 1)


# --------------------------------------------------------------------------------------------
# combine_stats
# --------------------------------------------------------------------------------------------


def _split_stats(X, centers, cuts, **kw) -> list[ChunkStats]:
    w = kw.pop("weights", None)
    bounds = [0, *cuts, len(X)]
    return [
        chunk_stats(X[lo:hi], centers, offset=lo, weights=None if w is None else w[lo:hi], **kw)
        for lo, hi in itertools.pairwise(bounds)
    ]


def _assert_stats_equal(a: ChunkStats, b: ChunkStats, dist_rtol: float = 1e-12) -> None:
    """Equal up to float64 summation order. ``dist_rtol`` bounds the difference in the squared
    distances themselves (the loss and far_dist): with float32 rows the products x.mu come from
    a float32 BLAS call whose rounding depends on the shape of the block it is given, so the
    same row's distance may differ in the last float32 bits between two chunkings (~1e-9 of
    the loss here, against a float32 accuracy of ~1e-7 anyway)."""
    np.testing.assert_allclose(a.sums, b.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.counts, b.counts, rtol=1e-12)
    np.testing.assert_allclose(a.loss, b.loss, rtol=dist_rtol)
    np.testing.assert_array_equal(a.changed, b.changed)
    np.testing.assert_array_equal(a.far_index, b.far_index)
    np.testing.assert_array_equal(a.far_rows, b.far_rows)
    np.testing.assert_allclose(a.far_dist, b.far_dist, rtol=dist_rtol)
    assert a.n_rows == b.n_rows
    np.testing.assert_allclose(a.sq_total, b.sq_total, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cuts", [[1], [333], [7, 8, 500, 999], [100, 200, 300, 400, 500, 600]])
def test_combine_of_split_chunks_equals_whole(dtype, cuts) -> None:
    X, centers = _separated(n=1000, d=4, k=5, seed=15, dtype=dtype)
    rng = np.random.default_rng(16)
    stacked = np.stack([centers, centers + rng.normal(scale=0.3, size=centers.shape)])
    previous = stacked + rng.normal(scale=1.0, size=stacked.shape)
    w = rng.uniform(0.0, 2.0, size=len(X))
    kw = {"previous": previous, "n_far": 6, "weights": w}
    whole = chunk_stats(X, stacked, **kw)
    parts = _split_stats(X, stacked, cuts, **dict(kw))
    rtol = 1e-7 if dtype == np.float32 else 1e-12
    _assert_stats_equal(reduce(combine_stats, parts), whole, rtol)
    # a different grouping of the same parts: (p0 + (p1 + (p2 ...)))
    _assert_stats_equal(reduce(lambda acc, p: combine_stats(p, acc), parts[::-1]), whole, rtol)


def test_farthest_rows_chosen_at_once_equal_those_chosen_pair_by_pair() -> None:
    # what the client does with held chunks' statistics: the sums in the tree's order, the
    # farthest rows from all chunks at once; rows repeated across chunks tie on distance
    X, centers = _separated(n=300, d=3, k=4, seed=18, dtype=np.float64)
    X = np.concatenate([X, X[:40], X[:40]])
    parts = _split_stats(X, centers[None], [50, 51, 170, 300, 320], n_far=9)
    pairwise = reduce(combine_stats, parts)
    at_once = with_farthest(reduce(add_stats, parts), parts)
    for name in ("sums", "counts", "loss", "changed", "far_dist", "far_rows", "far_index"):
        np.testing.assert_array_equal(getattr(at_once, name), getattr(pairwise, name))
    assert (at_once.n_rows, at_once.sq_total) == (pairwise.n_rows, pairwise.sq_total)
    assert len(set(at_once.far_dist[0])) < 9  # ties were there to break


def test_combine_keeps_unknown_changed() -> None:
    X, centers = _separated(n=200, d=2, k=3, seed=17, dtype=np.float64)
    known = chunk_stats(X[:100], centers[None], previous=centers[None])
    unknown = chunk_stats(X[100:], centers[None])
    assert combine_stats(known, unknown).changed[0] == -1
    assert combine_stats(unknown, known).changed[0] == -1
    assert combine_stats(known, known).changed[0] == 0


# --------------------------------------------------------------------------------------------
# block boundaries
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 100, 255, 256, 257, 1000, 1024])
def test_small_blocks_match_reference(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(kernel, "_BLOCK_BYTES", 1)  # the minimum block: 256 rows
    # and, where the kernel works in smaller tiles inside a block, the smallest tiles
    monkeypatch.setattr(kernel, "_TILE_BYTES", 1, raising=False)
    assert kernel.block_rows_for(3, 2, 8) == 256
    X, centers = _separated(n=max(n, 3), d=2, k=3, seed=18, dtype=np.float64)
    X = X[:n]
    w = np.linspace(0.5, 1.5, n)
    s = chunk_stats(X, centers[None], weights=w, previous=centers[None] + 0.05, n_far=4)
    ref = _ref_stats(X, centers, w)
    np.testing.assert_allclose(s.sums[0], ref["sums"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.counts[0], ref["counts"], rtol=1e-12)
    np.testing.assert_allclose(s.loss[0], ref["loss"], rtol=1e-10)
    assert s.changed[0] == _brute_changed(X, centers, centers + 0.05)
    assert s.far_index.shape == (1, min(4, n))
    np.testing.assert_array_equal(
        s.far_index[0], np.argsort(-ref["dist"], kind="stable")[: min(4, n)]
    )
    labels, _ = assign_labels(X, centers)
    np.testing.assert_array_equal(labels, ref["labels"])
    monkeypatch.undo()
    # the same numbers with one block for everything: same labels, same accumulation order
    big = chunk_stats(X, centers[None], weights=w, previous=centers[None] + 0.05, n_far=4)
    np.testing.assert_array_equal(s.sums, big.sums)
    np.testing.assert_array_equal(s.counts, big.counts)
    np.testing.assert_allclose(s.loss, big.loss, rtol=1e-13)


def test_default_block_boundary() -> None:
    step = kernel.block_rows_for(3, 2, 4)
    assert step == 16384  # large distance blocks are clipped to the maximum
    n = step + 37
    X, centers = _separated(n=n, d=2, k=3, seed=19, dtype=np.float32)
    s = chunk_stats(X, centers[None])
    ref = _ref_stats(X, centers)
    np.testing.assert_allclose(s.sums[0], ref["sums"], rtol=1e-12)
    np.testing.assert_array_equal(s.counts[0], ref["counts"])
    labels, _ = assign_labels(X, centers)
    np.testing.assert_array_equal(labels, ref["labels"])
    # both sides of the block boundary at row ``step``
    whole = chunk_stats(X, centers[None], n_far=5)
    parts = _split_stats(X, centers[None], [step], n_far=5)
    _assert_stats_equal(reduce(combine_stats, parts), whole, dist_rtol=1e-7)


def test_block_rows_for_bounds() -> None:
    assert kernel.block_rows_for(10**6, 10, 8) == 256
    assert kernel.block_rows_for(1, 1, 4) == 16384
    rows = kernel.block_rows_for(64, 64, 8)
    assert rows * 8 * 128 <= kernel._BLOCK_BYTES < (rows + 1) * 8 * 128


def test_single_row_and_single_mean() -> None:
    X = np.array([[3.0, 4.0]], dtype=np.float32)
    s = chunk_stats(X, np.zeros((2, 1, 2)), previous=np.ones((2, 1, 2)), offset=7, n_far=3)
    np.testing.assert_array_equal(s.sums, [[[3.0, 4.0]], [[3.0, 4.0]]])
    np.testing.assert_array_equal(s.counts, [[1.0], [1.0]])
    np.testing.assert_array_equal(s.loss, [25.0, 25.0])
    np.testing.assert_array_equal(s.changed, [0, 0])
    np.testing.assert_array_equal(s.far_index, [[7], [7]])
    np.testing.assert_array_equal(s.far_dist, [[25.0], [25.0]])


def test_empty_chunk() -> None:
    centers = np.ones((2, 3, 2))
    empty = chunk_stats(np.zeros((0, 2)), centers, previous=centers + 1, offset=5, n_far=3)
    assert empty.n_rows == 0 and empty.sq_total == 0.0
    np.testing.assert_array_equal(empty.counts, np.zeros((2, 3)))
    np.testing.assert_array_equal(empty.changed, [0, 0])
    assert empty.far_index.shape == (2, 0)
    one = chunk_stats(np.array([[1.0, 2.0]]), centers, previous=centers + 1, offset=5, n_far=3)
    for combined in (combine_stats(empty, one), combine_stats(one, empty)):
        _assert_stats_equal(combined, one)


def test_vector_types_unpickle_by_name() -> None:
    # numba's on-disk cache pickles compiled signatures and unpickles an index before it
    # checks the index is current: a type renamed or removed by a later version must not
    # make the stale index fail to load
    for t in (kernel._f32x16, kernel._f64x8, kernel._i32x16):
        assert pickle.loads(pickle.dumps(t)) is t
    gone = kernel._Vec("kmeans_gd.gone", 4, ir.IntType(8))
    assert pickle.loads(pickle.dumps(gone)) == "kmeans_gd.gone"


# --------------------------------------------------------------------------------------------
# Both block shapes of the float32 pass, whichever this CPU compiles into it
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 6, 7, 8, 9, 13, 17, 64])
@pytest.mark.parametrize("want_second", [False, True])
def test_both_block_shapes_agree_bit_for_bit(k: int, want_second: bool) -> None:
    # 32 rows x 8 means (AVX-512) and 16 rows x 6 means (AVX2) must give the same values and
    # labels, so that a fit's result never depends on the CPUs its workers run on
    d, b = 13, 96 - 5  # a ragged tile: the SIMD paths read it zero-padded to 96 columns
    rng = np.random.default_rng(k)
    X = rng.normal(size=(b, d)).astype(np.float32)
    X[7] = X[3]  # a repeated row: the same label and values
    C = rng.normal(size=(k, d))
    if k > 2:
        C[2] = C[1]  # an exact tie between means: the lower label wins
    S2 = np.ascontiguousarray(C.astype(np.float32) * np.float32(-2))
    cn = kernel.row_sq_norms(C.astype(np.float32))
    XT = np.zeros((d, 96), dtype=np.float32)
    XT[:, :b] = X.T
    results = []
    for tile_nearest in (kernel._tile_nearest32, kernel._tile_nearest16):
        best, second = np.full(96, np.nan), np.full(96, np.nan)
        arg = np.full(96, -1, dtype=np.int32)
        tile_nearest(XT, b, S2, cn, 0, k, best, second, arg, want_second, X, 0, 0)
        results.append((best[:b], second[:b], arg[:b]))
    (best, second, arg), (best16, second16, arg16) = results
    np.testing.assert_array_equal(arg16, arg)
    np.testing.assert_array_equal(best16, best)
    D = _ref_distances(X, C)
    xsq = (X.astype(np.float64) ** 2).sum(axis=1)
    np.testing.assert_array_equal(arg, D.argmin(axis=1))
    np.testing.assert_allclose(xsq + best, D.min(axis=1), rtol=1e-5, atol=1e-4)
    if want_second:
        np.testing.assert_array_equal(second16, second)
        expected = np.sort(D, axis=1)[:, 1] if k > 1 else np.full(b, np.inf)
        np.testing.assert_allclose(xsq + second, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("wide", [True, False])
def test_both_transpositions(monkeypatch: pytest.MonkeyPatch, wide: bool) -> None:
    # the 16 x 16 blocks are transposed by 16-lane shuffles with AVX-512 and by four 8 x 8
    # blocks without: compile each here, whichever this CPU uses, and check it is the one asked
    monkeypatch.setattr(kernel, "_WIDE_REGISTERS", wide)

    @numba.njit
    def transpose(src, dst):  # type: ignore[no-untyped-def]
        kernel._transpose16(src, 3, 16, dst, 32)

    src = np.arange(40 * 37, dtype=np.float32).reshape(40, 37)
    dst = np.full((37, 50), -1.0, dtype=np.float32)
    transpose(src, dst)
    expected = np.full((37, 50), -1.0, dtype=np.float32)
    expected[16:32, 32:48] = src[3:19, 16:32].T
    np.testing.assert_array_equal(dst, expected)
    ir_text = next(iter(transpose.inspect_llvm().values()))
    lanes, other = (16, 8) if wide else (8, 16)
    assert f"shufflevector <{lanes} x float>" in ir_text
    assert f"shufflevector <{other} x float>" not in ir_text


@pytest.mark.parametrize("d, m", [(1, 1), (3, 5), (16, 16), (32, 65536 + 7), (37, 53)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_columns_to_rows(d: int, m: int, dtype) -> None:
    rng = np.random.default_rng(d * m)
    buffer = rng.standard_normal((d, m + 9)).astype(dtype)
    cols = buffer[:, :m]  # a view with rows of stride m + 9, as the Parquet reader passes
    out = np.full((m + 2, d), np.nan, dtype=dtype)
    kernel.columns_to_rows(cols, out[1 : m + 1])
    np.testing.assert_array_equal(out[1 : m + 1], cols.T)
    assert np.isnan(out[0]).all() and np.isnan(out[-1]).all()  # nothing written outside


@pytest.mark.parametrize("d, m", [(1, 1), (17, 300), (32, 65536 + 7), (37, 53)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_columns_to_rows_from_separate_columns(d: int, m: int, dtype) -> None:
    """Columns in buffers of their own, as Arrow gives them, and the rows they fill."""
    rng = np.random.default_rng(d + m)
    columns = [rng.standard_normal(m + j % 3)[: m].astype(dtype) for j in range(d)]
    out = np.empty((m, d), dtype=dtype)
    assert kernel.columns_to_rows(columns, out, check_finite=True) is None
    np.testing.assert_array_equal(out, np.column_stack(columns))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("row", "column"), [(0, 0), (300, 18), (260, 33), (517, 36)])
def test_columns_to_rows_names_the_first_non_finite_column(dtype, bad, row, column) -> None:
    # rows 512.. and columns 32.. are outside the whole 16 x 16 blocks
    columns = [np.ones(520, dtype=dtype) for _ in range(37)]
    columns[column][row] = bad
    columns[-1][-1] = bad  # a later column too: the first one is named
    out = np.empty((520, 37), dtype=dtype)
    assert kernel.columns_to_rows(columns, out, check_finite=True) == column
    assert kernel.columns_to_rows(columns, out) is None  # not asked to check


def test_columns_to_rows_converts_other_types() -> None:
    columns = [np.arange(5, dtype=np.float64), np.arange(5, dtype=np.int64)]
    out = np.empty((5, 2), dtype=np.float32)
    assert kernel.columns_to_rows(columns, out, check_finite=True) is None
    np.testing.assert_array_equal(out, np.column_stack([np.arange(5)] * 2))
    columns[0][2] = np.inf
    assert kernel.columns_to_rows(columns, out, check_finite=True) == 0


@pytest.mark.parametrize("d, m", [(3, 5), (32, 4096 + 7), (37, 53)])
def test_columns_to_rows_less_an_origin(d: int, m: int) -> None:
    """Each difference rounded once: exact from float32 columns near a float32 origin (the
    SIMD path), from float64 columns computed in float64; an origin that is not a float32
    value takes NumPy's path, rounded once too."""
    rng = np.random.default_rng(d)
    near = rng.uniform(-1e6, 1e6, d).astype(np.float32).astype(np.float64)
    columns = [(near[j] + rng.normal(0, 50, m)).astype(np.float32) for j in range(d)]
    out = np.empty((m, d), dtype=np.float32)
    assert kernel.columns_to_rows(columns, out, check_finite=True, origin=near) is None
    exact = np.column_stack(columns).astype(np.float64) - near
    np.testing.assert_array_equal(out, exact.astype(np.float32))
    np.testing.assert_array_equal(out.astype(np.float64), exact)  # no rounding at all
    wide = [c.astype(np.float64) + 0.001 for c in columns]
    kernel.columns_to_rows(wide, out, origin=near + 0.1)
    np.testing.assert_array_equal(out, (np.column_stack(wide) - (near + 0.1)).astype(np.float32))
    columns[d - 1][m // 2] = np.nan
    assert kernel.columns_to_rows(columns, out, check_finite=True, origin=near) == d - 1
    with pytest.raises(ValueError, match=rf"origin has shape \(2,\); expected \({d},\)\."):
        kernel.columns_to_rows(columns, out, origin=np.zeros(2))


def test_columns_to_rows_refuses_other_shapes() -> None:
    with pytest.raises(ValueError, match=r"out has shape \(4, 3\); expected \(5, 3\)\."):
        kernel.columns_to_rows(np.zeros((3, 5), np.float32), np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match=r"columns should be 1-D arrays of one length"):
        kernel.columns_to_rows([np.zeros(3), np.zeros(4)], np.zeros((3, 2)))


# --------------------------------------------------------------------------------------------
# ColumnChunk: a chunk's columns, row group by row group, read in place by the pass
# --------------------------------------------------------------------------------------------


def _groups_of(X: np.ndarray, cuts: list[int]) -> list[list[np.ndarray]]:
    """X's columns cut into row groups at ``cuts``, each column a separate array."""
    bounds = [0, *cuts, len(X)]
    return [[np.array(X[lo:hi, j]) for j in range(X.shape[1])] for lo, hi in itertools.pairwise(bounds)]


_STATS_FIELDS = ("sums", "counts", "loss", "changed", "far_dist", "far_rows", "far_index",
                 "n_rows", "sq_total")  # fmt: skip


@pytest.mark.parametrize(
    ("n", "d", "k", "cuts"),
    [
        (1000, 32, 64, [224, 448, 449, 800]),  # tiles cut short by each row group
        (700, 17, 5, [0, 0, 350]),  # empty row groups; d not a multiple of 16
        (65536 + 77, 32, 8, [65536]),
        (3, 3, 1, []),
        (500, 37, 13, [1, 2, 3, 499]),
    ],
)
@pytest.mark.parametrize("weighted", [False, True])
def test_a_column_chunk_gives_what_its_rows_give_bit_for_bit(n, d, k, cuts, weighted) -> None:
    """Every statistic equal to the pass over the same rows as a matrix (sums, counts, loss,
    changed labels and the farthest rows, with two restarts, weights and previous means), and
    so are the labels and distances; the sums and counts also match the NumPy reference."""
    rng = np.random.default_rng(n + d)
    X = rng.normal(size=(n, d)).astype(np.float32)
    X[1::7] = X[::7][: len(X[1::7])]  # tied rows
    centers = rng.normal(size=(2, k, d))
    previous = centers + rng.normal(scale=0.05, size=centers.shape)
    w = rng.uniform(0, 2, n) * (rng.random(n) > 0.1) if weighted else None
    columns = kernel.ColumnChunk(_groups_of(X, cuts))
    assert columns.shape == (n, d) and columns.dtype == np.float32
    for prev in (None, previous):
        want = chunk_stats(X, centers, weights=w, previous=prev, offset=9, n_far=6, remember=False)
        got = chunk_stats(columns, centers, weights=w, previous=prev, offset=9, n_far=6,
                          remember=False)  # fmt: skip
        for name in _STATS_FIELDS:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for got_part, want_part in zip(assign_labels(columns, centers[1]), assign_labels(X, centers[1]),
                                   strict=True):  # fmt: skip
        np.testing.assert_array_equal(got_part, want_part)
    ref = _ref_stats(X, centers[0], w)
    got = chunk_stats(columns, centers[:1], weights=w, remember=False)
    np.testing.assert_allclose(got.sums[0], ref["sums"], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got.counts[0], ref["counts"])


def test_a_column_chunk_less_its_origin() -> None:
    """Read as ``x - origin``, each difference exact (values near the float32 origin)."""
    rng = np.random.default_rng(3)
    origin = rng.uniform(-1e5, 1e5, 32).astype(np.float32).astype(np.float64)
    X = (origin + rng.normal(0, 20, (900, 32))).astype(np.float32)
    shifted = (X.astype(np.float64) - origin).astype(np.float32)
    assert np.array_equal(shifted.astype(np.float64), X.astype(np.float64) - origin)
    columns = kernel.ColumnChunk(_groups_of(X, [300, 600]), origin)
    centers = rng.normal(0, 20, (1, 9, 32))
    want = chunk_stats(shifted, centers, n_far=4, remember=False)
    got = chunk_stats(columns, centers, n_far=4, remember=False)
    for name in _STATS_FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    np.testing.assert_array_equal(columns[np.array([899, 0, 450])], shifted[[899, 0, 450]])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    ("cells", "named"),
    [
        ([(0, 0)], 0),
        ([(301, 18), (301, 25), (700, 1)], 18),  # later columns, a later row group
        ([(301, 18), (450, 2)], 2),  # a later row of the same row group, a lower column
        ([(899, 31)], 31),
    ],
)
def test_a_column_chunk_names_the_first_non_finite_column(bad, cells, named) -> None:
    """The first column, in order, holding NaN or an infinity in the row group of the first
    row that does: the column reading row group by row group into rows names."""
    X = np.random.default_rng(0).normal(size=(900, 32)).astype(np.float32)
    for row, column in cells:
        X[row, column] = bad
    groups = _groups_of(X, [300, 600])
    with pytest.raises(kernel.NonFiniteError, match=rf"column {named} holds NaN or an infinity"):
        chunk_stats(kernel.ColumnChunk(groups), np.zeros((1, 3, 32)), remember=False)
    out = np.empty((300, 32), np.float32)
    first = next(g for g in groups if kernel.columns_to_rows(g, out, check_finite=True) is not None)
    assert kernel.columns_to_rows(first, out, check_finite=True) == named


def test_a_float32_value_far_out_overflows_less_its_origin() -> None:
    X = np.array([[3e38], [-3e38]], dtype=np.float32)
    columns = kernel.ColumnChunk(_groups_of(X, []), np.array([-3e38], np.float32).astype(np.float64))
    with pytest.raises(kernel.NonFiniteError, match="column 0"):
        chunk_stats(columns, np.zeros((1, 1, 1)), remember=False)


@pytest.mark.parametrize(
    ("groups", "origin", "message"),
    [
        ([[np.zeros(3, np.float32), np.zeros(4, np.float32)]], None, "of one length"),
        ([[np.zeros(3, np.float32)], [np.zeros(3, np.float32)] * 2], None, "same number"),
        ([[np.zeros(3, np.float64)]], None, "float32 arrays"),
        ([[np.zeros(6, np.float32)[::2]]], None, "contiguous"),
        ([[np.zeros(3, np.float32)]], np.array([0.1]), r"origin should be 1 float32 values"),
        ([[np.zeros(3, np.float32)]], np.zeros(2), r"origin should be 1 float32 values"),
    ],
)
def test_a_column_chunk_refuses(groups, origin, message) -> None:
    with pytest.raises(ValueError, match=message):
        kernel.ColumnChunk(groups, origin)


def test_a_column_chunk_is_read_once() -> None:
    columns = kernel.ColumnChunk(_groups_of(np.zeros((5, 2), np.float32), []))
    centers = np.zeros((1, 1, 2))
    for kwargs in ({}, {"remember": False, "xsq": np.zeros(5)}):
        with pytest.raises(ValueError, match="a ColumnChunk is read for one pass"):
            chunk_stats(columns, centers, **kwargs)


def test_thread_buffer_is_reused_per_thread_and_purpose() -> None:
    import threading

    a = kernel.thread_buffer("test-a", (100, 4), np.float32)
    assert a.shape == (100, 4) and a.dtype == np.float32 and a.flags.c_contiguous
    a[:] = 1.0
    smaller = kernel.thread_buffer("test-a", (10, 3), np.float64)  # the same memory, retyped
    assert np.shares_memory(a, smaller) and smaller.shape == (10, 3)
    assert not np.shares_memory(a, kernel.thread_buffer("test-b", (100, 4), np.float32))
    larger = kernel.thread_buffer("test-a", (1000, 4), np.float32)  # outgrows it: a new one
    assert not np.shares_memory(a, larger)
    assert np.shares_memory(larger, kernel.thread_buffer("test-a", (1000, 4), np.float32))
    other: list[np.ndarray] = []
    thread = threading.Thread(
        target=lambda: other.append(kernel.thread_buffer("test-a", (1000, 4), np.float32))
    )
    thread.start()
    thread.join()
    assert not np.shares_memory(larger, other[0])
    kernel.release_thread_buffers()  # the next ask makes a new one
    assert not np.shares_memory(larger, kernel.thread_buffer("test-a", (1000, 4), np.float32))

    # released from another thread: a live thread gets a new buffer after it
    asked, released, same = threading.Event(), threading.Event(), []

    def hold() -> None:
        first = kernel.thread_buffer("test-c", (64,), np.float64)
        asked.set()
        released.wait()
        same.append(np.shares_memory(first, kernel.thread_buffer("test-c", (64,), np.float64)))

    thread = threading.Thread(target=hold)
    thread.start()
    asked.wait()
    kernel.release_thread_buffers()
    released.set()
    thread.join()
    assert same == [False]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_streamed_passes_in_a_row_do_not_mix(dtype) -> None:
    # passes over arrays read for one pass only reuse the thread's buffers (distances,
    # labels): each result equals that of a pass in a fresh thread
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(5)
    chunks = [blobs(n, 6, 4, seed=s).astype(dtype) for n, s in ((900, 1), (700, 2), (900, 3))]
    centers = rng.standard_normal((2, 5, 6))
    streamed = [chunk_stats(X, centers, n_far=7, remember=False) for X in chunks]
    for X, got in zip(chunks, streamed, strict=True):
        with ThreadPoolExecutor(1) as pool:  # a new thread
            fresh = pool.submit(chunk_stats, X, centers, n_far=7, remember=False).result()
        for name in ("sums", "counts", "loss", "far_dist", "far_rows", "far_index"):
            np.testing.assert_array_equal(getattr(got, name), getattr(fresh, name), err_msg=name)
