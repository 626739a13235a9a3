"""Tests for pipeline.parquet_io: resolving inputs, the chunk plan, features, reading chunks,
input errors, and the atomic output directory."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_parquet, write_split

from pipeline import kernel, parquet_io
from pipeline.parquet_io import (
    Chunk,
    InputError,
    LabelledFileWriter,
    OutputExistsError,
    atomic_output_dir,
    labelled_file_name,
    open_parquet,
    read_chunk,
    reads_in_place,
)


def _X(n: int = 30, d: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


# --------------------------------------------------------------------------------------------
# inputs: a file, a directory, a glob
# --------------------------------------------------------------------------------------------


def test_open_a_single_file(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "data.parquet", _X(12, 3))
    ds = open_parquet(path)
    assert [Path(f).name for f in ds.files] == ["data.parquet"]
    assert os.path.samefile(ds.files[0], path)
    assert ds.file_rows == (12,)
    assert ds.n_rows == 12
    assert ds.features == ("x0", "x1", "x2")
    assert ds.n_features == 3
    assert ds.passthrough_columns == ()


def test_open_a_directory_skips_hidden_and_non_parquet_files(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write_parquet(root / "part-1.parquet", _X(3))
    write_parquet(root / "part-0.parq", _X(4))
    write_parquet(root / "sub" / "part-2.pq", _X(5))
    write_parquet(root / ".hidden.parquet", _X(6))
    write_parquet(root / "_tmp" / "part-9.parquet", _X(7))
    write_parquet(root / ".staging" / "part-8.parquet", _X(8))
    (root / "_SUCCESS").write_text("")
    (root / "notes.txt").write_text("not data")
    ds = open_parquet(root)
    assert [os.path.relpath(f, root) for f in ds.files] == [
        "part-0.parq",
        "part-1.parquet",
        os.path.join("sub", "part-2.pq"),
    ]
    assert ds.file_rows == (4, 3, 5)
    # a trailing slash names the same directory
    assert open_parquet(f"{root}/").files == ds.files


def test_open_a_glob(tmp_path: Path) -> None:
    write_split(tmp_path / "in", _X(40), [10, 25, 31])
    ds = open_parquet(str(tmp_path / "in" / "part-00[12].parquet"))
    assert [Path(f).name for f in ds.files] == ["part-001.parquet", "part-002.parquet"]
    assert ds.file_rows == (15, 6)
    everything = open_parquet(str(tmp_path / "in" / "*.parquet"))
    assert everything.file_rows == (10, 15, 6, 9)


@pytest.mark.parametrize("name", ["run[1]/a.parquet", "b[2].parquet"])
def test_existing_path_with_glob_characters(tmp_path: Path, name: str) -> None:
    write_parquet(tmp_path / name, _X(3))
    target = tmp_path / Path(name).parts[0]
    assert open_parquet(target).file_rows == (3,)


# --------------------------------------------------------------------------------------------
# the chunk plan
# --------------------------------------------------------------------------------------------


def _chunks(ds) -> list[tuple[int, tuple[int, ...], int, int]]:
    return [(c.file_index, c.row_groups, c.n_rows, c.offset) for c in ds.chunks]


def test_chunk_plan_follows_files_and_row_groups(tmp_path: Path) -> None:
    # two files of 30 and 16 rows in row groups of 7: [7 7 7 7 2] and [7 7 2]
    write_split(tmp_path / "in", _X(46), [30], row_group_rows=7, with_id=False)
    row_bytes = 4 * 2  # float32, two features
    one_group = open_parquet(tmp_path / "in", chunk_bytes=row_bytes * 7)
    assert _chunks(one_group) == [
        (0, (0,), 7, 0),
        (0, (1,), 7, 7),
        (0, (2,), 7, 14),
        (0, (3,), 7, 21),
        (0, (4,), 2, 28),
        (1, (0,), 7, 30),
        (1, (1,), 7, 37),
        (1, (2,), 2, 44),
    ]
    two_groups = open_parquet(tmp_path / "in", chunk_bytes=row_bytes * 15)
    assert _chunks(two_groups) == [
        (0, (0, 1), 14, 0),
        (0, (2, 3), 14, 14),
        (0, (4,), 2, 28),
        (1, (0,), 7, 30),  # a chunk never spans two files;
        (1, (1, 2), 9, 37),  # two runs of 16 rows: 7 and 9 rather than 14 and 2
    ]
    # float64 rows are twice as large: the same byte budget holds half the rows
    wide = open_parquet(tmp_path / "in", chunk_bytes=row_bytes * 15, dtype="float64")
    assert wide.chunk_sizes() == (7, 7, 7, 7, 2, 7, 7, 2)
    # a chunk is never smaller than a row group, even with a tiny budget
    assert open_parquet(tmp_path / "in", chunk_bytes=1).chunk_sizes() == one_group.chunk_sizes()
    # the default budget takes each file whole
    assert _chunks(open_parquet(tmp_path / "in")) == [
        (0, (0, 1, 2, 3, 4), 30, 0),
        (1, (0, 1, 2), 16, 30),
    ]
    for ds in (one_group, two_groups, wide):
        assert sum(ds.chunk_sizes()) == ds.n_rows == 46
        assert all(isinstance(c, Chunk) and c.path == ds.files[c.file_index] for c in ds.chunks)


def test_chunk_plan_cuts_each_file_as_evenly_as_its_row_groups_allow(tmp_path: Path) -> None:
    # 15 row groups of 4 rows and one of 3 (63 rows), at most 28 rows (7 groups) a chunk: three
    # chunks, as filling each to the budget would make (28, 28, 7), but of 20, 20 and 23 rows
    write_parquet(tmp_path / "a.parquet", _X(63), row_group_rows=4)
    ds = open_parquet(tmp_path / "a.parquet", chunk_bytes=8 * 28)  # float32, two features
    assert _chunks(ds) == [
        (0, tuple(range(5)), 20, 0),
        (0, tuple(range(5, 10)), 20, 20),
        (0, tuple(range(10, 16)), 23, 40),
    ]
    # three row groups of 10 rows: two chunks under a budget of 25 rows (no even cut exists),
    # and a row group over the budget is a chunk of its own
    write_parquet(tmp_path / "b.parquet", _X(30), row_group_rows=10)
    assert open_parquet(tmp_path / "b.parquet", chunk_bytes=8 * 25).chunk_sizes() == (20, 10)
    assert open_parquet(tmp_path / "b.parquet", chunk_bytes=8 * 5).chunk_sizes() == (10, 10, 10)


def test_chunk_plan_reads_only_footers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_split(tmp_path / "in", _X(50), [13, 20], row_group_rows=4, with_id=False)

    def refuse(*args, **kwargs):
        raise AssertionError("open_parquet read row data")

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    ds = open_parquet(tmp_path / "in", chunk_bytes=8 * 8)
    assert ds.file_rows == (13, 7, 30)
    assert ds.chunk_sizes() == (8, 5, 7, 8, 8, 8, 6)
    assert [c.offset for c in ds.chunks] == [0, 8, 13, 20, 28, 36, 44]


def test_empty_file_gets_no_chunk(tmp_path: Path) -> None:
    write_parquet(tmp_path / "in" / "a.parquet", _X(5))
    write_parquet(tmp_path / "in" / "b.parquet", _X(0))
    write_parquet(tmp_path / "in" / "c.parquet", _X(4))
    ds = open_parquet(tmp_path / "in")
    assert ds.file_rows == (5, 0, 4)
    assert _chunks(ds) == [(0, (0,), 5, 0), (2, (0,), 4, 5)]


def test_fingerprint(tmp_path: Path) -> None:
    X = _X(10)
    write_parquet(tmp_path / "a.parquet", X, extra={"w": np.ones(10)})
    ds = open_parquet(tmp_path / "a.parquet", weight_column="w")
    fp = ds.fingerprint()
    assert {k: fp[k] for k in ("files", "file_rows", "features", "weight_column")} == {
        "files": ["a.parquet"],
        "file_rows": [10],
        "features": ["x0", "x1"],
        "weight_column": "w",
    }
    # the same data written again has the same fingerprint; other values of the same shape not
    write_parquet(tmp_path / "b" / "a.parquet", X, extra={"w": np.ones(10)})
    assert open_parquet(tmp_path / "b" / "a.parquet", weight_column="w").fingerprint() == fp
    write_parquet(tmp_path / "c" / "a.parquet", X + 1.0, extra={"w": np.ones(10)})
    assert open_parquet(tmp_path / "c" / "a.parquet", weight_column="w").fingerprint() != fp


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------


def _mixed_table(n: int = 6) -> pa.Table:
    rng = np.random.default_rng(1)
    return pa.table(
        {
            "id": pa.array(np.arange(n), pa.int64()),
            "name": pa.array([f"r{i}" for i in range(n)]),
            "a": pa.array(rng.normal(size=n).astype(np.float32)),
            "w": pa.array(rng.uniform(size=n)),
            "b": pa.array(np.arange(n, dtype=np.int32) * 3),
            "flag": pa.array([True, False] * (n // 2)),
            "c": pa.array(rng.normal(size=n)),
        }
    )


def test_default_features_are_numeric_columns_minus_id_and_weight(tmp_path: Path) -> None:
    pq.write_table(_mixed_table(), tmp_path / "m.parquet")
    ds = open_parquet(tmp_path / "m.parquet", id_column="id", weight_column="w")
    assert ds.features == ("a", "b", "c")
    assert ds.passthrough_columns == ("id", "name", "w", "flag")
    assert ds.id_column == "id" and ds.weight_column == "w"
    # without roles every integer or floating column is a feature, in schema order
    assert open_parquet(tmp_path / "m.parquet").features == ("id", "a", "w", "b", "c")
    # but never the columns of a labelled output, unless named
    labelled = _mixed_table().append_column("cluster", pa.array(np.zeros(6, np.int32)))
    pq.write_table(labelled.append_column("distance", pa.array(np.zeros(6))), tmp_path / "l.parquet")
    assert open_parquet(tmp_path / "l.parquet").features == ("id", "a", "w", "b", "c")
    named = open_parquet(tmp_path / "l.parquet", features=["a", "cluster"])
    assert named.features == ("a", "cluster")


@pytest.mark.parametrize(
    ("values", "origin"),
    [
        ([1e5 + 1, 1e5 + 2, 1e5 + 5], 100003.0),  # far from zero: the midpoint of the range
        ([-4e6 - 0.3, -4e6 + 0.2, -4e6 + 0.1], float(np.float32(-4e6 - 0.05))),  # a float32
        ([-3.0, 1.0, 5.0], 0.0),  # around zero
        ([2.0, 3.0, 6.0], 0.0),  # no farther from zero (4) than it spreads (4)
        ([7.0, 7.0, 7.0], 7.0),  # constant
        (np.array([10, 11, 14], dtype=np.int64), 12.0),
        (np.array([1e5 + 1, 1e5 + 2, 1e5 + 5], dtype=np.float32), 100003.0),
    ],
)
def test_features_far_from_zero_are_read_less_their_origin(
    tmp_path: Path, values: Any, origin: float
) -> None:
    """The origin comes from the footers' statistics over all row groups and files; each
    value is read as ``x - origin``, rounded once to the dtype."""
    values = np.asarray(values)
    table = pa.table({"v": values, "z": np.zeros(3)})
    (tmp_path / "in").mkdir()
    pq.write_table(table.slice(0, 2), tmp_path / "in" / "a.parquet", row_group_size=1)
    pq.write_table(table.slice(2), tmp_path / "in" / "b.parquet")
    ds = open_parquet(tmp_path / "in")
    assert ds.origin == (origin, 0.0)
    assert ds.fingerprint()["origin"] == [origin, 0.0]
    for dtype in ("float32", "float64"):
        X = np.concatenate([read_chunk(ds, chunk, dtype)[0] for chunk in ds.chunks])
        expected = (values.astype(np.float64) - origin).astype(dtype)
        np.testing.assert_array_equal(X[:, 0], expected)
    # without statistics in some row group, no origin
    pq.write_table(table.slice(2), tmp_path / "in" / "b.parquet", write_statistics=False)
    assert open_parquet(tmp_path / "in").origin == (0.0, 0.0)


def test_feature_selection(tmp_path: Path) -> None:
    pq.write_table(_mixed_table(), tmp_path / "m.parquet")
    ds = open_parquet(tmp_path / "m.parquet", features=["c", "a"], weight_column="w")
    assert ds.features == ("c", "a")  # the order asked for
    assert ds.passthrough_columns == ("id", "name", "w", "b", "flag")
    X, w = read_chunk(ds, ds.chunks[0], "float64")
    table = _mixed_table()
    np.testing.assert_array_equal(X[:, 0], table["c"].to_numpy())
    np.testing.assert_array_equal(X[:, 1], table["a"].to_numpy().astype(np.float64))
    np.testing.assert_array_equal(w, table["w"].to_numpy())


def test_read_chunk(tmp_path: Path) -> None:
    pq.write_table(_mixed_table(40), tmp_path / "m.parquet", row_group_size=8)
    ds = open_parquet(tmp_path / "m.parquet", id_column="id", chunk_bytes=4 * 4 * 16)
    assert ds.chunk_sizes() == (16, 16, 8)
    table = _mixed_table(40)
    chunk = ds.chunks[1]
    X, w = read_chunk(ds, chunk)
    assert X.dtype == np.float32 and X.shape == (16, 4)
    assert w is None
    expected = np.column_stack([table[c].to_numpy() for c in ("a", "w", "b", "c")])[16:32]
    np.testing.assert_array_equal(X, expected.astype(np.float32))
    X64, _, passthrough = read_chunk(ds, chunk, "float64", passthrough=True)
    np.testing.assert_array_equal(X64, expected)
    assert passthrough.column_names == ["id", "name", "flag"]
    assert passthrough.to_pydict() == table.select(["id", "name", "flag"]).slice(16, 16).to_pydict()

    # into a given array: that array, filled
    out = np.full((16, 4), np.nan, dtype=np.float32)
    X_out, _ = read_chunk(ds, chunk, out=out)
    assert X_out is out
    np.testing.assert_array_equal(out, expected.astype(np.float32))


def test_read_chunk_in_place(tmp_path: Path) -> None:
    """float32 features read as float32 come back as the row groups' columns, which give the
    rows ``read_chunk`` fills (less the dataset's origin), with the same weights."""
    rng = np.random.default_rng(4)
    table = pa.table({
        "far": (1e5 + rng.normal(0, 3, 50)).astype(np.float32),  # read less an origin
        "w": rng.uniform(0, 2, 50),
        "near": rng.normal(0, 1, 50).astype(np.float32),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=8)
    ds = open_parquet(tmp_path / "p.parquet", weight_column="w", chunk_bytes=4 * 2 * 20)
    assert ds.origin[0] != 0 and ds.origin[1] == 0 and len(ds.chunks) == 3
    assert reads_in_place(ds, "float32") and not reads_in_place(ds, "float64")
    for chunk in ds.chunks:
        rows, w = read_chunk(ds, chunk)
        columns, w_in_place = read_chunk(ds, chunk, in_place=True)
        assert isinstance(columns, kernel.ColumnChunk) and columns.shape == rows.shape
        np.testing.assert_array_equal(columns[np.arange(len(rows))], rows)
        np.testing.assert_array_equal(w_in_place, w)
    with pytest.raises(ValueError, match=r"cannot be read in place as float64"):
        read_chunk(ds, ds.chunks[0], "float64", in_place=True)
    pq.write_table(_mixed_table(), tmp_path / "m.parquet")
    assert not reads_in_place(open_parquet(tmp_path / "m.parquet"), "float32")


def test_labelled_batches_in_place(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    table = pa.table({
        "id": np.arange(40),
        "far": (-3e4 + rng.normal(0, 3, 40)).astype(np.float32),
        "near": rng.normal(0, 1, 40).astype(np.float32),
    })  # fmt: skip
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=16)
    ds = open_parquet(tmp_path / "p.parquet", id_column="id")
    assert ds.origin[0] != 0
    filled = list(parquet_io.iter_labelled_batches(ds, 0))
    in_place = list(parquet_io.iter_labelled_batches(ds, 0, in_place=True))
    assert [len(x) for x, _, _ in filled] == [16, 16, 8] and len(in_place) == 3
    for (rows, _, kept), (columns, _, kept_in_place) in zip(filled, in_place, strict=True):
        assert isinstance(columns, kernel.ColumnChunk)
        np.testing.assert_array_equal(columns[np.arange(len(rows))], rows)
        assert kept_in_place.equals(kept)
    with pytest.raises(ValueError, match=r"cannot be read in place as float64"):
        next(parquet_io.iter_labelled_batches(ds, 0, "float64", in_place=True))


def test_a_null_is_raised_when_reading_in_place(tmp_path: Path) -> None:
    _file_with(tmp_path, x0=pa.array([1.0, 2.0], pa.float32()), x1=pa.array([3.0, None], pa.float32()))
    ds = open_parquet(tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"feature column 'x1' in file '.*p\.parquet' has null"):
        read_chunk(ds, ds.chunks[0], in_place=True)


@pytest.mark.parametrize("compression", ["snappy", "none"])
def test_mapped_row_groups_outlive_their_map(tmp_path: Path, compression: str) -> None:
    # uncompressed plain pages could come back as slices of the map itself (pyarrow 26 copies
    # them): they must stay valid after read_row_group has closed it
    table = pa.table({"a": np.arange(30, dtype=np.float32), "b": np.arange(30.0) / 7})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=10, compression=compression, use_dictionary=False)
    mapped = parquet_io._MappedParquetFile(str(path))
    assert mapped.metadata.num_row_groups == 3
    parts = [mapped.read_row_group(i, columns=["b", "a"]) for i in range(3)]
    assert pa.concat_tables(parts).equals(table.select(["b", "a"]))


def _mapped_rss(path: Path) -> int:
    """Bytes of ``path``'s pages in this process's memory (its maps' Rss in /proc/self/smaps)."""
    total, ours = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if not head[0].endswith(":"):  # a map's header: range, perms, offset, dev, inode[, path]
                ours = len(head) >= 6 and head[5] == str(path)
            elif ours and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_mapped_row_groups_leave_no_pages_in_the_process(tmp_path: Path) -> None:
    # a streamed chunk's pages would count against a Dask worker's memory limit
    n = 3 * 65536
    table = pa.table({"a": np.arange(n, dtype=np.float32), "b": np.ones(n, np.float32)})
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=65536, compression="none", use_dictionary=False)
    mapped = parquet_io._MappedParquetFile(str(path))
    for i in range(3):
        part = mapped.read_row_group(i, columns=["a", "b"])
        assert part.column("a").to_pylist()[:2] == [65536.0 * i, 65536.0 * i + 1]
        assert 0 <= _mapped_rss(path) < 64 << 10  # 512 KiB read, none of it kept
    del mapped
    assert _mapped_rss(path) == 0  # unmapped


