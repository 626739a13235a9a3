"""Passes over the data: one Dask graph per pass, reduced in a fixed tree.

A pass maps every chunk of rows to small additive statistics (``kernel.chunk_stats``) and
combines them pairwise in a fixed order, so the result does not depend on which task finishes
first. Small means are written into every chunk's task; larger ones enter the graph as one key,
so they travel to each worker once per pass. Each pass is exactly one ``dask.compute``.

:class:`DaskData` is what the fit loop iterates over: the rows as a Dask array chunked by rows,
optional sample weights, and each chunk's global row offset (for randomness keyed by row).
Whether the chunks are read from Parquet on every pass (streaming) or held in the workers'
memory (persisted) is decided when the :class:`DaskData` is built; the passes do not care.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, TypeVar

import dask
import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.delayed import Delayed, delayed
from dask.highlevelgraph import HighLevelGraph, MaterializedLayer
from dask.task_spec import DataNode, List, Task, TaskRef

from . import kernel, parquet_io
from .kernel import ChunkStats

__all__ = [
    "DaskData",
    "choose_cache",
    "chunk_bytes_for",
    "data_from_array",
    "data_from_parquet",
    "gather_rows",
    "label_files",
    "release_buffers",
    "stats_pass",
    "tree_reduce",
]

T = TypeVar("T")

#: Times a failed task of a pass is rerun before the pass fails. Tasks are pure functions of
#: their inputs (a label task rewrites its whole file), so a transient failure (a read that
#: fails once, a worker lost mid-task) costs a recomputation, never a wrong result. With
#: Dask's local schedulers the option is ignored.
RETRIES = 2

#: Most bytes that copies of the means (and the previous means) may add to a pass's graph when
#: written into every chunk's task. A key of their own costs a round trip before any chunk
#: starts (a worker "computes" it, the others fetch it): 8 ms of a pass's 40 ms of overhead
#: (8 small chunks on 2 workers). Beyond this size, one key of their own is the cheaper way.
INLINE_MEANS_BYTES = 1 << 20

#: Most bytes of per-chunk statistics a pass over held rows may send to the client, which
#: combines them (see ``stats_pass``): 8 chunks at k=64, d=32 send 0.3 MB. Beyond it (many
#: chunks, large k x d) the chunks' statistics are combined by tasks on the workers, as for
#: streamed rows, so that the client never receives a pass's worth of them.
HELD_GATHER_BYTES = 16 << 20

#: Chunks a task of a streamed pass reads one after the other, while the pass has chunks to
#: spare: each task costs the client, the scheduler and the worker messages and bookkeeping.
#: The last ``STREAMED_TAIL_TASKS_PER_THREAD`` chunks per worker thread (whole groups of the
#: reduction tree) stay one per task, and run last, so that the workers still finish
#: together. A pass over 105 chunks of 36M x 32 rows on two 512 MB workers: 39 tasks instead
#: of 105, 7.50 s instead of 7.76 and 14.71 s of CPU instead of 15.16 (medians of 5,
#: alternating in one cluster). With every chunk in tasks of 4, or the tasks of one chunk
#: run first (Dask's own order), the workers' last tasks ended up to 0.6 s apart.
STREAMED_CHUNKS_PER_TASK = 4
STREAMED_TAIL_TASKS_PER_THREAD = 8


@dataclass(frozen=True)
class DaskData:
    """Rows to cluster, as Dask arrays chunked by rows only.

    Attributes
    ----------
    X : dask.array.Array of shape (n, d)
    weights : dask.array.Array of shape (n,), optional
    xsq : dask.array.Array of shape (n,), optional
        Squared row norms, kept when X is persisted so they are computed once.
    source : ParquetDataset, optional
        The Parquet plan the rows come from, when they do.
    """

    X: da.Array
    weights: da.Array | None = None
    xsq: da.Array | None = None
    source: parquet_io.ParquetDataset | None = None
    #: Per chunk, the delayed (X block, weights block or None) straight from their read tasks:
    #: each block's graph is its own read, not the whole array's.
    read_blocks: tuple[tuple[Delayed, Delayed | None], ...] | None = field(
        default=None, repr=False, compare=False
    )
    #: Per chunk, (plan for tasks, chunk, dtype) of streamed data: a pass reads and reduces
    #: a chunk in one task (a third of the tasks of read, take and reduce).
    read_specs: tuple[tuple[Any, Any, Any], ...] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0,) + self.X.chunks[0][:-1]))

    @property
    def nbytes(self) -> int:
        return int(self.X.nbytes)

    @property
    def streamed(self) -> bool:
        """Whether every pass reads the chunks from Parquet (not persisted)."""
        return self.read_blocks is not None

    def blocks(self) -> list[tuple[Any, Any, Any, int]]:
        """Per chunk: (X block, weights block or None, xsq block or None, row offset).

        Built once per :class:`DaskData` and reused by every pass: ``to_delayed`` on an array
        of many chunks costs milliseconds per pass, and a block taken from the concatenated
        array drags the whole array's graph into every task of the pass (graph work that grew
        with the square of the number of chunks).
        """
        return list(self._blocks)

    @cached_property
    def _blocks(self) -> tuple[tuple[Any, Any, Any, int], ...]:
        if self.read_blocks is not None and self.xsq is None:
            return tuple(
                (x, w, None, off)
                for (x, w), off in zip(self.read_blocks, self.offsets, strict=True)
            )
        xs = self.X.to_delayed().ravel().tolist()
        ws = self.weights.to_delayed().ravel().tolist() if self.weights is not None else None
        qs = self.xsq.to_delayed().ravel().tolist() if self.xsq is not None else None
        return tuple(
            (x, None if ws is None else ws[i], None if qs is None else qs[i], off)
            for i, (x, off) in enumerate(zip(xs, self.offsets, strict=True))
        )

    def persist(self) -> DaskData:
        """Hold the rows (and their squared norms) in the workers' memory."""
        if self.read_specs is not None:
            X, weights, xsq = self._read_with_norms()
        else:
            X, weights = self.X, self.weights
            xsq = X.map_blocks(kernel.row_sq_norms, drop_axis=1, dtype=np.float64)
        X, weights, xsq = dask.persist(X, weights, xsq, retries=RETRIES)
        return replace(self, X=X, weights=weights, xsq=xsq, read_blocks=None, read_specs=None)

    def _read_with_norms(self) -> tuple[da.Array, da.Array | None, da.Array]:
        """Rows read from Parquet, their weights and their squared norms, all three from one
        task per chunk that computes the norms of the rows it has just read.

        With a task of their own for the norms, run after the read on rows no longer in cache,
        loading 10M x 32 rows into two fresh workers took 2.8-3.6 s instead of 2.3-2.5 s.
        """
        assert self.read_specs is not None
        d, dtype = self.n_features, self.X.dtype
        token = tokenize(self.X.name)
        parts = [
            delayed(_read_chunk_with_norms, pure=True, nout=3)(
                *spec, dask_key_name=f"read-parquet-norms-{token}-{i}"
            )
            for i, spec in enumerate(self.read_specs)
        ]
        sizes = self.X.chunks[0]
        X = _from_parts(parts, 0, sizes, (d,), dtype)
        weights = None if self.weights is None else _from_parts(parts, 1, sizes, (), np.float64)
        return X, weights, _from_parts(parts, 2, sizes, (), np.float64)


