"""Prefect flows that drive the ``pipeline`` engine: ``kmeans-fit`` and ``kmeans-predict``.

The flows are imported on first use, not with the package: Dask's worker processes are
spawned, and a spawned process re-imports its parent's main module, which for the
``kmeans-gd`` console script imports ``flows.cli``. Importing Prefect there cost every worker
~90 MiB of memory it never used (enough to pause 450 MB workers before any work).
"""

from __future__ import annotations

from typing import Any

__all__ = ["kmeans_fit", "kmeans_predict"]


def __getattr__(name: str) -> Any:
    if name == "kmeans_fit":
        from .fit import kmeans_fit

        return kmeans_fit
    if name == "kmeans_predict":
        from .predict import kmeans_predict

        return kmeans_predict
    raise AttributeError(f"module 'flows' has no attribute {name!r}")
