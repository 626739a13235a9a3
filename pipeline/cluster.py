"""Dask cluster specifications and the client context manager built from them.

Three ways to get a :class:`distributed.Client` are supported, each described by
a small frozen dataclass so that flows and the CLI can pass them around, log
them and validate them before anything is started:

* :class:`LocalClusterSpec` -- an embedded :class:`distributed.LocalCluster`
  whose workers are separate processes;
* :class:`SchedulerSpec` -- an already running scheduler reached by address;
* :class:`ClusterClassSpec` -- any cluster class given by import path, e.g.
  ``"dask_jobqueue.SLURMCluster"``, optionally made adaptive.

:func:`dask_client` turns a spec into a connected client and tears everything
down on exit.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import dask.config
import distributed
from dask.utils import parse_bytes
from distributed.security import Security

__all__ = [
    "ClusterClassSpec",
    "ClusterConnectionError",
    "ClusterSpec",
    "LocalClusterSpec",
    "SchedulerSpec",
    "dashboard_link",
    "dask_client",
    "load_engine",
    "worker_memory_per_thread",
    "workers_memory_limit",
    "workers_peak_memory",
]

_ALLOWED_SCHEMES = ("tcp", "tls", "ucx", "inproc")

# Generous: spawning a worker process means a fresh interpreter importing
# numpy/dask, which can take tens of seconds on a loaded CI machine or a slow
# network filesystem.  It only bounds a hang, it never delays a healthy start.
_LOCAL_WORKERS_TIMEOUT = 120.0


class ClusterConnectionError(ConnectionError, ValueError):
    """The Dask scheduler could not be reached.

    It is a :class:`ConnectionError` because that is what happened, and a
    :class:`ValueError` so that callers reporting bad user input with one
    ``except ValueError`` also catch a wrong or dead ``--scheduler`` address.
    """


@dataclass(frozen=True)
class LocalClusterSpec:
    """An embedded :class:`distributed.LocalCluster` with worker processes.

    Parameters
    ----------
    n_workers : int or None, default=None
        Number of worker processes. ``None`` means ``min(2, os.cpu_count())``.
    threads_per_worker : int or None, default=None
        Threads in each worker process. ``None`` means 1.
    memory_limit : str or None, default=None
        Memory limit of *each* worker, e.g. ``"512MB"`` or ``"2GiB"``; ``"0"``
        disables the limit. ``None`` keeps Dask's default, ``"auto"`` (system
        memory shared evenly between workers).

    Notes
    -----
    BLAS/OpenMP threads in the workers are capped at 1 by Distributed itself,
    via the ``distributed.nanny.pre-spawn-environ`` config (``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``), unless those variables are
    already set in the environment of the calling process. With several
    threads per worker, each running its own task, one BLAS thread per task is
    what avoids oversubscription, so nothing is added on top of it.
    """

    n_workers: int | None = None
    threads_per_worker: int | None = None
    memory_limit: str | None = None

    def __post_init__(self) -> None:
        if self.n_workers is not None:
            _check_positive_int("n_workers", self.n_workers)
        if self.threads_per_worker is not None:
            _check_positive_int("threads_per_worker", self.threads_per_worker)
        if self.memory_limit is not None:
            _check_memory_limit(self.memory_limit)

    @property
    def resolved_n_workers(self) -> int:
        """Number of worker processes that will be started."""
        if self.n_workers is not None:
            return self.n_workers
        return min(2, os.cpu_count() or 1)

    @property
    def resolved_threads_per_worker(self) -> int:
        """Number of threads in each worker process."""
        return 1 if self.threads_per_worker is None else self.threads_per_worker


@dataclass(frozen=True)
class SchedulerSpec:
    """An existing Dask scheduler, reached by address.

    Parameters
    ----------
    address : str
        Scheduler address such as ``"tcp://10.0.0.5:8786"`` or
        ``"tls://scheduler:8786"``. Schemes ``tcp``, ``tls``, ``ucx`` and
        ``inproc`` are accepted. For ``tls``, certificates come from the Dask
        config (``distributed.comm.tls.*``), as for any Dask client.
    timeout : float, default=30.0
        Seconds to keep trying to connect before giving up.
    """

    address: str
    timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_scheduler_address(self.address)
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, int | float):
            raise TypeError(f"timeout={self.timeout!r} should be a number of seconds.")
        if not self.timeout > 0:
            raise ValueError(f"timeout={self.timeout!r} should be > 0.")


@dataclass(frozen=True)
class ClusterClassSpec:
    """Any cluster class, given by import path, built with keyword arguments.

    Parameters
    ----------
    cluster_class : str
        Import path ``"package.module.Class"`` or ``"package.module:Class"``,
        e.g. ``"dask_jobqueue.SLURMCluster"``. It is imported only when the
        cluster is started by :func:`dask_client`.
    kwargs : Mapping[str, Any], default={}
        Keyword arguments for the class.
    adapt_minimum, adapt_maximum : int or None, default=None
        If either is given, ``cluster.adapt(minimum=..., maximum=...)`` is
        called with the bounds given; otherwise the cluster is left to scale as
        ``kwargs`` say.
    """

    cluster_class: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    adapt_minimum: int | None = None
    adapt_maximum: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.cluster_class, str) or not self.cluster_class.strip():
            raise ValueError(
                f"cluster_class={self.cluster_class!r} should be an import path such as "
                "'dask_jobqueue.SLURMCluster' or 'package.module:Class'."
            )
        _split_import_path(self.cluster_class)
        if not isinstance(self.kwargs, Mapping) or not all(
            isinstance(key, str) for key in self.kwargs
        ):
            raise TypeError(
                f"kwargs={self.kwargs!r} should be a mapping of keyword-argument names to values."
            )
        if self.adapt_minimum is not None:
            _check_int("adapt_minimum", self.adapt_minimum, minimum=0)
        if self.adapt_maximum is not None:
            _check_int("adapt_maximum", self.adapt_maximum, minimum=1)
        if (
            self.adapt_minimum is not None
            and self.adapt_maximum is not None
            and self.adapt_minimum > self.adapt_maximum
        ):
            raise ValueError(
                f"adapt_minimum={self.adapt_minimum} should be <= "
                f"adapt_maximum={self.adapt_maximum}."
            )

    @property
    def adaptive(self) -> bool:
        """Whether :func:`dask_client` will call ``cluster.adapt``."""
        return self.adapt_minimum is not None or self.adapt_maximum is not None


ClusterSpec: TypeAlias = LocalClusterSpec | SchedulerSpec | ClusterClassSpec


@contextmanager
def dask_client(spec: ClusterSpec | None = None) -> Iterator[distributed.Client]:
    """Start or connect to a Dask cluster and yield a client for it.

    Everything that can be checked without starting a cluster (addresses,
    import paths, TLS settings) is checked first, so a bad spec fails fast
    and leaves nothing behind.

    Parameters
    ----------
    spec : ClusterSpec or None, default=None
        What to run on. ``None`` means ``LocalClusterSpec()``.

    Yields
    ------
    distributed.Client
        A client connected to the cluster. For a :class:`LocalClusterSpec`
        all workers are up when it is yielded; for the other specs workers may
        still be joining (a batch-queue cluster can take minutes to get any).

    Raises
    ------
    ValueError
        If the spec cannot work: unsupported or unconfigured address, class
        that cannot be imported or is not adaptive although bounds were given.
    ClusterConnectionError
        If the scheduler of a :class:`SchedulerSpec` cannot be reached within
        its ``timeout``.

    Notes
    -----
    On exit, even on error, the client is closed and then any cluster started
    here. A cluster reached through :class:`SchedulerSpec` is not ours and is
    left running.

    A local cluster spawns worker processes, so a script using it must guard
    its entry point with ``if __name__ == "__main__":``.
    """
    if spec is None:
        spec = LocalClusterSpec()
    if isinstance(spec, LocalClusterSpec):
        cm = _local_client(spec)
    elif isinstance(spec, SchedulerSpec):
        cm = _scheduler_client(spec)
    elif isinstance(spec, ClusterClassSpec):
        cm = _cluster_class_client(spec)
    else:
        raise TypeError(
            f"spec={spec!r} should be a LocalClusterSpec, SchedulerSpec, ClusterClassSpec or None."
        )
    with cm as client:
        yield client


def dashboard_link(client: distributed.Client) -> str | None:
    """Return the URL of the scheduler's dashboard, or None if it has none.

    Parameters
    ----------
    client : distributed.Client
        A connected client.

    Returns
    -------
    str or None
        For example ``"http://127.0.0.1:8787/status"``.

    Notes
    -----
    The scheduler serves HTTP even without Bokeh installed, so a link can be
    returned whose diagnostic pages only say that Bokeh is missing.
    """
    try:
        link = client.dashboard_link
    except (AttributeError, KeyError, OSError):
        # Remote schedulers started with --no-dashboard have no "dashboard"
        # service, which Client.dashboard_link reports as a KeyError.
        return None
    return link or None


def workers_memory_limit(client: distributed.Client) -> int:
    """Return the total memory limit of the current workers, in bytes.

    Parameters
    ----------
    client : distributed.Client
        A connected (synchronous) client.

    Returns
    -------
    int
        Sum of the workers' ``memory_limit``. 0 if there are no workers or
        if any worker has no limit, since the total is then unknown.
    """
    workers = _scheduler_info(client).get("workers", {})
    total = 0
    for worker in workers.values():
        limit = worker.get("memory_limit")
        if not limit:
            return 0
        total += int(limit)
    return total


def _peak_rss() -> int:
    # VmHWM is the peak of this process's own address space. ru_maxrss is not: Linux keeps it
    # across fork and execve, so a worker spawned by a large client process would report the
    # client's peak.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def workers_peak_memory(client: distributed.Client) -> dict[str, int]:
    """Peak resident memory of each worker process so far, in bytes (Linux's VmHWM)."""
    return {address: int(rss) for address, rss in client.run(_peak_rss).items()}


def load_engine() -> None:
    """Load what every task starts from: the compiled kernel (from numba's on-disk cache, or
    compiled and written to it), over rows and over columns read in place, and the reading of
    Arrow columns into rows.

    Run where workers will start, before they do, it leaves them only the loading from the
    cache: see ``_load_engine_before_workers`` and :mod:`pipeline.preload`.
    """
    import numpy as np
    import pyarrow as pa

    from pipeline import kernel, parquet_io

    # built from buffers: building an Arrow array from NumPy or Python values imports pandas,
    # which reading Parquet does not need
    column = pa.Array.from_buffers(pa.float32(), 64, [None, pa.py_buffer(np.ones(64, np.float32))])
    table = pa.table({"a": column, "b": column})
    X = np.empty((64, 2), dtype=np.float32)
    parquet_io._fill(X, 0, table, ["a", "b"])
    kernel.chunk_stats(X, np.ones((1, 2, 2)), previous=np.zeros((1, 2, 2)), n_far=1)
    kernel.assign_labels(X, np.ones((2, 2)))
    # and the streamed passes over float32 columns read in place
    columns = kernel.ColumnChunk([parquet_io._feature_arrays(table, ["a", "b"])])
    kernel.chunk_stats(columns, np.ones((1, 2, 2)), previous=np.zeros((1, 2, 2)), n_far=1,
                       remember=False)  # fmt: skip
    kernel.assign_labels(columns, np.ones((2, 2)))


def _rss_with_engine_loaded() -> int:
    import psutil

    # What every task starts from, measured once it has happened: loading the compiled kernel
    # (LLVM, numba's dispatchers) takes about 50 MB more than importing it.
    load_engine()
    return int(psutil.Process().memory_info().rss)


@functools.cache
def _load_engine_before_workers() -> None:
    """Load (on a first run: compile) the kernel in this process, once, before it starts
    worker processes on this machine, which then load it from numba's on-disk cache.

    Compiled in every worker instead (the first run after an install or an upgrade), it took
    some 13 s of CPU per worker and left each worker's memory about 90 MB higher for good (at
    the baseline probe of a 512MB worker: 360 against 269 MiB), room the tasks' budget then
    did not have. In this process, not a child (as deployed nannies do, :mod:`pipeline.preload`):
    the embedded cluster's parent has no memory limit to share, and loading takes 0.5 s here
    against 1.9 s in a fresh interpreter.
    """
    load_engine()


#: Share of a worker's memory limit that tasks may fill: room under the restart at 95% for
#: what the allocators keep after a task and for a task's temporaries.
_USABLE_FRACTION = 0.7


def worker_memory_per_thread(client: distributed.Client) -> int:
    """Bytes one task may use: the smallest ``(0.7 * memory_limit - baseline) / nthreads`` over
    the current workers, where the baseline is the worker's memory with the engine loaded.

    0 if there are no workers or any has no limit.
    """
    workers = _scheduler_info(client).get("workers", {})
    if not workers or not all(w.get("memory_limit") for w in workers.values()):
        return 0
    baseline = client.run(_rss_with_engine_loaded)
    shares = [
        (_USABLE_FRACTION * int(w["memory_limit"]) - baseline.get(address, 0))
        // max(int(w.get("nthreads") or 1), 1)
        for address, w in workers.items()
    ]
    return max(int(min(shares)), 1)


#: Memory settings of the embedded cluster's workers. Never spill: a pass reads every row,
#: so spilled chunks would only be a slower copy of the Parquet files, and streamed chunks
#: are read again anyway; data that does not fit is streamed instead of persisted
#: (``passes.choose_cache``) and tasks are sized to the headroom
#: (:func:`worker_memory_per_thread`). Never pause either: pausing waits for spilling to free
#: memory, so without it a worker whose allocators keep freed pages past 80% of its limit stays
#: paused forever and the fit hangs (dask/distributed#5999; seen once in a streamed bench run).
#: The restart at 95%, with the tasks' retries, stays as the guard.
_WORKER_MEMORY_CONFIG = {
    "distributed.worker.memory.target": False,
    "distributed.worker.memory.spill": False,
    "distributed.worker.memory.pause": False,
}

#: Dask's background polling on the embedded cluster, trimmed for batch work: the event-loop
#: tick (a warning when a loop was blocked; every 20 ms), the system monitor (the dashboard's
#: graphs; every 0.5 s) and the workers' statistical profiler (every 10 ms). With Dask's
#: intervals an idle 2-worker cluster took 45-48 ms/s of the client process's CPU and 25-33
#: ms/s of each worker's (about 5% of two cores, taken from the passes); with these, 20-22 and
#: 5-7 ms/s (``/proc`` CPU times over 20 s).
#: An interval set in the user's Dask config is kept (``_unless_configured``).
_BACKGROUND_CONFIG = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.profile.interval": "100ms",
}


