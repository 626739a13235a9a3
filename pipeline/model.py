"""The model file: ``model.json``, written by a fit and read by predict and warm starts."""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .parquet_io import OUTPUT_COLUMNS, InputError, filesystem_of

__all__ = [
    "MODEL_FILE",
    "Model",
    "package_versions",
    "read_init_centers",
    "read_model",
    "write_model",
]

MODEL_FILE = "model.json"
FORMAT = "kmeans-gd/model/v1"


def package_versions() -> dict[str, str]:
    """Versions of this package and of what computes with it, for the record."""
    out = {}
    for name in ("kmeans-gd", "numpy", "dask", "distributed", "pyarrow", "prefect", "numba"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


@dataclass(frozen=True)
class Model:
    """What predict needs from a model file."""

    path: str
    features: tuple[str, ...]
    centers: np.ndarray
    content: dict[str, Any]

    @property
    def dtype(self) -> str:
        return str(self.content.get("parameters", {}).get("dtype", "float32"))


def write_model(path: str, content: dict[str, Any]) -> None:
    """Write ``model.json`` (the caller writes into a temporary directory, renamed when done)."""
    record = {
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": package_versions(),
        **content,
    }
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2, default=_jsonable)
        handle.write("\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to model.json")


def read_model(path: str | os.PathLike[str]) -> Model:
    """Read and check a model file (or a fit's output directory holding one), a local path or
    any fsspec URL."""
    path = os.fspath(path)
    fs, inner = filesystem_of(path, f"model '{path}'")
    if fs.isdir(inner):
        path, inner = f"{path.rstrip('/')}/{MODEL_FILE}", f"{inner.rstrip('/')}/{MODEL_FILE}"
    try:
        with fs.open(inner, "r", encoding="utf-8") as handle:
            content = json.load(handle)
    except FileNotFoundError:
        raise InputError(f"model '{path}' does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"model '{path}' is not valid JSON: {exc}") from None
    features = content.get("features") if isinstance(content, dict) else None
    centers = content.get("centers") if isinstance(content, dict) else None
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise InputError(f"model '{path}' has no 'features' list; is it a kmeans-gd model.json?")
    try:
        array = np.asarray(centers, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.ndim != 2 or array.shape[1] != len(features) or array.shape[0] < 1:
        raise InputError(
            f"model '{path}': 'centers' should be k lists of {len(features)} numbers."
        )
    if not np.isfinite(array).all():
        raise InputError(f"model '{path}': 'centers' holds NaN or infinite values.")
    return Model(path=path, features=tuple(features), centers=array, content=content)


def read_init_centers(
    path: str | os.PathLike[str], n_clusters: int, features: Sequence[str] | None, n_features: int
) -> np.ndarray:
    """Initial means for a warm start, shape (n_clusters, n_features).

    ``path`` (a local path or any fsspec URL) is a ``model.json`` of an earlier fit (or the
    directory holding one), or a Parquet file of centres, one row per centre. With
    ``features`` (the fit's feature columns), the model's features or the Parquet file's
    columns of those names are used, in the fit's order; without (an array fit), the model's
    centres or the Parquet file's numeric columns (but ``cluster`` and ``distance``) are taken
    as they are and only their number is checked.
    """
    path = os.fspath(path)
    fs, inner = filesystem_of(path, f"init file '{path}'")
    if path.endswith(".json") or fs.isdir(inner):
        model = read_model(path)
        what = f"init model '{model.path}'"
        centers = model.centers
        if features is not None:
            missing = [name for name in features if name not in model.features]
            if missing:
                raise InputError(
                    f"{what} has features {', '.join(model.features)}; the input's feature"
                    f" {', '.join(missing)} is not among them."
                )
            centers = centers[:, [model.features.index(name) for name in features]]
    else:
        what = f"init file '{path}'"
        centers = _read_center_table(fs, inner, features, what)
    if centers.shape[1] != n_features:
        raise InputError(f"{what} has {centers.shape[1]} features; the input has {n_features}.")
    if centers.shape[0] != n_clusters:
        raise InputError(f"{what} holds {centers.shape[0]} centres; k={n_clusters}.")
    if not np.isfinite(centers).all():
        raise InputError(f"{what} holds NaN or infinite values.")
    return centers


def _read_center_table(
    fs: Any, path: str, features: Sequence[str] | None, what: str
) -> np.ndarray:
    try:
        table = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        raise InputError(
            f"{what} does not exist; init should be auto, k-means||, k-means++, random,"
            " a model.json or a Parquet file of centres."
        ) from None
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{what} is not a readable Parquet file: {exc}") from None
    if features is None:  # every numeric column but a centre number ('cluster')
        columns = [
            field.name
            for field in table.schema
            if (pa.types.is_integer(field.type) or pa.types.is_floating(field.type))
            and field.name not in OUTPUT_COLUMNS
        ]
    else:
        columns = list(features)
        missing = [name for name in columns if name not in table.schema.names]
        if missing:
            raise InputError(f"{what} has no column {', '.join(missing)}.")
    try:
        return np.column_stack(
            [table.column(name).to_numpy(zero_copy_only=False) for name in columns]
        ).astype(np.float64)
    except (TypeError, ValueError, pa.ArrowException) as exc:
        raise InputError(f"{what}: the centre columns are not numeric ({exc}).") from None
