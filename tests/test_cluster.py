"""Tests for pipeline.cluster, against real Dask clusters (no mocks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import dask.config
import distributed
import numpy as np
import pytest

from pipeline.cluster import (
    ClusterClassSpec,
    ClusterConnectionError,
    LocalClusterSpec,
    SchedulerSpec,
    dashboard_link,
    dask_client,
    workers_memory_limit,
)

_BLAS_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _enter(spec: object) -> None:
    with dask_client(spec):  # type: ignore[arg-type]
        pass  # pragma: no cover


def _blas_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in _BLAS_VARS}


@pytest.fixture(scope="module")
def local_run() -> Iterator[tuple[distributed.Client, dict[str, str | None]]]:
    # One process cluster shared by the LocalClusterSpec tests: starting
    # worker processes is the slow part.
    env_before = _blas_env()
    spec = LocalClusterSpec(n_workers=2, threads_per_worker=1, memory_limit="512MB")
    with dask_client(spec) as client:
        yield client, env_before


@pytest.fixture()
def in_process_cluster() -> Iterator[distributed.LocalCluster]:
    with distributed.LocalCluster(
        n_workers=1, processes=False, dashboard_address=":0", silence_logs=False
    ) as cluster:
        yield cluster


def test_local_cluster_starts_worker_processes(local_run) -> None:
    client, _ = local_run
    assert len(client.scheduler_info()["workers"]) == 2
    pids = client.run(os.getpid)
    assert len(set(pids.values())) == 2
    assert os.getpid() not in pids.values()
    assert client.submit(sum, [1, 2, 3]).result() == 6


def test_local_cluster_memory_limit(local_run) -> None:
    client, _ = local_run
    assert workers_memory_limit(client) == 2 * 512_000_000


def test_local_cluster_dashboard_link(local_run) -> None:
    client, _ = local_run
    link = dashboard_link(client)
    assert link is not None
    assert link.startswith("http://")
    # dashboard_address=":0": a free port, not the default 8787.
    assert ":8787/" not in link


def test_local_cluster_workers_get_single_blas_thread(local_run) -> None:
    # Distributed's nanny.pre-spawn-environ sets these to 1, unless the
    # variable is already set in the parent environment, which then wins.
    client, env_before = local_run
    expected = {name: value if value is not None else "1" for name, value in env_before.items()}
    per_worker = client.run(_blas_env)
    assert list(per_worker.values()) == [expected, expected]


def _intervals(server, names=("tick", "monitor")) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Milliseconds between a Dask server's background callbacks."""
    return {name: server.periodic_callbacks[name].callback_time for name in names}


def _worker_intervals(dask_worker) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return _intervals(dask_worker, ("tick", "monitor", "profile"))


def _scheduler_intervals(dask_scheduler) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return _intervals(dask_scheduler)


def test_local_cluster_trims_background_polling(local_run) -> None:
    client, _ = local_run
    assert list(client.run(_worker_intervals).values()) == [
        {"tick": 1000, "monitor": 2000, "profile": 100}
    ] * 2
    assert client.run_on_scheduler(_scheduler_intervals) == {"tick": 1000, "monitor": 2000}


def test_local_cluster_keeps_background_intervals_the_user_configured() -> None:
    with (
        dask.config.set({"distributed.worker.profile.interval": "50ms"}),
        dask_client(LocalClusterSpec(n_workers=1, threads_per_worker=1)) as client,
    ):
        assert list(client.run(_worker_intervals).values()) == [
            {"tick": 1000, "monitor": 2000, "profile": 50}
        ]


def _hold_unmanaged_memory(fraction: float, dask_worker) -> float:  # type: ignore[no-untyped-def]
    """Grow the worker's unmanaged memory to ``fraction`` of its limit, as memory that the
    allocators keep after a task does; returns the fraction reached."""
    import psutil

    process = psutil.Process()
    missing = int(fraction * dask_worker.memory_manager.memory_limit) - process.memory_info().rss
    dask_worker._test_ballast = np.ones(max(missing, 0), dtype=np.uint8)
    return process.memory_info().rss / dask_worker.memory_manager.memory_limit


