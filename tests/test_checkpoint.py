"""Checkpoints: exact round trip, refusal of other data or parameters, and kill-and-resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from pipeline.checkpoint import (
    CheckpointMismatchError,
    checkpoint_path,
    checkpoint_record,
    load_checkpoint,
    save_checkpoint,
    write_checkpoint,
)
from pipeline.fit import FitState

KMEANS_GD = [sys.executable, "-m", "flows.cli"]


def _state() -> FitState:
    rng = np.random.default_rng(0)
    state = FitState.start(rng.normal(size=(2, 3, 4)))
    state.iteration = 5
    state.previous = state.centers + 1e-17 * rng.normal(size=state.centers.shape)
    state.last_loss = np.array([1.0 / 3.0, np.nan])
    state.active[1] = False
    state.stop_reason[1] = "loss-tol"
    state.final_loss[1] = 2.0 / 7.0
    state.history[0].append({"iteration": 5, "loss": 1.0 / 3.0, "relative_change": None})
    return state


def test_round_trip_is_exact(tmp_path: Path) -> None:
    path = str(tmp_path / "c.json")
    state = _state()
    save_checkpoint(path, {"k": 3}, state)
    loaded = load_checkpoint(path, {"k": 3})
    assert loaded is not None
    np.testing.assert_array_equal(loaded.centers, state.centers)
    np.testing.assert_array_equal(loaded.previous, state.previous)
    np.testing.assert_array_equal(loaded.last_loss, state.last_loss)
    np.testing.assert_array_equal(loaded.last_shift, state.last_shift)
    np.testing.assert_array_equal(loaded.active, state.active)
    assert loaded.stop_reason == state.stop_reason
    assert loaded.iteration == 5
    assert loaded.history == state.history


def test_a_record_is_the_state_when_taken(tmp_path: Path) -> None:
    # the flow writes a record while the fit goes on changing the state
    path = str(tmp_path / "c.json")
    state = _state()
    save_checkpoint(str(tmp_path / "then.json"), {"k": 3}, state)
    record = checkpoint_record({"k": 3}, state)
    state.iteration += 1
    state.centers[0, 0, 0] += 1.0
    state.history[0].append({"iteration": 6, "loss": 0.25, "relative_change": 0.25})
    write_checkpoint(path, record)
    assert Path(path).read_text() == (tmp_path / "then.json").read_text()
    loaded = load_checkpoint(path, {"k": 3})
    assert loaded is not None and loaded.iteration == 5 and len(loaded.history[0]) == 1


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert load_checkpoint(str(tmp_path / "none.json"), {"k": 3}) is None


def test_other_parameters_refused_naming_them(tmp_path: Path) -> None:
    path = str(tmp_path / "c.json")
    save_checkpoint(path, {"k": 3, "seed": 0, "data": {"files": ["a"]}}, _state())
    with pytest.raises(CheckpointMismatchError, match=r"differs in: data, k\).*--no-resume"):
        load_checkpoint(path, {"k": 4, "seed": 0, "data": {"files": ["b"]}})


def test_unreadable_checkpoint_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text("{not json")
    with pytest.raises(CheckpointMismatchError, match="unreadable"):
        load_checkpoint(str(path), {"k": 3})


def test_checkpoint_is_a_sibling_of_the_output(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path / "out") == str(tmp_path / "out") + ".checkpoint.json"


@pytest.fixture(scope="module")
def slow_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough rows that an iteration takes a noticeable fraction of a second."""
    from pipeline.generate import generate_blobs

    root = tmp_path_factory.mktemp("ckpt") / "data"
    generate_blobs(root, rows=600_000, dims=16, centers=30, files=3, seed=3, row_group_rows=50_000)
    return root


def _fit_command(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        *KMEANS_GD, "fit", str(data), str(out), "-k", "30", "--id-column", "id",
        "--tol", "0", "--max-iter", "25", "--workers", "1",
        # random rows: k-means|| (the default here) finds these blobs in ~2 iterations, too
        # few to kill the run between two of them
        "--init", "random", *extra,
    ]  # fmt: skip


def test_killed_run_resumes_and_matches_uninterrupted(
    slow_data: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    full = tmp_path / "full"
    done = subprocess.run(_fit_command(slow_data, full), env=cli_env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "killed"
    log = tmp_path / "killed.log"
    with open(log, "w") as handle:
        proc = subprocess.Popen(
            _fit_command(slow_data, out), env=cli_env, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while "iteration 5 " not in log.read_text():
            assert proc.poll() is None, f"run ended before it could be killed:\n{log.read_text()}"
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its Dask workers, as a crash would
        proc.wait()
    assert not out.exists()
    saved = json.loads(Path(checkpoint_path(out)).read_text())
    # saved while the next pass runs: when a line is shown, the iteration before is saved
    assert 4 <= saved["state"]["iteration"] < 25

    resumed = subprocess.run(_fit_command(slow_data, out), env=cli_env, capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {checkpoint_path(out)} after iteration" in resumed.stdout
    assert not os.path.exists(checkpoint_path(out)), "the checkpoint is removed once done"

    a = json.loads((full / "model.json").read_text())
    b = json.loads((out / "model.json").read_text())
    np.testing.assert_array_equal(np.array(a["centers"]), np.array(b["centers"]))
    assert a["inertia"] == b["inertia"]
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]


def test_terminated_run_stops_everything_it_started_and_keeps_the_checkpoint(
    slow_data: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """SIGTERM to the command alone (as ``kill`` or ``timeout`` send it), with no Prefect
    server configured: the temporary server, the Dask workers and the rest of the process
    tree stop with the run, which exits 143 with one line on stderr."""
    own_server = {key: value for key, value in cli_env.items() if key != "PREFECT_API_URL"}
    out = tmp_path / "terminated"
    log = tmp_path / "terminated.log"
    started: list[psutil.Process] = []
    with open(log, "w") as stdout:
        proc = subprocess.Popen(
            _fit_command(slow_data, out, "--max-iter", "200"), env=own_server, stdout=stdout,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 240
            while "iteration 2 " not in log.read_text():
                assert proc.poll() is None, f"run ended before it could be stopped:\n{log.read_text()}"
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.05)
            started = psutil.Process(proc.pid).children(recursive=True)
            assert any("uvicorn" in " ".join(p.cmdline()) for p in started), "no temporary server"
            proc.send_signal(signal.SIGTERM)
            stderr = proc.communicate(timeout=120)[1]
            _, alive = psutil.wait_procs(started, timeout=15)
        finally:  # nothing left behind when the test fails
            for child in [*started, psutil.Process(proc.pid)] if proc.poll() is None else started:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert stderr == "kmeans-gd: terminated\n"
    assert alive == [], [p.cmdline() for p in alive]
    assert sorted(os.listdir(tmp_path)) == ["terminated.checkpoint.json", "terminated.log"]
    saved = json.loads(Path(checkpoint_path(out)).read_text())
    assert 2 <= saved["state"]["iteration"] < 200


def test_checkpoint_from_other_data_refused(
    slow_data: Path, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    out = tmp_path / "out"
    save_checkpoint(checkpoint_path(out), {"data": {"files": ["other.parquet"]}}, _state())
    run = subprocess.run(_fit_command(slow_data, out), env=cli_env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 2
    assert run.stderr.startswith("kmeans-gd: error: checkpoint")
    assert "other data or parameters" in run.stderr and "--no-resume" in run.stderr
    assert "Traceback" not in run.stderr
    assert not out.exists()

    fresh = subprocess.run(
        _fit_command(slow_data, out, "--no-resume", "--max-iter", "2"), env=cli_env,
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    assert (out / "model.json").exists()