def data_from_array(X: Any, sample_weight: Any = None, dtype: Any = None) -> DaskData:
    """Wrap a NumPy or Dask array (and optional weights) as row-chunked :class:`DaskData`."""
    if isinstance(X, da.Array):
        arr = X
    else:
        arr = np.asarray(X)
    if arr.ndim != 2:
        raise ValueError(f"X should be 2-dimensional, got shape {arr.shape}.")
    if not isinstance(arr, da.Array):
        arr = da.from_array(arr, chunks=(_default_rows(arr), -1))
    if dtype is not None:
        arr = arr.astype(dtype)
    elif arr.dtype not in (np.float32, np.float64):
        arr = arr.astype(np.float64)
    arr = arr.rechunk({1: -1})
    weights = None
    if sample_weight is not None:
        weights = (
            sample_weight
            if isinstance(sample_weight, da.Array)
            else da.from_array(np.asarray(sample_weight, dtype=np.float64), chunks=arr.chunks[0])
        )
        if weights.shape != (arr.shape[0],):
            raise ValueError(
                f"sample_weight has shape {weights.shape}; expected ({arr.shape[0]},)."
            )
        weights = weights.astype(np.float64).rechunk((arr.chunks[0],))
    return DaskData(X=arr, weights=weights)


def _default_rows(arr: np.ndarray) -> int:
    row_bytes = max(1, arr.itemsize * (arr.shape[1] if arr.ndim == 2 else 1))
    return max(1, min(len(arr), parquet_io.DEFAULT_CHUNK_BYTES // row_bytes))


def data_from_parquet(dataset: parquet_io.ParquetDataset, dtype: Any = "float32") -> DaskData:
    """Rows of a planned Parquet dataset as lazy Dask arrays: each compute reads the chunks.

    Chunk lengths come from the plan (the footers), so nothing is read here.
    """
    dtype = np.dtype(dtype)
    d = dataset.n_features
    token = dask.base.tokenize(
        dataset.files,
        dataset.file_rows,
        dataset.features,
        str(dtype),
        dataset.weight_column,
        [c.row_groups for c in dataset.chunks],
    )
    # every read task carries the plan without its chunk list: the list grows with the data,
    # and one copy of it per task made the graph grow with the square of the chunks
    slim = dataset.for_tasks()
    parts = [
        delayed(parquet_io.read_chunk, pure=True, nout=2)(
            slim, chunk, dtype, dask_key_name=f"read-parquet-{token}-{i}"
        )
        for i, chunk in enumerate(dataset.chunks)
    ]
    sizes = dataset.chunk_sizes()
    X = _from_parts(parts, 0, sizes, (d,), dtype)
    weights = None
    if dataset.weight_column is not None:
        weights = _from_parts(parts, 1, sizes, (), np.float64)
    read_blocks = tuple((p[0], None if weights is None else p[1]) for p in parts)
    read_specs = tuple((slim, chunk, dtype) for chunk in dataset.chunks)
    return DaskData(
        X=X, weights=weights, source=dataset, read_blocks=read_blocks, read_specs=read_specs
    )


def _from_parts(
    parts: Sequence[Delayed], j: int, sizes: Sequence[int], row_shape: tuple[int, ...], dtype: Any
) -> da.Array:
    """Output ``j`` of each chunk's delayed call, ``sizes[i]`` rows of ``row_shape`` from part
    ``i``, as one array chunked by rows."""
    return da.concatenate(
        [
            da.from_delayed(p[j], shape=(n, *row_shape), dtype=dtype)
            for p, n in zip(parts, sizes, strict=True)
        ]
    )


def tree_reduce(
    parts: Sequence[Delayed], combine: Callable[[T, T], T], split_every: int = 8
) -> Delayed:
    """Combine delayed partial results in a fixed tree: adjacent groups, in order, level by level."""
    if not parts:
        raise ValueError("nothing to reduce")
    name = "tree-reduce-" + tokenize(combine, [p.key for p in parts], split_every)
    tasks, root = _reduce_tasks(name, [p.key for p in parts], combine, split_every)
    if not tasks:
        return parts[0]
    graph = HighLevelGraph.from_collections(name, tasks, dependencies=list(parts))
    return Delayed(root, graph, layer=name)


def _reduce_tasks(
    prefix: str, keys: Sequence[Any], combine: Callable[[T, T], T], split_every: int = 8
) -> tuple[dict[str, Task], Any]:
    """The tasks of ``tree_reduce`` over the results at ``keys``, keyed ``prefix-level-i``,
    and the key of the root (``keys[0]`` when there is nothing to combine)."""
    tasks: dict[str, Task] = {}
    level = list(keys)
    depth = 0
    while len(level) > 1:
        above = []
        for i in range(0, len(level), split_every):
            key = f"{prefix}-{depth}-{i // split_every}"
            group = List(*(TaskRef(k) for k in level[i : i + split_every]))
            tasks[key] = Task(key, _combine_group, combine, group)
            above.append(key)
        level = above
        depth += 1
    return tasks, level[0]


def _reduce_in_order(
    items: Sequence[T], combine: Callable[[T, T], T], split_every: int = 8
) -> T:
    """Combine ``items`` here in the tree ``_reduce_tasks`` builds as tasks: adjacent groups,
    in order, level by level, so both round alike."""
    level = list(items)
    while len(level) > 1:
        level = [
            _combine_group(combine, level[i : i + split_every])
            for i in range(0, len(level), split_every)
        ]
    return level[0]


def _combine_group(combine: Callable[[T, T], T], items: Sequence[T]) -> T:
    result = items[0]
    for item in items[1:]:
        result = combine(result, item)
    return result


def _take_rows(
    X: np.ndarray, weights: np.ndarray | None, local: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None]:
    return X[local], None if weights is None else weights[local]


def gather_rows(data: DaskData, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows at the sorted global ``index`` and their weights (1 where unweighted).

    One task per chunk that holds a wanted row, each returning only those rows, so memory is
    bounded by a chunk on the workers and by the wanted rows on the client (Dask's own fancy
    indexing would shuffle whole chunks).
    """
    index = np.asarray(index, dtype=np.int64)
    bounds = np.cumsum((0,) + data.X.chunks[0])
    parts = []
    for i, (x, w, _, _) in enumerate(data.blocks()):
        lo, hi = np.searchsorted(index, [bounds[i], bounds[i + 1]])
        if hi > lo:
            parts.append(delayed(_take_rows, pure=True)(x, w, index[lo:hi] - bounds[i]))
    (taken,) = dask.compute(parts, retries=RETRIES)
    d = data.n_features
    rows = np.concatenate([t[0] for t in taken]) if taken else np.empty((0, d))
    if data.weights is None:
        weights = np.ones(len(rows))
    else:
        weights = np.concatenate([t[1] for t in taken]) if taken else np.empty(0)
    return np.asarray(rows, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def _chunk_stats_task(
    X: np.ndarray,
    weights: np.ndarray | None,
    xsq: np.ndarray | None,
    centers: np.ndarray,
    previous: np.ndarray | None,
    offset: int,
    n_far: int,
) -> ChunkStats:
    return kernel.chunk_stats(
        X, centers, weights=weights, xsq=xsq, previous=previous, offset=offset, n_far=n_far
    )


def _read_chunk_with_norms(
    dataset: parquet_io.ParquetDataset, chunk: parquet_io.Chunk, dtype: Any
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    X, weights = parquet_io.read_chunk(dataset, chunk, dtype)
    return X, weights, kernel.row_sq_norms(X)


def _read_chunk_stats_task(
    spec: tuple[Any, Any, Any],
    centers: np.ndarray,
    previous: np.ndarray | None,
    offset: int,
    n_far: int,
) -> ChunkStats:
    dataset, chunk, dtype = spec
    # the rows are needed for this pass only: read in place where they can be, else into the
    # thread's buffer, which the next chunk reuses rather than faulting in a new array
    if parquet_io.reads_in_place(dataset, dtype):
        X, weights = parquet_io.read_chunk(dataset, chunk, dtype, in_place=True)
    else:
        rows = kernel.thread_buffer("rows", (chunk.n_rows, dataset.n_features), dtype)
        X, weights = parquet_io.read_chunk(dataset, chunk, dtype, out=rows)
    try:
        return kernel.chunk_stats(
            X, centers, weights=weights, previous=previous, offset=offset, n_far=n_far,
            remember=False,  # X is this pass's only
        )
    except kernel.NonFiniteError as bad:
        raise parquet_io.non_finite_error(dataset, bad, chunk.path) from None


def release_buffers() -> None:
    """Free the kernel's per-thread buffers in this process and, when a Dask client is the
    default scheduler, in every worker: called when a fit's passes are done, or have failed,
    so that the workers go back to their baseline (kept, the streamed chunks' buffers made the
    label pass after a fit the workers' peak, at 82% of their limit).

    Best effort, and never raises: it runs while a failed fit's error propagates, which it
    must not replace; a worker that cannot be reached frees its buffers when it goes away.
    """
    kernel.release_thread_buffers()
    try:
        from distributed import default_client

        client = default_client()
    except (ImportError, ValueError):  # no distributed client: the passes ran in this process
        return
    if client.status != "running":
        return
    try:
        client.run(kernel.release_thread_buffers, on_error="ignore")
    except (OSError, TimeoutError):  # the scheduler went away (CommClosedError is an OSError)
        pass


def stats_pass(
    data: DaskData,
    centers: np.ndarray,
    *,
    previous: np.ndarray | None = None,
    n_far: int = 0,
) -> ChunkStats:
    """One pass: the reduced statistics of all rows for ``n_init`` sets of means.

    ``centers`` has shape (n_init, k, d). Exactly one ``dask.compute``, of one graph layer
    written out here, as ``dask.array``'s reductions do: built from delayed calls, the graph
    took 17 ms of the client's time per pass of 8 chunks, written out 5 ms (8 small chunks on
    2 workers: a pass's wall time 55-58 -> 45-49 ms). Each pass's keys are new, so a pass
    never asks for an earlier pass's result while the scheduler forgets it. The key of every
    kind of task starts with a name of its own (the scheduler groups tasks by that name, and
    sizes its queues by group: one name for all made a streamed pass 20-40% slower).

    Rows held in a distributed cluster's memory are reduced by one task per worker thread
    over the chunks that worker holds (``_held_groups``), and the client combines the tasks'
    per-chunk statistics (up to ``HELD_GATHER_BYTES`` of them): a pass's time beyond its
    busiest worker's computing went from 38 to 25 ms (median of 24 passes over 8 chunks of
    1.25M x 32 rows on 2 workers), the gaps between a worker's chunk tasks and the hop to a
    combining task gone. Rows streamed from Parquet are read by tasks of up to
    ``STREAMED_CHUNKS_PER_TASK`` chunks, then one chunk per task (``_streamed_tasks``); other
    rows by one task per chunk; both with a tree of combining tasks. All combine the chunks in
    the same fixed tree (``_reduce_tasks``, ``_reduce_in_order``), so which way a pass goes,
    and which task finishes first, never changes a bit of the result.
    """
    token = uuid.uuid4().hex
    tasks: dict[str, Any] = {}
    inputs: dict[str, DataNode] = {}  # the means, when they are not written into the tasks

    def data_node(key: str, value: np.ndarray) -> TaskRef:
        inputs[key] = DataNode(key, value)
        return TaskRef(key)

    n_init, k, d = np.shape(centers)
    per_chunk_bytes = 8 * n_init * (k * (d + 1) + n_far * (d + 2))  # sums, counts, far rows
    small = per_chunk_bytes * len(data.offsets) <= HELD_GATHER_BYTES
    groups = _held_groups(data) if small else None
    n_tasks = len(data.offsets) if groups is None else len(groups)
    means: Any = np.asarray(centers, dtype=np.float64)
    before: Any = None if previous is None else np.asarray(previous)
    copies = n_tasks * (means.nbytes + (0 if before is None else before.nbytes))
    if copies > INLINE_MEANS_BYTES:
        means = data_node(f"means-{token}", means)
        before = None if before is None else data_node(f"previous-means-{token}", before)
    keys = [f"chunk-stats-{token}-{i}" for i in range(n_tasks)]
    layer = f"stats-pass-{token}"
    dependencies: list[Delayed] = []
    if groups is not None:
        blocks = data.blocks()
        for key, group in zip(keys, groups, strict=True):
            x, w, q = (List(*(_ref(blocks[i][j]) for i in group)) for j in range(3))
            offsets = tuple(blocks[i][3] for i in group)
            tasks[key] = Task(key, _held_chunks_stats_task, x, w, q, offsets, means, before, n_far)
            dependencies += [b for i in group for b in blocks[i][:3] if b is not None]
        graph = HighLevelGraph.from_collections(layer, tasks | inputs, dependencies=dependencies)
        roots = [Delayed(key, graph, layer=layer) for key in keys]
        per_task = dask.compute(*roots, retries=RETRIES)
        per_chunk: list[Any] = [None] * len(data.offsets)
        for group, stats in zip(groups, per_task, strict=True):
            for i, s in zip(group, stats, strict=True):
                per_chunk[i] = s
        # the sums in the tree's order, the farthest rows chosen once from all chunks:
        # combine_stats's result, bit for bit, without a selection per pair (a pass over 400
        # held chunks of 5000 x 32 rows on 2 workers: 422 -> 352 ms, median of 6)
        total = _reduce_in_order(per_chunk, kernel.add_stats)
        return kernel.with_farthest(total, per_chunk)
    if data.read_specs is not None and data.xsq is None:
        ahead, combining, root = _streamed_tasks(token, data, means, before, n_far)
        tasks.update(combining)
        # the tasks of several chunks first, whatever order Dask gives the graph (it ran the
        # last chunks' first), so that the pass ends with tasks of one chunk
        graph = HighLevelGraph(
            {
                f"{layer}-inputs": MaterializedLayer(inputs),
                f"{layer}-ahead": MaterializedLayer(ahead, annotations={"priority": 1}),
                layer: MaterializedLayer(tasks),
            },
            {
                f"{layer}-inputs": set(),
                f"{layer}-ahead": {f"{layer}-inputs"},
                layer: {f"{layer}-inputs", f"{layer}-ahead"},
            },
        )
    else:
        for key, (x, w, q, off) in zip(keys, data.blocks(), strict=True):
            blocks = [_ref(b) for b in (x, w, q)]
            tasks[key] = Task(key, _chunk_stats_task, *blocks, means, before, off, n_far)
            dependencies += [b for b in (x, w, q) if b is not None]
        combining, root = _reduce_tasks(f"combine-stats-{token}", keys, kernel.combine_stats)
        tasks.update(combining)
        graph = HighLevelGraph.from_collections(layer, tasks | inputs, dependencies=dependencies)
    (total,) = dask.compute(Delayed(root, graph, layer=layer), retries=RETRIES)
    return total


def _ref(block: Delayed | None) -> TaskRef | None:
    return None if block is None else TaskRef(block.key)


def _streamed_tasks(
    token: str, data: DaskData, means: Any, before: Any, n_far: int, split_every: int = 8
) -> tuple[dict[str, Task], dict[str, Task], str]:
    """The tasks of a streamed pass, as the tasks of several chunks, the others, and the key
    of the root: tasks that each read up to ``STREAMED_CHUNKS_PER_TASK`` chunks in a row
    (never across a group of the reduction tree), one chunk per task for the pass's tail
    (``_streamed_batches``), and the tree of ``_reduce_tasks`` over the chunks, its first
    level taking the tasks' lists of per-chunk statistics: the same sums, in the same order,
    as one task per chunk."""
    assert data.read_specs is not None
    n = len(data.read_specs)
    batches = _streamed_batches(n, _cluster_threads(), split_every)
    ahead: dict[str, Task] = {}
    tasks: dict[str, Task] = {}
    first_level = []
    for g, lo in enumerate(range(0, n, split_every)):
        keys = []
        for a, b in batches[g]:
            key = f"chunk-stats-{token}-{a}"
            specs, offsets = data.read_specs[a:b], data.offsets[a:b]
            task = Task(key, _read_chunks_stats_task, specs, offsets, means, before, n_far)
            (ahead if b - a > 1 else tasks)[key] = task
            keys.append(key)
        key = f"combine-stats-{token}-first-{g}"
        lists = List(*(TaskRef(k) for k in keys))
        tasks[key] = Task(key, _combine_lists, kernel.combine_stats, lists)
        first_level.append(key)
    above, root = _reduce_tasks(f"combine-stats-{token}", first_level, kernel.combine_stats, split_every)
    tasks.update(above)
    return ahead, tasks, root


def _streamed_batches(
    n_chunks: int, threads: int | None, split_every: int = 8
) -> list[list[tuple[int, int]]]:
    """Per group of ``split_every`` chunks, the ranges of chunks ``[a, b)`` its tasks read:
    ``STREAMED_CHUNKS_PER_TASK`` at a time, but one at a time in the last groups, those that
    hold the last ``STREAMED_TAIL_TASKS_PER_THREAD * threads`` chunks (every group when the
    number of threads is unknown)."""
    tail = n_chunks if threads is None else STREAMED_TAIL_TASKS_PER_THREAD * threads
    batches = []
    for lo in range(0, n_chunks, split_every):
        hi = min(n_chunks, lo + split_every)
        step = 1 if hi > n_chunks - tail else STREAMED_CHUNKS_PER_TASK
        batches.append([(a, min(hi, a + step)) for a in range(lo, hi, step)])
    return batches


def _cluster_threads() -> int | None:
    """Worker threads of the default distributed client's cluster; None without one."""
    try:
        from distributed import default_client

        return sum(default_client().nthreads().values()) or None
    except (ImportError, ValueError):
        return None


def _read_chunks_stats_task(
    specs: Sequence[tuple[Any, Any, Any]],
    offsets: Sequence[int],
    centers: np.ndarray,
    previous: np.ndarray | None,
    n_far: int,
) -> list[ChunkStats]:
    # one chunk after the other: only one chunk's rows are alive at a time
    return [
        _read_chunk_stats_task(spec, centers, previous, off, n_far)
        for spec, off in zip(specs, offsets, strict=True)
    ]


def _combine_lists(combine: Callable[[T, T], T], lists: Sequence[Sequence[T]]) -> T:
    return _combine_group(combine, [item for items in lists for item in items])


def _held_chunks_stats_task(
    xs: Sequence[np.ndarray],
    ws: Sequence[np.ndarray | None],
    qs: Sequence[np.ndarray | None],
    offsets: Sequence[int],
    centers: np.ndarray,
    previous: np.ndarray | None,
    n_far: int,
) -> list[ChunkStats]:
    return [
        _chunk_stats_task(x, w, q, centers, previous, off, n_far)
        for x, w, q, off in zip(xs, ws, qs, offsets, strict=True)
    ]


def _held_groups(data: DaskData) -> list[list[int]] | None:
    """The chunks of each task of a pass over rows held in a distributed cluster's memory:
    per worker, its chunks split round robin among its threads. None (one task per chunk)
    unless every chunk of X is held by a live worker.

    Asked of the scheduler at every pass (two small requests, about 2 ms here), so that the
    tasks follow the chunks wherever the cluster moved them: a worker lost and its chunks
    recomputed elsewhere, chunks rebalanced. A chunk held by several workers counts for the
    one with the fewest chunks per thread so far.
    """
    if data.read_blocks is not None:
        return None
    try:
        from distributed import futures_of
    except ImportError:
        return None
    futures = futures_of(data.X)
    if not futures or futures[0].client.status != "running":
        return None
    client = futures[0].client
    held = {f.key for f in futures}
    keys = [x.key for x, _, _, _ in data.blocks()]
    if not held.issuperset(keys):
        return None
    who_has = client.who_has(futures)
    nthreads = client.nthreads()
    taken = dict.fromkeys(nthreads, 0)
    by_worker: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        holders = [a for a in who_has.get(key, ()) if a in nthreads]
        if not holders:
            return None  # being recomputed: the scheduler places this pass chunk by chunk
        worker = min(holders, key=lambda a: (taken[a] / nthreads[a], a))
        taken[worker] += 1
        by_worker.setdefault(worker, []).append(i)
    groups = []
    for worker, chunks in by_worker.items():
        threads = max(1, min(nthreads[worker], len(chunks)))
        groups += [chunks[t::threads] for t in range(threads)]
    return groups


def _empty_label_stats(k: int, d: int) -> ChunkStats:
    return ChunkStats(
        sums=np.zeros((1, k, d)), counts=np.zeros((1, k)), loss=np.zeros(1),
        changed=np.full(1, -1, dtype=np.int64), far_dist=np.zeros((1, 0)),
        far_rows=np.zeros((1, 0, d)), far_index=np.zeros((1, 0), dtype=np.int64),
    )  # fmt: skip


def _add_labelled(
    stats: ChunkStats, labels: np.ndarray, dist: np.ndarray, weights: np.ndarray | None
) -> None:
    w = np.ones(len(labels)) if weights is None else weights
    stats.counts[0] += np.bincount(labels, weights=w, minlength=stats.counts.shape[1])
    stats.loss[0] += float(np.dot(w, dist))
    stats.n_rows += len(labels)


def _label_file_task(
    dataset: parquet_io.ParquetDataset,
    file_index: int,
    centers: np.ndarray,
    dtype: Any,
    out_dir: str,
) -> ChunkStats:
    """Label one input file in bounded batches, appending each to its output file as it goes;
    return the file's counts and loss."""
    stats = _empty_label_stats(*centers.shape)
    in_place = parquet_io.reads_in_place(dataset, dtype)
    batches = parquet_io.iter_labelled_batches(dataset, file_index, dtype, in_place=in_place)
    with parquet_io.LabelledFileWriter(dataset, file_index, out_dir) as writer:
        for X, weights, passthrough in batches:
            try:
                labels, dist = kernel.assign_labels(X, centers)
            except kernel.NonFiniteError as bad:
                raise parquet_io.non_finite_error(dataset, bad, dataset.files[file_index]) from None
            del X
            writer.write(passthrough, labels, dist)
            _add_labelled(stats, labels, dist, weights)
    return stats


def _chunk_labels_task(
    X: np.ndarray, xsq: np.ndarray, centers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return kernel.assign_labels(X, centers, xsq)


def _write_labels_task(
    dataset: parquet_io.ParquetDataset,
    file_index: int,
    parts: Sequence[tuple[np.ndarray, np.ndarray]],
    k: int,
    out_dir: str,
) -> ChunkStats:
    """Write one input file's labelled copy from its chunks' (labels, distances), in order,
    reading only its other columns; return the file's counts and loss."""
    stats = _empty_label_stats(k, dataset.n_features)
    part, pos = 0, 0
    with parquet_io.LabelledFileWriter(dataset, file_index, out_dir) as writer:
        for _, weights, passthrough in parquet_io.iter_labelled_batches(
            dataset, file_index, features=False
        ):
            # chunks are whole row groups, so a row group never straddles two parts
            while pos == len(parts[part][0]):
                part, pos = part + 1, 0
            end = pos + passthrough.num_rows
            labels, dist = parts[part][0][pos:end], parts[part][1][pos:end]
            pos = end
            writer.write(passthrough, labels, dist)
            _add_labelled(stats, labels, dist, weights)
    return stats


#: Bytes per row of a file's labels and distances, which the task writing the file holds.
_LABEL_ROW_BYTES = 12


def label_files(
    dataset: parquet_io.ParquetDataset,
    centers: np.ndarray,
    out_dir: str,
    dtype: Any = "float32",
    data: DaskData | None = None,
) -> ChunkStats:
    """The final pass: write one labelled Parquet file per input file, in parallel on the
    workers, and return the cluster sizes and inertia of ``centers`` over all rows.

    Each file is streamed in bounded batches (``parquet_io.iter_labelled_batches``) and written
    incrementally, so a worker's memory does not grow with the size of a file or a row group.
    A task that fails is rerun (``RETRIES``) and rewrites its whole output file.

    With ``data``, the same rows held in the workers' memory (persisted, planned as
    ``dataset``'s chunks), the labels are computed there, chunk by chunk where each chunk is,
    and the writing tasks read only the columns that are not features; unless a file's labels
    would take more than ``parquet_io.DEFAULT_CHUNK_BYTES``.
    """
    os.makedirs(out_dir, exist_ok=True)
    centers_key = delayed(np.asarray(centers, dtype=np.float64), pure=True)
    slim = dataset.for_tasks()
    held = (
        data is not None
        and not data.streamed
        and data.xsq is not None
        and tuple(data.X.chunks[0]) == dataset.chunk_sizes()
        and max(dataset.file_rows, default=0) * _LABEL_ROW_BYTES <= parquet_io.DEFAULT_CHUNK_BYTES
    )
    if held:
        assert data is not None
        by_file: list[list[Delayed]] = [[] for _ in dataset.files]
        for chunk, (x, _, q, _) in zip(dataset.chunks, data.blocks(), strict=True):
            by_file[chunk.file_index].append(
                delayed(_chunk_labels_task, pure=True)(x, q, centers_key)
            )
        parts = [
            delayed(_write_labels_task, pure=False)(slim, i, by_file[i], len(centers), out_dir)
            for i in range(len(dataset.files))
        ]
    else:
        parts = [
            delayed(_label_file_task, pure=False)(slim, i, centers_key, np.dtype(dtype), out_dir)
            for i in range(len(dataset.files))
        ]
    (total,) = dask.compute(tree_reduce(parts, kernel.combine_stats), retries=RETRIES)
    return total


#: Share of the workers' total memory limit that persisted data may take; the rest is for the
#: pass's temporaries (a chunk's distance blocks, labels, Arrow buffers) and Dask itself.
PERSIST_FRACTION = 0.5


#: Share of a task's memory budget its chunk may take. Reading and reducing a chunk was
#: measured to peak at about 1.5 times the chunk's size above the worker's idle memory (the
#: matrix, one row group's Arrow data at a time, the kernel's per-row arrays; pyarrow 26 with
#: jemalloc, 8-32 MiB chunks of 8 MiB row groups), and an idle worker sits some 35 MiB above
#: the baseline the budget is measured from; half the budget covers both.
CHUNK_SHARE = 0.5


def chunk_bytes_for(memory_per_thread: int) -> int:
    """Target chunk size for tasks that may each use ``memory_per_thread`` bytes:
    ``CHUNK_SHARE`` of it, at least 1 MiB and at most ``parquet_io.DEFAULT_CHUNK_BYTES``.

    Larger chunks mean fewer tasks per pass (a streamed pass of 8M x 32 float32 on two
    450 MB workers: 128 tasks of 8 MiB took 1.2 times as long as 64 of 16 MiB).
    """
    if memory_per_thread <= 0:
        return parquet_io.DEFAULT_CHUNK_BYTES
    share = int(memory_per_thread * CHUNK_SHARE)
    return int(min(max(share, 1 << 20), parquet_io.DEFAULT_CHUNK_BYTES))


def choose_cache(nbytes: int, memory_limit: int, cache: str = "auto") -> tuple[bool, str]:
    """Whether to hold the data in the workers' memory (True) or stream it from Parquet.

    ``memory_limit`` is the workers' total limit in bytes (0 when unknown or unlimited).
    Returns the choice and the reason, for the log.
    """
    size = f"{nbytes / 2**20:.1f} MiB"
    if cache == "memory":
        return True, f"forced; data {size}"
    if cache == "none":
        return False, f"forced; data {size}"
    if cache != "auto":
        raise ValueError(f"cache={cache!r} should be one of auto, memory, none.")
    if memory_limit <= 0:
        return True, f"data {size}, workers have no memory limit"
    budget = PERSIST_FRACTION * memory_limit
    if nbytes <= budget:
        return (
            True,
            f"data {size} fits in {PERSIST_FRACTION:.0%} of the workers' {memory_limit / 2**20:.0f} MiB",
        )
    return (
        False,
        f"data {size} exceeds {PERSIST_FRACTION:.0%} of the workers' {memory_limit / 2**20:.0f} MiB",
    )
