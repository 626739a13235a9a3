"""The ``kmeans-gd`` console script, run as real subprocesses on real Parquet files.

Subprocesses talk to the session's Prefect harness (``cli_env``) rather than each starting a
temporary server, and all but one compute on the session's Dask cluster (``--scheduler``); the
end-to-end fit and the NaN refusal use the embedded LocalCluster, as a user's default run does.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_flows import check_fit_output, check_labels_dir

from pipeline import parquet_io

KMEANS_GD = shutil.which("kmeans-gd", path=os.path.dirname(sys.executable)) or "kmeans-gd"

ITERATION_LINE = re.compile(
    r"^iteration (?P<n>\d+)  loss (?P<loss>\S+)  change (?P<change>\S+)"
    r"  (?:.*  )?seconds (?P<s>\d+\.\d+)$"
)
SUMMARY_LINE = re.compile(
    r"^done: (?P<rows>\d+) rows, inertia (?P<inertia>\S+), (?P<n_iter>\d+) iterations"
    r" \((?P<reason>[\w-]+)\), wall time (?P<seconds>[\d.]+) s$"
)


def run(
    args: list[str], env: dict[str, str], cwd: Path, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KMEANS_GD, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def own_server_env(cli_env: dict[str, str]) -> dict[str, str]:
    """No Prefect API configured: the process starts (and stops) a temporary server itself."""
    return {key: value for key, value in cli_env.items() if key != "PREFECT_API_URL"}


def _parquet_names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".parquet")


def _labels(directory: Path) -> dict[str, pa.Table]:
    return {name: pq.read_table(directory / name) for name in _parquet_names(directory)}


# --------------------------------------------------------------------------------------------
# End to end: generate, fit, fit again with --quiet --overwrite, predict
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def generated(workdir: Path, cli_env: dict[str, str]) -> Path:
    data = workdir / "data"
    proc = run(
        ["generate", data, "--rows", 3000, "--dims", 3, "--centers", 5, "--files", 3,
         "--seed", 4, "--row-group-rows", 333],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"wrote 3000 rows x 3 features in 3 files to {data}"
    return data


@pytest.fixture(scope="module")
def cli_fit(
    workdir: Path, generated: Path, cli_env: dict[str, str]
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """The default run: embedded LocalCluster, per-iteration lines."""
    output = workdir / "out"
    proc = run(["fit", generated, output, "-k", 5, "--id-column", "id"], cli_env, workdir)
    return proc, output


def test_generate_writes_the_files(generated: Path) -> None:
    assert _parquet_names(generated) == [f"part-{i:05d}.parquet" for i in range(3)]
    rows = [
        pq.ParquetFile(generated / name).metadata.num_rows for name in _parquet_names(generated)
    ]
    assert rows == [1000, 1000, 1000]
    assert pq.ParquetFile(generated / "part-00000.parquet").metadata.num_row_groups == 4


def test_fit_end_to_end(
    cli_fit: tuple[subprocess.CompletedProcess[str], Path], generated: Path
) -> None:
    proc, output = cli_fit
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "error" not in proc.stderr.lower(), proc.stderr

    files = [generated / name for name in _parquet_names(generated)]
    model = check_fit_output(output, files, k=5, features=["x0", "x1", "x2"])
    assert model["parameters"]["id_column"] == "id"
    # id is the only non-feature column and it is copied to the labels.
    assert pq.read_schema(output / "labels" / files[0].name).names == ["id", "cluster", "distance"]

    lines = proc.stdout.splitlines()
    # what was chosen, before the first iteration
    assert lines[0] == f"input {generated}: 3000 rows in 3 files, features x0, x1, x2"
    assert re.fullmatch(r"data: 3 chunks, held in the workers' memory \(data 0\.0 MiB fits in 50% of"
                        r" the workers' \d+ MiB\)", lines[1]), lines[1]  # fmt: skip
    assert re.fullmatch(r"initialised 1 restart\(s\) with k-means\+\+ in [\d.]+ s", lines[2])
    iterations = [m for m in map(ITERATION_LINE.match, lines) if m]
    assert lines.index(iterations[0].string) == 3
    assert [int(m["n"]) for m in iterations] == list(range(1, model["n_iter"] + 1)), proc.stdout
    for m, record in zip(iterations, model["history"], strict=True):
        assert float(m["loss"]) == pytest.approx(record["loss"], rel=1e-5)
        if record["relative_change"] is None:
            assert m["change"] == "-"
        else:
            assert float(m["change"]) == pytest.approx(
                record["relative_change"], rel=1e-3, abs=1e-12
            )
        assert float(m["s"]) >= 0

    summaries = [m for m in map(SUMMARY_LINE.match, lines) if m]
    assert len(summaries) == 1, proc.stdout
    summary = summaries[0]
    assert int(summary["rows"]) == 3000
    assert float(summary["inertia"]) == pytest.approx(model["inertia"], rel=1e-5)
    assert int(summary["n_iter"]) == model["n_iter"]
    assert summary["reason"] == model["stop_reason"]
    rest = lines[lines.index(summary.string) + 1 :]
    assert rest[0].startswith("cluster sizes: ")
    sizes = [int(s) for s in rest[0].removeprefix("cluster sizes: ").split(", ")]
    assert len(sizes) == 5 and sum(sizes) == 3000
    assert rest[1:] == [f"model: {output / 'model.json'}", f"labels: {output / 'labels'}"]


def test_fit_run_is_recorded_by_the_session_api(
    cli_fit: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    """Pointing the subprocess at the harness with PREFECT_API_URL works: its flow run is there."""
    from prefect.client.orchestration import get_client

    proc, output = cli_fit
    assert proc.returncode == 0, proc.stderr
    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_flow_runs() if r.parameters.get("output") == str(output)]
    assert len(runs) == 1
    assert runs[0].state is not None and runs[0].state.is_completed()
    assert runs[0].parameters["k"] == 5


def test_quiet_overwrite_replaces_the_output(
    workdir: Path, cli_fit: tuple[subprocess.CompletedProcess[str], Path], generated: Path,
    cli_env: dict[str, str], dask_client: Any,
) -> None:  # fmt: skip
    proc, first = cli_fit
    assert proc.returncode == 0, proc.stderr
    output = workdir / "out-replaced"
    shutil.copytree(first, output)
    (output / "stale.txt").write_text("from an earlier run")

    proc = run(
        ["fit", generated, output, "-k", 3, "--id-column", "id", "--overwrite", "--quiet",
         "--scheduler", dask_client.scheduler.address],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not any(line.startswith("iteration") for line in proc.stdout.splitlines()), proc.stdout
    assert len([line for line in proc.stdout.splitlines() if SUMMARY_LINE.match(line)]) == 1

    # Replaced, not merged: the old files are gone and the new model has k=3.
    assert "stale.txt" not in os.listdir(output)
    files = [generated / name for name in _parquet_names(generated)]
    check_fit_output(output, files, k=3)
    # Nothing left beside it: no temporary or old sibling, no checkpoint.
    assert [n for n in os.listdir(workdir) if n.startswith(".") or "checkpoint" in n] == []


def test_fit_with_kmeans_parallel_init(
    workdir: Path, generated: Path, cli_env: dict[str, str], dask_client: Any,
) -> None:  # fmt: skip
    output = workdir / "out-kmeans-parallel"
    proc = run(
        ["fit", generated, output, "-k", 5, "--id-column", "id", "--init", "k-means||", "--quiet",
         "--scheduler", dask_client.scheduler.address],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    files = [generated / name for name in _parquet_names(generated)]
    model = check_fit_output(output, files, k=5, features=["x0", "x1", "x2"])
    assert model["parameters"]["init"] == "k-means||"
    # five well separated blobs: every one gets a mean, none is empty
    assert min(model["cluster_sizes"]) > 300


def test_fit_minibatch_then_warm_start_from_its_model(
    workdir: Path, generated: Path, cli_env: dict[str, str], dask_client: Any,
) -> None:  # fmt: skip
    files = [generated / name for name in _parquet_names(generated)]
    mini = workdir / "out-minibatch"
    proc = run(
        ["fit", generated, mini, "-k", 5, "--id-column", "id", "--step", "minibatch",
         "--batch-size", 1000, "--patience", 3, "--scheduler", dask_client.scheduler.address],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^iteration 1  batch loss \S+  smoothed \S+  rows \d+  seconds", proc.stdout, re.MULTILINE)
    model = json.loads((mini / "model.json").read_text())
    assert model["parameters"]["step"] == "minibatch"
    assert model["stop_reason"] in ("no-improvement", "max-iter")
    loss = check_labels_dir(mini / "labels", files, ["x0", "x1", "x2"], np.asarray(model["centers"]), "float32")
    assert model["inertia"] == pytest.approx(loss, rel=1e-6)

    warm = workdir / "out-warm"
    proc = run(
        ["fit", generated, warm, "-k", 5, "--id-column", "id", "--init", mini / "model.json",
         "--quiet", "--scheduler", dask_client.scheduler.address],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    after = check_fit_output(warm, files, k=5, features=["x0", "x1", "x2"])
    assert after["init"]["method"] == "warm-start"
    assert after["history"][0]["loss"] == pytest.approx(model["inertia"], rel=1e-9)
    assert after["inertia"] <= model["inertia"] * (1 + 1e-9)


def test_predict_on_a_filesystem_without_locks_says_so_and_writes(
    cli_fit: tuple[subprocess.CompletedProcess[str], Path], generated: Path,
    cli_env: dict[str, str], dask_client: Any, tmp_path: Path,
) -> None:  # fmt: skip
    """Where ``flock`` fails, as on NFS without its lock service, the run goes on and its
    command line says that the output is not guarded. This machine's filesystems all lock, so
    the run's ``flock`` is replaced at start-up (``sitecustomize``)."""
    (tmp_path / "sitecustomize.py").write_text(
        "import errno, fcntl, os\n\n\n"
        "def _no_locks(fd, operation):\n"
        "    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))\n\n\n"
        "fcntl.flock = _no_locks\n"
    )
    path = os.pathsep.join(p for p in (str(tmp_path), cli_env.get("PYTHONPATH", "")) if p)
    env = {**cli_env, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1"}
    output = tmp_path / "out"
    proc = run(
        ["predict", cli_fit[1] / "model.json", generated, output,
         "--scheduler", dask_client.scheduler.address],
        env, tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        f"output '{output}' is not locked: its filesystem cannot lock"
        f" '{tmp_path / '.out.lock'}' (No locks available), so a second run writing it at the"
        " same time would not be refused; do not schedule overlapping runs on it."
    )
    assert lines[1].startswith("done: 3000 rows labelled"), proc.stdout
    assert sorted(os.listdir(output)) == _parquet_names(generated)
    assert sorted(os.listdir(tmp_path)) == ["out", "sitecustomize.py"]  # no lock file left


def test_predict_labels_equal_the_fit_labels(
    workdir: Path, cli_fit: tuple[subprocess.CompletedProcess[str], Path], generated: Path,
    cli_env: dict[str, str], dask_client: Any,
) -> None:  # fmt: skip
    proc, fitted = cli_fit
    assert proc.returncode == 0, proc.stderr
    output = workdir / "predicted"
    proc = run(
        ["predict", fitted / "model.json", generated, output,
         "--scheduler", dask_client.scheduler.address],
        cli_env, workdir,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    model = json.loads((fitted / "model.json").read_text())
    lines = proc.stdout.splitlines()
    match = re.match(r"^done: 3000 rows labelled, inertia (\S+), wall time [\d.]+ s$", lines[0])
    assert match, proc.stdout
    assert float(match[1]) == pytest.approx(model["inertia"], rel=1e-5)
    assert lines[1] == f"labels: {output}"

    # Same layout as the fit's labels/, directly under OUTPUT, and the same labels.
    files = [generated / name for name in _parquet_names(generated)]
    assert sorted(os.listdir(output)) == [p.name for p in files]
    check_labels_dir(output, files, model["features"], np.asarray(model["centers"]), "float32")
    predicted, fit_labels = _labels(output), _labels(fitted / "labels")
    assert predicted.keys() == fit_labels.keys()
    for name, table in predicted.items():
        assert table.equals(fit_labels[name]), name


# --------------------------------------------------------------------------------------------
# Bad input: one line on stderr, exit code 2, no traceback, nothing written
# --------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    root: Path  # the case's directory; OUTPUT is root / "out"
    scheduler: str  # the session cluster

    @property
    def out(self) -> Path:
        return self.root / "out"


def _table(n: int = 40, seed: int = 0, **columns: Any) -> pa.Table:
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"id": np.arange(n, dtype=np.int64)}
    data |= {"x0": rng.normal(size=n), "x1": rng.normal(size=n)}
    return pa.table(data | columns)


def _two_files(ctx: Ctx, second: pa.Table | None = None, first: pa.Table | None = None) -> Path:
    directory = ctx.root / "data"
    directory.mkdir()
    pq.write_table(
        first if first is not None else _table(seed=1),
        directory / "part-0.parquet",
        row_group_size=16,
    )
    pq.write_table(
        second if second is not None else _table(seed=2),
        directory / "part-1.parquet",
        row_group_size=16,
    )
    return directory


def _with_value(table: pa.Table, column: str, row: int, value: float) -> pa.Table:
    values = table[column].to_numpy().copy()
    values[row] = value
    return table.set_column(table.schema.get_field_index(column), column, pa.array(values))


def _fit(data: Path, ctx: Ctx, *extra: Any) -> list[Any]:
    return ["fit", data, ctx.out, *extra]


def case_missing_input(ctx: Ctx) -> list[Any]:
    return _fit(ctx.root / "no-such-data", ctx, "-k", 2)


def case_no_parquet_files(ctx: Ctx) -> list[Any]:
    (ctx.root / "csvs").mkdir()
    (ctx.root / "csvs" / "rows.csv").write_text("x0,x1\n1,2\n")
    return _fit(ctx.root / "csvs", ctx, "-k", 2)


def case_no_numeric_features(ctx: Ctx) -> list[Any]:
    path = ctx.root / "words.parquet"
    pq.write_table(
        pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"], "city": ["x", "y", "z"]}), path
    )
    return _fit(path, ctx, "-k", 2, "--id-column", "id")


def case_feature_absent(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--features", "x0,height")


def case_feature_not_numeric(ctx: Ctx) -> list[Any]:
    tags = pa.array([f"t{i}" for i in range(40)])
    data = _two_files(ctx, first=_table(seed=1, tag=tags), second=_table(seed=2, tag=tags))
    return _fit(data, ctx, "-k", 2, "--features", "x0,tag")


def case_nan_in_feature(ctx: Ctx) -> list[Any]:
    # Found only when the workers read the rows, inside the flow run; the default run:
    # embedded LocalCluster and a temporary Prefect server of its own.
    return _fit(_two_files(ctx, second=_with_value(_table(seed=2), "x1", 30, np.nan)), ctx, "-k", 2)


def case_inf_in_feature(ctx: Ctx) -> list[Any]:
    data = _two_files(ctx, first=_with_value(_table(seed=1), "x0", 5, -np.inf))
    return _fit(data, ctx, "-k", 2, "--scheduler", ctx.scheduler)


def case_schema_type_differs(ctx: Ctx) -> list[Any]:
    second = _table(seed=2)
    second = second.set_column(2, "x1", pa.array(np.arange(40, dtype=np.int64)))
    return _fit(_two_files(ctx, second=second), ctx, "-k", 2)


def case_schema_columns_differ(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx, second=_table(seed=2).drop_columns(["x1"])), ctx, "-k", 2)


def case_k_zero(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 0)


def case_k_above_rows(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 81)


def case_output_exists(ctx: Ctx) -> list[Any]:
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("precious")
    return _fit(_two_files(ctx), ctx, "-k", 2)


def case_output_url(ctx: Ctx) -> list[Any]:
    return ["fit", _two_files(ctx), "s3://bucket/out", "-k", 2]


def case_output_is_input(ctx: Ctx) -> list[Any]:
    data = _two_files(ctx)
    return ["fit", data, data, "-k", 2, "--overwrite"]


def case_input_inside_output(ctx: Ctx) -> list[Any]:
    ctx.out.mkdir()
    data = _two_files(ctx).rename(ctx.out / "data")
    return ["fit", data, ctx.out, "-k", 2, "--overwrite"]


def case_output_inside_input(ctx: Ctx) -> list[Any]:
    data = _two_files(ctx)
    return ["fit", data, data / "labels", "-k", 2]


#: Output locks that cases hold in this process while their runs are refused.
_HELD_LOCKS: list[contextlib.AbstractContextManager[None]] = []


def case_output_locked(ctx: Ctx) -> list[Any]:
    lock = parquet_io.output_lock(ctx.out)  # another run writing the same output
    lock.__enter__()
    _HELD_LOCKS.append(lock)
    return _fit(_two_files(ctx), ctx, "-k", 2)


def case_bad_step(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--step", "sideways")


def case_bad_dtype(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--dtype", "float16")


def case_negative_tol(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--tol", "-0.1")


def case_nan_tol(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--tol", "nan")


def case_non_number_tol(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--tol", "tiny")


def case_bad_scheduler_scheme(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--scheduler", "ftp://localhost:8786")


def case_scheduler_and_workers(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--scheduler", ctx.scheduler, "--workers", 2)


def case_init_typo(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--init", "kmeans++")


def case_init_missing_file(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--init", ctx.root / "old" / "model.json")


def case_init_other_k(ctx: Ctx) -> list[Any]:
    model = ctx.root / "model.json"
    model.write_text(json.dumps({"features": ["x0", "x1"], "centers": [[0, 0], [1, 1], [2, 2]]}))
    return _fit(_two_files(ctx), ctx, "-k", 2, "--id-column", "id", "--init", model)


def case_minibatch_restarts(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--step", "minibatch", "--n-init", 3)


def case_zero_oversampling(ctx: Ctx) -> list[Any]:
    return _fit(_two_files(ctx), ctx, "-k", 2, "--oversampling", 0)


def case_predict_missing_model(ctx: Ctx) -> list[Any]:
    return ["predict", ctx.root / "no-model" / "model.json", _two_files(ctx), ctx.out]


def case_predict_feature_absent(ctx: Ctx) -> list[Any]:
    model = ctx.root / "model.json"
    model.write_text(json.dumps({"features": ["x0", "width"], "centers": [[0, 0], [1, 1]]}))
    return ["predict", model, _two_files(ctx), ctx.out]


def case_predict_output_holds_model(ctx: Ctx) -> list[Any]:
    ctx.out.mkdir()
    model = ctx.out / "model.json"
    model.write_text(json.dumps({"features": ["x0", "x1"], "centers": [[0, 0], [1, 1]]}))
    return ["predict", ctx.out, _two_files(ctx), ctx.out, "--overwrite"]


BAD_INPUTS: list[Any] = [
    pytest.param(case_missing_input, ["no-such-data"], id="missing-input"),
    pytest.param(case_no_parquet_files, ["csvs"], id="no-parquet-files"),
    pytest.param(case_no_numeric_features, ["words.parquet"], id="no-numeric-features"),
    pytest.param(case_feature_absent, ["'height'"], id="feature-absent"),
    pytest.param(case_feature_not_numeric, ["'tag'"], id="feature-not-numeric"),
    pytest.param(
        case_nan_in_feature,
        ["'x1'", "part-1.parquet"],
        id="nan-in-feature",
    ),
    pytest.param(case_inf_in_feature, ["'x0'", "part-0.parquet"], id="inf-in-feature"),
    pytest.param(case_schema_type_differs, ["part-1.parquet", "x1"], id="schema-type-differs"),
    pytest.param(case_schema_columns_differ, ["part-1.parquet", "x1"], id="schema-columns-differ"),
    pytest.param(case_k_zero, [r"\bk\b"], id="k-zero"),
    pytest.param(case_k_above_rows, [r"\bk\b", "80"], id="k-above-rows"),
    pytest.param(case_output_exists, ["out", "--overwrite"], id="output-exists"),
    pytest.param(case_output_url, ["'s3://bucket/out' is a URL", "shared?"], id="output-url"),
    pytest.param(
        case_output_is_input, ["holds the input file", "part-0.parquet"], id="output-is-input"
    ),
    pytest.param(
        case_input_inside_output, ["holds the input file", "out/data"], id="input-inside-output"
    ),
    pytest.param(
        case_output_inside_input, ["data/labels", "inside the input directory"],
        id="output-inside-input",
    ),
    pytest.param(
        case_output_locked, ["'.*/out' is being written by another run", r"/\.out\.lock'"],
        id="output-locked",
    ),
    pytest.param(case_bad_step, ["step"], id="bad-step"),
    pytest.param(case_bad_dtype, ["dtype"], id="bad-dtype"),
    pytest.param(case_negative_tol, ["tol"], id="negative-tol"),
    pytest.param(case_nan_tol, ["tol"], id="nan-tol"),
    pytest.param(
        case_non_number_tol,
        ["tol"],
        id="non-number-tol",
    ),
    pytest.param(case_bad_scheduler_scheme, ["scheduler"], id="bad-scheduler-scheme"),
    pytest.param(
        case_scheduler_and_workers, ["--scheduler", "--workers"], id="scheduler-and-workers"
    ),
    pytest.param(case_init_typo, ["init"], id="init-typo"),
    pytest.param(case_init_missing_file, ["old/model.json", "does not exist"], id="init-missing-file"),
    pytest.param(case_init_other_k, ["model.json", "holds 3 centres; k=2"], id="init-other-k"),
    pytest.param(case_minibatch_restarts, ["n_init=3", "minibatch"], id="minibatch-restarts"),
    pytest.param(case_zero_oversampling, ["oversampling"], id="zero-oversampling"),
    pytest.param(case_predict_missing_model, ["no-model"], id="predict-missing-model"),
    pytest.param(case_predict_feature_absent, ["'width'"], id="predict-feature-absent"),
    pytest.param(
        case_predict_output_holds_model, ["holds the model", "model.json"],
        id="predict-output-holds-model",
    ),
]


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the content of files."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@dataclass
class BadRun:
    proc: subprocess.CompletedProcess[str]
    before: dict[str, bytes | None]
    after: dict[str, bytes | None]


@pytest.fixture(scope="module")
def bad_runs(
    tmp_path_factory: pytest.TempPathFactory, cli_env: dict[str, str], dask_client: Any
) -> dict[str, BadRun]:
    """Every bad-input case, each in a directory of its own, run a few processes at a time:
    most of a refused run is Python importing Prefect, so running them side by side divides the
    wall time of the table. The long NaN case (a cluster and a server of its own) goes first."""
    builders = sorted((p.values[0] for p in BAD_INPUTS), key=lambda b: b is not case_nan_in_feature)
    jobs = []
    for build in builders:
        ctx = Ctx(
            root=tmp_path_factory.mktemp(build.__name__), scheduler=dask_client.scheduler.address
        )
        env = own_server_env(cli_env) if build is case_nan_in_feature else cli_env
        jobs.append((build.__name__, ctx.root, build(ctx), env))
    befores = {name: _tree(root) for name, root, _, _ in jobs}
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = {name: pool.submit(run, args, env, root) for name, root, args, env in jobs}
        results = {name: future.result() for name, future in procs.items()}
    runs = {name: BadRun(results[name], befores[name], _tree(root)) for name, root, _, _ in jobs}
    while _HELD_LOCKS:
        _HELD_LOCKS.pop().__exit__(None, None, None)
    return runs


@pytest.mark.parametrize(("build", "names"), BAD_INPUTS)
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(
    build: Callable[[Ctx], list[Any]], names: list[str], bad_runs: dict[str, BadRun]
) -> None:
    result = bad_runs[build.__name__]
    proc = result.proc

    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kmeans-gd: error: "), proc.stderr
    for name in names:
        assert re.search(name, lines[0]), (name, lines[0])
    assert proc.returncode == 2, proc.stderr
    # a run refused once started (bad values found by reading the rows) has said what it read
    assert all(re.match(r"(input .*|data): ", line) for line in proc.stdout.splitlines()), proc.stdout
    # No OUTPUT, no temporary sibling, no checkpoint; an existing OUTPUT is left as it was.
    assert result.after == result.before


def test_the_command_line_module_does_not_import_prefect() -> None:
    """Dask's worker processes are spawned and re-import the parent's main module (for the
    console script, ``flows.cli``): Prefect imported there cost every worker ~90 MiB."""
    code = "import sys, flows.cli; print(sorted(m for m in ('prefect', 'pipeline', 'dask') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "args",
    [
        ["fit", "no-such-data", "out", "-k", "3"],
        ["predict", "no-model/model.json", "no-such-data", "out"],
    ],
    ids=["fit", "predict"],
)
def test_a_run_refused_for_its_input_does_not_import_prefect(tmp_path: Path, args: list[str]) -> None:
    """The data, the model and the output are checked before Prefect is imported (2-3 s of a
    refused run's 5 s on a slow machine)."""
    code = (
        "import sys; from flows.cli import main; code = main(sys.argv[1:]);"
        " print(code, 'prefect' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tmp_path,
        check=False, timeout=120,
    )  # fmt: skip
    assert proc.stdout.strip() == "2 False", proc.stderr
    assert proc.stderr.startswith("kmeans-gd: error: "), proc.stderr
    assert "does not exist" in proc.stderr
