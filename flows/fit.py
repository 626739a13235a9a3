"""The ``kmeans-fit`` flow: Parquet in, means fitted by gradient descent on Dask, labels out.

The flow process owns the Dask client and calls the engine in ``pipeline``; iterations are not
Prefect tasks (a task per iteration would add scheduling latency and nothing else). Prefect
gets the parameters, the logs of every iteration and the final outputs.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import Field

from pipeline import checkpoint, parquet_io, report
from pipeline.cluster import (
    dashboard_link,
    dask_client,
    worker_memory_per_thread,
    workers_memory_limit,
    workers_peak_memory,
)
from pipeline.estimator import (
    DEFAULT_BATCH_SIZE,
    initial_centers,
    resolve_init,
)
from pipeline.fit import FitResult, FitState, IterationReport, fit_means
from pipeline.minibatch import MinibatchReport, fit_minibatch
from pipeline.model import MODEL_FILE, write_model
from pipeline.optimizer import make_step_rule
from pipeline.passes import choose_cache, chunk_bytes_for, data_from_parquet, label_files

from .inputs import check_fit_inputs
from .params import ClusterChoice, LocalDask, to_cluster_spec
from .progress import in_background, tell
from .retries import FLOW_RETRIES, FLOW_RETRY_DELAY_SECONDS, retry_only_transient_failures

__all__ = ["kmeans_fit"]


def _iteration_line(report: IterationReport) -> str:
    best = min(report.records.values(), key=lambda rec: rec["loss"])
    change = best["relative_change"]
    changed = best["changed_labels"]
    return (
        f"iteration {report.iteration}  loss {best['loss']:.6g}"
        f"  change {'-' if change is None else f'{change:.3e}'}"
        f"  changed {'-' if changed is None else changed}"
        f"  seconds {report.seconds:.3f}"
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _batch_line(report: MinibatchReport) -> str:
    rec = report.record
    return (
        f"iteration {report.iteration}  batch loss {rec['loss']:.6g}"
        f"  smoothed {rec['ewa_loss']:.6g}  rows {rec['rows']}  seconds {report.seconds:.3f}"
    )


@flow(
    name="kmeans-fit",
    validate_parameters=True,
    retries=FLOW_RETRIES,
    retry_delay_seconds=FLOW_RETRY_DELAY_SECONDS,
)
def kmeans_fit(
    input: Annotated[str, Field(min_length=1)],
    output: Annotated[str, Field(min_length=1)],
    k: Annotated[int, Field(ge=1)],
    features: list[str] | None = None,
    id_column: str | None = None,
    weight_column: str | None = None,
    # a method name, or a path (anything with a '/' or a '.'): a typo such as 'kmeans++' is
    # refused by the API when the run is created, like any other bad value
    init: Annotated[str, Field(pattern=r"^(auto|k-means\|\||k-means\+\+|random)$|[/.]")] = "auto",
    n_init: Annotated[int, Field(ge=1, le=100)] = 1,
    max_iter: Annotated[int, Field(ge=1, le=100_000)] = 100,
    tol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-4,
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0,
    step: Literal["newton", "damped", "fixed", "minibatch"] = "newton",
    learning_rate: Annotated[float | None, Field(gt=0)] = None,
    alpha: Annotated[float | None, Field(gt=0, le=1)] = None,
    batch_size: Annotated[int | None, Field(ge=1)] = None,
    patience: Annotated[int, Field(ge=1, le=100_000)] = 10,
    oversampling: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 2.0,
    init_rounds: Annotated[int, Field(ge=1, le=100)] = 5,
    dtype: Literal["float32", "float64"] = "float32",
    cache: Literal["auto", "memory", "none"] = "auto",
    cluster: ClusterChoice = LocalDask(),
    overwrite: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Fit k-means by gradient descent to Parquet data and write labelled Parquet.

    Args:
        input: Parquet file, directory or glob (local path or fsspec URI).
        output: Output directory: model.json and labels/.
        k: Number of clusters.
        features: Feature columns (default: every numeric column but the id and weight columns).
        id_column: Id column, never a feature; copied to the labels.
        weight_column: Sample weight column (>= 0).
        init: auto (k-means|| unless the data are small, then k-means++), k-means|| (over all rows), k-means++ (on a sample), random, or a warm start: the path of a model.json or a Parquet file of k centres.
        n_init: Restarts, all evaluated in the same pass over the data.
        max_iter: Most iterations (passes over the data).
        tol: Stop when the relative loss decrease falls below this.
        seed: Seed of every random choice.
        step: Step rule: newton = Lloyd's update.
        learning_rate: Step of the 'fixed' rule (default 0.1).
        alpha: Fraction of the Newton step for 'damped' (default 0.5).
        batch_size: Rows per batch for 'minibatch' (default 1,000,000; whole chunks).
        patience: 'minibatch' stops after this many batches without improvement.
        oversampling: k-means||: candidates per round, as a multiple of k.
        init_rounds: k-means||: sampling rounds (one pass over the data each).
        dtype: Precision of the features in memory; statistics are float64.
        cache: Hold the data in worker memory, stream it from Parquet every iteration, or choose by size.
        cluster: Dask cluster to compute on.
        overwrite: Replace an existing output.
        resume: Resume from the checkpoint of an interrupted run with the same data and parameters.
    """
    with retry_only_transient_failures(), contextlib.ExitStack() as held:
        logger = get_run_logger()
        started = time.perf_counter()
        parameters = {
            "input": input, "output": output, "k": k, "features": features, "id_column": id_column,
            "weight_column": weight_column, "init": init, "n_init": n_init, "max_iter": max_iter,
            "tol": tol, "seed": seed, "step": step, "learning_rate": learning_rate, "alpha": alpha,
            "batch_size": batch_size, "patience": patience, "oversampling": oversampling,
            "init_rounds": init_rounds, "dtype": dtype, "cache": cache,
        }  # fmt: skip
        dataset, warm_start = check_fit_inputs(
            input, output, k, features=features, id_column=id_column, weight_column=weight_column,
            dtype=dtype, overwrite=overwrite, init=init, step=step, n_init=n_init,
        )  # fmt: skip
        # held to the end: the output and its checkpoint
        unlocked = held.enter_context(parquet_io.output_lock(output))
        tell(logger, None, [unlocked] if unlocked else [])
        minibatch = step == "minibatch"
        step_rule = None if minibatch else make_step_rule(step, learning_rate=learning_rate, alpha=alpha)
        method = resolve_init(init, dataset.n_rows, k)
        if warm_start is not None:
            n_init = 1
        tell(logger, f"input {input}: {_count(dataset.n_rows, 'row')} in"
                     f" {_count(len(dataset.files), 'file')}, features {', '.join(dataset.features)}")  # fmt: skip

        checkpoint_file = checkpoint.checkpoint_path(output)
        checkpoint_key = {"data": dataset.fingerprint()} | {
            name: value for name, value in parameters.items() if name not in ("input", "output", "cache")
        }
        # a mini-batch fit is not checkpointed: its batches are cheap, and its state is not a FitState
        state = checkpoint.load_checkpoint(checkpoint_file, checkpoint_key) if resume and not minibatch else None

        with dask_client(to_cluster_spec(cluster)) as client:
            logger.info("Dask dashboard: %s", dashboard_link(client) or "not available")
            dataset = dataset.rechunked(chunk_bytes_for(worker_memory_per_thread(client)), dtype)
            data = data_from_parquet(dataset, dtype)
            persist, why = choose_cache(data.nbytes, workers_memory_limit(client), cache)
            where = "held in the workers' memory" if persist else "streamed from Parquet every pass"
            tell(logger, f"data: {_count(len(dataset.chunks), 'chunk')}, {where} ({why})")
            if persist:
                data = data.persist()

            t0 = time.perf_counter()
            if state is None:
                centers = initial_centers(
                    # means are fitted in the frame of the rows read: less the dataset's origin
                    data, k, init=method if warm_start is None else warm_start - dataset.origin, n_init=n_init,
                    seed=seed, oversampling=oversampling, rounds=init_rounds,
                )  # fmt: skip
                state = FitState.start(centers)
                source = f" from {init}" if warm_start is not None else ""
                tell(logger, f"initialised {n_init} restart(s) with {method}{source} in {time.perf_counter() - t0:.2f} s")
            else:
                tell(logger, f"resuming from {checkpoint_file} after iteration {state.iteration}")
            init_seconds = time.perf_counter() - t0
            progress = create_progress_artifact(
                progress=100.0 * state.iteration / max_iter, key="kmeans-fit-progress",
                description=f"k-means fit of {input}: iterations done out of at most {max_iter}",
            )  # fmt: skip

            def on_batch(report_: MinibatchReport) -> None:
                tell(logger, _batch_line(report_), report_.notes)
                update_progress_artifact(progress, progress=100.0 * report_.iteration / max_iter)

            if minibatch:
                result = FitResult.from_minibatch(fit_minibatch(
                    data, state.centers[0], batch_size=batch_size or DEFAULT_BATCH_SIZE,
                    max_iter=max_iter, patience=patience, seed=seed, tol=tol, on_iteration=on_batch,
                    final_pass=False,  # the label pass below gives the inertia and the sizes
                ))  # fmt: skip
            else:
                # checkpoints and progress are written while the next pass runs: when an
                # iteration's line is shown, the one before is saved; a failed write stops the
                # fit one pass later
                with in_background() as later:

                    def on_iteration(report_: IterationReport) -> None:
                        record = checkpoint.checkpoint_record(checkpoint_key, report_.state)
                        done = 100.0 if report_.state.done else 100.0 * report_.iteration / max_iter

                        def save() -> None:
                            checkpoint.write_checkpoint(checkpoint_file, record)
                            update_progress_artifact(progress, progress=done)

                        later(save)
                        tell(logger, _iteration_line(report_), report_.notes)

                    result = fit_means(
                        data, state, max_iter=max_iter, tol=tol, step=step_rule, on_iteration=on_iteration
                    )
            tell(logger, None, result.notes)

            with parquet_io.atomic_output_dir(output, overwrite=overwrite) as tmp:
                t0 = time.perf_counter()
                final = label_files(dataset, result.centers, os.path.join(tmp, "labels"), dtype, data=data)
                label_seconds = time.perf_counter() - t0
                if minibatch:
                    result.inertia = float(final.loss[0])
                    result.restarts[0]["inertia"] = result.inertia
                summary = {
                    "features": list(dataset.features),
                    "centers": result.centers + dataset.origin,
                    "inertia": result.inertia,
                    "n_iter": result.n_iter,
                    "converged": result.converged,
                    "stop_reason": result.stop_reason,
                    "cluster_sizes": final.counts[0].tolist(),
                    "n_rows": dataset.n_rows,
                    "history": result.history,
                    "restarts": result.restarts,
                    "init": {"method": method, "n_init": n_init}
                    | ({"from": init} if warm_start is not None else {})
                    | ({"oversampling": oversampling, "rounds": init_rounds} if method == "k-means||" else {}),
                    "parameters": parameters,
                    "data": dataset.fingerprint(),
                    "seconds": {
                        "init": init_seconds,
                        "iterations": sum(rec["seconds"] for rec in result.history),
                        "labels": label_seconds,
                        "total": time.perf_counter() - started,
                    },
                }
                peaks = workers_peak_memory(client)
                summary["workers_peak_memory"] = peaks
                logger.info(
                    "workers' peak memory: %s",
                    ", ".join(f"{rss / 2**20:.0f} MiB" for rss in peaks.values()),
                )
                write_model(os.path.join(tmp, MODEL_FILE), summary)
                report.loss_curve_png(result.history, os.path.join(tmp, "loss.png"))
        checkpoint.remove_checkpoint(checkpoint_file)
        create_table_artifact(
            table=report.iteration_table(result.history), key="kmeans-fit-iterations",
            description="Loss, relative change, changed labels and seconds per iteration",
        )  # fmt: skip
        create_markdown_artifact(
            markdown=report.summary_markdown(summary, os.path.abspath(output)), key="kmeans-fit-summary",
            description="Summary of the k-means fit",
        )  # fmt: skip
        logger.info(
            "done: inertia %.6g after %d iterations (%s); outputs in %s",
            result.inertia, result.n_iter, result.stop_reason, output,
        )  # fmt: skip
        return {key: summary[key] for key in ("inertia", "n_iter", "converged", "stop_reason", "cluster_sizes", "n_rows")} | {
            "output": os.path.abspath(output)
        }
