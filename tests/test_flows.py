"""The kmeans-fit and kmeans-predict flows, run through Prefect's test harness on real Dask
clusters, with real Parquet files: the output contract, the cluster choice, parameter
validation, and independence from how the data is split into files and row groups."""

from __future__ import annotations

import errno
import itertools
import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import blobs, lloyd_reference, write_parquet
from distributed import get_task_stream
from prefect.exceptions import ParameterTypeError

from flows.fit import kmeans_fit
from flows.predict import kmeans_predict
from pipeline import parquet_io

FEATURES = ["x0", "x1", "x2"]
MODEL_KEYS = {
    "features", "centers", "inertia", "n_iter", "converged", "history", "stop_reason",
    "parameters", "versions",
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# The output contract, checked against NumPy on the input files
# --------------------------------------------------------------------------------------------


def numpy_distances(
    path: Path, features: Sequence[str], centers: np.ndarray, dtype: str
) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances of every row of one input file to every centre, by NumPy in float64,
    and the rounding error the pipeline may make on each row.

    The features are first rounded to ``dtype``, the precision the fit holds them in. The
    pipeline computes ``||x||^2 - 2 x.mu + ||mu||^2`` with the product in ``dtype``, so its
    error on a row is a few ``eps(dtype) * (||x||^2 + ||mu||^2)``; the tolerance allows 16.
    """
    table = pq.read_table(path)
    X = np.column_stack([table[name].to_numpy() for name in features]).astype(dtype)
    X = X.astype(np.float64)
    d2 = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(axis=2)
    scale = (X**2).sum(axis=1) + (centers**2).sum(axis=1).max()
    return d2, 16 * np.finfo(dtype).eps * scale + 1e-12


def check_labels_dir(
    labels_dir: Path,
    input_files: Sequence[Path],
    features: Sequence[str],
    centers: np.ndarray,
    dtype: str,
) -> float:
    """One labelled file per input file, named after it, in input row order: the non-feature
    columns, then ``cluster`` (int32) and ``distance`` (float64). Returns the NumPy loss."""
    assert sorted(os.listdir(labels_dir)) == sorted(p.name for p in input_files)
    total = 0.0
    for path in input_files:
        source = pq.read_table(path)
        out = pq.read_table(labels_dir / path.name)
        passthrough = [name for name in source.column_names if name not in features]
        assert out.column_names == [*passthrough, "cluster", "distance"]
        assert out.schema.field("cluster").type == pa.int32()
        assert out.schema.field("distance").type == pa.float64()
        assert out.num_rows == source.num_rows
        # Non-feature columns are copied: values, types and row order.
        assert out.select(passthrough).equals(source.select(passthrough))

        d2, tol = numpy_distances(path, features, centers, dtype)
        rows = np.arange(len(d2))
        best = d2.argmin(axis=1)
        nearest = d2[rows, best]
        cluster = out["cluster"].to_numpy()
        distance = out["distance"].to_numpy()
        # The label is NumPy's argmin wherever the two nearest centres are told apart by more
        # than the rounding error (ties within it may go either way) ...
        second = np.partition(d2, 1, axis=1)[:, 1] if d2.shape[1] > 1 else np.full(len(d2), np.inf)
        clear = second - nearest > 2 * tol
        assert clear.mean() > 0.99
        np.testing.assert_array_equal(cluster[clear], best[clear])
        # ... and always a centre at the least distance, up to rounding.
        assert (d2[rows, cluster] <= nearest + 2 * tol).all()
        # distance is the squared distance to the assigned centre.
        assert (np.abs(distance - d2[rows, cluster]) <= tol).all(), np.abs(
            distance - d2[rows, cluster]
        ).max()
        total += float(nearest.sum())
    return total


def check_fit_output(
    output: Path,
    input_files: Sequence[Path],
    *,
    k: int,
    features: Sequence[str] = FEATURES,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The whole fit output contract; returns model.json's content."""
    model = json.loads((output / "model.json").read_text())
    assert MODEL_KEYS <= model.keys()
    assert model["features"] == list(features)
    centers = np.asarray(model["centers"], dtype=np.float64)
    assert centers.shape == (k, len(features))
    assert np.isfinite(centers).all()
    assert isinstance(model["n_iter"], int) and model["n_iter"] >= 1
    assert isinstance(model["converged"], bool)
    assert isinstance(model["stop_reason"], str) and model["stop_reason"]
    assert model["converged"] == (model["stop_reason"] != "max-iter")
    history = model["history"]
    assert isinstance(history, list) and len(history) == model["n_iter"]
    losses = [record["loss"] for record in history]
    assert all(isinstance(loss, float) and math.isfinite(loss) for loss in losses)
    assert isinstance(model["parameters"], dict) and model["parameters"]["k"] == k
    assert isinstance(model["versions"], dict) and "kmeans-gd" in model["versions"]

    loss = check_labels_dir(output / "labels", input_files, features, centers, dtype)
    # inertia is the loss of the final centres over all rows, recomputed by NumPy.
    assert model["inertia"] == pytest.approx(loss, rel=1e-6)
    # ... and the last iteration evaluated exactly those centres.
    assert losses[-1] == pytest.approx(model["inertia"], rel=1e-12)
    return model


def no_leftovers(parent: Path, name: str) -> list[str]:
    """Entries next to an output named ``name`` that a run may have left: temporary siblings."""
    return [entry for entry in os.listdir(parent) if entry.startswith(f".{name}.tmp-")]


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def _write_tagged(
    directory: Path, X: np.ndarray, bounds: Sequence[int], row_group_rows: int
) -> list[Path]:
    """Files cut at ``bounds``, with a global int64 ``id`` and a string ``tag`` before the
    features."""
    cuts = [0, *bounds, len(X)]
    paths = []
    for i, (lo, hi) in enumerate(itertools.pairwise(cuts)):
        ids = np.arange(lo, hi, dtype=np.int64)
        tags = np.array([f"row-{j}" for j in ids], dtype=object)
        paths.append(
            write_parquet(directory / f"part-{i}.parquet", X[lo:hi], row_group_rows=row_group_rows,
                          extra={"id": ids, "tag": tags})
        )  # fmt: skip
    return paths


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """2,400 rows of 4 blobs in 3 files with row groups of 137 rows; id and tag columns."""
    directory = tmp_path_factory.mktemp("flows") / "data"
    X = blobs(n=2400, d=3, k=4, seed=1)
    return directory, _write_tagged(directory, X, [700, 1501], row_group_rows=137)


@pytest.fixture(scope="module")
def scheduler(dask_client: Any) -> dict[str, str]:
    return {"kind": "scheduler", "address": dask_client.scheduler.address}


@pytest.fixture(scope="module")
def fitted(
    prefect_harness: None,
    small: tuple[Path, list[Path]],
    scheduler: dict[str, str],
    dask_client: Any,
) -> dict[str, Any]:
    """One kmeans-fit flow run on the session cluster, with its task stream."""
    directory, _ = small
    output = directory.parent / "fit-out"
    with get_task_stream(client=dask_client) as stream:
        state = kmeans_fit(
            input=str(directory), output=str(output), k=4, id_column="id", cluster=scheduler,
            return_state=True,
        )  # fmt: skip
    return {"state": state, "output": output, "tasks": list(stream.data)}


# --------------------------------------------------------------------------------------------
# kmeans-fit and kmeans-predict
# --------------------------------------------------------------------------------------------


def test_fit_flow_completes_and_writes_the_output_contract(
    fitted: dict[str, Any], small: tuple[Path, list[Path]]
) -> None:
    state, output = fitted["state"], fitted["output"]
    assert state.is_completed(), state.message
    summary = state.result()
    model = check_fit_output(output, small[1], k=4)

    assert summary["output"] == str(output)
    assert summary["n_rows"] == 2400
    for key in ("inertia", "n_iter", "converged", "stop_reason"):
        assert summary[key] == model[key], key
    labels = np.concatenate(
        [pq.read_table(output / "labels" / p.name)["cluster"].to_numpy() for p in small[1]]
    )
    assert summary["cluster_sizes"] == pytest.approx(np.bincount(labels, minlength=4).tolist())
    # Four well separated blobs: every cluster is used.
    assert min(summary["cluster_sizes"]) > 0
    assert model["parameters"]["id_column"] == "id"
    assert no_leftovers(output.parent, output.name) == []


def test_fit_flow_runs_on_the_given_scheduler(fitted: dict[str, Any]) -> None:
    """cluster={"kind": "scheduler", ...} computes on that cluster: its scheduler saw the
    Parquet reads and the labelling tasks of the run."""
    keys = [str(task["key"]) for task in fitted["tasks"]]
    assert any("read-parquet" in key for key in keys), keys[:20]
    # the rows fit the workers' memory: labelled where they are held, then written file by file
    assert any("_chunk_labels_task" in key for key in keys), keys[:20]
    assert any("_write_labels_task" in key for key in keys), keys[:20]


def test_fit_flow_run_is_recorded_by_the_api(fitted: dict[str, Any]) -> None:
    from prefect.client.orchestration import get_client

    run_id = fitted["state"].state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        flow = client.read_flow(run.flow_id)
    assert flow.name == "kmeans-fit"
    assert run.state is not None and run.state.is_completed()
    assert run.parameters["k"] == 4
    assert run.parameters["output"] == str(fitted["output"])


def test_predict_flow_labels_equal_the_fit_labels(
    fitted: dict[str, Any], small: tuple[Path, list[Path]], scheduler: dict[str, str]
) -> None:
    output = fitted["output"]
    predicted = output.parent / "predict-out"
    # The model given as the fit's output directory.
    state = kmeans_predict(
        model=str(output), input=str(small[0]), output=str(predicted), cluster=scheduler,
        return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    summary = state.result()
    model = json.loads((output / "model.json").read_text())

    # Same layout as the fit's labels/, directly under OUTPUT.
    assert sorted(os.listdir(predicted)) == sorted(p.name for p in small[1])
    loss = check_labels_dir(predicted, small[1], FEATURES, np.asarray(model["centers"]), "float32")
    for path in small[1]:
        fit_labels = pq.read_table(output / "labels" / path.name)
        assert pq.read_table(predicted / path.name).equals(fit_labels), path.name
    assert summary["n_rows"] == 2400
    assert summary["output"] == str(predicted)
    assert summary["inertia"] == pytest.approx(model["inertia"], rel=1e-9)
    assert summary["inertia"] == pytest.approx(loss, rel=1e-6)
    assert no_leftovers(predicted.parent, predicted.name) == []


def test_predict_flow_applies_a_model_read_from_a_url(
    fitted: dict[str, Any], small: tuple[Path, list[Path]], scheduler: dict[str, str],
    tmp_path: Path,
) -> None:
    """A model copied to object storage (here fsspec's in-memory filesystem, which the flow,
    run in this process, sees) labels as the local one does."""
    import fsspec

    memory = fsspec.filesystem("memory")
    url = f"memory://{tmp_path.name}/model.json"
    memory.put_file(str(fitted["output"] / "model.json"), url)
    predicted = tmp_path / "predict-out"
    try:
        state = kmeans_predict(
            model=url, input=str(small[0]), output=str(predicted), cluster=scheduler,
            return_state=True,
        )  # fmt: skip
    finally:
        memory.rm(f"memory://{tmp_path.name}", recursive=True)
    assert state.is_completed(), state.message
    for path in small[1]:
        fit_labels = pq.read_table(fitted["output"] / "labels" / path.name)
        assert pq.read_table(predicted / path.name).equals(fit_labels), path.name


def test_predict_flow_on_a_filesystem_without_locks_warns_and_writes(
    fitted: dict[str, Any], small: tuple[Path, list[Path]], scheduler: dict[str, str],
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    def no_locks(fd: int, operation: int) -> None:  # NFS without its lock service
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(parquet_io.fcntl, "flock", no_locks)
    predicted = tmp_path / "predict-out"
    state = kmeans_predict(
        model=str(fitted["output"]), input=str(small[0]), output=str(predicted),
        cluster=scheduler, return_state=True,
    )  # fmt: skip
    assert state.is_completed(), state.message
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    expected = (
        f"output '{predicted}' is not locked: its filesystem cannot lock"
        f" '{tmp_path / '.predict-out.lock'}' (No locks available), so a second run writing it"
        " at the same time would not be refused; do not schedule overlapping runs on it."
    )
    assert [m for m in warned if "is not locked" in m] == [expected]
    assert sorted(os.listdir(predicted)) == sorted(p.name for p in small[1])
    assert sorted(os.listdir(tmp_path)) == ["predict-out"]


def test_nan_found_inside_the_flow_fails_the_run_and_writes_nothing(
    prefect_harness: None, tmp_path: Path, scheduler: dict[str, str]
) -> None:
    X = blobs(n=300, d=3, k=3, seed=2)
    files = _write_tagged(tmp_path / "data", X, [150], row_group_rows=64)
    table = pq.read_table(files[1])
    x1 = table["x1"].to_numpy().copy()
    x1[77] = np.nan
    pq.write_table(
        table.set_column(table.schema.get_field_index("x1"), "x1", pa.array(x1)), files[1]
    )
    output = tmp_path / "out"

    state = kmeans_fit(
        input=str(tmp_path / "data"), output=str(output), k=3, id_column="id", cluster=scheduler,
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert "'x1'" in state.message and "part-1.parquet" in state.message
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_minibatch_fit_through_the_flow(
    prefect_harness: None, small: tuple[Path, list[Path]], scheduler: dict[str, str], tmp_path: Path
) -> None:
    output = tmp_path / "mini"
    result = kmeans_fit(
        input=str(small[0]), output=str(output), k=4, id_column="id", step="minibatch",
        batch_size=700, patience=3, max_iter=50, cluster=scheduler,
    )  # fmt: skip
    model = json.loads((output / "model.json").read_text())
    assert model["init"] == {"method": "k-means++", "n_init": 1}  # auto, on 2,400 rows
    assert model["stop_reason"] in ("no-improvement", "max-iter")
    assert result["stop_reason"] == model["stop_reason"]
    assert all(rec["rows"] < 2400 for rec in model["history"])  # batches, not full passes
    loss = check_labels_dir(output / "labels", small[1], FEATURES, np.asarray(model["centers"]), "float32")
    # the inertia comes from the label pass: the loss of the final means over all rows
    assert model["inertia"] == pytest.approx(loss, rel=1e-6)
    assert model["restarts"][0]["inertia"] == model["inertia"]
    assert min(model["cluster_sizes"]) > 0


def test_warm_start_from_an_earlier_model(
    fitted: dict[str, Any], small: tuple[Path, list[Path]], scheduler: dict[str, str], tmp_path: Path
) -> None:
    earlier = fitted["output"] / "model.json"
    output = tmp_path / "warm"
    kmeans_fit(
        input=str(small[0]), output=str(output), k=4, id_column="id", init=str(earlier),
        n_init=3, cluster=scheduler,
    )  # fmt: skip
    model = check_fit_output(output, small[1], k=4)
    assert model["init"] == {"method": "warm-start", "n_init": 1, "from": str(earlier)}
    before = json.loads(earlier.read_text())
    # the first pass evaluated exactly the earlier means, and the fit went on from there
    assert model["history"][0]["loss"] == pytest.approx(before["inertia"], rel=1e-12)
    assert model["inertia"] <= before["inertia"]


def test_warm_start_with_another_k_fails_before_any_work(
    fitted: dict[str, Any], small: tuple[Path, list[Path]], scheduler: dict[str, str], tmp_path: Path
) -> None:
    earlier = fitted["output"] / "model.json"
    state = kmeans_fit(
        input=str(small[0]), output=str(tmp_path / "out"), k=3, id_column="id",
        init=str(earlier), cluster=scheduler, return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    assert f"init model '{earlier}' holds 4 centres; k=3." in state.message
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# Parameter validation, as the Prefect API and the CLI do it
# --------------------------------------------------------------------------------------------

_GOOD = {"input": "data", "output": "out", "k": 3}

BAD_FIT_PARAMETERS = [
    ({"k": 0}, "k"),
    ({"k": "three"}, "k"),
    ({"input": ""}, "input"),
    ({"output": ""}, "output"),
    ({"init": "kmeans||"}, "init"),
    ({"init": "kmeans++"}, "init"),
    ({"oversampling": 0}, "oversampling"),
    ({"init_rounds": 0}, "init_rounds"),
    ({"batch_size": 0}, "batch_size"),
    ({"patience": 0}, "patience"),
    ({"n_init": 0}, "n_init"),
    ({"max_iter": 0}, "max_iter"),
    ({"tol": -1e-3}, "tol"),
    ({"tol": float("nan")}, "tol"),
    ({"seed": -1}, "seed"),
    ({"step": "sideways"}, "step"),
    ({"learning_rate": 0.0}, "learning_rate"),
    ({"alpha": 1.5}, "alpha"),
    ({"dtype": "float16"}, "dtype"),
    ({"cache": "disk"}, "cache"),
    ({"features": "x0"}, "features"),
    ({"cluster": {"kind": "scheduler", "address": "ftp://host:8786"}}, "address"),
    ({"cluster": {"kind": "scheduler"}}, "address"),
    ({"cluster": {"kind": "local", "workers": 0}}, "workers"),
    ({"cluster": {"kind": "local", "memory_limit": "lots"}}, "memory_limit"),
    ({"cluster": {"kind": "local", "threads": 2}}, "threads"),
    ({"cluster": {"kind": "cloud"}}, "cluster"),
]


@pytest.mark.parametrize(
    ("change", "name"),
    BAD_FIT_PARAMETERS,
    ids=[f"{n}-{i}" for i, (_, n) in enumerate(BAD_FIT_PARAMETERS)],
)
def test_fit_validate_parameters_refuses_and_names_the_parameter(
    change: dict[str, Any], name: str
) -> None:
    with pytest.raises(ParameterTypeError) as info:
        kmeans_fit.validate_parameters(_GOOD | change)
    # The message names the parameter (as a whole word, so 'k' is not found inside 'kind').
    problems = str(info.value).splitlines()[1:]
    assert any(_names(line, name) for line in problems), str(info.value)


def _names(line: str, name: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", line) is not None


def test_fit_validate_parameters_accepts_and_coerces_good_values(dask_client: Any) -> None:
    address = dask_client.scheduler.address
    checked = kmeans_fit.validate_parameters(
        _GOOD | {"cluster": {"kind": "scheduler", "address": address}, "tol": 0, "step": "damped",
                 "alpha": 1, "features": ["x0", "x1"]}
    )  # fmt: skip
    assert checked["k"] == 3 and checked["features"] == ["x0", "x1"]
    assert checked["cluster"].kind == "scheduler" and checked["cluster"].address == address


@pytest.mark.parametrize(
    ("change", "name"),
    [
        ({"model": ""}, "model"),
        ({"input": ""}, "input"),
        ({"cluster": {"kind": "scheduler", "address": "http://host:8786"}}, "address"),
    ],
)
def test_predict_validate_parameters_refuses_and_names_the_parameter(
    change: dict[str, Any], name: str
) -> None:
    good = {"model": "out/model.json", "input": "data", "output": "pred"}
    with pytest.raises(ParameterTypeError) as info:
        kmeans_predict.validate_parameters(good | change)
    assert any(_names(line, name) for line in str(info.value).splitlines()[1:]), str(info.value)


# --------------------------------------------------------------------------------------------
# The split of the data into files and row groups does not change the result
# --------------------------------------------------------------------------------------------


def test_result_does_not_depend_on_files_and_row_groups(
    prefect_harness: None, tmp_path: Path, scheduler: dict[str, str]
) -> None:
    # More rows than the k-means++ sample (10,000), so the sampling is exercised too.
    X = blobs(n=12_000, d=3, k=5, seed=3, spread=2.0)
    one = _write_tagged(tmp_path / "one", X, [], row_group_rows=len(X))
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in one] == [1]
    three = _write_tagged(tmp_path / "three", X, [4001, 7777], row_group_rows=997)
    assert [pq.ParquetFile(p).metadata.num_row_groups for p in three] == [5, 4, 5]

    models, labels = [], []
    for name in ("one", "three"):
        output = tmp_path / f"out-{name}"
        result = kmeans_fit(
            input=str(tmp_path / name), output=str(output), k=5, id_column="id", seed=11,
            init="k-means++", cluster=scheduler,
        )  # fmt: skip
        assert result["n_rows"] == len(X)
        models.append(json.loads((output / "model.json").read_text()))
        files = sorted((output / "labels").iterdir())
        labels.append(pa.concat_tables(pq.read_table(f) for f in files))

    a, b = (np.asarray(m["centers"]) for m in models)
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    assert models[0]["n_iter"] == models[1]["n_iter"]
    assert models[1]["inertia"] == pytest.approx(models[0]["inertia"], rel=1e-6)
    np.testing.assert_array_equal(labels[0]["id"].to_numpy(), np.arange(len(X)))
    np.testing.assert_array_equal(labels[1]["id"].to_numpy(), np.arange(len(X)))
    np.testing.assert_array_equal(labels[0]["cluster"].to_numpy(), labels[1]["cluster"].to_numpy())


def test_data_far_from_zero_fits_as_float64_does(
    prefect_harness: None, tmp_path: Path, scheduler: dict[str, str]
) -> None:
    """Coordinates such as (500000, 4000000) +- 50 (projected metres), held as float32 (the
    default): the fit ends on the means, labels and inertia of a float64 NumPy Lloyd from the
    same means, because every feature is read less its origin; predict labels alike."""
    rng = np.random.default_rng(5)
    truth = rng.uniform(-40, 40, size=(5, 2))
    X = truth[rng.integers(0, 5, 3000)] + rng.normal(0, 3, size=(3000, 2)) + [5e5, 4e6]
    write_parquet(tmp_path / "in" / "p.parquet", X, row_group_rows=1000)
    start = truth + [5e5, 4e6] + 4.0
    init = write_parquet(tmp_path / "init.parquet", start)

    C, labels, inertia = lloyd_reference(X, start)

    output = tmp_path / "out"
    kmeans_fit(input=str(tmp_path / "in"), output=str(output), k=5, init=str(init), tol=0,
               cluster=scheduler)  # fmt: skip
    model = json.loads((output / "model.json").read_text())
    np.testing.assert_allclose(model["centers"], C, rtol=0, atol=1e-4)  # 0.1 mm
    assert model["inertia"] == pytest.approx(inertia, rel=1e-6)
    fitted = pq.read_table(output / "labels" / "p.parquet")
    np.testing.assert_array_equal(fitted["cluster"].to_numpy(), labels)
    # within the float32 products' rounding of values within 60 of the origin (numpy_distances)
    np.testing.assert_allclose(fitted["distance"].to_numpy(), ((X - C[labels]) ** 2).sum(axis=1),
                               rtol=0, atol=16 * np.finfo(np.float32).eps * 2 * 60**2)  # fmt: skip
    kmeans_predict(model=str(output), input=str(tmp_path / "in"), output=str(tmp_path / "pred"),
                   cluster=scheduler)  # fmt: skip
    assert pq.read_table(tmp_path / "pred" / "p.parquet").equals(fitted)
