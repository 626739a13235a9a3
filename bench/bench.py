"""Side-by-side benchmark: kmeans-gd against scikit-learn, dask-ml and the machine's floor.

Run from the repository root::

    python bench/bench.py --rows 10000000 --dims 32 --k 64 --iters 10 --workers 2

The data (Gaussian blobs, float32) is generated once, chunk by chunk, into a ``.npy`` file under
``bench/data/`` and reused by later runs. Every method starts from the same initial means
(k-means++ on a sample) and runs a fixed number of Lloyd iterations with ``tol=0``:

(a) kmeans-gd ``pipeline.KMeans`` on a distributed ``LocalCluster`` (``--workers`` processes
    of one thread), the rows a Dask array persisted on the workers; per-iteration times from
    ``history_[i]['seconds']``, and each pass's busiest worker's summed chunk-task time from
    the scheduler's task stream (what (d) measures, for kmeans-gd's own tasks);
(b) scikit-learn ``KMeans(algorithm='lloyd', n_init=1)`` in this process, on ``--workers``
    threads (threadpoolctl); per iteration = total / ``n_iter_`` (sklearn also stops early on
    strict convergence: see n_iter);
(c) dask-ml ``KMeans`` on the same cluster (``--skip-daskml`` to skip it); per-iteration times
    from its "Lloyd loop" log records;
(d) the floor: the same float32 products ``(rows x d) @ (d x k)`` alone, and one read of every
    row, run on the workers over the persisted chunks, before and after (a); the faster kept.
    The products are also timed once between every two iterations of (a) (from its
    per-iteration callback, outside its timed iterations): this machine's speed drifts by
    20-40% over minutes, so the median of those, taken in the same minutes as (a)'s median
    iteration, is the like-for-like floor (``kmeans_gd_over_interleaved_floor``); the
    before/after best of 3 (``kmeans_gd_over_matmul_floor``) is the strictest. That one sums
    each chunk's fastest of 3 repeats, a lower envelope (at most any one pass's time of the
    products), against kmeans-gd's median iteration; kmeans-gd's fastest iteration against it
    (``kmeans_gd_best_over_matmul_floor``) compares best with best.

Inertia is computed the same way for every result: the float64 loss of its final means (labels
from a float64 product, each row's distance to its mean then summed exactly as ``(x - mu)^2``).
The table is printed and written as JSON to ``bench/results/<timestamp>.json``.

Other modes (``--mode``; each also runs as its own script, see its ``--help``):

* ``--mode e2e`` (bench/e2e.py): Parquet in to labels out, kmeans-gd's CLI against dask-ml;
* ``--mode scaling`` (bench/scaling.py): seconds per iteration against rows and workers, PNG;
* ``--mode streaming`` (bench/streaming.py): data several times the workers' memory limit,
  streamed from Parquet, against one plain pyarrow read;
* ``--mode quality`` (bench/quality.py): final inertia of kmeans-gd, scikit-learn and dask-ml
  on overlapping blobs of very unequal sizes and spreads, over several seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

GEN_ROWS = 1 << 20  # rows generated (and held in memory) at a time


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------


def data_path(data_dir: Path, rows: int, dims: int, centers: int, seed: int) -> Path:
    return data_dir / f"blobs-{rows}x{dims}-c{centers}-s{seed}-float32.npy"


def generate(path: Path, rows: int, dims: int, centers: int, seed: int) -> float:
    """Write Gaussian blobs (true centres uniform in [-10, 10]^d, unit spread) to ``path`` as a
    float32 ``.npy``, ``GEN_ROWS`` rows at a time. Returns the seconds spent (0 if cached)."""
    if path.exists():
        return 0.0
    started = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    truth = np.random.default_rng(seed).uniform(-10.0, 10.0, size=(centers, dims))
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows, dims))
    for i, lo in enumerate(range(0, rows, GEN_ROWS)):
        hi = min(lo + GEN_ROWS, rows)
        rng = np.random.default_rng([seed, i])
        block = truth[rng.integers(0, centers, size=hi - lo)]
        block += rng.standard_normal((hi - lo, dims))
        out[lo:hi] = block
    out.flush()
    del out
    os.replace(tmp, path)
    return time.perf_counter() - started


def parquet_data(
    data_dir: Path, rows: int, dims: int, centers: int, files: int, seed: int
) -> tuple[Path, float]:
    """The same kind of blobs as Parquet (columns ``id``, ``x0 .. x{d-1}``, float32), written
    once with ``pipeline.generate.generate_blobs`` (one row group at a time, bounded memory)
    into ``data_dir/parquet-<rows>x<dims>-c<centers>-f<files>-s<seed>/`` and reused. Returns
    the directory and the seconds spent generating it (0 if cached)."""
    from pipeline.generate import generate_blobs

    path = data_dir / f"parquet-{rows}x{dims}-c{centers}-f{files}-s{seed}"
    if path.exists():
        return path, 0.0
    started = time.perf_counter()
    generate_blobs(path, rows=rows, dims=dims, centers=centers, files=files, seed=seed)
    return path, time.perf_counter() - started


def initial_means(path: Path, k: int, seed: int) -> np.ndarray:
    """k-means++ (scikit-learn's) on a uniform sample of at most 100 000 rows, float64."""
    from sklearn.cluster import kmeans_plusplus

    X = np.load(path, mmap_mode="r")
    rng = np.random.default_rng(seed)
    size = min(len(X), max(100_000, 50 * k))
    index = np.sort(rng.choice(len(X), size=size, replace=False))
    sample = np.asarray(X[index], dtype=np.float64)
    centers, _ = kmeans_plusplus(sample, k, random_state=seed)
    return centers


def _load_rows(path: str, lo: int, hi: int) -> np.ndarray:
    return np.array(np.load(path, mmap_mode="r")[lo:hi])


def persisted_array(
    client: Any, path: Path, chunk_rows: int, rows: int | None = None
) -> tuple[Any, list[int]]:
    """The rows (the first ``rows`` of the file, default all) as a Dask array whose chunks are
    loaded on the workers, round robin, and held there. Returns the array and how many chunks
    each worker holds."""
    import dask.array as da
    import distributed

    X = np.load(path, mmap_mode="r")
    n, d = X.shape
    n = n if rows is None else min(rows, n)
    workers = sorted(client.scheduler_info()["workers"])
    futures = [
        client.submit(_load_rows, str(path), lo, min(lo + chunk_rows, n),
                      workers=[workers[i % len(workers)]], allow_other_workers=False,
                      key=f"bench-rows-{path.stem}-{n}-{chunk_rows}-{i}", pure=False)
        for i, lo in enumerate(range(0, n, chunk_rows))
    ]  # fmt: skip
    distributed.wait(futures)
    arr = da.concatenate(
        [
            da.from_delayed(f, shape=(min(lo + chunk_rows, n) - lo, d), dtype=np.float32)
            for f, lo in zip(futures, range(0, n, chunk_rows), strict=True)
        ]
    )
    held = client.has_what()
    counts = [
        sum(1 for key in held.get(w, ()) if str(key).startswith("bench-rows-")) for w in workers
    ]
    return arr, counts


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------


class Poller:
    """Calls ``_sample`` on a thread every ``interval`` seconds while the ``with`` block runs,
    and once at each end, so that a peak is never missed at the edges."""

    interval = 0.02

    def _sample(self) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> Self:
        self._stop = threading.Event()
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


class MemorySampler(Poller):
    """Peak RSS of this process and of the worker processes, sampled every 20 ms."""

    def __init__(self, worker_pids: list[int]) -> None:
        import psutil

        self._gone = psutil.Error
        self._main = psutil.Process()
        self._workers = [psutil.Process(p) for p in worker_pids]
        self.main_peak = 0
        self.workers_peak = 0  # largest sum over workers at one instant
        self.worker_peaks = [0] * len(self._workers)

    def _sample(self) -> None:
        self.main_peak = max(self.main_peak, self._main.memory_info().rss)
        total = 0
        for i, p in enumerate(self._workers):
            try:
                rss = p.memory_info().rss
            except self._gone:  # a worker restarted or went away
                rss = 0
            self.worker_peaks[i] = max(self.worker_peaks[i], rss)
            total += rss
        self.workers_peak = max(self.workers_peak, total)

    def as_dict(self) -> dict[str, float]:
        mb = 2.0**20
        return {
            "main_rss_peak_mb": round(self.main_peak / mb, 1),
            "workers_rss_peak_mb": round(self.workers_peak / mb, 1),
            "worker_rss_peaks_mb": [round(p / mb, 1) for p in self.worker_peaks],
        }


class ProcessTreeSampler(Poller):
    """Peak RSS of a process (e.g. a ``kmeans-gd fit`` subprocess) and of every descendant,
    sampled every 50 ms, from outside. Dask worker processes are the ones started through
    ``multiprocessing.spawn``; counting the distinct ones seen tells whether a worker was
    restarted (a restarted worker is a new process).

    The tree itself is looked up every ``tree_interval`` (1 s): finding a process's
    descendants reads the parent of every process on the machine, 2.5 ms of CPU here, which
    every 50 ms took 5% of a core from the run measured (the other tool's run is not sampled
    from outside); a process's RSS alone is one small read.
    """

    def __init__(self, pid: int, interval: float = 0.05, tree_interval: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self._root = psutil.Process(pid)
        self.interval = interval
        self.tree_interval = tree_interval
        self._procs: list[Any] = [self._root]
        self._tree_at = -math.inf
        self.peaks: dict[int, int] = {}
        self.is_worker: dict[int, bool] = {}
        self.root_peak = 0
        self.workers_sum_peak = 0

    def _sample(self) -> None:
        psutil = self._psutil
        now = time.monotonic()
        if now - self._tree_at >= self.tree_interval:
            try:
                self._procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            self._tree_at = now
            for proc in self._procs:
                # asked again until it is one: right after the fork a new worker's command
                # line is not yet its own (a worker was once never counted)
                if not self.is_worker.get(proc.pid):
                    with contextlib.suppress(psutil.Error):
                        cmd = " ".join(proc.cmdline())
                        self.is_worker[proc.pid] = "spawn_main" in cmd and "resource_tracker" not in cmd
        workers_sum = 0
        for proc in self._procs:
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                continue
            self.peaks[proc.pid] = max(self.peaks.get(proc.pid, 0), rss)
            if proc.pid == self._root.pid:
                self.root_peak = max(self.root_peak, rss)
            elif self.is_worker.get(proc.pid):
                workers_sum += rss
        self.workers_sum_peak = max(self.workers_sum_peak, workers_sum)

    def worker_peaks(self) -> list[int]:
        """Peak RSS of every worker process seen, in order of first sighting."""
        return [self.peaks[pid] for pid, w in self.is_worker.items() if w and pid in self.peaks]

    def as_dict(self) -> dict[str, Any]:
        mb = 2.0**20
        return {
            "main_rss_peak_mb": round(self.root_peak / mb, 1),
            "workers_rss_peak_mb": round(self.workers_sum_peak / mb, 1),
            "worker_rss_peaks_mb": [round(p / mb, 1) for p in self.worker_peaks()],
            "worker_processes_seen": len(self.worker_peaks()),
        }


def _chunk_inertia(X: np.ndarray, centers: np.ndarray) -> float:
    """Float64 loss of ``centers`` over one chunk: nearest mean from a float64 product, then
    the distance to it as the sum of squared differences."""
    total = 0.0
    csq = (centers**2).sum(axis=1)
    for lo in range(0, len(X), 65536):
        x = X[lo : lo + 65536].astype(np.float64)
        labels = np.argmin(csq[None, :] - 2.0 * (x @ centers.T), axis=1)
        total += math.fsum(((x - centers[labels]) ** 2).sum(axis=1))
    return total


def exact_inertia(X: Any, centers: np.ndarray) -> float:
    import dask
    from dask import delayed

    c = delayed(np.asarray(centers, dtype=np.float64), pure=True)
    parts = [delayed(_chunk_inertia, pure=True)(b, c) for b in X.to_delayed().ravel()]
    return math.fsum(dask.compute(*parts))


def exact_inertias(X: Any, centers: dict[str, np.ndarray]) -> dict[str, float]:
    """``exact_inertia`` of several sets of means in one pass (each chunk read once)."""
    import dask
    from dask import delayed

    blocks = X.to_delayed().ravel()
    parts = {
        name: [delayed(_chunk_inertia, pure=True)(b, delayed(np.asarray(c, dtype=np.float64)))
               for b in blocks]
        for name, c in centers.items()
    }  # fmt: skip
    (done,) = dask.compute(parts)
    return {name: math.fsum(v) for name, v in done.items()}


def _matmul_task(X: np.ndarray, C: np.ndarray, block: int, reps: int) -> float:
    """Best-of-``reps`` seconds of the float32 products of one chunk with C (k, d)."""
    best = math.inf
    CT = C.T
    if block:
        G = np.empty((min(block, len(X)), len(C)), dtype=X.dtype)
    for _ in range(reps):
        t = time.perf_counter()
        if block:
            for lo in range(0, len(X), block):
                np.matmul(X[lo : lo + block], CT, out=G[: min(block, len(X) - lo)])
        else:
            np.matmul(X, CT)
        best = min(best, time.perf_counter() - t)
    return best


def _read_task(X: np.ndarray, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        X.sum(axis=0)
        best = min(best, time.perf_counter() - t)
    return best


def _timed_on_worker(fn: Any, X: np.ndarray, *args: Any) -> tuple[float, str]:
    from distributed import get_worker

    return fn(X, *args), get_worker().address


def worker_floor(client: Any, X: Any, fn: Any, *args: Any) -> dict[str, float]:
    """Run ``fn(chunk, *args)`` (returning its own seconds) on every chunk where it lives.
    ``seconds``: the busiest worker's summed task time (pure compute, no scheduling);
    ``wall``: the wall time of the whole dask compute."""
    import dask
    from dask import delayed

    tasks = [delayed(_timed_on_worker, pure=False)(fn, b, *args) for b in X.to_delayed().ravel()]
    t = time.perf_counter()
    done = dask.compute(*tasks)
    wall = time.perf_counter() - t
    per_worker: dict[str, float] = {}
    for seconds, owner in done:
        per_worker[owner] = per_worker.get(owner, 0.0) + seconds
    return {"seconds": max(per_worker.values()), "wall": wall,
            "sum": float(sum(s for s, _ in done))}  # fmt: skip


def summary(times: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(times),
        "min": min(times),
        "max": max(times),
    }


class _LloydTimes(logging.Handler):
    """Collects dask-ml's per-iteration 'Finished Lloyd loop N. in H:MM:SS.ffffff' records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.seconds: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Finished %s in %s" and str(record.args[0]).startswith("Lloyd loop"):
            self.seconds.append(record.args[1].total_seconds())


@contextlib.contextmanager
def _captured_lloyd_times() -> Iterator[_LloydTimes]:
    logger = logging.getLogger("dask_ml.cluster.k_means")
    handler = _LloydTimes()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _warm_up(k: int, d: int) -> None:
    """Load (or compile) the numba code of kmeans-gd and dask-ml in a worker."""
    from pipeline import kernel

    rng = np.random.default_rng(0)
    X = rng.standard_normal((1000, d)).astype(np.float32)
    C = rng.standard_normal((1, k, d))
    kernel.chunk_stats(X, C, n_far=k)
    kernel.chunk_stats(X, C, previous=C + 0.1, n_far=k)
    try:
        from dask_ml.cluster.k_means import _centers_dense

        _centers_dense(X, np.zeros(len(X), dtype=np.int32), k)
    except ImportError:
        pass


# ------------------------------------------------------------------------------------------
# the methods
# ------------------------------------------------------------------------------------------


def run_kmeans_gd(
    X: Any, init: np.ndarray, max_iter: int, between: Callable[[Any], None] | None = None
) -> dict[str, Any]:
    """kmeans-gd's fit; ``between(report)``, if given, runs after every iteration, outside the
    iteration's own time and taken out of the total."""
    from pipeline import KMeans

    outside = 0.0

    def on_iteration(report: Any) -> None:
        nonlocal outside
        assert between is not None
        t = time.perf_counter()
        between(report)
        outside += time.perf_counter() - t

    from distributed import get_task_stream

    km = KMeans(n_clusters=len(init), init=init, max_iter=max_iter, tol=0.0,
                on_iteration=on_iteration if between is not None else None)  # fmt: skip
    with get_task_stream() as stream:
        t = time.perf_counter()
        km.fit(X)
        total = time.perf_counter() - t - outside
    per_iter = [float(rec["seconds"]) for rec in km.history_]
    return {
        "centers": km.cluster_centers_,
        "max_iter": max_iter,
        "n_iter": int(km.n_iter_),
        "steps": int(km.n_iter_) - 1,
        "total": total,
        "per_iter": per_iter,
        "stop_reason": km.stop_reason_,
        "own_inertia": float(km.inertia_),
        "busiest_tasks_per_iter": _busiest_chunk_tasks(stream.data),
    }


def _busiest_chunk_tasks(records: list[dict[str, Any]]) -> list[float]:
    """Per pass of a fit, the busiest worker's summed compute time of its chunk tasks (keys
    ``chunk-stats-<pass>-<i>``, one per chunk or, for held rows, per worker thread over its
    chunks; see ``pipeline.passes.stats_pass``), from the scheduler's task stream: what the
    matmul floor measures (the busiest worker's summed task time), for kmeans-gd's own tasks.
    The iteration's time minus it is Dask's: the pass's scheduling, the gaps between a
    worker's tasks, the reduction, the result to the client (and the step)."""
    busy: dict[str, dict[str, float]] = {}
    for rec in records:
        key = str(rec["key"])
        if not key.startswith("chunk-stats-"):
            continue
        per_worker = busy.setdefault(key.rsplit("-", 1)[0], {})
        for span in rec["startstops"]:
            if span["action"] == "compute":
                per_worker[rec["worker"]] = per_worker.get(rec["worker"], 0.0) + (
                    span["stop"] - span["start"]
                )
    return [max(w.values()) for w in busy.values()]


def run_sklearn(X: np.ndarray, init: np.ndarray, iters: int, threads: int) -> dict[str, Any]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=threads):
        km = KMeans(n_clusters=len(init), algorithm="lloyd", init=init, n_init=1,
                    max_iter=iters, tol=0.0)  # fmt: skip
        t = time.perf_counter()
        km.fit(X)
        total = time.perf_counter() - t
        # the fixed cost of one fit (input checks, the final labelling pass): a 1-iteration fit
        one = KMeans(n_clusters=len(init), algorithm="lloyd", init=init, n_init=1,
                     max_iter=1, tol=0.0)  # fmt: skip
        t = time.perf_counter()
        one.fit(X)
        total_one = time.perf_counter() - t
    n_iter = int(km.n_iter_)
    return {
        "centers": km.cluster_centers_.astype(np.float64),
        "n_iter": n_iter,
        "total": total,
        "per_iter": [total / n_iter] * n_iter,
        "marginal_per_iter": (total - total_one) / (n_iter - 1) if n_iter > 1 else None,
        "own_inertia": float(km.inertia_),
    }


def run_daskml(X: Any, init: np.ndarray, iters: int) -> dict[str, Any]:
    from dask_ml.cluster import KMeans

    km = KMeans(n_clusters=len(init), init=init.astype(np.float32), max_iter=iters, tol=0.0)
    with _captured_lloyd_times() as lloyd:
        t = time.perf_counter()
        km.fit(X)
        total = time.perf_counter() - t
    n_iter = int(km.n_iter_)
    per_iter = lloyd.seconds[:n_iter] or [total / n_iter] * n_iter
    return {
        "centers": np.asarray(km.cluster_centers_, dtype=np.float64),
        "n_iter": n_iter,
        "total": total,
        "per_iter": per_iter,
        "own_inertia": float(km.inertia_),
    }


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------


def fmt(v: Any, p: str = ".3f") -> str:
    """A table cell: ``v`` formatted with ``p``, or '-' when missing."""
    return "-" if v is None else format(v, p)


def aligned_table(lines: list[tuple[str, ...]], *, first_left: bool = True) -> str:
    """Rows of cells (the first is the header) as aligned text columns, a rule under the
    header; the first column left-aligned unless ``first_left`` is false, the others right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for j, line in enumerate(lines):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 and first_left else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt_table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "n_iter", "s/iter med", "min", "max", "total s", "x kmeans-gd",
            "main RSS MB", "workers RSS MB", "inertia", "rel. inertia")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append((
            r["method"], fmt(r.get("n_iter"), "d"), fmt(r["s_per_iter"]["median"]),
            fmt(r["s_per_iter"]["min"]), fmt(r["s_per_iter"]["max"]), fmt(r.get("total"), ".2f"),
            fmt(r.get("ratio_to_kmeans_gd"), ".2f"), fmt(r.get("main_rss_peak_mb"), ".0f"),
            fmt(r.get("workers_rss_peak_mb"), ".0f"), fmt(r.get("inertia"), ".6e"),
            fmt(r.get("inertia_rel_to_kmeans_gd"), "+.1e"),
        ))  # fmt: skip
    return aligned_table(lines)


MODES = {
    "iter": "per-iteration time against scikit-learn, dask-ml and the floor (this module)",
    "e2e": "end to end, Parquet in to labels out, kmeans-gd's CLI against dask-ml (bench/e2e.py)",
    "scaling": "seconds per iteration against rows and workers, table and PNG (bench/scaling.py)",
    "streaming": "larger than the workers' memory, streamed from Parquet (bench/streaming.py)",
    "quality": "final inertia on unequal overlapping blobs, against scikit-learn and dask-ml "
    "(bench/quality.py)",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--mode", choices=list(MODES), default="iter")
    mode, rest = pre.parse_known_args(argv)
    if mode.mode != "iter":
        import importlib

        sys.path.insert(0, str(HERE))
        module = importlib.import_module({"e2e": "e2e", "scaling": "scaling",
                                          "streaming": "streaming", "quality": "quality"}[mode.mode])  # fmt: skip
        return int(module.main(rest) or 0)

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="modes: " + "; ".join(f"{m}: {what}" for m, what in MODES.items()),
    )
    p.add_argument(
        "--mode",
        choices=list(MODES),
        default="iter",
        help="iter (default), e2e, scaling, streaming or quality; see each mode's --help",
    )
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--centers",
        type=int,
        default=None,
        help="true blob centres (default: 16 k, so Lloyd needs ~100 iterations)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="rows per Dask chunk (default: as many chunks as kmeans-gd's 64 MiB "
        "chunks would make, rounded up to a multiple of --workers, equal sizes)",
    )
    p.add_argument(
        "--literal-max-iter",
        action="store_true",
        help="run kmeans-gd with max_iter=iters (iters passes, iters-1 steps) instead "
        "of iters+1 (iters steps, as scikit-learn and dask-ml make)",
    )
    p.add_argument("--skip-daskml", action="store_true")
    p.add_argument("--skip-sklearn", action="store_true")
    p.add_argument("--floor-reps", type=int, default=3)
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)

    from pipeline import parquet_io
    from pipeline.cluster import LocalClusterSpec, dask_client

    started = _dt.datetime.now()
    load_start = os.getloadavg()
    n, d, k = args.rows, args.dims, args.k
    centers = args.centers or 16 * k
    if args.chunk_rows:
        chunk_rows = args.chunk_rows
    else:
        n_chunks = -(-n // max(1, parquet_io.DEFAULT_CHUNK_BYTES // (4 * d)))
        n_chunks = -(-n_chunks // args.workers) * args.workers
        chunk_rows = -(-n // n_chunks)
    gd_max_iter = args.iters if args.literal_max_iter else args.iters + 1
    path = data_path(args.data_dir, n, d, centers, args.seed)
    gen_seconds = generate(path, n, d, centers, args.seed)
    print(
        f"data: {path} ({n} x {d} float32, {n * d * 4 / 2**30:.2f} GiB)"
        + (f", generated in {gen_seconds:.1f} s" if gen_seconds else ", cached"),
        flush=True,
    )
    init = initial_means(path, k, args.seed)
    flops = 2.0 * n * d * k

    results: dict[str, dict[str, Any]] = {}
    floors: dict[str, dict[str, float]] = {}
    spec = LocalClusterSpec(n_workers=args.workers, threads_per_worker=1)
    with dask_client(spec) as client:
        pids = list(client.run(os.getpid).values())
        client.run(_warm_up, k, d)
        with MemorySampler(pids) as mem:
            X, held = persisted_array(client, path, chunk_rows)
        print(
            f"cluster: {args.workers} workers x 1 thread; {X.numblocks[0]} chunks of "
            f"{chunk_rows} rows, per worker {held}; load {mem.as_dict()}",
            flush=True,
        )

        # (d) the floor, on the workers, over the persisted chunks; measured before and after
        # kmeans-gd (this VM's speed drifts over minutes) and the fastest kept, which can only
        # make kmeans-gd's ratio to it larger
        C32 = init.astype(np.float32)
        floor_tasks = [
            ("matmul (blocks of 2048 rows)", _matmul_task, (C32, 2048, args.floor_reps)),
            ("matmul (one per chunk)", _matmul_task, (C32, 0, args.floor_reps)),
            ("read pass (X.sum(axis=0))", _read_task, (args.floor_reps,)),
        ]
        for name, fn, fargs in floor_tasks:
            floors[name] = worker_floor(client, X, fn, *fargs)
            print(f"floor {name}: {floors[name]}", flush=True)

        # (a) kmeans-gd, the products timed once between every two of its iterations
        interleaved: list[float] = []

        # X bound as a default: main deletes its X before returning, which a closure would see
        def floor_between(_report: Any, rows: Any = X) -> None:
            interleaved.append(worker_floor(client, rows, _matmul_task, C32, 2048, 1)["seconds"])

        with MemorySampler(pids) as mem:
            results["kmeans-gd"] = run_kmeans_gd(X, init, gd_max_iter, floor_between)
        results["kmeans-gd"].update(mem.as_dict())
        print(f"kmeans-gd: {results['kmeans-gd']['total']:.2f} s", flush=True)

        for name, fn, fargs in floor_tasks:
            again = worker_floor(client, X, fn, *fargs)
            print(f"floor {name} again: {again}", flush=True)
            floors[name]["before_and_after"] = [floors[name]["seconds"], again["seconds"]]
            if again["seconds"] < floors[name]["seconds"]:
                floors[name].update(again)

        # (c) dask-ml
        if not args.skip_daskml:
            with MemorySampler(pids) as mem:
                results["dask-ml"] = run_daskml(X, init, args.iters)
            results["dask-ml"].update(mem.as_dict())
            print(f"dask-ml: {results['dask-ml']['total']:.2f} s", flush=True)

        for r in results.values():
            r["inertia"] = exact_inertia(X, r["centers"])
        workers_info = {
            "n_workers": args.workers, "threads_per_worker": 1, "chunks_per_worker": held,
            "chunk_rows": chunk_rows, "n_chunks": int(X.numblocks[0]),
        }  # fmt: skip
        del X

    # (b) scikit-learn, in this process, after the cluster is gone
    blas: list[dict[str, Any]] = []
    if not args.skip_sklearn:
        from threadpoolctl import threadpool_info, threadpool_limits

        Xnp = np.load(path)  # float32, C-contiguous
        with MemorySampler([]) as mem:
            results["scikit-learn"] = run_sklearn(Xnp, init, args.iters, args.workers)
        results["scikit-learn"].update(mem.as_dict())
        results["scikit-learn"]["workers_rss_peak_mb"] = None
        results["scikit-learn"]["inertia"] = _chunk_inertia(Xnp, results["scikit-learn"]["centers"])
        print(f"scikit-learn: {results['scikit-learn']['total']:.2f} s", flush=True)
        # the products alone with BLAS on --workers threads in this process, for comparison
        with threadpool_limits(limits=args.workers):
            floors["matmul, this process, BLAS x threads"] = {
                "seconds": _matmul_task(Xnp, init.astype(np.float32), 16384, args.floor_reps)
            }
            blas = threadpool_info()
        del Xnp

    # the table
    base = results["kmeans-gd"]
    base_med = statistics.median(base["per_iter"])
    rows = []
    for name, r in results.items():
        s = summary(r["per_iter"])
        rows.append({
            "method": name, "n_iter": r["n_iter"], "s_per_iter": s, "total": r["total"],
            "ratio_to_kmeans_gd": s["median"] / base_med,
            "main_rss_peak_mb": r.get("main_rss_peak_mb"),
            "workers_rss_peak_mb": r.get("workers_rss_peak_mb"),
            "inertia": r["inertia"],
            "inertia_rel_to_kmeans_gd": (r["inertia"] - base["inertia"]) / base["inertia"],
        })  # fmt: skip
    for name, fl in floors.items():
        secs = fl["seconds"]
        rows.append({
            "method": f"floor: {name}", "s_per_iter": {"median": secs, "min": secs, "max": secs},
            "ratio_to_kmeans_gd": secs / base_med, "total": None,
        })  # fmt: skip
    tasks = summary(base["busiest_tasks_per_iter"])
    rows.append({
        "method": f"kmeans-gd: chunk tasks of the busiest worker (x{len(base['busiest_tasks_per_iter'])})",
        "s_per_iter": tasks, "ratio_to_kmeans_gd": tasks["median"] / base_med, "total": None,
    })  # fmt: skip
    between = summary(interleaved)
    rows.append({
        "method": f"floor: matmul (2048), between iterations (x{len(interleaved)})",
        "s_per_iter": between, "ratio_to_kmeans_gd": between["median"] / base_med, "total": None,
    })  # fmt: skip
    table = _fmt_table(rows)
    mm = floors["matmul (blocks of 2048 rows)"]["seconds"]
    checks = {
        "kmeans_gd_s_per_iter": base_med,
        "matmul_floor_s_per_iter": mm,
        "matmul_floor_gflops": flops / mm / 1e9,
        "kmeans_gd_over_matmul_floor": base_med / mm,
        "kmeans_gd_best_over_matmul_floor": min(base["per_iter"]) / mm,
        "interleaved_floor_s_per_iter": between["median"],
        "kmeans_gd_over_interleaved_floor": base_med / between["median"],
        "kmeans_gd_tasks_over_matmul_floor": tasks["median"] / mm,
        "kmeans_gd_tasks_over_interleaved_floor": tasks["median"] / between["median"],
    }
    if "scikit-learn" in results:
        checks["kmeans_gd_over_sklearn"] = base_med / statistics.median(
            results["scikit-learn"]["per_iter"]
        )
        marg = results["scikit-learn"].get("marginal_per_iter")
        if marg:
            checks["kmeans_gd_over_sklearn_marginal"] = base_med / marg
    if "dask-ml" in results:
        checks["daskml_over_kmeans_gd"] = (
            statistics.median(results["dask-ml"]["per_iter"]) / base_med
        )
    load_end = os.getloadavg()

    print()
    print(f"rows={n} dims={d} k={k} iters={args.iters} workers={args.workers} "
          f"chunks={workers_info['n_chunks']}x{chunk_rows} rows; load average "
          f"{load_start[0]:.1f} -> {load_end[0]:.1f}")  # fmt: skip
    print(table)
    print()
    for key, value in checks.items():
        print(f"{key}: {value:.3f}")
    for name, r in results.items():
        if r["n_iter"] != (gd_max_iter if name == "kmeans-gd" else args.iters):
            print(f"note: {name} stopped after {r['n_iter']} iterations")
    if not args.literal_max_iter:
        print(
            f"note: kmeans-gd ran with max_iter={gd_max_iter}: it counts passes and ends on an "
            f"evaluation, so that makes {args.iters} steps like the others"
        )

    record = {
        "config": {
            **vars(args),
            "data_dir": str(args.data_dir),
            "results_dir": str(args.results_dir),
            "centers": centers,
        },
        "data": {"path": str(path), "bytes": n * d * 4},
        "cluster": workers_info,
        "table": rows,
        "checks": checks,
        "floors": {**floors, "matmul between iterations": interleaved},
        "runs": {
            name: {key: v for key, v in r.items() if key != "centers"}
            for name, r in results.items()
        },
        "max_center_diff_to_kmeans_gd": {
            name: float(np.abs(r["centers"] - base["centers"]).max()) for name, r in results.items()
        },
        "printed": table,
    }
    blas = [{k2: v for k2, v in b.items() if k2 != "filepath"} for b in blas]
    out = write_record(args.results_dir, None, started, record, load_start=load_start,
                       load_end=load_end, machine={"blas": blas})  # fmt: skip
    print(f"\nwritten {out}")
    return 0


# ------------------------------------------------------------------------------------------
# shared by the modes: the kmeans-gd command line, the JSON record
# ------------------------------------------------------------------------------------------


def kmeans_gd_command() -> list[str]:
    """The installed ``kmeans-gd`` console script of this interpreter's environment, or
    ``python -m flows.cli`` when it is not installed."""
    script = Path(sys.executable).parent / "kmeans-gd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


_ITERATION_LINE = re.compile(r"^iteration (\d+) .*\bseconds ([0-9.]+)\s*$", re.MULTILINE)


def run_cli_fit(
    data: Path,
    out: Path,
    k: int,
    extra: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    quiet: bool = True,
) -> dict[str, Any]:
    """``kmeans-gd fit`` in a subprocess (its own process group), its process tree sampled for
    memory. After ``timeout`` seconds the group is terminated (a stalled fit: paused workers).
    Returns the wall time, exit code, whether it timed out, the tail of stderr/stdout
    (``output_tail``: stderr's, or stdout's if stderr is empty), the sampled memory and either
    ``model`` (model.json) with ``per_iter`` (the seconds of each iteration in its history) or
    ``failure``: why there is no model (None when there is one)."""
    cmd = [*kmeans_gd_command(), "fit", str(data), str(out), "-k", str(k), "--id-column", "id",
           "--overwrite", "--no-resume", *(["--quiet"] if quiet else []), *extra]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)  # fmt: skip
    timed_out = False
    with ProcessTreeSampler(proc.pid) as tree:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)  # the group of the process started here
            try:
                stdout, stderr = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                stdout, stderr = proc.communicate()
    wall = time.perf_counter() - t
    result: dict[str, Any] = {
        "command": " ".join(cmd), "returncode": proc.returncode, "wall": wall,
        "timed_out": timed_out, "stdout_tail": stdout[-2000:], "stderr_tail": stderr[-4000:],
        "output_tail": stderr[-4000:].strip() or stdout[-2000:].strip(),
        "process_tree": tree.as_dict(),
        # per-iteration lines printed (without --quiet): what a failed fit got through
        "printed_iterations": [(int(i), float(sec)) for i, sec in _ITERATION_LINE.findall(stdout)],
        "failure": None,
    }  # fmt: skip
    model = out / "model.json"
    if proc.returncode == 0 and model.exists():
        result["model"] = json.loads(model.read_text())
        result["per_iter"] = [float(h["seconds"]) for h in result["model"]["history"]]
    elif timed_out:
        result["failure"] = f"did not finish in {timeout:.0f} s (stalled?) and was stopped"
    elif proc.returncode != 0:
        result["failure"] = f"failed with exit code {proc.returncode}"
    else:
        result["failure"] = "exited 0 but wrote no model.json"
    return result


STAMP = "%Y%m%dT%H%M%S"  # the timestamp in the names of results


def write_record(
    results_dir: Path,
    mode: str | None,
    started: _dt.datetime,
    record: dict[str, Any],
    *,
    load_start: tuple[float, float, float],
    load_end: tuple[float, float, float] | None = None,
    machine: dict[str, Any] | None = None,
) -> Path:
    """Write a mode's JSON record to ``results_dir/<mode>-<timestamp>.json`` (``<timestamp>.json``
    without a mode), completed with what every record holds: ``mode``, ``started``, the
    ``command`` line, ``machine`` (cores, platform, Python, load average at the start and at the
    end -- now unless given -- and ``machine``'s extra items) and package ``versions``."""
    load_end = os.getloadavg() if load_end is None else load_end
    full: dict[str, Any] = {"mode": mode} if mode else {}
    full |= {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        **record,
        "machine": {
            "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average_start": load_start,
            "load_average_end": load_end, **(machine or {}),
        },
        "versions": _versions(),
    }  # fmt: skip
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = started.strftime(STAMP)
    out = results_dir / (f"{mode}-{stamp}.json" if mode else f"{stamp}.json")
    out.write_text(json.dumps(full, indent=1, default=_json_default))
    return out


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in (
        "numpy",
        "numba",
        "dask",
        "distributed",
        "scikit-learn",
        "dask-ml",
        "threadpoolctl",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "-"
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


if __name__ == "__main__":
    sys.exit(main())