def _unless_configured(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings whose keys still have Dask's default value."""
    defaults = dask.config.merge(*dask.config.defaults)
    return {
        key: value
        for key, value in settings.items()
        if dask.config.get(key) == dask.config.get(key, config=defaults)
    }


@contextmanager
def _local_client(spec: LocalClusterSpec) -> Iterator[distributed.Client]:
    n_workers = spec.resolved_n_workers
    cluster_kwargs: dict[str, Any] = {
        "n_workers": n_workers,
        "threads_per_worker": spec.resolved_threads_per_worker,
        "processes": True,
        # ":0" so that two pipelines (or a test run next to a notebook) on the
        # same machine do not fight over the default port 8787.
        "dashboard_address": ":0",
        # task failures reach the caller as exceptions; the workers' own copies of them would
        # be printed again on the caller's stderr
        "silence_logs": logging.CRITICAL,
    }
    if spec.memory_limit is not None:
        cluster_kwargs["memory_limit"] = spec.memory_limit
    _load_engine_before_workers()
    with (
        _restored_environ(_pre_spawn_environ_keys()),
        # the nannies hand this config to the worker processes they start
        dask.config.set({**_WORKER_MEMORY_CONFIG, **_unless_configured(_BACKGROUND_CONFIG)}),
        distributed.LocalCluster(**cluster_kwargs) as cluster,
        distributed.Client(cluster) as client,
    ):
        client.wait_for_workers(n_workers, timeout=_LOCAL_WORKERS_TIMEOUT)
        yield client


@contextmanager
def _scheduler_client(spec: SchedulerSpec) -> Iterator[distributed.Client]:
    if spec.address.startswith("tls://"):
        _check_tls_configured(spec.address)
    try:
        # security=None lets Client apply its own resolution: the configured
        # distributed.client.security-loader if any, else Security() built
        # from distributed.comm.tls.*.  Passing Security() here would bypass
        # the loader.
        client = distributed.Client(spec.address, timeout=spec.timeout)
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise ClusterConnectionError(
            f"could not connect to Dask scheduler at {spec.address}: {reason}"
        ) from exc
    with client:
        yield client


@contextmanager
def _cluster_class_client(spec: ClusterClassSpec) -> Iterator[distributed.Client]:
    cluster_cls = _import_cluster_class(spec.cluster_class)
    if spec.adaptive and not callable(getattr(cluster_cls, "adapt", None)):
        raise ValueError(
            f"cluster_class {spec.cluster_class!r} has no adapt() method; "
            "drop adapt_minimum/adapt_maximum or use an adaptive cluster class."
        )
    with ExitStack() as stack:
        cluster = cluster_cls(**spec.kwargs)
        stack.callback(cluster.close)
        if spec.adaptive:
            adapt_kwargs: dict[str, int] = {}
            if spec.adapt_minimum is not None:
                adapt_kwargs["minimum"] = spec.adapt_minimum
            if spec.adapt_maximum is not None:
                adapt_kwargs["maximum"] = spec.adapt_maximum
            cluster.adapt(**adapt_kwargs)
        client = stack.enter_context(distributed.Client(cluster))
        yield client


def _import_cluster_class(path: str) -> type:
    module_name, attr_path = _split_import_path(path)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        if isinstance(exc, ModuleNotFoundError) and exc.name:
            reason = f"no module named {exc.name!r}"
        else:
            reason = " ".join(str(exc).split())
        raise ValueError(f"cluster_class {path!r}: {reason} (is it installed?)") from exc
    where = module_name
    for attr in attr_path.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise ValueError(
                f"cluster_class {path!r}: {where!r} has no attribute {attr!r}"
            ) from None
        where = f"{where}.{attr}"
    if not inspect.isclass(obj):
        raise ValueError(f"cluster_class {path!r}: {type(obj).__name__} is not a class")
    return obj


def _split_import_path(path: str) -> tuple[str, str]:
    path = path.strip()
    if ":" in path:
        module_name, _, attr_path = path.partition(":")
    else:
        module_name, _, attr_path = path.rpartition(".")
    if not module_name or not attr_path or ":" in attr_path:
        raise ValueError(
            f"cluster_class {path!r} should be an import path such as "
            "'dask_jobqueue.SLURMCluster' or 'package.module:Class'."
        )
    return module_name, attr_path


def _check_scheduler_address(address: object) -> None:
    accepted = ", ".join(f"{scheme}://" for scheme in _ALLOWED_SCHEMES)
    if isinstance(address, str):
        scheme, sep, location = address.partition("://")
        if sep and scheme in _ALLOWED_SCHEMES and location:
            return
    raise ValueError(
        f"scheduler={address!r} should be a Dask scheduler address starting with "
        f"{accepted} (e.g. 'tcp://host:8786')."
    )


def _check_tls_configured(address: str) -> None:
    if dask.config.get("distributed.client.security-loader", None):
        # Credentials come from the loader at connection time; nothing to
        # check here.
        return
    security = Security()
    if security.get_connection_args("client").get("ssl_context") is None:
        raise ValueError(
            f"scheduler={address!r} uses TLS but no client certificate is configured: "
            "set distributed.comm.tls.ca-file and distributed.comm.tls.client.cert "
            "(and .key) in the Dask config or DASK_DISTRIBUTED__COMM__TLS__* variables."
        )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} should be an integer.")
    if value < minimum:
        raise ValueError(f"{name}={value!r} should be >= {minimum}.")


