"""Flow retries: a transient failure is retried by Prefect and ends with the uninterrupted
result; bad input is not retried. Real flow runs through Prefect's test harness, on the
session's Dask cluster, reading real Parquet files through an fsspec filesystem whose reads
fail a few times in the Dask workers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from conftest import blobs, write_split
from fsspec.implementations.local import LocalFileSystem

from flows.fit import kmeans_fit
from flows.retries import FLOW_RETRIES


class FailingReadsFileSystem(LocalFileSystem):
    """The local filesystem under ``failing://``, except that opening ``part-001.parquet`` in any
    process but the test's own fails the first ``failures`` times (counted across processes by
    marker files): the Dask workers' reads fail until a task has used up its retries."""

    protocol = ("failing",)
    root_marker = "/"

    cachable = False

    def __init__(self, marker: str = "", failures: int = 0, home: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)  # the arguments travel to the workers with the instance
        self.marker, self.failures, self.home = marker, failures, home

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        return path.removeprefix("failing://")

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode and os.getpid() != self.home and str(path).endswith("part-001.parquet"):
            for i in range(self.failures):
                try:
                    os.close(os.open(f"{self.marker}.{i}", os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    continue
                raise OSError(f"transient failure {i + 1} reading {path}")
        return super()._open(path, mode=mode, **kwargs)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_split(tmp_path / "data", blobs(n=3000, d=3, k=4, seed=6), [1000, 2000], row_group_rows=250)


def _run_count(state: Any) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).run_count


def test_a_transient_failure_is_retried_and_gives_the_uninterrupted_result(
    prefect_harness: None, dask_client: Any, data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from pipeline.passes import RETRIES

    cluster = {"kind": "scheduler", "address": dask_client.scheduler.address}
    common = {"k": 4, "id_column": "id", "seed": 3, "cache": "none", "cluster": cluster}
    clean = kmeans_fit(input=str(data), output=str(tmp_path / "clean"), return_state=True, **common)
    assert clean.is_completed() and _run_count(clean) == 1

    marker = str(tmp_path / "failed")
    failures = RETRIES + 1  # more than a Dask task's own retries: the flow run fails once
    fsspec.register_implementation("failing", FailingReadsFileSystem, clobber=True)
    conf = {"marker": marker, "failures": failures, "home": os.getpid()}
    monkeypatch.setitem(fsspec.config.conf, "failing", conf)
    flaky = kmeans_fit.with_options(retry_delay_seconds=0)(
        input=f"failing://{data}", output=str(tmp_path / "flaky"), return_state=True, **common
    )
    assert all(os.path.exists(f"{marker}.{i}") for i in range(failures))  # the reads did fail
    assert flaky.is_completed(), flaky.message
    assert _run_count(flaky) == 2  # the first attempt failed, the retry completed
    a = json.loads((tmp_path / "clean" / "model.json").read_text())
    b = json.loads((tmp_path / "flaky" / "model.json").read_text())
    np.testing.assert_array_equal(np.asarray(b["centers"]), np.asarray(a["centers"]))
    assert b["inertia"] == a["inertia"] and b["n_iter"] == a["n_iter"]
    assert sorted(os.listdir(tmp_path / "flaky" / "labels")) == sorted(os.listdir(data))


def test_bad_input_is_not_retried(prefect_harness: None, dask_client: Any, data: Path, tmp_path: Path) -> None:
    assert FLOW_RETRIES >= 1
    cluster = {"kind": "scheduler", "address": dask_client.scheduler.address}
    state = kmeans_fit.with_options(retry_delay_seconds=30)(
        input=str(data), output=str(tmp_path / "out"), k=4, id_column="id",
        features=["x0", "height"], cluster=cluster, return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert "'height'" in state.message
    assert _run_count(state) == 1  # failed at once: no retry, no 30 s wait
    assert not (tmp_path / "out").exists()
