"""Synthetic Gaussian blobs written to Parquet in bounded memory.

:func:`generate_blobs` streams the data one row group at a time, so it can
produce datasets much larger than RAM: peak memory is proportional to
``row_group_rows * dims``, whatever ``rows`` is.
"""

from __future__ import annotations

import math
import operator
import os
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .parquet_io import atomic_output_dir, check_output_free

__all__ = ["GeneratedDataset", "generate_blobs"]

_DTYPES = ("float32", "float64")


@dataclass(frozen=True)
class GeneratedDataset:
    """What :func:`generate_blobs` wrote.

    Attributes
    ----------
    path : str
        Absolute path of the output directory.
    files : tuple of str
        Absolute paths of the Parquet files, in row order.
    rows : int
        Total number of rows over all files.
    dims : int
        Number of feature columns ``x0 .. x{dims-1}``.
    centers : ndarray of shape (centers, dims)
        The true blob centres, float64, read-only.
    """

    path: str
    files: tuple[str, ...]
    rows: int
    dims: int
    # compare=False: ndarray equality is elementwise, which would make
    # dataclass __eq__ raise on truth-testing.
    centers: np.ndarray = field(compare=False, repr=False)


def generate_blobs(
    output: str | os.PathLike[str],
    *,
    rows: int,
    dims: int,
    centers: int,
    files: int = 1,
    seed: int = 0,
    row_group_rows: int = 65_536,
    spread: float = 1.0,
    center_box: float = 10.0,
    dtype: str = "float32",
    overwrite: bool = False,
) -> GeneratedDataset:
    """Write isotropic Gaussian blobs to a directory of Parquet files.

    True centres are drawn uniformly in ``[-center_box, center_box]^dims``;
    each row picks one centre uniformly at random and is that centre plus
    ``spread`` times standard normal noise.

    Parameters
    ----------
    output : str or os.PathLike
        Directory to create. It receives ``part-00000.parquet``,
        ``part-00001.parquet``, ... Missing parent directories are created.
    rows : int
        Total number of rows, >= 1.
    dims : int
        Number of features, >= 1.
    centers : int
        Number of blobs, between 1 and ``rows``.
    files : int, default=1
        Number of files, between 1 and ``rows``. Rows are split as evenly as
        possible, earlier files getting the extra row.
    seed : int, default=0
        Seed of the random generator. The same arguments give byte-identical
        files; changing ``files`` or ``row_group_rows`` changes the data.
    row_group_rows : int, default=65_536
        Rows per Parquet row group (the last group of each file may be
        shorter). It also bounds memory use.
    spread : float, default=1.0
        Standard deviation of each blob along every axis, >= 0.
    center_box : float, default=10.0
        Half-width of the box the centres are drawn from, > 0.
    dtype : {"float32", "float64"}, default="float32"
        Type of the feature columns.
    overwrite : bool, default=False
        Replace an existing ``output``. The old output is removed only once
        the new one is complete.

    Returns
    -------
    GeneratedDataset
        Paths, sizes and the true centres.

    Raises
    ------
    ValueError
        If a parameter is out of range; raised before anything is written.
    TypeError
        If a parameter has the wrong type.
    OutputExistsError
        (a ``FileExistsError``) If ``output`` exists and ``overwrite`` is false.

    Notes
    -----
    Files are written into a hidden sibling directory
    (``parquet_io.atomic_output_dir``) that is renamed to ``output`` when
    complete and removed on any error, so ``output`` never holds a partial
    dataset.

    Columns are ``id`` (int64, the global row index ``0 .. rows-1`` in file
    order) then ``x0 .. x{dims-1}``.
    """
    rows = _check_int("rows", rows, minimum=1)
    dims = _check_int("dims", dims, minimum=1)
    centers = _check_int("centers", centers, minimum=1)
    files = _check_int("files", files, minimum=1)
    seed = _check_int("seed", seed, minimum=0)
    row_group_rows = _check_int("row_group_rows", row_group_rows, minimum=1)
    if centers > rows:
        raise ValueError(f"centers={centers} should be <= rows={rows}.")
    if files > rows:
        raise ValueError(f"files={files} should be <= rows={rows}.")
    spread = _check_float("spread", spread, positive=False)
    center_box = _check_float("center_box", center_box, positive=True)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} should be one of {', '.join(map(repr, _DTYPES))}.")

    check_output_free(output, overwrite=overwrite)
    final = os.path.abspath(os.fspath(output))

    rng = np.random.default_rng(seed)
    true_centers = rng.uniform(-center_box, center_box, size=(centers, dims))
    true_centers.setflags(write=False)
    schema = pa.schema(
        [pa.field("id", pa.int64())]
        + [pa.field(f"x{j}", pa.from_numpy_dtype(np.dtype(dtype))) for j in range(dims)]
    )
    names = [f"part-{i:05d}.parquet" for i in range(files)]

    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        start = 0
        for name, n_rows in zip(names, _split_rows(rows, files), strict=True):
            _write_file(
                os.path.join(tmp, name),
                schema,
                rng,
                true_centers,
                start=start,
                n_rows=n_rows,
                row_group_rows=row_group_rows,
                spread=spread,
                dtype=np.dtype(dtype),
            )
            start += n_rows

    return GeneratedDataset(
        path=final,
        files=tuple(os.path.join(final, name) for name in names),
        rows=rows,
        dims=dims,
        centers=true_centers,
    )


def _write_file(
    path: str,
    schema: pa.Schema,
    rng: np.random.Generator,
    true_centers: np.ndarray,
    *,
    start: int,
    n_rows: int,
    row_group_rows: int,
    spread: float,
    dtype: np.dtype,
) -> None:
    # Transposed (dims, k) so that a gather gives one contiguous array per
    # feature column, which Arrow then wraps without copying.
    centers_t = np.ascontiguousarray(true_centers.T, dtype=dtype)
    n_centers = true_centers.shape[0]
    with pq.ParquetWriter(path, schema) as writer:
        for offset in range(0, n_rows, row_group_rows):
            n = min(row_group_rows, n_rows - offset)
            labels = rng.integers(0, n_centers, size=n)
            points = rng.standard_normal(size=(centers_t.shape[0], n), dtype=dtype)
            points *= spread
            points += centers_t[:, labels]
            first = start + offset
            columns = [pa.array(np.arange(first, first + n, dtype=np.int64))]
            columns += [pa.array(column) for column in points]
            # One write per row group: each write_table call of at most
            # row_group_rows rows becomes exactly one row group.
            writer.write_table(
                pa.Table.from_arrays(columns, schema=schema), row_group_size=row_group_rows
            )


def _split_rows(rows: int, files: int) -> list[int]:
    base, extra = divmod(rows, files)
    return [base + 1 if i < extra else base for i in range(files)]


def _check_int(name: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name}={value!r} should be an integer.")
    try:
        number = operator.index(value)  # accepts numpy integers, refuses 2.0
    except TypeError:
        raise TypeError(f"{name}={value!r} should be an integer.") from None
    if number < minimum:
        raise ValueError(f"{name}={number} should be >= {minimum}.")
    return number


def _check_float(name: str, value: object, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TypeError(f"{name}={value!r} should be a number.")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name}={value!r} should be finite.")
    if positive and number <= 0:
        raise ValueError(f"{name}={value!r} should be > 0.")
    if not positive and number < 0:
        raise ValueError(f"{name}={value!r} should be >= 0.")
    return number
