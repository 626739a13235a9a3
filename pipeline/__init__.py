"""kmeans-gd engine: k-means fitted by gradient descent on Dask arrays read from Parquet.

A library with no Prefect in it; the flows in ``flows/`` drive it.
"""

from .estimator import KMeans, initial_centers
from .fit import FitResult, FitState, IterationReport, fit_means
from .kernel import ChunkStats, assign_labels, chunk_stats
from .optimizer import make_step_rule
from .parquet_io import (
    InputError,
    OutputExistsError,
    OutputLockedError,
    ParquetDataset,
    open_parquet,
)
from .passes import DaskData, data_from_array, data_from_parquet, label_files, stats_pass

__all__ = [
    "ChunkStats",
    "DaskData",
    "FitResult",
    "FitState",
    "InputError",
    "IterationReport",
    "KMeans",
    "OutputExistsError",
    "OutputLockedError",
    "ParquetDataset",
    "assign_labels",
    "chunk_stats",
    "data_from_array",
    "data_from_parquet",
    "fit_means",
    "initial_centers",
    "label_files",
    "make_step_rule",
    "open_parquet",
    "stats_pass",
]
