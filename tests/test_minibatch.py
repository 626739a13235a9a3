"""Tests for mini-batch k-means (pipeline.minibatch.fit_minibatch)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs

from pipeline import kernel, optimizer
from pipeline.fit import FitState, fit_means
from pipeline.initialization import kmeans_parallel
from pipeline.minibatch import _batch_stats_task, choose_chunks, fit_minibatch
from pipeline.passes import DaskData


@pytest.fixture(autouse=True)
def _local_scheduler(request: pytest.FixtureRequest) -> Iterator[None]:
    """Threads, unless the test asks for the session's distributed client."""
    if "dask_client" in request.fixturenames:
        yield
    else:
        with dask.config.set(scheduler="threads"):
            yield


class _ChunkLog:
    """Records which chunks of an array are read (materialised), by their first row."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reads: list[int] = []

    def wrap(self, X: np.ndarray, chunks: int) -> da.Array:
        starts = np.arange(0, len(X), chunks)

        def read(block: np.ndarray, block_info=None) -> np.ndarray:
            with self.lock:
                self.reads.append(int(block_info[0]["array-location"][0][0]))
            return block

        meta = np.empty((0, 0), dtype=X.dtype)
        arr = da.from_array(X, chunks=(chunks, -1)).map_blocks(read, dtype=X.dtype, meta=meta)
        assert len(starts) == arr.numblocks[0]
        return arr


def _overlapping(n: int, seed: int = 0) -> np.ndarray:
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n_samples=n, centers=8, cluster_std=2.0, n_features=3,
                      center_box=(-10, 10), random_state=seed)  # fmt: skip
    return X


def test_choose_chunks() -> None:
    sizes = np.array([100] * 30 + [7, 500, 3])
    a = choose_chunks(sizes, 1000, seed=1, iteration=4)
    np.testing.assert_array_equal(a, choose_chunks(sizes, 1000, seed=1, iteration=4))
    assert np.all(np.diff(a) > 0)
    total = sizes[a].sum()
    assert total >= 1000
    # the shortest random prefix: without its last chunk it would hold fewer rows
    assert total - sizes[a].min() < 1000 or total - sizes[a].max() < 1000
    others = {tuple(choose_chunks(sizes, 1000, seed=1, iteration=i)) for i in range(1, 20)}
    assert len(others) > 15  # each iteration draws its own chunks
    assert not np.array_equal(a, choose_chunks(sizes, 1000, seed=2, iteration=4))
    assert choose_chunks(sizes, 1, seed=0, iteration=1).size == 1
    np.testing.assert_array_equal(choose_chunks(sizes, 10**9, 0, 1), np.arange(sizes.size))


def test_aggregate_update_equals_per_row_sculley_updates() -> None:
    rng = np.random.default_rng(0)
    X = blobs(n=400, d=3, k=4, seed=5, spread=1.5)
    w = rng.uniform(0.2, 3.0, size=len(X))
    start = X[[0, 100, 200, 300]] + 0.5
    data = DaskData(X=da.from_array(X, chunks=(50, -1)), weights=da.from_array(w, chunks=50))
    result = fit_minibatch(data, start, batch_size=180, max_iter=3, seed=7)

    # Sculley (2010), Algorithm 1, with weights: cache the nearest centre of every batch row,
    # then one gradient step per row with rate w / v_j
    centers, v = start.copy(), np.zeros(4)
    sizes = np.full(8, 50)
    for it in range(1, 4):
        rows = np.concatenate(
            [np.arange(c * 50, c * 50 + 50) for c in choose_chunks(sizes, 180, 7, it)]
        )
        nearest = ((X[rows, None, :] - centers[None]) ** 2).sum(-1).argmin(axis=1)
        for i, j in zip(rows, nearest, strict=True):
            v[j] += w[i]
            eta = w[i] / v[j]
            centers[j] = (1 - eta) * centers[j] + eta * X[i]
    np.testing.assert_allclose(result.centers, centers, rtol=1e-10, atol=1e-10)
    assert result.n_iter == 3 and result.stop_reason == "max-iter"


def test_reads_only_the_batch_chunks_and_reports_rows_read() -> None:
    X = _overlapping(20_000)
    log = _ChunkLog()
    data = DaskData(X=log.wrap(X, 500))  # 40 chunks, never persisted: every use is a read
    start = X[:8].copy()
    with dask.config.set(scheduler="sync"):
        result = fit_minibatch(data, start, batch_size=1200, max_iter=15, patience=100, seed=3)
    assert result.n_iter == 15
    batch_reads, final_reads = log.reads[:-40], log.reads[-40:]
    assert sorted(final_reads) == list(range(0, 20_000, 500))  # one full pass at the end
    expected = []
    for it in range(1, 16):
        chunks = choose_chunks(np.full(40, 500), 1200, 3, it)
        assert result.history[it - 1]["chunks"] == chunks.size == 3
        expected += [500 * c for c in chunks]
    assert sorted(batch_reads) == sorted(expected)
    assert result.rows_read == 500 * len(log.reads)
    assert [rec["rows_read"] for rec in result.history] == [1500 * i for i in range(1, 16)]

    # without the final pass: only the batches are read, and the same centres come out
    log.reads.clear()
    with dask.config.set(scheduler="sync"):
        skipped = fit_minibatch(
            data, start, batch_size=1200, max_iter=15, patience=100, seed=3, final_pass=False
        )
    assert sorted(log.reads) == sorted(expected)
    assert skipped.rows_read == 15 * 1500 and np.isnan(skipped.inertia)
    np.testing.assert_array_equal(skipped.centers, result.centers)


def test_within_five_percent_of_full_batch_reading_a_fraction() -> None:
    n = 60_000
    X = _overlapping(n)
    data = DaskData(X=da.from_array(X, chunks=(1000, -1))).persist()
    for seed in range(3):
        start = kmeans_parallel(data, 8, seed=seed)
        full = fit_means(data, FitState.start(start.copy()), max_iter=300, tol=1e-4,
                         step=optimizer.NewtonStep())  # fmt: skip
        mini = fit_minibatch(data, start[0], batch_size=2000, max_iter=300, patience=10,
                             seed=seed)  # fmt: skip
        assert mini.stop_reason == "no-improvement"
        assert mini.inertia <= 1.05 * full.inertia, (seed, mini.inertia, full.inertia)
        assert mini.rows_read < n * mini.n_iter
        assert mini.rows_read < 0.5 * n * full.n_iter, (seed, mini.rows_read, full.n_iter)
        # the reported inertia is the true one of the returned centres
        dist = ((X[:, None, :] - mini.centers[None]) ** 2).sum(-1).min(axis=1)
        assert mini.inertia == pytest.approx(dist.sum(), rel=1e-9)
        assert [rec["iteration"] for rec in mini.history] == list(range(1, mini.n_iter + 1))
        assert {"loss", "ewa_loss", "seconds", "rows"} <= set(mini.history[0])


def test_deterministic_and_seed_dependent() -> None:
    X = _overlapping(10_000, seed=2)
    data = DaskData(X=da.from_array(X, chunks=(250, -1)))
    start = X[:8].copy()
    a = fit_minibatch(data, start, batch_size=1000, max_iter=30, seed=1)
    b = fit_minibatch(data, start, batch_size=1000, max_iter=30, seed=1)
    c = fit_minibatch(data, start, batch_size=1000, max_iter=30, seed=2)
    np.testing.assert_array_equal(a.centers, b.centers)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert not np.array_equal(a.centers, c.centers)
    np.testing.assert_array_equal(start, X[:8])  # the caller's centres are not modified


def test_same_result_on_a_distributed_cluster(dask_client) -> None:
    X = _overlapping(6000, seed=4)
    data = DaskData(X=da.from_array(X, chunks=(300, -1)))
    start = X[:8].copy()
    on_cluster = fit_minibatch(data.persist(), start, batch_size=900, max_iter=8, seed=5)
    with dask.config.set(scheduler="sync"):
        local = fit_minibatch(data, start, batch_size=900, max_iter=8, seed=5)
    np.testing.assert_allclose(on_cluster.centers, local.centers, rtol=1e-12)
    assert on_cluster.rows_read == local.rows_read
    assert on_cluster.inertia == pytest.approx(local.inertia, rel=1e-12)


def test_stops_after_patience_batches_without_improvement() -> None:
    X = blobs(n=8000, d=2, k=3, seed=0, spread=0.5)
    data = DaskData(X=da.from_array(X, chunks=(200, -1)))
    start = kmeans_parallel(data, 3, seed=0)[0]
    for patience in (3, 8):
        result = fit_minibatch(data, start, batch_size=400, max_iter=500, patience=patience)
        assert result.stop_reason == "no-improvement"
        ewa = [rec["ewa_loss"] for rec in result.history]
        best_at = int(np.argmin(ewa))
        assert result.n_iter == best_at + 1 + patience  # stopped right after `patience` stale
        assert result.n_iter < 500


def test_centre_that_never_gets_rows_is_relocated() -> None:
    X = blobs(n=3000, d=2, k=3, seed=1, spread=0.5)
    data = DaskData(X=da.from_array(X, chunks=(300, -1)))
    start = np.concatenate([kmeans_parallel(data, 3, seed=0)[0], [[1e4, 1e4]]])
    seen: list = []
    result = fit_minibatch(data, start, batch_size=600, max_iter=20, on_iteration=seen.append)
    assert np.abs(result.centers).max() < 100  # moved next to the data
    assert any("had no rows" in note for note in seen[0].notes)
    assert all(size > 0 for size in result.cluster_sizes)
    assert len(seen) == result.n_iter and seen[0].record is result.history[0]


def test_bad_arguments() -> None:
    X = blobs(n=100, d=2, k=2, seed=0)
    data = DaskData(X=da.from_array(X, chunks=(50, -1)))
    with pytest.raises(ValueError, match="centers"):
        fit_minibatch(data, np.zeros((2, 3)), batch_size=10, max_iter=5)
    with pytest.raises(ValueError, match="batch_size"):
        fit_minibatch(data, X[:2], batch_size=0, max_iter=5)
    with pytest.raises(ValueError, match="tol"):
        fit_minibatch(data, X[:2], batch_size=10, max_iter=5, tol=-1.0)


def test_batch_passes_keep_no_labels() -> None:
    # no later pass compares with a batch's labels: keeping them (and a checksum of the rows)
    # would only cost memory and time
    X = blobs(n=500, d=32, k=3, seed=2).astype(np.float32)
    centers = X[None, :3].astype(np.float64)
    stats = _batch_stats_task(X, None, None, centers, 0, 3)
    assert stats.n_rows == 500
    assert id(X) not in kernel._LABELS._entries
    kernel.chunk_stats(X, centers)  # a fit's pass does keep them
    assert id(X) in kernel._LABELS._entries