def test_a_file_emptied_after_planning_is_named(tmp_path: Path) -> None:
    path = _file_with(tmp_path, x0=pa.array([1.0, 2.0], pa.float32()))
    ds = open_parquet(tmp_path)
    path.write_bytes(b"")
    with pytest.raises(InputError, match=r"file '.*p\.parquet' changed while it was read: it is empty"):
        read_chunk(ds, ds.chunks[0])


@pytest.mark.parametrize(
    "out",
    [
        np.empty((15, 4), dtype=np.float32),
        np.empty((16, 4), dtype=np.float64),
        np.empty((4, 16), dtype=np.float32).T,
    ],
)
def test_read_chunk_refuses_an_unfit_out(tmp_path: Path, out: np.ndarray) -> None:
    pq.write_table(_mixed_table(40), tmp_path / "m.parquet", row_group_size=8)
    ds = open_parquet(tmp_path / "m.parquet", id_column="id", chunk_bytes=4 * 4 * 16)
    with pytest.raises(ValueError, match=r"out should be a C-contiguous \(16, 4\) array of float32"):
        read_chunk(ds, ds.chunks[0], out=out)


# --------------------------------------------------------------------------------------------
# input errors
# --------------------------------------------------------------------------------------------


def _file_with(tmp_path: Path, name: str = "p.parquet", **columns) -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize(
    ("columns", "kwargs", "message"),
    [
        (
            {"s": ["a", "b"], "t": ["c", "d"]},
            {},
            "file '{path}' has no numeric feature columns (columns: s, t); name them with --features.",
        ),
        (
            {"id": [1, 2], "s": ["a", "b"]},
            {"id_column": "id"},
            "file '{path}' has no numeric feature columns (columns: id, s)",
        ),
        (
            {"x": [1.0, 2.0], "s": ["a", "b"]},
            {"features": ["x", "zz"]},
            "feature column 'zz' is not in file '{path}' (columns: x, s).",
        ),
        (
            {"x": [1.0, 2.0], "s": ["a", "b"]},
            {"features": ["s"]},
            (
                "feature column 's' in file '{path}' has type string; features must be integer"
                " or floating point."
            ),
        ),
        (
            {"x": [1.0, 2.0], "f": [True, False]},
            {"features": ["x", "f"]},
            "feature column 'f' in file '{path}' has type bool",
        ),
        (
            {"x": [1.0, 2.0], "w": [1.0, 1.0]},
            {"features": ["x", "w"], "weight_column": "w"},
            "column 'w' cannot be both a feature and the id or weight column.",
        ),
        ({"x": [1.0, 2.0]}, {"features": []}, "features is empty"),
        ({"x": [1.0, 2.0]}, {"features": ["x", "x"]}, "features ['x', 'x'] name a column more"),
        (
            {"x": [1.0, 2.0]},
            {"id_column": "key"},
            "id_column 'key' is not in file '{path}' (columns: x).",
        ),
        ({"x": [1.0, 2.0]}, {"weight_column": "w"}, "weight_column 'w' is not in file '{path}'"),
        (
            {"x": [1.0, 2.0], "w": ["a", "b"]},
            {"weight_column": "w"},
            "weight_column 'w' in file '{path}' is not numeric.",
        ),
        ({"x": pa.array([], pa.float64())}, {}, "input '{path}' has no rows."),
    ],
)
def test_open_parquet_errors(tmp_path: Path, columns, kwargs, message: str) -> None:
    path = _file_with(tmp_path, **columns)
    # the message, with the file named by its full path
    pattern = re.escape(message).replace(re.escape("{path}"), "([^']*)")
    with pytest.raises(InputError, match=pattern) as info:
        open_parquet(path, **kwargs)
    named = re.search(pattern, str(info.value))
    if "{path}" in message:
        assert os.path.samefile(named.group(1), path)


