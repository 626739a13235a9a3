"""kmeans-fit and kmeans-predict as Prefect deployments on a real Prefect server (SQLite).

* served from a separate process (``python -m flows.serve``, the same as ``kmeans-gd serve``),
  runs triggered through the API, outputs and artifacts checked;
* invalid parameters refused by the server when the run is created, naming the field;
* created by ``prefect deploy --prefect-file deploy/prefect.yaml --all`` (the commands of
  deploy/README.md) and run by a ``process`` work-pool worker.

The server is the one at ``$KMEANS_GD_PREFECT_API_URL`` (CI's .ci/run starts one), else one
started here on a free port with a temporary PREFECT_HOME. Every process started here is stopped
at the end, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
API_ENV = "KMEANS_GD_PREFECT_API_URL"
RUN_TIMEOUT = 180
POOL = "kmeans-gd-process"

pytestmark = pytest.mark.timeout(600)


# --------------------------------------------------------------------------------------------
# Processes: a server, the serving process, CLI commands, a worker
# --------------------------------------------------------------------------------------------


def _prefect_cli() -> list[str]:
    return [sys.executable, "-m", "prefect"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _start(args: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A process in its own session, so that stopping it stops its children too."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (Prefect's server, runner and worker shut down gracefully on
    it; SIGINT may be ignored by a process started in the background), then SIGKILL to what is
    left of the group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children that outlived their parent
    except (ProcessLookupError, PermissionError):
        pass
    if process.poll() is None:
        process.wait(timeout=10)


def _tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The API URL of a real Prefect server, and the environment for processes that use it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("prefect")
    home = work / "home"
    home.mkdir()
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    server = None
    url = os.environ.get(API_ENV, "").rstrip("/")
    try:
        if not url:
            port = _free_port()
            url = f"http://127.0.0.1:{port}/api"
            log = work / "server.log"
            server = _start(
                [*_prefect_cli(), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                env=env | {"PREFECT_UI_ENABLED": "false", "PREFECT_API_URL": ""},
                cwd=work, log=log,
            )  # fmt: skip
            deadline = time.monotonic() + 120
            while not _healthy(url):
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the Prefect server did not start:\n{_tail(log)}")
                time.sleep(0.5)
        elif not _healthy(url):
            pytest.fail(f"{API_ENV}={url} does not answer /health")
        env["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield {"url": url, "env": env, "work": work}
    finally:
        if server is not None:
            _stop(server)


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _wait_for_deployments(
    names: list[str], since: datetime, process: subprocess.Popen, log: Path
) -> None:
    """Until each deployment exists and was (re)applied after ``since``."""
    from prefect.exceptions import ObjectNotFound

    deadline = time.monotonic() + 120
    pending = set(names)
    with _client() as client:
        while pending:
            if process.poll() is not None:
                pytest.fail(f"serving process exited with {process.returncode}:\n{_tail(log)}")
            if time.monotonic() > deadline:
                pytest.fail(f"deployments {sorted(pending)} not served in time:\n{_tail(log)}")
            for name in sorted(pending):
                try:
                    deployment = client.read_deployment_by_name(name)
                except ObjectNotFound:
                    continue
                if deployment.updated is not None and deployment.updated >= since:
                    pending.discard(name)
            time.sleep(0.5)


@pytest.fixture(scope="module")
def served(prefect_api: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``python -m flows.serve`` serving kmeans-fit/served and kmeans-predict/served."""
    work: Path = prefect_api["work"]
    log = work / "serve.log"
    since = datetime.now(UTC) - timedelta(seconds=2)
    # Run from an unrelated directory: served deployments use module entrypoints.
    process = _start(
        [sys.executable, "-m", "flows.serve", "--limit", "2"],
        env=prefect_api["env"], cwd=work, log=log,
    )  # fmt: skip
    try:
        _wait_for_deployments(["kmeans-fit/served", "kmeans-predict/served"], since, process, log)
        yield {"process": process, "log": log}
    finally:
        _stop(process)  # SIGTERM: the runner pauses the deployments and exits


