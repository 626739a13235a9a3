"""Shared fixtures: one real distributed cluster and one Prefect test server per session."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def buffered_bytes() -> int:
    """Bytes of the kernel's per-thread buffers held in this process (run it on the workers)."""
    from pipeline import kernel

    return sum(b.nbytes for buffers in kernel._ALL_BUFFERS for b in buffers.by_purpose.values())


@pytest.fixture(scope="session")
def dask_client() -> Iterator[object]:
    """A LocalCluster with two worker processes of one thread each, for the whole session."""
    from distributed import Client, LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster, Client(cluster) as client:
        yield client


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """Prefect's test harness (a temporary API on SQLite), started once per session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def write_parquet(
    path: Path,
    X: np.ndarray,
    *,
    row_group_rows: int | None = None,
    prefix: str = "x",
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the rows of X as columns ``{prefix}0..`` (after any ``extra`` columns)."""
    columns: dict[str, object] = dict(extra or {})
    for j in range(X.shape[1]):
        columns[f"{prefix}{j}"] = X[:, j]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path, row_group_size=row_group_rows or max(len(X), 1))
    return path


def write_split(
    directory: Path,
    X: np.ndarray,
    splits: Sequence[int],
    *,
    row_group_rows: int | None = None,
    with_id: bool = True,
) -> Path:
    """Write X as several files cut at the row indices ``splits``, with a global ``id``."""
    bounds = [0, *splits, len(X)]
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        extra = {"id": np.arange(lo, hi, dtype=np.int64)} if with_id else None
        write_parquet(directory / f"part-{i:03d}.parquet", X[lo:hi],
                      row_group_rows=row_group_rows, extra=extra)
    return directory


@pytest.fixture
def parquet_writer() -> Callable[..., Path]:
    return write_parquet


@pytest.fixture
def split_writer() -> Callable[..., Path]:
    return write_split


def lloyd_reference(X: np.ndarray, init: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd's algorithm in float64 NumPy from ``init`` to a fixed point (at most 100 steps):
    the means, the labels and the inertia."""
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(init, dtype=np.float64)
    for _ in range(100):
        labels = ((X[:, None, :] - C[None]) ** 2).sum(axis=2).argmin(axis=1)
        moved = np.array([X[labels == j].mean(axis=0) for j in range(len(C))])
        if np.array_equal(moved, C):
            break
        C = moved
    return C, labels, float(((X - C[labels]) ** 2).sum())


def blobs(n: int = 3000, d: int = 4, k: int = 5, seed: int = 0, spread: float = 1.0) -> np.ndarray:
    """Gaussian blobs with well separated centres, float64."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10, 10, size=(k, d))
    return centers[rng.integers(0, k, size=n)] + spread * rng.normal(size=(n, d))


@pytest.fixture(scope="session")
def cli_env(prefect_harness: None) -> dict[str, str]:
    """Environment for ``kmeans-gd`` subprocesses: the session's Prefect API, so each process
    does not start a temporary server of its own."""
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ)
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    return env
