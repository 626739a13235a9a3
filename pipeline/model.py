"""The model file: ``model.json``, written by a fit and read by predict and warm starts."""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from .parquet_io import InputError

__all__ = ["MODEL_FILE", "Model", "package_versions", "read_model", "write_model"]

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
    """Read and check a model file (or a fit's output directory holding one)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, MODEL_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
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
