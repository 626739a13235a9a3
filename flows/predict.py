"""The ``kmeans-predict`` flow: label Parquet files with the means of a saved model."""

from __future__ import annotations

import os
from typing import Annotated, Any

from prefect import flow, get_run_logger
from pydantic import Field

from pipeline import parquet_io
from pipeline.cluster import dask_client
from pipeline.passes import label_files

from .inputs import check_predict_inputs
from .params import ClusterChoice, LocalDask, to_cluster_spec
from .progress import tell
from .retries import FLOW_RETRIES, FLOW_RETRY_DELAY_SECONDS, retry_only_transient_failures

__all__ = ["kmeans_predict"]


@flow(
    name="kmeans-predict",
    validate_parameters=True,
    retries=FLOW_RETRIES,
    retry_delay_seconds=FLOW_RETRY_DELAY_SECONDS,
)
def kmeans_predict(
    model: Annotated[str, Field(min_length=1)],
    input: Annotated[str, Field(min_length=1)],
    output: Annotated[str, Field(min_length=1)],
    cluster: ClusterChoice = LocalDask(),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Label Parquet rows with the nearest mean of a saved model.

    Args:
        model: model.json of a kmeans-fit run (or its output directory); a path or fsspec URL.
        input: Parquet file, directory or glob to label.
        output: Output directory: one labelled file per input file.
        cluster: Dask cluster to compute on.
        overwrite: Replace an existing output.
    """
    with retry_only_transient_failures():
        logger = get_run_logger()
        saved, dataset = check_predict_inputs(model, input, output, overwrite=overwrite)
        logger.info(
            "model %s: k=%d on %s; input %d rows in %d files",
            saved.path, len(saved.centers), ", ".join(saved.features), dataset.n_rows,
            len(dataset.files),
        )  # fmt: skip
        with parquet_io.output_lock(output) as unlocked, dask_client(to_cluster_spec(cluster)) as client:
            del client  # computations use the client as Dask's default scheduler
            tell(logger, None, [unlocked] if unlocked else [])
            with parquet_io.atomic_output_dir(output, overwrite=overwrite) as tmp:
                # in the frame of the rows read
                stats = label_files(dataset, saved.centers - dataset.origin, tmp, saved.dtype)
        logger.info("labelled %d rows; inertia %.6g; outputs in %s", dataset.n_rows, stats.loss[0], output)
        return {
            "output": os.path.abspath(output),
            "n_rows": dataset.n_rows,
            "inertia": float(stats.loss[0]),
            "cluster_sizes": stats.counts[0].tolist(),
        }
