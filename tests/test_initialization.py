"""Tests for k-means|| (pipeline.initialization.kmeans_parallel) and its helpers."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs

from pipeline import optimizer
from pipeline.fit import FitState, fit_means
from pipeline.initialization import (
    STATE_DTYPE,
    kmeans_parallel,
    uniform_hash,
    weighted_lloyd,
)
from pipeline.passes import DaskData, data_from_array


@pytest.fixture(autouse=True)
def _local_scheduler(request: pytest.FixtureRequest) -> Iterator[None]:
    """Threads, unless the test asks for the session's distributed client (which, once
    started, would otherwise become every later test's scheduler)."""
    if "dask_client" in request.fixturenames:
        yield
    else:
        with dask.config.set(scheduler="threads"):
            yield


def _true_centers(k: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-10, 10, size=(k, d))  # as conftest.blobs draws


def _data(X: np.ndarray, chunks: int, w: np.ndarray | None = None) -> DaskData:
    Xd = da.from_array(X, chunks=(chunks, -1))
    wd = None if w is None else da.from_array(w, chunks=(chunks,))
    return DaskData(X=Xd, weights=wd)


class _ReadCounter:
    """Counts how often each chunk of an array is materialised (a read of that chunk)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads = 0

    def wrap(self, array: da.Array) -> da.Array:
        def count(block: np.ndarray) -> np.ndarray:
            with self.lock:
                self.reads += 1
            return block

        meta = np.empty((0,) * array.ndim, dtype=array.dtype)  # no call to infer the meta
        return array.map_blocks(count, dtype=array.dtype, meta=meta)


def test_uniform_hash_is_a_function_of_seed_stream_and_row() -> None:
    rows = np.arange(100_000, dtype=np.int64)
    u = uniform_hash(7, 3, rows)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005
    # any slice of rows gets the same numbers as the whole, whatever the order asked
    np.testing.assert_array_equal(uniform_hash(7, 3, rows[5000:5097]), u[5000:5097])
    np.testing.assert_array_equal(uniform_hash(7, 3, rows[::-1]), u[::-1])
    assert not np.array_equal(uniform_hash(8, 3, rows), u)
    assert not np.array_equal(uniform_hash(7, 4, rows), u)
    # independent-looking streams: no correlation between neighbouring seeds or rounds
    assert abs(np.corrcoef(u, uniform_hash(7, 4, rows))[0, 1]) < 0.02


def test_finds_one_centre_per_well_separated_blob() -> None:
    k, d = 6, 4
    for seed in range(3):
        X = blobs(n=6000, d=d, k=k, seed=seed, spread=0.5)
        centers = kmeans_parallel(_data(X, 500), k, seed=seed, n_init=2)
        assert centers.shape == (2, k, d)
        truth = _true_centers(k, d, seed)
        for found in centers:
            dist = np.sqrt(((found[:, None, :] - truth[None]) ** 2).sum(-1))
            nearest = dist.argmin(axis=1)
            assert sorted(nearest.tolist()) == list(range(k))  # one centre per blob
            assert dist.min(axis=1).max() < 0.75  # rows lie ~1 from their blob centre


@pytest.mark.parametrize("weighted", [False, True])
def test_candidates_do_not_depend_on_chunking(weighted: bool) -> None:
    X = blobs(n=5000, d=3, k=7, seed=4, spread=1.0)
    w = np.random.default_rng(1).uniform(0, 3, size=len(X)) if weighted else None
    results = []
    for chunks in (97, 1000, 5000):
        centers, info = kmeans_parallel(_data(X, chunks, w), 7, seed=11, n_init=3,
                                        return_info=True)  # fmt: skip
        results.append((centers, info))
    ref_centers, ref = results[0]
    assert ref.n_candidates > 7
    for centers, info in results[1:]:
        np.testing.assert_array_equal(info.candidate_index, ref.candidate_index)
        np.testing.assert_array_equal(info.candidates, ref.candidates)
        if weighted:
            # sums of fractional weights round differently in another order: the last bits
            np.testing.assert_allclose(info.candidate_weights, ref.candidate_weights, rtol=1e-12)
            np.testing.assert_allclose(centers, ref_centers, rtol=1e-12, atol=1e-12)
        else:
            np.testing.assert_array_equal(info.candidate_weights, ref.candidate_weights)
            np.testing.assert_array_equal(centers, ref_centers)
    # and the seed matters
    _, other = kmeans_parallel(_data(X, 1000, w), 7, seed=12, return_info=True)
    assert not np.array_equal(other.candidate_index, ref.candidate_index)


def test_same_result_on_a_distributed_cluster(dask_client) -> None:
    X = blobs(n=4000, d=3, k=5, seed=2, spread=0.7)
    w = np.random.default_rng(3).uniform(0.5, 2, size=len(X))
    data = data_from_array(X, w)
    data = DaskData(X=data.X.rechunk((500, -1)), weights=data.weights.rechunk(500))
    on_cluster, info = kmeans_parallel(data.persist(), 5, seed=5, return_info=True)
    with dask.config.set(scheduler="sync"):
        local, local_info = kmeans_parallel(_data(X, 1333, w), 5, seed=5, return_info=True)
    np.testing.assert_array_equal(info.candidate_index, local_info.candidate_index)
    np.testing.assert_allclose(on_cluster, local, rtol=1e-12, atol=1e-12)


def test_rows_of_weight_zero_are_never_chosen() -> None:
    rng = np.random.default_rng(0)
    near = blobs(n=3000, d=2, k=4, seed=1, spread=0.5)
    far = 1000.0 + rng.normal(size=(60, 2))
    X = np.concatenate([near, far])
    far_rows = np.arange(len(near), len(X))
    w = np.ones(len(X))
    # control: with weight 1 the far rows dominate phi and are always sampled
    _, info = kmeans_parallel(_data(X, 400, w), 4, seed=0, return_info=True)
    assert np.isin(info.candidate_index, far_rows).any()
    w[far_rows] = 0.0
    for seed in range(10):
        centers, info = kmeans_parallel(_data(X, 400, w), 4, seed=seed, return_info=True)
        assert not np.isin(info.candidate_index, far_rows).any()
        assert np.abs(centers).max() < 50
    # the first centre too: only 5 rows have positive weight
    w = np.zeros(len(X))
    allowed = np.array([3, 700, 1500, 2222, 3010])
    w[allowed] = 1.0
    firsts = set()
    for seed in range(20):
        _, info = kmeans_parallel(_data(X, 400, w), 2, seed=seed, return_info=True)
        assert np.isin(info.candidate_index, allowed).all()
        firsts.add(int(info.candidate_index[0]))
    assert len(firsts) >= 3  # the first centre is random among them, not always the same


def test_every_weight_zero_is_an_error() -> None:
    X = blobs(n=100, d=2, k=2, seed=0)
    with pytest.raises(ValueError, match="weight 0"):
        kmeans_parallel(_data(X, 30, np.zeros(100)), 2, seed=0)


@pytest.mark.parametrize(("rounds", "weighted"), [(1, False), (3, False), (5, True)])
def test_passes_over_the_data_are_rounds_plus_one(rounds: int, weighted: bool) -> None:
    X = blobs(n=3000, d=3, k=5, seed=0)
    n_chunks = 12
    x_reads, w_reads = _ReadCounter(), _ReadCounter()
    Xd = x_reads.wrap(da.from_array(X, chunks=(250, -1)))
    wd = None
    if weighted:
        wd = w_reads.wrap(da.from_array(np.ones(len(X)), chunks=(250,)))
    with dask.config.set(scheduler="sync"):
        _, info = kmeans_parallel(DaskData(X=Xd, weights=wd), 5, seed=1, rounds=rounds,
                                  return_info=True)  # fmt: skip
    assert info.passes == rounds + 1
    # every chunk read once per pass, plus the one chunk holding the first centre
    assert x_reads.reads == (rounds + 1) * n_chunks + 1
    if weighted:
        # weights: the exponential race for the first centre, then once per pass
        assert info.weight_passes == 1
        assert w_reads.reads == (rounds + 2) * n_chunks


def test_per_row_state_is_eight_bytes() -> None:
    assert STATE_DTYPE.itemsize == 8


def test_fewer_distinct_rows_than_k() -> None:
    base = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    X = base[np.arange(300) % 3]
    x_reads = _ReadCounter()
    data = DaskData(X=x_reads.wrap(da.from_array(X, chunks=(70, -1))))
    with dask.config.set(scheduler="sync"):
        centers, info = kmeans_parallel(data, 5, seed=0, return_info=True)
    assert info.n_candidates == 3
    assert info.phi[-1] == 0.0
    assert info.passes < 6  # stops once every row coincides with a candidate
    assert x_reads.reads == info.passes * 5 + 1
    found = {tuple(c) for c in centers[0]}
    assert found == {tuple(b) for b in base}
    np.testing.assert_array_equal(info.candidate_weights, [100, 100, 100])
    assert any("distinct rows" in note for note in info.notes)


def test_extra_rounds_when_too_few_candidates() -> None:
    X = blobs(n=2000, d=2, k=10, seed=3, spread=1.0)
    _, info = kmeans_parallel(_data(X, 500), 10, seed=0, oversampling=0.05, rounds=1,
                              return_info=True)  # fmt: skip
    assert info.n_candidates >= 10
    assert info.rounds > 1
    assert info.passes == info.rounds + 1
    assert any("sampling round" in note for note in info.notes)


def test_weighted_lloyd_matches_repeated_rows() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 2))
    w = rng.integers(1, 4, size=50).astype(float)
    start = X[:3].copy()
    a, loss_a = weighted_lloyd(X, w, start)
    b, loss_b = weighted_lloyd(np.repeat(X, w.astype(int), axis=0), np.ones(int(w.sum())), start)
    np.testing.assert_allclose(a, b)
    assert loss_a == pytest.approx(loss_b)


def _unequal_blobs(seed: int) -> np.ndarray:
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(
        n_samples=[5000, 500, 50, 2000, 200, 1000, 100, 3000],
        cluster_std=[0.5, 1.0, 2.5, 1.5, 0.3, 2.0, 1.0, 3.0],
        n_features=2, center_box=(-10, 10), random_state=seed,
    )  # fmt: skip
    return X


def test_quality_no_worse_than_scikit_learn_kmeans() -> None:
    """k-means|| + Lloyd against scikit-learn's KMeans (greedy k-means++ + Lloyd), one restart
    each, median inertia over 5 seeds, on overlapping blobs of very unequal sizes and spreads.

    fit_means stops at a relative loss decrease of 1e-4 where scikit-learn stops on the centre
    shift, so the same local minimum can end up to ~1e-4 apart: hence the 1e-3 tolerance."""
    from sklearn.cluster import KMeans as SKKMeans

    k = 8
    X = _unequal_blobs(0)
    data = data_from_array(X).persist()
    ours, theirs = [], []
    for seed in range(5):
        start = kmeans_parallel(data, k, seed=seed)
        fitted = fit_means(data, FitState.start(start), max_iter=300, tol=1e-4,
                           step=optimizer.NewtonStep())  # fmt: skip
        ours.append(fitted.inertia)
        theirs.append(SKKMeans(k, n_init=1, random_state=seed).fit(X).inertia_)
    assert np.median(ours) <= np.median(theirs) * (1 + 1e-3), (ours, theirs)


def test_local_trials_keep_the_best_reclustering() -> None:
    X = _unequal_blobs(9)
    data = data_from_array(X).persist()
    one, info = kmeans_parallel(data, 8, seed=3, local_trials=1, return_info=True)
    many = kmeans_parallel(data, 8, seed=3, local_trials=10)

    def candidate_loss(centers: np.ndarray) -> float:
        dist = ((info.candidates[:, None, :] - centers[None]) ** 2).sum(-1).min(axis=1)
        return float(info.candidate_weights @ dist)

    assert candidate_loss(many[0]) <= candidate_loss(one[0]) + 1e-9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k="), ({"oversampling": 0}, "oversampling"), ({"rounds": 0}, "rounds"),
     ({"n_init": 0}, "n_init"), ({"local_trials": 0}, "local_trials"), ({"k": 101}, "n_samples")],
)  # fmt: skip
def test_bad_arguments(kwargs: dict, match: str) -> None:
    X = blobs(n=100, d=2, k=2, seed=0)
    args = {"k": 2, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=match):
        kmeans_parallel(_data(X, 50), **args)
