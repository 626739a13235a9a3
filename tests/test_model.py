"""model.json round trip and warm-start centres: what is accepted, in which column order, and
the one-line refusals."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.model import read_init_centers, read_model, write_model
from pipeline.parquet_io import InputError

CENTERS = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])


def _model(tmp_path: Path, features=("a", "b", "c"), centers=CENTERS) -> Path:
    path = tmp_path / "model.json"
    write_model(str(path), {"features": list(features), "centers": centers})
    return path


def test_model_round_trip(tmp_path: Path) -> None:
    model = read_model(_model(tmp_path))
    assert model.features == ("a", "b", "c")
    np.testing.assert_array_equal(model.centers, CENTERS)
    assert json.loads((tmp_path / "model.json").read_text())["format"] == "kmeans-gd/model/v1"


def test_model_centres_follow_the_fits_feature_order(tmp_path: Path) -> None:
    got = read_init_centers(_model(tmp_path), 2, ["c", "a", "b"], 3)
    np.testing.assert_array_equal(got, CENTERS[:, [2, 0, 1]])


def test_parquet_centres_by_name_or_all_numeric_columns(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"cluster": [0, 1], "name": ["x", "y"], "b": CENTERS[:, 1],
                             "a": CENTERS[:, 0], "c": CENTERS[:, 2]}), path)  # fmt: skip
    np.testing.assert_array_equal(read_init_centers(path, 2, ["a", "b", "c"], 3), CENTERS)
    # without names: the numeric columns in file order, 'cluster' left out
    np.testing.assert_array_equal(read_init_centers(path, 2, None, 3), CENTERS[:, [1, 0, 2]])


@pytest.mark.parametrize(
    ("make", "k", "features", "message"),
    [
        ("model", 3, ["a", "b", "c"], "init model '{path}' holds 2 centres; k=3."),
        ("model", 2, ["a", "b", "z"], ("init model '{path}' has features a, b, c; the input's"
                                      " feature z is not among them.")),
        ("model", 2, None, "init model '{path}' has 3 features; the input has 4."),
        ("parquet", 2, ["a", "b", "z"], "init file '{path}' has no column z."),
        ("parquet", 1, ["a", "b", "c"], "init file '{path}' holds 2 centres; k=1."),
        ("nan", 2, ["a", "b", "c"], "init file '{path}' holds NaN or infinite values."),
        ("missing", 2, None, ("init file '{path}' does not exist; init should be auto, k-means||,"
                             " k-means++, random, a model.json or a Parquet file of centres.")),
        ("garbage", 2, None, "init file '{path}' is not a readable Parquet file"),
    ],
)  # fmt: skip
def test_refusals(tmp_path: Path, make: str, k: int, features, message: str) -> None:
    if make == "model":
        path = _model(tmp_path)
    else:
        path = tmp_path / "c.parquet"
        values = CENTERS.copy()
        if make == "nan":
            values[1, 1] = np.nan
        if make == "garbage":
            path.write_text("not parquet")
        elif make != "missing":
            pq.write_table(pa.table({n: values[:, j] for j, n in enumerate("abc")}), path)
    width = 4 if features is None and make == "model" else 3
    with pytest.raises(InputError, match=re.escape(message.format(path=path))):
        read_init_centers(path, k, features, width)


def test_model_and_centres_read_from_a_url(tmp_path: Path) -> None:
    """A model copied to object storage is applied from there: any fsspec URL (here fsspec's
    in-memory filesystem, in this process) reads as the local file does."""
    import fsspec

    memory = fsspec.filesystem("memory")
    root = f"memory://{tmp_path.name}"
    memory.put_file(str(_model(tmp_path)), f"{root}/fit/model.json")
    table = tmp_path / "c.parquet"
    pq.write_table(pa.table({n: CENTERS[:, j] for j, n in enumerate("abc")}), table)
    memory.put_file(str(table), f"{root}/c.parquet")
    try:
        for given in (f"{root}/fit", f"{root}/fit/", f"{root}/fit/model.json"):
            model = read_model(given)
            assert model.path == f"{root}/fit/model.json"
            assert model.features == ("a", "b", "c")
            np.testing.assert_array_equal(model.centers, CENTERS)
        got = read_init_centers(f"{root}/fit", 2, ["c", "a", "b"], 3)
        np.testing.assert_array_equal(got, CENTERS[:, [2, 0, 1]])
        np.testing.assert_array_equal(read_init_centers(f"{root}/c.parquet", 2, None, 3), CENTERS)
        with pytest.raises(InputError, match=re.escape(f"model '{root}/no/model.json' does not exist.")):
            read_model(f"{root}/no/model.json")
    finally:
        memory.rm(root, recursive=True)
    with pytest.raises(InputError, match=r"^model 'nosuch://x/model\.json' cannot be opened: "):
        read_model("nosuch://x/model.json")
