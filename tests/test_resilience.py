"""A fit on a separate `dask scheduler` with two `dask worker` processes survives losing a worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import blobs, write_split
from distributed import Client

from pipeline import parquet_io
from pipeline.estimator import initial_centers
from pipeline.fit import FitState, IterationReport, fit_means
from pipeline.optimizer import NewtonStep
from pipeline.passes import data_from_parquet

PYTHON_M = [sys.executable, "-m"]


@pytest.fixture(scope="module")
def external_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dask scheduler` and two `dask worker` processes, as an operator would start them."""
    root = tmp_path_factory.mktemp("cluster")
    scheduler_file = root / "scheduler.json"
    env = dict(os.environ, DASK_DISTRIBUTED__WORKER__DAEMON="False")
    procs = [
        subprocess.Popen(
            [*PYTHON_M, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
    ]  # fmt: skip
    deadline = time.monotonic() + 60
    while not scheduler_file.exists():
        assert time.monotonic() < deadline, "dask scheduler did not start"
        time.sleep(0.1)
    for _ in range(2):
        procs.append(
            subprocess.Popen(
                [*PYTHON_M, "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
                 "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address", ":0"],
                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )  # fmt: skip
    try:
        with Client(scheduler_file=str(scheduler_file), timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            yield client.scheduler.address
    finally:
        # each process in a session of its own, so that a nanny goes with its worker: the nanny
        # whose worker was killed and restarted took 20 s to exit on SIGTERM
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    X = blobs(n=60_000, d=6, k=12, seed=4, spread=2.5)
    return write_split(tmp_path_factory.mktemp("res") / "data", X, [21_000, 40_000], row_group_rows=4_000)


def _fit(address: str, source: Path, kill_after: int | None) -> tuple[np.ndarray, float, int]:
    dataset = parquet_io.open_parquet(source, id_column="id", chunk_bytes=100_000)
    with Client(address, timeout=60) as client:
        data = data_from_parquet(dataset, "float64").persist()
        centers = initial_centers(data, 12, init="random", seed=7)
        killed: list[int] = []

        def on_iteration(report: IterationReport) -> None:
            if report.iteration == kill_after:
                pids = client.run(os.getpid)
                pid = pids[min(pids)]
                os.kill(pid, signal.SIGKILL)  # a worker holding persisted chunks dies
                killed.append(pid)

        result = fit_means(
            data, FitState.start(centers), max_iter=15, tol=0.0, step=NewtonStep(),
            on_iteration=on_iteration,
        )  # fmt: skip
        if kill_after is not None:
            assert killed, "the worker was not killed"
            client.wait_for_workers(1, timeout=60)
    return result.centers, result.inertia, result.n_iter


def test_fit_survives_a_killed_worker_with_the_same_result(
    external_cluster: str, parquet_dir: Path
) -> None:
    reference = _fit(external_cluster, parquet_dir, kill_after=None)
    survived = _fit(external_cluster, parquet_dir, kill_after=3)
    np.testing.assert_allclose(survived[0], reference[0], rtol=1e-12, atol=1e-12)
    assert survived[1] == pytest.approx(reference[1], rel=1e-12)
    assert survived[2] == reference[2]