def _drop_ballast(dask_worker) -> None:  # type: ignore[no-untyped-def]
    vars(dask_worker).pop("_test_ballast", None)


def _status(dask_worker) -> str:  # type: ignore[no-untyped-def]
    return str(dask_worker.status)


def test_local_cluster_workers_run_tasks_past_the_pause_threshold(local_run) -> None:
    # Dask pauses a worker at 80% of its limit until spilling frees memory; with spilling off
    # nothing does, and a paused worker would hold its tasks forever (the fit would hang).
    client, _ = local_run
    address = min(client.scheduler_info()["workers"])
    try:
        reached = client.run(_hold_unmanaged_memory, 0.87, workers=[address])[address]
        assert 0.8 < reached < 0.95
        time.sleep(1.0)  # several rounds of the workers' memory monitor (every 100 ms)
        future = client.submit(sum, [1, 2, 3], workers=[address], pure=False)
        assert future.result(timeout=30) == 6
        assert client.run(_status, workers=[address])[address] == "Status.running"
    finally:
        client.run(_drop_ballast, workers=[address])


_COMPILED_IN_WORKERS = """
import contextlib, json, sys
import distributed
from pipeline.cluster import LocalClusterSpec, dask_client

def compiled_here():
    import numba
    from pipeline import cluster, kernel
    cluster.load_engine()
    dispatchers = [f for f in vars(kernel).values() if isinstance(f, numba.core.dispatcher.Dispatcher)]
    return sum(len(f.stats.cache_misses) for f in dispatchers), len(dispatchers)

with contextlib.ExitStack() as stack:
    if len(sys.argv) > 1:  # a running scheduler
        client = stack.enter_context(distributed.Client(scheduler_file=sys.argv[1], timeout=60))
        client.wait_for_workers(1, timeout=120)
    else:
        client = stack.enter_context(dask_client(LocalClusterSpec(n_workers=1)))
    print(json.dumps(list(client.run(compiled_here).values())))
"""

_REPO = Path(__file__).resolve().parents[1]


def _compiled_in_workers(env: dict[str, str], *args: str) -> list[list[int]]:
    """Per worker: how many of the kernel's functions it compiled (not found in numba's
    cache), and how many it has."""
    done = subprocess.run(
        [sys.executable, "-c", _COMPILED_IN_WORKERS, *args], check=False, env=env,
        capture_output=True, text=True, cwd=_REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _local_cluster_compiled(root: Path) -> list[list[int]]:
    # A first run (here: an empty numba cache): the parent compiles the kernel before starting
    # the workers, which load it from the cache instead of each compiling it (13 s of CPU and
    # some 90 MB of memory per worker, kept).
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root / "numba-cache")}
    return _compiled_in_workers(env)