def _check_positive_int(name: str, value: object) -> None:
    _check_int(name, value, minimum=1)


def _check_memory_limit(value: object) -> None:
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return
        try:
            if parse_bytes(value) >= 0:
                return
        except (ValueError, TypeError):
            pass
    raise ValueError(
        f"memory_limit={value!r} should be a size such as '512MB' or '2GiB', "
        "'0' for no limit, or 'auto'."
    )


def _pre_spawn_environ_keys() -> tuple[str, ...]:
    keys = dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {}
    # The nanny also sets PYTHONHASHSEED before spawning workers.
    return (*keys, "PYTHONHASHSEED")


@contextmanager
def _restored_environ(keys: tuple[str, ...]) -> Iterator[None]:
    # Nannies export their pre-spawn environment (OMP_NUM_THREADS=1,
    # PYTHONHASHSEED, ...) into the *calling* process's os.environ before
    # spawning workers.  Undo that on exit so later subprocesses of the
    # CLI/flow process (e.g. a scikit-learn benchmark) are not silently
    # pinned to one BLAS thread.
    saved = {key: os.environ.get(key) for key in keys}
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _scheduler_info(client: distributed.Client) -> Mapping[str, Any]:
    # Recent Distributed releases take n_workers, and some default it to a
    # handful of workers rather than all; older ones have no such parameter
    # and would forward it to the scheduler, which rejects it.
    if "n_workers" in inspect.signature(client.scheduler_info).parameters:
        return client.scheduler_info(n_workers=-1)
    return client.scheduler_info()
