"""Tests for pipeline.passes: Dask data from arrays and Parquet, the fixed-tree stats pass and
the labelling pass that writes one Parquet file per input file."""

from __future__ import annotations

import itertools
import os
import tracemalloc
from functools import reduce
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs, buffered_bytes, write_parquet, write_split
from dask.delayed import delayed

from pipeline import kernel, parquet_io, passes
from pipeline.fit import FitState, IterationReport, fit_means
from pipeline.optimizer import NewtonStep
from pipeline.parquet_io import InputError, open_parquet
from pipeline.passes import (
    DaskData,
    chunk_bytes_for,
    data_from_array,
    data_from_parquet,
    label_files,
    release_buffers,
    stats_pass,
    tree_reduce,
)


def _centers(X: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return X[rng.choice(len(X), size=k, replace=False)].astype(np.float64)


def _assert_same_stats(a: kernel.ChunkStats, b: kernel.ChunkStats, rtol: float = 1e-12) -> None:
    np.testing.assert_allclose(a.sums, b.sums, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(a.counts, b.counts, rtol=rtol)
    np.testing.assert_allclose(a.loss, b.loss, rtol=rtol)
    np.testing.assert_array_equal(a.changed, b.changed)
    np.testing.assert_array_equal(a.far_index, b.far_index)
    np.testing.assert_array_equal(a.far_rows, b.far_rows)
    np.testing.assert_allclose(a.far_dist, b.far_dist, rtol=rtol)
    assert a.n_rows == b.n_rows
    assert a.sq_total == pytest.approx(b.sq_total, rel=rtol)


# --------------------------------------------------------------------------------------------
# data from arrays and from Parquet
# --------------------------------------------------------------------------------------------


def test_data_from_array() -> None:
    X = np.arange(12, dtype=np.int32).reshape(6, 2)
    data = data_from_array(X, sample_weight=[1, 2, 3, 4, 5, 6])
    assert isinstance(data, DaskData)
    assert data.X.dtype == np.float64  # integers are fitted as float64
    assert data.weights.dtype == np.float64
    assert data.n_rows == 6 and data.n_features == 2
    np.testing.assert_array_equal(data.X.compute(), X)
    assert data_from_array(X.astype(np.float32)).X.dtype == np.float32
    assert data_from_array(X, dtype="float32").X.dtype == np.float32
    lazy = data_from_array(da.from_array(np.ones((10, 4)), chunks=(3, 2)))
    assert lazy.X.chunks == ((3, 3, 3, 1), (4,))  # chunked by rows only
    assert lazy.offsets == (0, 3, 6, 9)
    with pytest.raises(ValueError, match=r"sample_weight has shape \(5,\); expected \(6,\)\."):
        data_from_array(X, sample_weight=np.ones(5))


def test_data_from_parquet_equals_pyarrow(tmp_path: Path) -> None:
    X = blobs(n=101, d=3, k=2, seed=1)
    w = np.random.default_rng(1).uniform(size=len(X))
    bounds = [0, 40, 41, 101]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        write_parquet(
            tmp_path / "in" / f"p{i}.parquet", X[lo:hi], row_group_rows=9, extra={"w": w[lo:hi]}
        )
    ds = open_parquet(tmp_path / "in", weight_column="w", chunk_bytes=8 * 3 * 20)
    direct = pa.concat_tables([pq.read_table(f) for f in ds.files])
    expected = np.column_stack([direct[c].to_numpy() for c in ("x0", "x1", "x2")])
    for dtype in ("float32", "float64"):
        data = data_from_parquet(ds, dtype)
        assert data.source is ds
        assert data.X.dtype == np.dtype(dtype)
        assert data.X.chunks[0] == ds.chunk_sizes()
        assert data.offsets == tuple(c.offset for c in ds.chunks)
        Xd, wd = dask.compute(data.X, data.weights)
        np.testing.assert_array_equal(Xd, expected.astype(dtype))
        np.testing.assert_array_equal(wd, direct["w"].to_numpy())
    np.testing.assert_array_equal(expected, X)


def test_data_from_parquet_reads_nothing_until_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_split(tmp_path / "in", blobs(n=30, d=2, k=2), [10], row_group_rows=4)
    ds = open_parquet(tmp_path / "in", chunk_bytes=1)
    reads: list[str] = []
    real = parquet_io._open_parquet_file

    def counting(dataset, path):
        reads.append(os.path.basename(path))
        return real(dataset, path)

    monkeypatch.setattr(parquet_io, "_open_parquet_file", counting)
    with dask.config.set(scheduler="sync"):
        data = data_from_parquet(ds)
        assert reads == []
        data.X[:3].compute()  # only the first chunk is needed
        assert reads == ["part-000.parquet"]


@pytest.mark.parametrize("file_dtype", [np.float64, np.float32])  # filled into rows, in place
def test_non_finite_feature_raises_through_dask(tmp_path: Path, dask_client, file_dtype) -> None:
    X = blobs(n=20, d=2, k=2).astype(file_dtype)
    X[15, 1] = np.nan
    write_split(tmp_path / "in", X, [10], with_id=False)
    ds = open_parquet(tmp_path / "in")
    assert parquet_io.reads_in_place(ds, "float32") == (file_dtype == np.float32)
    data = data_from_parquet(ds)
    with pytest.raises(
        InputError, match=r"feature column 'x1' in file '.*part-001\.parquet' has NaN"
    ):
        stats_pass(data, np.zeros((1, 2, 2)))


# --------------------------------------------------------------------------------------------
# the stats pass
# --------------------------------------------------------------------------------------------


def test_tree_reduce_is_a_fixed_ordered_tree() -> None:
    parts = [delayed(c) for c in "abcdefghijklmnopqrstu"]
    concat = str.__add__  # not commutative: any reordering shows
    for split_every in (2, 3, 8, 100):
        (result,) = dask.compute(tree_reduce(parts, concat, split_every=split_every))
        assert result == "abcdefghijklmnopqrstu"
    nested = tree_reduce(parts[:5], lambda a, b: f"({a}{b})", split_every=2)
    # level 1: (ab) (cd) e; level 2: ((ab)(cd)) e; level 3: the root
    assert nested.compute(scheduler="sync") == "(((ab)(cd))e)"
    with pytest.raises(ValueError, match="nothing to reduce"):
        tree_reduce([], concat)


def test_stats_pass_matches_kernel_on_numpy(dask_client) -> None:
    X = blobs(n=2500, d=3, k=4, seed=2)
    w = np.random.default_rng(2).uniform(0.0, 2.0, size=len(X))
    centers = np.stack([_centers(X, 4, s) for s in range(2)])
    previous = centers + 0.3
    data = data_from_array(da.from_array(X, chunks=(301, 3)), sample_weight=w)
    got = stats_pass(data, centers, previous=previous, n_far=5)
    expected = kernel.chunk_stats(X, centers, weights=w, previous=previous, n_far=5)
    _assert_same_stats(got, expected)
    persisted = stats_pass(data.persist(), centers, previous=previous, n_far=5)
    _assert_same_stats(persisted, expected)


def _means_keys_seen(dask_scheduler, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [str(e[0]) for e in dask_scheduler.transition_log if str(e[0]).startswith(prefix)]


@pytest.mark.parametrize("inline_bytes", [passes.INLINE_MEANS_BYTES, 0])
def test_stats_pass_means_written_into_tasks_or_one_key(
    dask_client, monkeypatch: pytest.MonkeyPatch, inline_bytes: int
) -> None:
    # small means go into every chunk's task (no round trip for a key of their own); beyond
    # INLINE_MEANS_BYTES they are one key: the same statistics either way
    monkeypatch.setattr(passes, "INLINE_MEANS_BYTES", inline_bytes)
    X = blobs(n=2000, d=3, k=4, seed=5)
    centers = np.stack([_centers(X, 4, s) for s in range(2)])
    previous = centers + 0.2
    data = data_from_array(da.from_array(X, chunks=(250, 3))).persist()
    before = dask_client.run_on_scheduler(_means_keys_seen, prefix="means-")
    got = stats_pass(data, centers, previous=previous, n_far=3)
    _assert_same_stats(got, kernel.chunk_stats(X, centers, previous=previous, n_far=3))
    seen = set(dask_client.run_on_scheduler(_means_keys_seen, prefix="means-")) - set(before)
    assert len(seen) == (0 if inline_bytes else 1)


def test_stats_pass_one_file_vs_many_files(tmp_path: Path, dask_client) -> None:
    X = blobs(n=1000, d=3, k=4, seed=3, spread=1.5)
    w = np.random.default_rng(3).integers(0, 4, size=len(X)).astype(np.float64)
    write_parquet(tmp_path / "one" / "all.parquet", X, extra={"w": w})
    bounds = [0, 1, 137, 138, 500, 999, 1000]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        write_parquet(
            tmp_path / "many" / f"part-{i}.parquet",
            X[lo:hi],
            row_group_rows=[3, 7, 11, 13, 17, 19][i],
            extra={"w": w[lo:hi]},
        )
    one = open_parquet(tmp_path / "one", weight_column="w", dtype="float64")
    many = open_parquet(tmp_path / "many", weight_column="w", dtype="float64", chunk_bytes=24 * 40)
    assert len(one.chunks) == 1 and len(many.chunks) > 20
    centers = np.stack([_centers(X, 4, 0), _centers(X, 4, 1)])
    previous = centers + 0.5
    a = stats_pass(data_from_parquet(one, "float64"), centers, previous=previous, n_far=6)
    b = stats_pass(data_from_parquet(many, "float64"), centers, previous=previous, n_far=6)
    _assert_same_stats(a, b)
    reference = kernel.chunk_stats(X, centers, weights=w, previous=previous, n_far=6)
    _assert_same_stats(b, reference)
    assert b.n_rows == 1000
    assert b.counts.sum(axis=1) == pytest.approx([w.sum(), w.sum()], rel=1e-12)
    # float32 rows: the sums are exact in float64 either way; the squared distances come from
    # float32 products whose rounding may depend on the block shape (see test_kernel)
    c = stats_pass(data_from_parquet(one), centers, n_far=6)
    d = stats_pass(data_from_parquet(many), centers, n_far=6)
    np.testing.assert_allclose(c.sums, d.sums, rtol=1e-12)
    np.testing.assert_array_equal(c.counts, d.counts)
    np.testing.assert_allclose(c.loss, d.loss, rtol=1e-7)
    np.testing.assert_array_equal(c.far_index, d.far_index)


def test_a_failed_fit_frees_the_workers_buffers(dask_client) -> None:
    # the session's cluster outlives the fit, as a long-lived cluster does: a fit that fails
    # (here its per-iteration callback, as a failed checkpoint would) must not leave a chunk's
    # buffers in every worker thread
    X = blobs(n=4000, d=4, k=3, seed=5)
    data = data_from_array(da.from_array(X, chunks=(1000, 4))).persist()

    def fail(report: IterationReport) -> None:
        raise RuntimeError("checkpoint failed")

    with pytest.raises(RuntimeError, match="checkpoint failed"):
        fit_means(data, FitState.start(X[None, :3].copy()), max_iter=5, tol=0.0,
                  step=NewtonStep(), on_iteration=fail)  # fmt: skip
    assert set(dask_client.run(buffered_bytes).values()) == {0}


def test_release_buffers_does_not_raise_once_the_scheduler_is_gone() -> None:
    # it runs while a failed fit's error propagates: raising would replace that error
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")
    with Client(cluster) as client:
        cluster.close()
        release_buffers()  # the closed client's run raised AttributeError
        assert client.status == "closed"


def _compute_spans(records: list[dict]) -> list[tuple[str, str]]:
    """(key name, worker) of each task computed, and ("transfer", worker) of each fetch."""
    from dask.utils import key_split

    return [
        (key_split(rec["key"]) if span["action"] == "compute" else span["action"], rec["worker"])
        for rec in records
        for span in rec["startstops"]
        if span["action"] in ("compute", "transfer")
    ]


def test_a_pass_gives_each_kind_of_task_a_name_of_its_own(dask_client) -> None:
    # the scheduler groups tasks by the name their key starts with and sizes its queues by
    # group: chunk tasks and combining tasks under one name made a streamed pass 20-40% slower
    from distributed import get_task_stream

    X = blobs(n=4000, d=4, k=3, seed=5)
    data = data_from_array(da.from_array(X, chunks=(250, 4)))  # read by the pass: not held
    with get_task_stream(dask_client) as stream:
        stats_pass(data, X[None, :3].astype(np.float64), n_far=2)
    names = {name for name, _ in _compute_spans(stream.data)}
    assert {"chunk-stats", "combine-stats"} <= names


@pytest.fixture
def amm_paused(dask_client):  # type: ignore[no-untyped-def]
    """The session cluster with its active memory manager paused: it drops extra replicas of
    held chunks every 2 s, so a test about where chunks are (replicated, or fetched by one
    pass for the next) would otherwise depend on when it last ran."""
    dask_client.amm.stop()
    try:
        yield dask_client
    finally:
        dask_client.amm.start()


def _holders(client, data: DaskData) -> list[str]:  # type: ignore[no-untyped-def]
    from distributed import futures_of, wait

    wait(futures_of([data.X, data.weights, data.xsq]))
    who_has = client.who_has(data.X)
    return [who_has[x.key][0] for x, _, _, _ in data.blocks()]


@pytest.mark.parametrize("gather_bytes", [passes.HELD_GATHER_BYTES, 0], ids=["client", "tasks"])
def test_held_rows_are_reduced_by_one_task_per_worker_where_they_are(
    amm_paused, monkeypatch: pytest.MonkeyPatch, gather_bytes: int
) -> None:
    # one task per worker thread over the chunks that worker holds, combined by the client in
    # the same tree as the combining tasks: not a bit of difference, and no chunk moves;
    # statistics too large to send to the client are combined by tasks
    from distributed import get_task_stream

    dask_client = amm_paused
    monkeypatch.setattr(passes, "HELD_GATHER_BYTES", gather_bytes)

    X = blobs(n=4000, d=4, k=3, seed=6)
    w = np.random.default_rng(6).uniform(0.0, 2.0, size=len(X))
    centers = np.stack([_centers(X, 3, s) for s in range(2)])
    previous = centers + 0.1
    read = data_from_array(da.from_array(X, chunks=(250, 4)), sample_weight=w)
    held = read.persist()
    holders = _holders(dask_client, held)
    assert len(set(holders)) == 2  # both workers hold chunks
    # the weights may be held apart from their rows: the first pass fetches those it needs
    stats_pass(held, centers, previous=previous, n_far=3)
    with get_task_stream(dask_client) as stream:
        got = stats_pass(held, centers, previous=previous, n_far=3)
    spans = _compute_spans(stream.data)
    if gather_bytes:
        assert sorted(spans) == sorted(("chunk-stats", worker) for worker in set(holders))
    else:
        assert [name for name, _ in spans].count("chunk-stats") == len(holders)
        assert "combine-stats" in {name for name, _ in spans}
    expected = stats_pass(read, centers, previous=previous, n_far=3)
    for name in ("sums", "counts", "loss", "changed", "far_dist", "far_index", "far_rows"):
        np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))
    assert (got.n_rows, got.sq_total) == (expected.n_rows, expected.sq_total)


def test_persisting_parquet_rows_reads_each_chunk_in_one_task_with_its_norms(
    tmp_path: Path, dask_client
) -> None:
    # the squared norms come from the task that read the rows, while they are in cache, not
    # from a task of their own
    from dask.utils import key_split
    from distributed import futures_of, get_task_stream, wait

    X = blobs(n=900, d=3, k=3, seed=9)
    w = np.random.default_rng(9).uniform(0.5, 2.0, size=len(X))
    for i, (lo, hi) in enumerate(itertools.pairwise([0, 400, 900])):
        write_parquet(tmp_path / "in" / f"part-{i}.parquet", X[lo:hi], row_group_rows=50,
                      extra={"w": w[lo:hi]})  # fmt: skip
    ds = open_parquet(tmp_path / "in", weight_column="w", chunk_bytes=4 * 3 * 150)
    read = data_from_parquet(ds)
    with get_task_stream(dask_client) as stream:
        held = read.persist()
        wait(futures_of(held.X) + futures_of(held.weights) + futures_of(held.xsq))
    computed = [key_split(rec["key"]) for rec in stream.data]
    assert computed.count("read-parquet-norms") == len(ds.chunks) > 2
    assert not {"row_sq_norms", "read-parquet"} & set(computed)
    X32 = X.astype(np.float32)
    np.testing.assert_array_equal(held.X.compute(), X32)
    np.testing.assert_array_equal(held.weights.compute(), w)
    np.testing.assert_array_equal(held.xsq.compute(), kernel.row_sq_norms(X32))
    centers = np.stack([_centers(X, 3, s) for s in range(2)])
    _assert_same_stats(stats_pass(held, centers, n_far=4), stats_pass(read, centers, n_far=4))


def test_a_streamed_pass_over_float32_parquet_reads_in_place(tmp_path: Path, dask_client) -> None:
    """float32 columns read in place by the workers' passes (several row groups per chunk, a
    far-off feature read less its origin, weights, previous means, far rows): the statistics of
    the same rows held in memory."""
    rng = np.random.default_rng(12)
    X = blobs(n=1500, d=5, k=4, seed=12).astype(np.float32)
    X[:, 2] += np.float32(3e4)
    w = rng.uniform(0.5, 2.0, size=len(X))
    for i, (lo, hi) in enumerate(itertools.pairwise([0, 700, 1500])):
        write_parquet(tmp_path / "in" / f"part-{i}.parquet", X[lo:hi], row_group_rows=96,
                      extra={"w": w[lo:hi]})  # fmt: skip
    ds = open_parquet(tmp_path / "in", weight_column="w", chunk_bytes=4 * 5 * 300)
    assert parquet_io.reads_in_place(ds, "float32") and ds.origin[2] != 0
    assert len(ds.chunks) > 3
    read = data_from_parquet(ds)
    assert read.streamed
    held = read.persist()
    centers = np.stack([_centers(X - np.float32(ds.origin), 4, s) for s in range(2)])
    previous = centers + 0.05
    _assert_same_stats(
        stats_pass(read, centers, previous=previous, n_far=3),
        stats_pass(held, centers, previous=previous, n_far=3),
        rtol=0,
    )


@pytest.mark.parametrize(
    ("n_chunks", "threads", "tasks_per_group"),
    [
        (105, 2, [2] * 11 + [8, 8, 1]),  # the last 16 chunks (and the rest of their groups) alone
        (20, 2, [8, 8, 4]),  # no more than 16 chunks: one per task
        (40, 1, [2, 2, 2, 2, 8]),
        (41, 1, [2, 2, 2, 2, 8, 1]),  # the groups holding the last 8 chunks
        (10, None, [8, 2]),  # no distributed client: one chunk per task
        (1, 4, [1]),
    ],
)
def test_streamed_tasks_read_several_chunks_until_the_tail(
    n_chunks: int, threads: int | None, tasks_per_group: list[int]
) -> None:
    assert (passes.STREAMED_CHUNKS_PER_TASK, passes.STREAMED_TAIL_TASKS_PER_THREAD) == (4, 8)
    batches = passes._streamed_batches(n_chunks, threads)
    assert [len(group) for group in batches] == tasks_per_group
    flat = [r for group in batches for r in group]
    assert [a for a, _ in flat] == sorted(a for a, _ in flat) and flat[0][0] == 0
    assert all(b == a2 for (_, b), (a2, _) in itertools.pairwise(flat)) and flat[-1][1] == n_chunks
    assert all(a // 8 == (b - 1) // 8 for a, b in flat)  # never across a group of the tree


def test_a_streamed_pass_in_tasks_of_several_chunks_gives_the_same_bits(
    tmp_path: Path, dask_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distributed import get_task_stream

    X = blobs(n=3000, d=3, k=4, seed=21).astype(np.float32)
    write_split(tmp_path / "in", X, [1100, 1900], row_group_rows=50)
    ds = open_parquet(tmp_path / "in", id_column="id", chunk_bytes=4 * 3 * 100)
    assert len(ds.chunks) == 30
    data = data_from_parquet(ds)
    centers = np.stack([_centers(X, 4, s) for s in range(2)])
    previous = centers + 0.1
    with monkeypatch.context() as one_per_task:
        one_per_task.setattr(passes, "STREAMED_CHUNKS_PER_TASK", 1)
        one_by_one = stats_pass(data, centers, previous=previous, n_far=3)
    # two threads, a tail of 2 chunks: the groups of 8 chunks 0-7, 8-15 and 16-23 in tasks of
    # 4, the last group's 6 chunks one per task
    monkeypatch.setattr(passes, "STREAMED_TAIL_TASKS_PER_THREAD", 1)
    with get_task_stream(dask_client) as stream:
        batched = stats_pass(data, centers, previous=previous, n_far=3)
    names = [name for name, _ in _compute_spans(stream.data)]
    assert names.count("chunk-stats") == 3 * 2 + 6
    # the tasks of several chunks go first (Dask alone would start with the last chunks)
    started = sorted(
        (span["start"], int(rec["key"].rsplit("-", 1)[1]))
        for rec in stream.data
        if rec["key"].startswith("chunk-stats")
        for span in rec["startstops"]
        if span["action"] == "compute"
    )
    assert started[-1][1] >= 24, started
    _assert_same_stats(batched, one_by_one, rtol=0)
    np.testing.assert_array_equal(batched.sums, one_by_one.sums)  # not only within atol
    _assert_same_stats(batched, stats_pass(data.persist(), centers, previous=previous, n_far=3), rtol=0)


def test_a_streamed_chunk_task_fills_no_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    X = blobs(n=500, d=4, k=3, seed=2).astype(np.float32)
    write_parquet(tmp_path / "p.parquet", X, row_group_rows=64)
    ds = open_parquet(tmp_path / "p.parquet")
    centers = _centers(X, 3)[None]
    rows, _ = parquet_io.read_chunk(ds, ds.chunks[0])  # less the dataset's origin
    want = kernel.chunk_stats(rows, centers, n_far=2, remember=False)

    def refused(*args, **kwargs):  # what filling rows from columns calls
        raise AssertionError("rows were filled")

    monkeypatch.setattr(kernel, "columns_to_rows", refused)
    got = passes._read_chunk_stats_task((ds, ds.chunks[0], "float32"), centers, None, 0, 2)
    _assert_same_stats(got, want, rtol=0)
    with pytest.raises(AssertionError, match="rows were filled"):
        passes._read_chunk_stats_task((ds, ds.chunks[0], "float64"), centers, None, 0, 2)


def test_held_rows_follow_the_chunks_where_the_cluster_put_them(amm_paused) -> None:
    from distributed import futures_of, get_task_stream

    dask_client = amm_paused

    X = blobs(n=3000, d=3, k=3, seed=7)
    centers = _centers(X, 3)[None]
    expected = kernel.chunk_stats(X, centers, n_far=2)
    held = data_from_array(da.from_array(X, chunks=(250, 3))).persist()
    _holders(dask_client, held)
    # every chunk on both workers: split evenly between them, nothing fetched
    dask_client.replicate(futures_of([held.X, held.xsq]), n=2)
    with get_task_stream(dask_client) as stream:
        _assert_same_stats(stats_pass(held, centers, n_far=2), expected)
    assert sorted(_compute_spans(stream.data)) == sorted(
        ("chunk-stats", address) for address in dask_client.nthreads()
    )
    assert sorted(len(g) for g in passes._held_groups(held)) == [6, 6]
    # every chunk on one worker: one task, there
    worker = sorted(dask_client.nthreads())[1]
    one = data_from_array(dask_client.persist(da.from_array(X, chunks=(300, 3)), workers=worker))
    assert set(_holders(dask_client, one)) == {worker}
    with get_task_stream(dask_client) as stream:
        _assert_same_stats(stats_pass(one, centers, n_far=2), expected)
    assert _compute_spans(stream.data) == [("chunk-stats", worker)]


def test_held_rows_are_split_among_a_workers_threads() -> None:
    from distributed import Client, LocalCluster, get_task_stream

    X = blobs(n=3000, d=3, k=3, seed=8)
    centers = _centers(X, 3)[None]
    expected = kernel.chunk_stats(X, centers, n_far=2)
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as client:  # fmt: skip
        held = data_from_array(da.from_array(X, chunks=(250, 3))).persist()
        _holders(client, held)
        assert passes._held_groups(held) == [[0, 2, 4, 6, 8, 10], [1, 3, 5, 7, 9, 11]]
        with get_task_stream(client) as stream:
            _assert_same_stats(stats_pass(held, centers, n_far=2), expected)
        assert [name for name, _ in _compute_spans(stream.data)] == ["chunk-stats"] * 2


def test_stats_pass_is_repeatable(tmp_path: Path, dask_client) -> None:
    X = blobs(n=3000, d=2, k=3, seed=4)
    data = data_from_array(da.from_array(X, chunks=(97, 2))).persist()
    centers = _centers(X, 3)[None]
    first = stats_pass(data, centers)
    for _ in range(3):
        again = stats_pass(data, centers)
        # a fixed reduction tree: bit-identical, whichever task finishes first
        np.testing.assert_array_equal(again.sums, first.sums)
        np.testing.assert_array_equal(again.loss, first.loss)


# --------------------------------------------------------------------------------------------
# labelling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file_dtype", [np.float64, np.float32])  # filled into rows, in place
@pytest.mark.parametrize("held", [False, True], ids=["read", "persisted"])
def test_label_files(tmp_path: Path, dask_client, held: bool, file_dtype) -> None:
    X = blobs(n=300, d=2, k=3, seed=5).astype(file_dtype)
    w = np.random.default_rng(5).uniform(0.5, 2.0, size=len(X))
    names = np.array([f"row-{i}" for i in range(len(X))])
    bounds = [0, 120, 120, 121, 300]  # the second file is empty
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        write_parquet(
            tmp_path / "in" / f"part-{i}.parquet",
            X[lo:hi],
            row_group_rows=16,
            extra={"id": np.arange(lo, hi), "name": names[lo:hi], "w": w[lo:hi]},
        )
    ds = open_parquet(tmp_path / "in", id_column="id", weight_column="w", chunk_bytes=8 * 30)
    assert parquet_io.reads_in_place(ds, "float32") == (file_dtype == np.float32)
    centers = _centers(X, 3)
    out = tmp_path / "out"
    # persisted: the labels are computed where the rows are held (several chunks per file)
    data = data_from_parquet(ds).persist() if held else None
    assert ds.chunk_sizes() != tuple(ds.file_rows)
    stats = label_files(ds, centers, str(out), data=data)
    assert sorted(os.listdir(out)) == [f"part-{i}.parquet" for i in range(4)]
    X32 = X.astype(np.float32)  # the default dtype of the pass
    labels, dist = kernel.assign_labels(X32, centers)
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        table = pq.read_table(out / f"part-{i}.parquet")
        assert table.schema.names == ["id", "name", "w", "cluster", "distance"]
        assert table.schema.field("cluster").type == pa.int32()
        assert table.schema.field("distance").type == pa.float64()
        assert table.schema.field("id").type == pa.int64()
        assert table.num_rows == hi - lo
        np.testing.assert_array_equal(table["id"].to_numpy(), np.arange(lo, hi))
        assert table["name"].to_pylist() == names[lo:hi].tolist()
        np.testing.assert_array_equal(table["w"].to_numpy(), w[lo:hi])
        np.testing.assert_array_equal(table["cluster"].to_numpy(), labels[lo:hi])
        np.testing.assert_array_equal(table["distance"].to_numpy(), dist[lo:hi])
        if hi > lo:  # the labels dictionary-encoded, as Arrow does by default; the distances not
            meta = pq.ParquetFile(out / f"part-{i}.parquet").metadata.row_group(0)
            encodings = {meta.column(j).path_in_schema: meta.column(j).encodings for j in range(5)}
            assert "RLE_DICTIONARY" in encodings["cluster"] and "RLE_DICTIONARY" in encodings["name"]
            assert not {"RLE_DICTIONARY", "PLAIN_DICTIONARY"} & set(encodings["distance"])
    # the returned statistics are the weighted sizes and inertia of ``centers``
    np.testing.assert_allclose(stats.counts[0], np.bincount(labels, weights=w, minlength=3))
    assert stats.loss[0] == pytest.approx(float(w @ dist), rel=1e-12)
    assert stats.n_rows == len(X)


@pytest.mark.parametrize("file_dtype", [np.float64, np.float32])  # filled into rows, in place
def test_label_files_name_a_non_finite_feature(tmp_path: Path, file_dtype) -> None:
    X = blobs(n=40, d=3, k=2).astype(file_dtype)
    X[33, 2] = np.inf
    write_split(tmp_path / "in", X, [20], with_id=False)
    ds = open_parquet(tmp_path / "in")
    with pytest.raises(
        InputError, match=r"feature column 'x2' in file '.*part-001\.parquet' has NaN or inf"
    ), dask.config.set(scheduler="sync"):  # fmt: skip
        label_files(ds, np.zeros((2, 3)), str(tmp_path / "out"))


def test_label_files_from_held_rows_read_no_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    X = blobs(n=200, d=3, k=2, seed=8)
    write_parquet(tmp_path / "in.parquet", X, row_group_rows=16, extra={"id": np.arange(200)})
    ds = open_parquet(tmp_path / "in.parquet", id_column="id", chunk_bytes=4 * 3 * 48)
    centers = _centers(X, 2)
    with dask.config.set(scheduler="sync"):
        data = data_from_parquet(ds).persist()
        want = label_files(ds, centers, str(tmp_path / "want"))

        def no_features(*args: object) -> None:
            raise AssertionError("the features were read again")

        monkeypatch.setattr(parquet_io, "_fill", no_features)
        have = label_files(ds, centers, str(tmp_path / "have"), data=data)
        assert pq.read_table(tmp_path / "have" / "in.parquet").equals(
            pq.read_table(tmp_path / "want" / "in.parquet")
        )
        np.testing.assert_array_equal(have.counts, want.counts)
        assert have.loss[0] == pytest.approx(want.loss[0], rel=1e-12)
        # a file whose labels would not fit a chunk's budget is read and labelled as before
        monkeypatch.setattr(passes, "_LABEL_ROW_BYTES", parquet_io.DEFAULT_CHUNK_BYTES)
        with pytest.raises(AssertionError, match="features were read again"):
            label_files(ds, centers, str(tmp_path / "big"), data=data)


def test_label_files_float64(tmp_path: Path) -> None:
    X = blobs(n=50, d=2, k=2, seed=6)
    write_parquet(tmp_path / "in.parquet", X)
    ds = open_parquet(tmp_path / "in.parquet")
    centers = _centers(X, 2)
    label_files(ds, centers, str(tmp_path / "out"), dtype="float64")
    table = pq.read_table(tmp_path / "out" / "in.parquet")
    assert table.schema.names == ["cluster", "distance"]
    labels, dist = kernel.assign_labels(X, centers)
    np.testing.assert_array_equal(table["cluster"].to_numpy(), labels)
    np.testing.assert_array_equal(table["distance"].to_numpy(), dist)


def test_label_files_same_name_in_two_subdirectories(tmp_path: Path) -> None:
    X = np.arange(20.0).reshape(10, 2)
    write_parquet(tmp_path / "in" / "2024" / "data.parquet", X[:4])
    write_parquet(tmp_path / "in" / "2025" / "data.parquet", X[4:])
    ds = open_parquet(tmp_path / "in")
    assert len(ds.files) == 2
    label_files(ds, np.array([[0.0, 0.0], [10.0, 10.0]]), str(tmp_path / "out"))
    total = sum(
        pq.read_metadata(os.path.join(root, f)).num_rows
        for root, _, files in os.walk(tmp_path / "out")
        for f in files
    )
    assert total == 10
    assert (tmp_path / "out" / "2024" / "data.parquet").exists()
    assert (tmp_path / "out" / "2025" / "data.parquet").exists()


def test_label_files_input_with_a_cluster_column(tmp_path: Path) -> None:
    X = np.arange(20.0).reshape(10, 2)
    extra = {"cluster": np.zeros(10, np.int32), "distance": np.zeros(10)}
    write_parquet(tmp_path / "labelled.parquet", X, extra=extra)
    ds = open_parquet(tmp_path / "labelled.parquet", features=["x0", "x1"])
    try:
        label_files(ds, np.array([[0.0, 0.0], [10.0, 10.0]]), str(tmp_path / "out"))
    except InputError:
        return  # refusing with a clear message is fine
    table = pq.read_table(tmp_path / "out" / "labelled.parquet")
    assert len(set(table.schema.names)) == len(table.schema.names)


def test_reduce_helpers_agree_with_functools_reduce(dask_client) -> None:
    X = blobs(n=400, d=2, k=3, seed=7)
    centers = _centers(X, 3)[None]
    cuts = [0, 50, 51, 200, 333, 400]
    parts = [
        kernel.chunk_stats(X[lo:hi], centers, offset=lo, n_far=3)
        for lo, hi in itertools.pairwise(cuts)
    ]
    (tree,) = dask.compute(tree_reduce([delayed(p) for p in parts], kernel.combine_stats, 2))
    _assert_same_stats(tree, reduce(kernel.combine_stats, parts))


# --------------------------------------------------------------------------------------------
# chunk size for a task's memory budget
# --------------------------------------------------------------------------------------------


def test_chunk_bytes_for_is_a_share_of_the_budget_within_bounds() -> None:
    mib = 1 << 20
    assert chunk_bytes_for(36 * mib) == 18 * mib  # CHUNK_SHARE of it
    assert chunk_bytes_for(36 * mib) == int(36 * mib * passes.CHUNK_SHARE)
    assert chunk_bytes_for(mib) == mib  # never under 1 MiB
    assert chunk_bytes_for(10 * 2**30) == parquet_io.DEFAULT_CHUNK_BYTES  # capped
    assert chunk_bytes_for(0) == parquet_io.DEFAULT_CHUNK_BYTES  # no limit known


def test_reading_and_reducing_a_chunk_fits_the_budget_it_was_sized_for(tmp_path: Path) -> None:
    # a chunk of 4 row groups: NumPy's peak (the matrix, the fill buffer, the kernel's
    # per-row arrays) plus Arrow's (one row group's pages and columns at a time) stays
    # within the budget chunk_bytes_for gives the chunk a share of
    rng = np.random.default_rng(0)
    n, d = 4 * 16384, 32
    table = pa.table({f"x{j}": rng.normal(size=n).astype(np.float32) for j in range(d)})
    pq.write_table(table, tmp_path / "t.parquet", row_group_size=n // 4)
    ds = open_parquet(tmp_path / "t.parquet", chunk_bytes=n * d * 4)
    assert [len(c.row_groups) for c in ds.chunks] == [4]
    centers = rng.normal(size=(1, 16, d))
    parquet_io._use_returning_allocator()
    kernel.chunk_stats(np.zeros((64, d), np.float32), centers, n_far=16)  # compiled, loaded
    previous = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(previous)  # counts this read's Arrow allocations alone
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        X, _ = parquet_io.read_chunk(ds, ds.chunks[0])
        kernel.chunk_stats(X, centers, n_far=16)
        _, numpy_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    budget = X.nbytes / passes.CHUNK_SHARE
    assert X.nbytes <= numpy_peak  # the measurement sees the matrix
    assert numpy_peak + pool.max_memory() < budget