def _deployed_worker_compiled(root: Path) -> list[list[int]]:
    # `dask worker --preload-nanny pipeline.preload`, as deploy/ starts workers, on an empty
    # numba cache: the worker finds the kernel compiled (without the preload it compiled 17)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(root / "numba-cache"),
           "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}  # fmt: skip
    scheduler_file = root / "scheduler.json"
    python_m = [sys.executable, "-m"]
    procs = [
        subprocess.Popen(
            [*python_m, "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
             "--dashboard-address", ":0", "--scheduler-file", str(scheduler_file)],
            env=env, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
        subprocess.Popen(
            [*python_m, "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
             "--nthreads", "1", "--host", "127.0.0.1", "--dashboard-address", ":0",
             "--preload-nanny", "pipeline.preload"],
            env=env, cwd=_REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.1)
        return _compiled_in_workers(env, str(scheduler_file))
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def compiled_in_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Both first runs side by side, each with an empty numba cache of its own: compiling
    takes one core for about 30 s, so together they take little more than one."""
    scenarios = {"local": _local_cluster_compiled, "deployed": _deployed_worker_compiled}
    with ThreadPoolExecutor(max_workers=len(scenarios)) as pool:
        futures = {
            name: pool.submit(run, tmp_path_factory.mktemp(name)) for name, run in scenarios.items()
        }
        # an exception is kept and raised in the test that asks for it
        return {name: future.exception() or future.result() for name, future in futures.items()}


def _result(runs: dict[str, Any], name: str) -> list[list[int]]:
    if isinstance(runs[name], BaseException):
        raise runs[name]
    return runs[name]


def test_local_cluster_workers_load_the_kernel_compiled_before_them(
    compiled_in_workers: dict[str, Any],
) -> None:
    [(misses, dispatchers)] = _result(compiled_in_workers, "local")
    assert dispatchers > 10
    assert misses == 0


def test_deployed_workers_load_the_kernel_their_nanny_compiled(
    compiled_in_workers: dict[str, Any],
) -> None:
    [(misses, dispatchers)] = _result(compiled_in_workers, "deployed")
    assert dispatchers > 10
    assert misses == 0


def test_local_cluster_default_spec() -> None:
    spec = LocalClusterSpec()
    assert spec.resolved_n_workers == min(2, os.cpu_count() or 1)
    assert spec.resolved_threads_per_worker == 1


def test_local_cluster_restores_parent_environ(monkeypatch) -> None:
    # The nanny exports its pre-spawn environment into this process before
    # spawning workers; dask_client must undo that on exit.  A variable
    # already set in the parent wins over Distributed's default of 1.
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    with dask_client(LocalClusterSpec(n_workers=1)) as client:
        (worker_env,) = client.run(_blas_env).values()
        assert worker_env["OMP_NUM_THREADS"] == "1"
        assert worker_env["MKL_NUM_THREADS"] == "3"
    assert "OMP_NUM_THREADS" not in os.environ
    assert "PYTHONHASHSEED" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "3"


def test_local_cluster_closed_on_error() -> None:
    with (
        pytest.raises(RuntimeError, match="boom"),
        dask_client(LocalClusterSpec(n_workers=1)) as client,
    ):
        cluster = client.cluster
        raise RuntimeError("boom")
    assert client.status == "closed"
    assert cluster.status.name == "closed"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_workers": 0}, r"n_workers=0 should be >= 1\."),
        ({"threads_per_worker": -1}, r"threads_per_worker=-1 should be >= 1\."),
        ({"memory_limit": "lots"}, r"memory_limit='lots' should be a size such as '512MB'"),
    ],
)
def test_local_cluster_spec_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        LocalClusterSpec(**kwargs)


def test_scheduler_spec_connects(in_process_cluster) -> None:
    spec = SchedulerSpec(in_process_cluster.scheduler_address)
    with dask_client(spec) as client:
        assert client.scheduler.address == in_process_cluster.scheduler_address
        assert client.submit(sum, [1, 2]).result() == 3
        assert workers_memory_limit(client) > 0
    # Not our cluster: it must still be running.
    assert in_process_cluster.status.name == "running"


@pytest.mark.parametrize(
    "address", ["http://127.0.0.1:8786", "127.0.0.1:8786", "tcp://", "", "tcp:/host:1"]
)
def test_scheduler_spec_bad_scheme(address) -> None:
    with pytest.raises(
        ValueError,
        match=r"scheduler=.* should be a Dask scheduler address "
        r"starting with tcp://, tls://, ucx://, inproc://",
    ):
        SchedulerSpec(address)


def test_scheduler_spec_unreachable() -> None:
    start = time.monotonic()
    with pytest.raises(
        ClusterConnectionError,
        match=r"^could not connect to Dask scheduler at tcp://127\.0\.0\.1:1: ",
    ) as excinfo:
        _enter(SchedulerSpec("tcp://127.0.0.1:1", timeout=1.0))
    assert time.monotonic() - start < 10
    assert "\n" not in str(excinfo.value)
    # Callers that report bad input with one "except ValueError" catch it too.
    assert isinstance(excinfo.value, ValueError)


def test_scheduler_spec_tls_without_certificates(monkeypatch) -> None:
    for name in list(os.environ):
        if name.startswith("DASK_DISTRIBUTED__COMM__TLS"):
            monkeypatch.delenv(name)
    with pytest.raises(ValueError, match=r"uses TLS but no client certificate is configured"):
        _enter(SchedulerSpec("tls://127.0.0.1:1", timeout=1.0))


def test_scheduler_spec_tls_uses_dask_config() -> None:
    pytest.importorskip("cryptography")
    import dask.config
    from distributed.security import Security

    security = Security.temporary()  # in-memory self-signed CA and certificates
    with distributed.LocalCluster(
        n_workers=1,
        processes=False,
        protocol="tls",
        security=security,
        dashboard_address=":0",
        silence_logs=False,
    ) as cluster:
        assert cluster.scheduler_address.startswith("tls://")
        tls_config = {
            "distributed.comm.tls.ca-file": security.tls_ca_file,
            "distributed.comm.tls.client.cert": security.tls_client_cert,
            "distributed.comm.tls.client.key": security.tls_client_key,
        }
        with (
            dask.config.set(tls_config),
            dask_client(SchedulerSpec(cluster.scheduler_address, timeout=10.0)) as client,
        ):
            assert client.submit(sum, [1, 2]).result() == 3


def test_scheduler_spec_timeout_validation() -> None:
    with pytest.raises(ValueError, match=r"timeout=0 should be > 0\."):
        SchedulerSpec("tcp://127.0.0.1:8786", timeout=0)


def test_cluster_class_spec() -> None:
    spec = ClusterClassSpec(
        "distributed.LocalCluster",
        kwargs={"n_workers": 1, "processes": False, "dashboard_address": ":0"},
    )
    with dask_client(spec) as client:
        cluster = client.cluster
        assert isinstance(cluster, distributed.LocalCluster)
        assert cluster._adaptive is None
        assert client.submit(sum, [1, 2]).result() == 3
    assert cluster.status.name == "closed"


def test_cluster_class_spec_colon_path_and_adapt() -> None:
    spec = ClusterClassSpec(
        "distributed:LocalCluster",
        kwargs={"n_workers": 1, "processes": False, "dashboard_address": ":0"},
        adapt_minimum=1,
        adapt_maximum=2,
    )
    with dask_client(spec) as client:
        adaptive = client.cluster._adaptive
        assert adaptive is not None
        assert (adaptive.minimum, adaptive.maximum) == (1, 2)
        assert client.submit(sum, [1, 2]).result() == 3


@pytest.mark.parametrize(
    ("path", "match"),
    [
        (
            "no_such_pkg_xyz.Cluster",
            r"cluster_class 'no_such_pkg_xyz.Cluster': no module named 'no_such_pkg_xyz'",
        ),
        (
            "distributed.NoSuchCluster",
            r"cluster_class 'distributed.NoSuchCluster': 'distributed' has no attribute",
        ),
        ("distributed.comm.tcp.logger", r"is not a class"),
    ],
)
def test_cluster_class_spec_bad_import(path, match) -> None:
    with pytest.raises(ValueError, match=match):
        _enter(ClusterClassSpec(path))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cluster_class": "LocalCluster"}, r"should be an import path"),
        (
            {"cluster_class": "distributed.LocalCluster", "adapt_minimum": 3, "adapt_maximum": 2},
            r"adapt_minimum=3 should be <= adapt_maximum=2\.",
        ),
        (
            {"cluster_class": "distributed.LocalCluster", "adapt_maximum": 0},
            r"adapt_maximum=0 should be >= 1\.",
        ),
    ],
)
def test_cluster_class_spec_validation(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        ClusterClassSpec(**kwargs)


def test_cluster_class_without_adapt_refused_before_start() -> None:
    # distributed.Scheduler has no adapt(); it must be refused before being built.
    spec = ClusterClassSpec("distributed.Scheduler", adapt_maximum=2)
    with pytest.raises(ValueError, match=r"has no adapt\(\) method"):
        _enter(spec)


def test_dask_client_rejects_unknown_spec() -> None:
    with pytest.raises(TypeError, match="should be a LocalClusterSpec"):
        _enter("tcp://127.0.0.1:8786")
