"""Tests for pipeline.generate."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate import GeneratedDataset, generate_blobs
from pipeline.parquet_io import InputError


def _read_all(dataset: GeneratedDataset) -> pa.Table:
    return pa.concat_tables(pq.read_table(path) for path in dataset.files)


def test_layout_and_row_counts(tmp_path: Path) -> None:
    out = tmp_path / "blobs"
    ds = generate_blobs(out, rows=1003, dims=3, centers=4, files=4, row_group_rows=100)

    assert ds.path == str(out)
    assert ds.files == tuple(str(out / f"part-{i:05d}.parquet") for i in range(4))
    assert sorted(os.listdir(out)) == [f"part-{i:05d}.parquet" for i in range(4)]
    assert (ds.rows, ds.dims, ds.centers.shape) == (1003, 3, (4, 3))
    # As even as possible, earlier files taking the remainder.
    assert [pq.ParquetFile(f).metadata.num_rows for f in ds.files] == [251, 251, 251, 250]


def test_schema_and_ids(tmp_path: Path) -> None:
    ds = generate_blobs(tmp_path / "blobs", rows=500, dims=4, centers=3, files=3, row_group_rows=64)
    expected = pa.schema(
        [
            ("id", pa.int64()),
            ("x0", pa.float32()),
            ("x1", pa.float32()),
            ("x2", pa.float32()),
            ("x3", pa.float32()),
        ]
    )
    for path in ds.files:
        assert pq.read_schema(path).remove_metadata() == expected
    table = _read_all(ds)
    np.testing.assert_array_equal(table["id"].to_numpy(), np.arange(500))


def test_float64_dtype(tmp_path: Path) -> None:
    ds = generate_blobs(tmp_path / "blobs", rows=10, dims=2, centers=2, dtype="float64")
    schema = pq.read_schema(ds.files[0])
    assert schema.field("x0").type == pa.float64()
    assert schema.field("x1").type == pa.float64()


def test_row_groups_have_requested_size(tmp_path: Path) -> None:
    ds = generate_blobs(
        tmp_path / "blobs", rows=1000, dims=2, centers=2, files=2, row_group_rows=128
    )
    for path in ds.files:
        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        assert sizes == [128, 128, 128, 116]


def test_same_arguments_give_identical_files(tmp_path: Path) -> None:
    kwargs = {"rows": 2000, "dims": 3, "centers": 5, "files": 2, "seed": 7, "row_group_rows": 300}
    a = generate_blobs(tmp_path / "a", **kwargs)
    b = generate_blobs(tmp_path / "b", **kwargs)
    c = generate_blobs(tmp_path / "c", **{**kwargs, "seed": 8})
    for path_a, path_b in zip(a.files, b.files, strict=True):
        assert Path(path_a).read_bytes() == Path(path_b).read_bytes()
    np.testing.assert_array_equal(a.centers, b.centers)
    assert not np.array_equal(a.centers, c.centers)
    assert Path(a.files[0]).read_bytes() != Path(c.files[0]).read_bytes()


def test_points_are_blobs_around_true_centres(tmp_path: Path) -> None:
    ds = generate_blobs(
        tmp_path / "blobs",
        rows=20_000,
        dims=3,
        centers=4,
        files=2,
        seed=3,
        spread=0.5,
        center_box=20.0,
        row_group_rows=4096,
    )
    centers = ds.centers
    assert np.all(np.abs(centers) <= 20.0)
    # Well separated relative to spread, so nearest centre recovers the blob.
    gaps = np.linalg.norm(centers[:, None] - centers[None], axis=-1)[~np.eye(4, dtype=bool)]
    assert gaps.min() > 10 * 0.5

    table = _read_all(ds)
    x = np.column_stack([table[f"x{j}"].to_numpy() for j in range(3)]).astype(np.float64)
    labels = np.argmin(((x[:, None, :] - centers[None]) ** 2).sum(-1), axis=1)
    for k in range(4):
        members = x[labels == k]
        # Centres are chosen uniformly: about 5000 points each.
        assert 4500 < len(members) < 5500
        np.testing.assert_allclose(members.mean(axis=0), centers[k], atol=0.05)
        np.testing.assert_allclose(members.std(axis=0), 0.5, rtol=0.05)


def test_memory_is_bounded_by_row_group(tmp_path: Path) -> None:
    rows, dims, row_group_rows = 2_000_000, 4, 50_000
    full_size = rows * (dims * 4 + 8)  # float32 features + int64 id: 48 MB
    # Warm up first: the first ParquetWriter in a process makes ~25 MB of
    # one-off allocations that say nothing about how memory scales with rows.
    generate_blobs(tmp_path / "warm", rows=10, dims=dims, centers=5)
    tracemalloc.start()
    try:
        ds = generate_blobs(
            tmp_path / "big", rows=rows, dims=dims, centers=5, row_group_rows=row_group_rows
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pq.ParquetFile(ds.files[0]).metadata.num_rows == rows
    # One row group's arrays are ~1.2 MB and a few coexist (about 3 MB measured);
    # materialising the dataset would need 48 MB.
    assert peak < full_size / 6, f"peak {peak / 1e6:.1f} MB"


def test_existing_output_refused(tmp_path: Path) -> None:
    out = tmp_path / "blobs"
    generate_blobs(out, rows=10, dims=2, centers=2)
    before = Path(out / "part-00000.parquet").read_bytes()
    with pytest.raises(
        FileExistsError,
        match=r"^output '.*blobs' already exists; pass --overwrite to replace it\.$",
    ):
        generate_blobs(out, rows=10, dims=2, centers=2, seed=1)
    assert Path(out / "part-00000.parquet").read_bytes() == before


def test_output_url_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"^output 's3://bucket/blobs' is a URL; give a path "):
        generate_blobs("s3://bucket/blobs", rows=10, dims=2, centers=2)
    assert os.listdir(tmp_path) == []  # not a directory named 's3:'


def test_overwrite_replaces_whole_directory(tmp_path: Path) -> None:
    out = tmp_path / "blobs"
    generate_blobs(out, rows=30, dims=2, centers=2, files=3)
    ds = generate_blobs(out, rows=20, dims=5, centers=2, files=1, overwrite=True)
    # No stale part files from the first run, no leftover temporaries.
    assert os.listdir(out) == ["part-00000.parquet"]
    assert os.listdir(tmp_path) == ["blobs"]
    assert pq.read_schema(ds.files[0]).names == ["id", "x0", "x1", "x2", "x3", "x4"]
    assert pq.ParquetFile(ds.files[0]).metadata.num_rows == 20


def test_failure_leaves_old_output_and_no_temporaries(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "blobs"
    generate_blobs(out, rows=100, dims=2, centers=2, row_group_rows=10)
    before = Path(out / "part-00000.parquet").read_bytes()

    calls = 0
    original = pq.ParquetWriter.write_table

    def failing_write_table(self, table, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError("disk full")
        return original(self, table, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing_write_table)
    with pytest.raises(OSError, match="disk full"):
        generate_blobs(out, rows=100, dims=2, centers=2, row_group_rows=10, seed=1, overwrite=True)
    assert os.listdir(tmp_path) == ["blobs"]
    assert Path(out / "part-00000.parquet").read_bytes() == before


def test_creates_missing_parents(tmp_path: Path) -> None:
    ds = generate_blobs(tmp_path / "a" / "b" / "blobs", rows=5, dims=1, centers=1)
    assert Path(ds.files[0]).is_file()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"rows": 0}, ValueError, r"^rows=0 should be >= 1\.$"),
        ({"dims": 0}, ValueError, r"^dims=0 should be >= 1\.$"),
        ({"centers": 0}, ValueError, r"^centers=0 should be >= 1\.$"),
        ({"rows": 3, "centers": 5}, ValueError, r"^centers=5 should be <= rows=3\.$"),
        ({"files": 0}, ValueError, r"^files=0 should be >= 1\.$"),
        ({"rows": 3, "centers": 1, "files": 4}, ValueError, r"^files=4 should be <= rows=3\.$"),
        ({"row_group_rows": 0}, ValueError, r"^row_group_rows=0 should be >= 1\.$"),
        ({"seed": -1}, ValueError, r"^seed=-1 should be >= 0\.$"),
        ({"spread": -0.5}, ValueError, r"^spread=-0\.5 should be >= 0\.$"),
        ({"center_box": 0.0}, ValueError, r"^center_box=0\.0 should be > 0\.$"),
        ({"spread": float("nan")}, ValueError, r"^spread=nan should be finite\.$"),
        ({"dtype": "int8"}, ValueError, r"^dtype='int8' should be one of 'float32', 'float64'\.$"),
        ({"rows": 10.0}, TypeError, r"^rows=10\.0 should be an integer\.$"),
        ({"dims": True}, TypeError, r"^dims=True should be an integer\.$"),
        ({"spread": "1"}, TypeError, r"^spread='1' should be a number\.$"),
    ],
)
def test_validation(tmp_path: Path, kwargs, error, match) -> None:
    args = {"rows": 10, "dims": 2, "centers": 2, **kwargs}
    with pytest.raises(error, match=match):
        generate_blobs(tmp_path / "blobs", **args)
    # Refused before anything touched the disk.
    assert os.listdir(tmp_path) == []


def test_numpy_integers_accepted(tmp_path: Path) -> None:
    ds = generate_blobs(tmp_path / "blobs", rows=np.int64(12), dims=np.int32(2), centers=2)
    assert ds.rows == 12 and type(ds.rows) is int