@pytest.fixture(scope="module")
def points(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small Gaussian blobs in two Parquet files, with an ``id`` column."""
    from pipeline.generate import generate_blobs

    data = tmp_path_factory.mktemp("points") / "points"
    generate_blobs(data, rows=3000, dims=3, centers=4, files=2, seed=1)
    return data


def _local(workers: int = 1) -> dict[str, Any]:
    return {"kind": "local", "workers": workers, "threads_per_worker": 1}


def _run(name: str, parameters: dict[str, Any], log: Path | None = None) -> Any:
    """Create a run through the API and wait for its final state."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(name, parameters=parameters, timeout=RUN_TIMEOUT, poll_interval=1)
    assert flow_run.state is not None and flow_run.state.is_final(), (
        f"{name}: run {flow_run.id} not finished after {RUN_TIMEOUT} s: {flow_run.state}\n"
        + (_tail(log) if log else "")
    )
    assert flow_run.state.is_completed(), (
        f"{name}: run {flow_run.id} ended {flow_run.state.type}: {flow_run.state.message}\n"
        + (_tail(log) if log else "")
    )
    return flow_run


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.parquet"))


# --------------------------------------------------------------------------------------------
# Served deployments
# --------------------------------------------------------------------------------------------


def test_served_fit_then_predict_complete(
    served: dict[str, Any], points: Path, tmp_path: Path
) -> None:
    fit_out = tmp_path / "fit"
    fit_run = _run(
        "kmeans-fit/served",
        {"input": str(points), "output": str(fit_out), "k": 4, "id_column": "id",
         "max_iter": 50, "seed": 3, "cluster": _local()},
        served["log"],
    )  # fmt: skip
    model = json.loads((fit_out / "model.json").read_text())
    assert len(model["centers"]) == 4 and model["features"] == ["x0", "x1", "x2"]
    labels = _parquet_files(fit_out / "labels")
    assert [path.name for path in labels] == [path.name for path in _parquet_files(points)]
    assert sum(pq.read_metadata(path).num_rows for path in labels) == 3000
    assert fit_run.parameters["k"] == 4

    _check_artifacts(fit_run.id)

    predict_out = tmp_path / "predicted"
    _run(
        "kmeans-predict/served",
        {"model": str(fit_out / "model.json"), "input": str(points), "output": str(predict_out),
         "cluster": _local()},
        served["log"],
    )  # fmt: skip
    assert len(_parquet_files(predict_out)) == 2


def _check_artifacts(flow_run_id: Any) -> None:
    """The flow's artifacts, for those it creates: none is required."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        artifacts = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    expected_types = {
        "kmeans-fit-progress": "progress",
        "kmeans-fit-iterations": "table",
        "kmeans-fit-summary": "markdown",
    }
    for artifact in artifacts:
        assert artifact.flow_run_id == flow_run_id
        if artifact.key in expected_types:
            assert artifact.type == expected_types[artifact.key], artifact
        if artifact.type == "progress":
            assert float(artifact.data) == pytest.approx(100.0)
        elif artifact.type == "table":
            rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
            assert rows, "an empty table"
        elif artifact.type == "markdown":
            assert isinstance(artifact.data, str) and artifact.data.strip()


def test_invalid_parameters_are_refused_when_the_run_is_created(
    served: dict[str, Any], points: Path, tmp_path: Path
) -> None:
    """The server checks parameters against the flow signature (enforce_parameter_schema):
    Prefect 3 answers 409 naming the field, and no run is created."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    base = {"input": str(points), "output": str(tmp_path / "never"), "cluster": _local()}
    with _client() as client:
        deployment = client.read_deployment_by_name("kmeans-fit/served")
        runs_filter = DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
        before = len(client.read_flow_runs(deployment_filter=runs_filter, limit=200))

    cases = [
        ({**base, "k": 0}, ["field 'k'", "0 is less than the minimum of 1"]),
        ({**base, "k": 3, "cluster": {"kind": "nowhere"}}, ["field 'cluster'"]),
        ({**base, "k": 3, "init": "kmeans||"}, ["field 'init'"]),
    ]
    for parameters, phrases in cases:
        with pytest.raises(PrefectHTTPStatusError) as refused:
            run_deployment("kmeans-fit/served", parameters=parameters, timeout=0)
        assert refused.value.response.status_code == 409
        message = refused.value.response.json()["detail"]
        assert "Validation failed" in message
        for phrase in phrases:
            assert phrase in message, message

    with _client() as client:
        assert len(client.read_flow_runs(deployment_filter=runs_filter, limit=200)) == before
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------
# deploy/prefect.yaml on a process work pool
# --------------------------------------------------------------------------------------------


def _cli(
    args: list[str], prefect_api: dict[str, Any], *, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*_prefect_cli(), *args], cwd=cwd, env=prefect_api["env"], stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def test_prefect_deploy_then_a_process_worker_runs_it(
    prefect_api: dict[str, Any], points: Path, tmp_path: Path
) -> None:
    created = _cli(["work-pool", "create", POOL, "--type", "process"], prefect_api)
    assert created.returncode == 0 or "already exists" in created.stdout + created.stderr, (
        created.stdout + created.stderr
    )
    deployed = _cli(["deploy", "--prefect-file", "deploy/prefect.yaml", "--all"], prefect_api)
    output = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, output
    assert "kmeans-fit/nightly-refit" in output and "kmeans-predict/hourly-labels" in output

    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    with _client() as client:
        for config in spec["deployments"]:
            flow_name = {"flows/fit.py:kmeans_fit": "kmeans-fit",
                         "flows/predict.py:kmeans_predict": "kmeans-predict"}[config["entrypoint"]]  # fmt: skip
            deployment = client.read_deployment_by_name(f"{flow_name}/{config['name']}")
            assert deployment.parameters == config["parameters"]
            assert deployment.work_pool_name == POOL
            assert deployment.enforce_parameter_schema
            assert deployment.entrypoint == config["entrypoint"]
            assert deployment.pull_steps == [
                {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
            ]
            (schedule,) = deployment.schedules
            assert schedule.schedule.cron == config["schedules"][0]["cron"]
            assert schedule.active is False

    # The README's trigger, refused with the server's message for a bad value ...
    refused = _cli(["deployment", "run", "kmeans-fit/nightly-refit", "-p", "k=0"], prefect_api)
    assert refused.returncode != 0
    assert "Validation failed for field 'k'" in " ".join((refused.stdout + refused.stderr).split())

    # ... and run by a worker of the pool, in the project directory set by the pull step.
    from prefect.deployments import run_deployment

    out = tmp_path / "nightly"
    flow_run = run_deployment(
        "kmeans-fit/nightly-refit",
        parameters={"input": str(points), "output": str(out), "k": 3, "cluster": _local()},
        timeout=0,
    )
    log = tmp_path / "worker.log"
    worker = _start(
        [*_prefect_cli(), "worker", "start", "--pool", POOL, "--run-once"],
        env=prefect_api["env"], cwd=tmp_path, log=log,
    )  # fmt: skip
    try:
        worker.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not finish the run in {RUN_TIMEOUT} s:\n{_tail(log)}")
    finally:
        _stop(worker)
    with _client() as client:
        state = client.read_flow_run(flow_run.id).state
    assert state is not None and state.is_completed(), f"{state}\n{_tail(log)}"
    assert (out / "model.json").is_file()
    assert len(_parquet_files(out / "labels")) == 2
