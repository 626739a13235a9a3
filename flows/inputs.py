"""The checks a run makes before any work: the input's footers, the output, the warm start.

No Prefect here: the command line runs the checks of the data, the model and the output before
it imports Prefect, so that a run with a missing input or an existing output is refused without
that import (2.2 s instead of 4.9 on a Zen 1 core, Python's start included). The flows run the
same checks again, for runs created from the Prefect UI or API.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from pipeline import parquet_io
from pipeline.estimator import INIT_METHODS, check_minibatch_restarts, validate_n_clusters
from pipeline.model import Model, read_init_centers, read_model

__all__ = [
    "FitInputs",
    "check_fit_data",
    "check_fit_inputs",
    "check_fit_options",
    "check_predict_inputs",
]


class FitInputs(NamedTuple):
    """The checked inputs of a fit: the Parquet plan and the warm-start means, if any."""

    dataset: parquet_io.ParquetDataset
    warm_start: np.ndarray | None  # (k, d)


def check_fit_data(
    input: str,
    output: str,
    *,
    features: list[str] | None,
    id_column: str | None,
    weight_column: str | None,
    dtype: str,
    overwrite: bool,
) -> parquet_io.ParquetDataset:
    """The output is free and apart from the input, and the input's footers plan a dataset."""
    parquet_io.check_output_free(output, overwrite=overwrite)
    dataset = parquet_io.open_parquet(
        input, features=features, id_column=id_column, weight_column=weight_column, dtype=dtype
    )
    parquet_io.check_output_apart(output, input, dataset)
    return dataset


def check_fit_options(
    dataset: parquet_io.ParquetDataset,
    input: str,
    k: int,
    *,
    init: str = "auto",
    step: str = "newton",
    n_init: int = 1,
) -> np.ndarray | None:
    """The options that depend on the data (k against its rows, a warm start's features), on
    parameters already validated; returns the warm-start means, if any."""
    try:
        validate_n_clusters(k, dataset.n_rows)
    except ValueError as exc:
        raise parquet_io.InputError(f"k={k} is larger than the {dataset.n_rows} rows of input '{input}'.") from exc
    warm = None
    if init not in INIT_METHODS:
        warm = read_init_centers(init, k, dataset.features, dataset.n_features)
    if step == "minibatch":
        try:
            check_minibatch_restarts(n_init, init)
        except ValueError as exc:
            raise parquet_io.InputError(str(exc)) from None
    return warm


def check_fit_inputs(
    input: str,
    output: str,
    k: int,
    *,
    features: list[str] | None,
    id_column: str | None,
    weight_column: str | None,
    dtype: str,
    overwrite: bool,
    init: str = "auto",
    step: str = "newton",
    n_init: int = 1,
) -> FitInputs:
    """Everything that can be checked from the footers and the warm-start file, before any
    cluster is started: ``check_fit_data``, then ``check_fit_options``."""
    dataset = check_fit_data(
        input, output, features=features, id_column=id_column, weight_column=weight_column,
        dtype=dtype, overwrite=overwrite,
    )  # fmt: skip
    warm = check_fit_options(dataset, input, k, init=init, step=step, n_init=n_init)
    return FitInputs(dataset, warm)


def check_predict_inputs(
    model: str, input: str, output: str, *, overwrite: bool
) -> tuple[Model, parquet_io.ParquetDataset]:
    """Everything that can be checked from the model file and the footers."""
    parquet_io.check_output_free(output, overwrite=overwrite)
    saved = read_model(model)
    dataset = parquet_io.open_parquet(input, features=list(saved.features), dtype=saved.dtype)
    parquet_io.check_output_apart(output, input, dataset, keep=[("model", saved.path)])
    return saved, dataset