def test_missing_input(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"input '.*nope\.parquet' does not exist\."):
        open_parquet(tmp_path / "nope.parquet")
    with pytest.raises(
        InputError, match=r"input '.*nope-\*\.parquet': no files match this pattern"
    ):
        open_parquet(str(tmp_path / "nope-*.parquet"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("")
    with pytest.raises(InputError, match=r"input '.*empty' is a directory with no \.parquet files"):
        open_parquet(tmp_path / "empty")
    # a URL whose filesystem cannot be opened: an unknown protocol, or one whose package
    # (s3fs here, not a dependency) is not installed
    with pytest.raises(
        InputError, match=r"^input 'nosuch://bucket/points' cannot be opened: Protocol not known"
    ):
        open_parquet("nosuch://bucket/points")
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(
            InputError, match=r"^input 's3://bucket/points' cannot be opened: Install s3fs"
        ):
            open_parquet("s3://bucket/points")


def test_not_a_parquet_file(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "a.parquet", _X(3))
    (tmp_path / "in" / "b.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(InputError, match=r"file '.*b\.parquet' is not a readable Parquet file"):
        open_parquet(tmp_path / "in")


@pytest.mark.parametrize(
    ("second", "difference"),
    [
        (
            {"x0": pa.array([1.0], pa.float32()), "x1": [1.0]},
            "column 'x0' is float, expected double",
        ),
        ({"x0": [1.0]}, "missing columns ['x1'], extra columns []"),
        ({"x0": [1.0], "x1": [1.0], "x2": [1.0]}, "missing columns [], extra columns ['x2']"),
    ],
)
def test_schemas_differing_between_files(tmp_path: Path, second, difference: str) -> None:
    (tmp_path / "in").mkdir()
    _file_with(tmp_path / "in", "a.parquet", x0=[1.0, 2.0], x1=[3.0, 4.0])
    _file_with(tmp_path / "in", "b.parquet", **second)
    pattern = (
        r"file '.*b\.parquet' has a different schema from '.*a\.parquet': "
        + re.escape(difference)
        + r"\.$"
    )
    with pytest.raises(InputError, match=pattern):
        open_parquet(tmp_path / "in")


def test_files_may_order_columns_differently_and_differ_in_nullability(tmp_path: Path) -> None:
    """Columns are matched by name: the dataset has the first file's order, and a column is
    nullable if any file declares it so; each file's rows and labelled copy are as in it."""
    (tmp_path / "in").mkdir()
    required = pa.schema([pa.field("id", pa.int64(), nullable=False),
                          pa.field("x0", pa.float64()), pa.field("x1", pa.float64())])  # fmt: skip
    pq.write_table(pa.table({"id": [1, 2], "x0": [1.0, 2.0], "x1": [3.0, 4.0]}, required),
                   tmp_path / "in" / "a.parquet")  # fmt: skip
    pq.write_table(pa.table({"x1": [6.0], "tag": ["t"], "id": [None], "x0": [5.0]}),
                   tmp_path / "in" / "b.parquet")  # fmt: skip
    with pytest.raises(InputError, match=r"extra columns \['tag'\]"):
        open_parquet(tmp_path / "in", id_column="id")
    pq.write_table(pa.table({"x1": [6.0], "id": pa.array([None], pa.int64()), "x0": [5.0]}),
                   tmp_path / "in" / "b.parquet")  # fmt: skip

    ds = open_parquet(tmp_path / "in", id_column="id")
    assert ds.schema == pa.schema([pa.field("id", pa.int64()), pa.field("x0", pa.float64()),
                                   pa.field("x1", pa.float64())])  # fmt: skip
    assert ds.features == ("x0", "x1")
    np.testing.assert_array_equal(read_chunk(ds, ds.chunks[1], "float64")[0] + ds.origin, [[5.0, 6.0]])
    out = tmp_path / "out"
    out.mkdir()
    for i in range(2):
        with LabelledFileWriter(ds, i, str(out)) as writer:
            for _, _, kept in parquet_io.iter_labelled_batches(ds, i, features=False):
                writer.write(kept, np.zeros(kept.num_rows, np.int32), np.zeros(kept.num_rows))
    assert pq.read_table(out / "a.parquet")["id"].to_pylist() == [1, 2]
    assert pq.read_table(out / "b.parquet").column_names == ["id", "cluster", "distance"]
    assert pq.read_table(out / "b.parquet")["id"].to_pylist() == [None]


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        (np.nan, "NaN or infinite values"),
        (np.inf, "NaN or infinite values"),
        (-np.inf, "NaN or infinite values"),
        (None, "null values"),
    ],
)
def test_non_finite_feature_is_raised_when_reading(tmp_path: Path, bad, what: str) -> None:
    (tmp_path / "in").mkdir()
    _file_with(tmp_path / "in", "a.parquet", x0=[1.0, 2.0], x1=[3.0, 4.0])
    _file_with(tmp_path / "in", "b.parquet", x0=[1.0, 2.0], x1=pa.array([5.0, bad], pa.float64()))
    ds = open_parquet(tmp_path / "in")  # planning reads no values: no error yet
    read_chunk(ds, ds.chunks[0])  # the clean file reads
    with pytest.raises(InputError, match=rf"feature column 'x1' in file '.*b\.parquet' has {what}"):
        read_chunk(ds, ds.chunks[1])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_value_too_large_for_float32(tmp_path: Path) -> None:
    path = _file_with(tmp_path, x0=[1.0, 2.0], x1=[1e300, 0.0])
    ds = open_parquet(path)
    with pytest.raises(
        InputError, match=r"feature column 'x1' in file '.*p\.parquet' has NaN or inf"
    ):
        read_chunk(ds, ds.chunks[0], "float32")
    X, _ = read_chunk(ds, ds.chunks[0], "float64")
    assert X[0, 1] == 1e300


@pytest.mark.parametrize("bad", [-1.0, np.nan, None])
def test_bad_weight(tmp_path: Path, bad) -> None:
    path = _file_with(tmp_path, x0=[1.0, 2.0], w=pa.array([1.0, bad], pa.float64()))
    ds = open_parquet(path, weight_column="w")
    assert ds.features == ("x0",)
    with pytest.raises(
        InputError,
        match=r"weight column 'w' in file '.*p\.parquet' has negative, null or NaN weights;"
        r" weights must be >= 0\.",
    ):
        read_chunk(ds, ds.chunks[0])


def test_zero_and_integer_weights_are_accepted(tmp_path: Path) -> None:
    path = _file_with(tmp_path, x0=[1.0, 2.0, 3.0], w=pa.array([0, 2, 5], pa.int16()))
    ds = open_parquet(path, weight_column="w")
    _, w = read_chunk(ds, ds.chunks[0])
    assert w.dtype == np.float64
    np.testing.assert_array_equal(w, [0.0, 2.0, 5.0])


# --------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------


def _siblings(path: Path) -> list[str]:
    return sorted(os.listdir(path.parent))


def test_atomic_output_dir_success(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    with atomic_output_dir(out) as tmp:
        assert not out.exists()
        assert Path(tmp).parent == out.parent
        (Path(tmp) / "a.txt").write_text("new")
    assert (out / "a.txt").read_text() == "new"
    assert _siblings(out) == ["out"]


def test_atomic_output_dir_leaves_nothing_on_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(out) as tmp:
        (Path(tmp) / "partial.txt").write_text("x")
        raise RuntimeError("boom")
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_refuses_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError) as info, atomic_output_dir(out):
        pytest.fail("the block must not run")  # pragma: no cover
    assert isinstance(info.value, InputError) and isinstance(info.value, FileExistsError)
    assert str(info.value) == f"output '{out}' already exists; pass --overwrite to replace it."
    assert (out / "old.txt").read_text() == "old"
    assert os.listdir(tmp_path) == ["out"]
    # an existing file is refused too
    (tmp_path / "file").write_text("f")
    with pytest.raises(OutputExistsError, match="already exists"):
        parquet_io.check_output_free(tmp_path / "file", overwrite=False)


@pytest.mark.parametrize("url", ["s3://bucket/out", "gs://bucket/out", "file:///data/out"])
def test_an_output_given_as_a_url_is_refused_and_nothing_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A URL taken as a relative path would be written under a local directory named 's3:'."""
    monkeypatch.chdir(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(InputError) as info, atomic_output_dir(url, overwrite=overwrite):
            pytest.fail("the block must not run")  # pragma: no cover
        assert str(info.value) == (
            f"output '{url}' is a URL; give a path on a filesystem that this run and the Dask"
            " workers share (a mounted volume, for example): outputs are written there, not to"
            " object storage, from which only inputs are read."
        )
    parquet_io.check_output_free("out:with-colon", overwrite=False)  # a path, not a URL
    assert os.listdir(tmp_path) == []


def test_atomic_output_dir_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    # a failing block leaves the existing output as it was
    with pytest.raises(ValueError, match="nope"), atomic_output_dir(out, overwrite=True) as tmp:
        (Path(tmp) / "new.txt").write_text("new")
        raise ValueError("nope")
    assert os.listdir(out) == ["old.txt"]
    assert _siblings(out) == ["out"]
    with atomic_output_dir(out, overwrite=True) as tmp:
        (Path(tmp) / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # replaced only once the block succeeds
    assert os.listdir(out) == ["new.txt"]
    assert _siblings(out) == ["out"]


def test_output_lock_refuses_a_second_run_until_the_first_ends(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "out"
    lock = tmp_path / "deep" / ".out.lock"
    with parquet_io.output_lock(out):
        assert lock.exists()
        with pytest.raises(parquet_io.OutputLockedError) as info, parquet_io.output_lock(out):
            pytest.fail("the block must not run")  # pragma: no cover
        assert isinstance(info.value, InputError)
        assert str(info.value) == (
            f"output '{out}' is being written by another run (it holds '{lock}');"
            " wait for that run to end."
        )
        with parquet_io.output_lock(tmp_path / "deep" / "other"):  # another output: free
            pass
    assert os.listdir(tmp_path / "deep") == []
    with parquet_io.output_lock(out):
        pass


def test_output_lock_of_a_killed_run_is_free(tmp_path: Path) -> None:
    """The kernel releases the lock of a process that ends without cleaning up."""
    out = tmp_path / "out"
    hold = (
        "import sys, time; from pipeline import parquet_io\n"
        "with parquet_io.output_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(parquet_io.OutputLockedError):
            parquet_io.output_lock(out).__enter__()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".out.lock").exists()  # left behind, and not held
    with parquet_io.output_lock(out):
        pass
    assert os.listdir(tmp_path) == []


def _flock_fails(code: int) -> Any:
    """``fcntl.flock`` as a filesystem without such locks answers it (this machine's local
    filesystems all have them): what NFS without its lock service, or Lustre mounted
    ``noflock``, returns."""

    def flock(fd: int, operation: int) -> None:
        raise OSError(code, os.strerror(code))

    return flock


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP])
def test_output_lock_on_a_filesystem_without_locks_goes_on_with_a_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    out = tmp_path / "deep" / "out"
    monkeypatch.setattr(parquet_io.fcntl, "flock", _flock_fails(code))
    with parquet_io.output_lock(out) as unlocked:
        assert unlocked == (
            f"output '{out}' is not locked: its filesystem cannot lock"
            f" '{tmp_path / 'deep' / '.out.lock'}' ({os.strerror(code)}), so a second run"
            " writing it at the same time would not be refused; do not schedule overlapping"
            " runs on it."
        )
        with parquet_io.output_lock(out) as again:  # unguarded: a second run is not refused
            assert again == unlocked
    assert os.listdir(tmp_path / "deep") == []  # no lock file left


def test_output_lock_passes_on_other_errors_and_says_none_when_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with parquet_io.output_lock(tmp_path / "out") as unlocked:
        assert unlocked is None
    monkeypatch.setattr(parquet_io.fcntl, "flock", _flock_fails(errno.EIO))
    with pytest.raises(OSError, match="Input/output error"), parquet_io.output_lock(tmp_path / "out"):
        pytest.fail("the block must not run")  # pragma: no cover
    monkeypatch.undo()
    assert parquet_io.fcntl.flock is fcntl.flock
    with parquet_io.output_lock(tmp_path / "out") as unlocked:  # the failed attempt left it free
        assert unlocked is None


def test_writers_left_running_after_a_failure_leave_nothing(tmp_path: Path) -> None:
    """When a pass fails, its other tasks run on to their end: one that was writing, and one
    that starts writing after the temporary output was removed (partitioned: a subdirectory)."""
    write_parquet(tmp_path / "in" / "day=1" / "a.parquet", _X(4))
    write_parquet(tmp_path / "in" / "day=2" / "a.parquet", _X(4))
    ds = open_parquet(tmp_path / "in")
    out = tmp_path / "out"
    rows = pa.table({"id": np.arange(4)}).select([])
    with pytest.raises(RuntimeError, match="a task failed"), atomic_output_dir(out) as tmp:
        writing = LabelledFileWriter(ds, 0, tmp).__enter__()
        raise RuntimeError("a task failed")
    writing.write(rows, np.zeros(4, dtype=np.int32), np.zeros(4))
    writing.__exit__(None, None, None)
    with pytest.raises(FileNotFoundError):
        LabelledFileWriter(ds, 1, tmp)
    assert sorted(os.listdir(tmp_path)) == ["in"]


@pytest.mark.parametrize(
    ("source", "output", "error"),
    [
        ("data", "data", "holds the input file '.*part-0.parquet'"),
        ("data", ".", "holds the input file '.*part-0.parquet'"),
        ("data", "data/sub", "holds the input file '.*part-1.parquet'"),
        ("one.parquet", "one.parquet", "holds the input file '.*one.parquet'"),
        ("data", "data/out", "inside the input directory 'data'"),
        ("data", "data/sub/out", "inside the input directory"),
        ("link", "data/out", "inside the input directory 'link'"),
        ("data", "link/out", "inside the input directory 'data'"),
        ("data", "data/_out", None),  # skipped when the directory is listed
        ("data", "data/.out", None),
        ("data", "dat", None),
        ("data", "data-labels", None),
        ("data/*.parquet", "data/out", None),
        ("one.parquet", "out", None),
    ],
)
def test_check_output_apart(
    source: str, output: str, error: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_parquet(tmp_path / "data" / "part-0.parquet", _X(3))
    write_parquet(tmp_path / "data" / "sub" / "part-1.parquet", _X(3))
    write_parquet(tmp_path / "one.parquet", _X(3))
    (tmp_path / "link").symlink_to(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    ds = open_parquet(source)
    if error is None:
        parquet_io.check_output_apart(output, source, ds)
    else:
        with pytest.raises(InputError, match=error):
            parquet_io.check_output_apart(output, source, ds)


def test_check_output_apart_messages_and_kept_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_parquet(data / "part-0.parquet", _X(3))
    ds = open_parquet(data)
    with pytest.raises(InputError) as info:
        parquet_io.check_output_apart(data, data, ds)
    assert str(info.value) == (
        f"output '{data}' holds the input file '{data / 'part-0.parquet'}'; replacing the output"
        " would delete it. Choose an output outside the input."
    )
    with pytest.raises(InputError) as info:
        parquet_io.check_output_apart(data / "out", data, ds)
    assert str(info.value) == (
        f"output '{data / 'out'}' is inside the input directory '{data}', so the next run over"
        " it would read the labels as input; choose an output outside it (or below a directory"
        " named '_*')."
    )
    model = tmp_path / "fitted" / "model.json"
    with pytest.raises(InputError, match=f"holds the model '{re.escape(str(model))}'"):
        parquet_io.check_output_apart(tmp_path / "fitted", data, ds, keep=[("model", model)])
    parquet_io.check_output_apart(tmp_path / "labels", data, ds, keep=[("model", model)])


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/data/a.parquet", "a.parquet"),
        ("/data/b.parq", "b.parq"),
        ("s3://bucket/x/c.pq", "c.pq"),
        ("/data/d.dat", "d.parquet"),
        ("/data/e", "e.parquet"),
    ],
)
def test_labelled_file_name(path: str, name: str) -> None:
    assert labelled_file_name(path) == name


# --------------------------------------------------------------------------------------------
# filling the matrix block by block, and the allocator
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fill_in_blocks_matches_the_columns(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    # blocks of 7 rows over 40 rows: a short last block, columns of several types
    monkeypatch.setattr(parquet_io, "_FILL_BLOCK_BYTES", 7 * 3 * np.dtype(dtype).itemsize)
    rng = np.random.default_rng(1)
    table = pa.table(
        {
            "a": rng.normal(size=40),
            "b": rng.integers(-5, 5, size=40),
            "c": rng.normal(size=40).astype(np.float32),
        }
    )
    out = np.full((45, 3), -99.0, dtype=dtype)
    parquet_io._fill(out, 5, table, ["c", "a", "b"])
    expected = np.column_stack([table.column(n).to_numpy().astype(dtype) for n in ("c", "a", "b")])
    np.testing.assert_array_equal(out[5:], expected)
    assert (out[:5] == -99.0).all()  # rows before ``start`` untouched


def test_fill_names_the_bad_column_in_a_later_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet_io, "_FILL_BLOCK_BYTES", 4 * 3 * 4)
    values = {n: np.arange(20, dtype=np.float64) for n in ("a", "b", "c")}
    values["c"][17] = np.inf
    table = pa.table(values)
    out = np.empty((20, 3), dtype=np.float32)
    with pytest.raises(parquet_io._NonFinite) as raised:
        parquet_io._fill(out, 0, table, ["a", "b", "c"])
    assert (raised.value.column, raised.value.what) == ("c", "NaN or infinite")
    np.testing.assert_array_equal(out[:16, 2], np.arange(16))  # earlier blocks were filled


@pytest.mark.parametrize("type_", list(parquet_io._FIXED_WIDTH), ids=str)
def test_a_column_of_fixed_width_numbers_is_a_view_of_its_buffer(type_: pa.DataType) -> None:
    values = pa.array(np.arange(10) % 7, type=type_)
    for column in (pa.chunked_array([values]), pa.chunked_array([values]).slice(3, 5)):
        got = parquet_io._as_numpy(column)
        assert got.dtype == column.to_numpy().dtype and not got.flags.owndata
        np.testing.assert_array_equal(got, column.to_numpy())


@pytest.mark.parametrize(
    "column",
    [
        pa.chunked_array([pa.array([1.0, 2.0]), pa.array([3.0])]),  # two chunks: concatenated
        pa.chunked_array([pa.array([1.5, 2.5], type=pa.float16())]),
        pa.chunked_array([pa.array([True, False])]),
    ],
    ids=["two-chunks", "float16", "bool"],
)
def test_other_columns_go_through_pyarrow(column: pa.ChunkedArray) -> None:
    np.testing.assert_array_equal(parquet_io._as_numpy(column), column.to_numpy())


def test_a_worker_that_reads_and_labels_parquet_never_imports_pandas(tmp_path: Path) -> None:
    # pyarrow's to_numpy and pa.array import pandas: 35 MiB and 0.37 s in every worker process
    X = np.arange(60, dtype=np.float64).reshape(20, 3)
    path = tmp_path / "p.parquet"
    write_parquet(path, X, row_group_rows=8, extra={"id": np.arange(20), "w": np.linspace(0.5, 2.0, 20)})
    script = f"""
import sys
import dask
import numpy as np
from pipeline.cluster import load_engine
from pipeline.parquet_io import open_parquet, read_chunk
from pipeline.passes import label_files
load_engine()
dataset = open_parquet({str(path)!r}, id_column="id", weight_column="w")
X, w = read_chunk(dataset, dataset.chunks[0])
assert X.tolist() == np.arange(60, dtype=np.float32).reshape(20, 3).tolist(), X
assert w.tolist() == np.linspace(0.5, 2.0, 20).tolist(), w
with dask.config.set(scheduler="sync"):
    label_files(dataset, np.array([[0.0, 1.0, 2.0], [57.0, 58.0, 59.0]]), {str(tmp_path / "out")!r})
print(sorted(m for m in sys.modules if m.split(".")[0] == "pandas"))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    labelled = pq.read_table(tmp_path / "out" / "p.parquet")
    assert labelled.column("cluster").to_pylist() == [0] * 10 + [1] * 10
    np.testing.assert_allclose(labelled.column("distance").to_numpy()[[0, 19]], [0.0, 0.0])


def test_reading_switches_arrow_to_an_allocator_that_returns_memory() -> None:
    # mimalloc (Arrow's default) keeps freed pages; reads must not run on it
    previous = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        parquet_io._use_returning_allocator()
        assert pa.default_memory_pool().backend_name in ("jemalloc", "system")
        chosen = pa.default_memory_pool().backend_name
        parquet_io._use_returning_allocator()  # idempotent
        assert pa.default_memory_pool().backend_name == chosen
    finally:
        pa.set_memory_pool(previous)
