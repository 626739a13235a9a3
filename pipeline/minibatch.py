"""Mini-batch k-means (Sculley 2010, "Web-scale k-means clustering") on Dask.

Each iteration reads a random subset of the data's chunks totalling about ``batch_size`` rows,
so a dataset far larger than memory is never read in full per step. The workers reduce those
chunks to the same additive statistics as a full pass (``kernel.chunk_stats``: per-centre
weighted sums ``S_j`` and counts ``c_j`` under the current centres, the batch loss, the rows
farthest from their centre) in one ``dask.compute``, and the client applies Sculley's update
with a per-centre learning rate ``1 / v_j``, ``v_j`` the cumulative weight the centre has
received:

    v_j <- v_j + c_j
    mu_j <- (1 - c_j / v_j) mu_j + S_j / v_j

This is exactly Sculley's Algorithm 1 applied to the batch: it caches every batch row's nearest
centre first (under the centres at the start of the batch), then takes for each row x (weight
w) in turn ``v_j += w; mu_j <- (1 - w / v_j) mu_j + (w / v_j) x``. Those per-row steps compose
to ``mu_j = (v_j^old mu_j + S_j) / (v_j^old + c_j)``, which is the aggregate update above, so
the per-row order within a batch does not matter and nothing per row leaves the workers.

Chunks, not rows, are sampled: with chunks of very different content (data sorted by cluster)
consecutive batches are less representative than uniform row samples, but every centre is
still the running mean of all the rows it has received.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import dask
import numpy as np
from dask.delayed import delayed

from . import kernel, optimizer
from .kernel import ChunkStats
from .passes import RETRIES, DaskData, release_buffers, stats_pass, tree_reduce

__all__ = [
    "MINIBATCH_STOP_REASONS",
    "MinibatchReport",
    "MinibatchResult",
    "choose_chunks",
    "fit_minibatch",
]

MINIBATCH_STOP_REASONS = ("no-improvement", "max-iter")


@dataclass
class MinibatchReport:
    """What one mini-batch iteration did, for the caller's logging and progress."""

    iteration: int
    seconds: float
    record: dict[str, Any]
    notes: list[str]
    centers: np.ndarray  # (k, d) after the update


@dataclass
class MinibatchResult:
    """The outcome of :func:`fit_minibatch`.

    ``inertia`` and ``cluster_sizes`` come from a final pass over all rows with the final
    centres (NaN and empty when it was skipped). ``rows_read`` counts every row read: the
    batches plus that final pass.
    """

    centers: np.ndarray  # (k, d)
    inertia: float
    n_iter: int
    rows_read: int
    stop_reason: str
    history: list[dict[str, Any]]
    cluster_sizes: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def converged(self) -> bool:
        return self.stop_reason != "max-iter"


def choose_chunks(sizes: np.ndarray, batch_size: int, seed: int, iteration: int) -> np.ndarray:
    """Indices (ascending) of the chunks of one batch: a random order of all chunks, drawn
    from a generator keyed by (seed, iteration), cut at the shortest prefix holding at least
    ``batch_size`` rows (at least one chunk; every chunk when the data are smaller)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(iteration), 0x6D62]))
    order = rng.permutation(sizes.size)
    cumulative = np.cumsum(sizes[order])
    count = min(int(np.searchsorted(cumulative, batch_size)) + 1, sizes.size)
    return np.sort(order[:count])


def _batch_stats_task(
    X: np.ndarray,
    weights: np.ndarray | None,
    xsq: np.ndarray | None,
    centers: np.ndarray,
    offset: int,
    n_far: int,
) -> ChunkStats:
    # no later pass compares with this one's labels (no previous means are ever given): none
    # are kept, and no checksum of the rows is taken
    return kernel.chunk_stats(
        X, centers, weights=weights, xsq=xsq, offset=offset, n_far=n_far, remember=False
    )


def _batch_pass(
    data_blocks: list[tuple[Any, Any, Any, int]], chunks: np.ndarray, centers: np.ndarray
) -> ChunkStats:
    """Statistics of the chosen chunks under ``centers`` (k, d): one ``dask.compute``."""
    k = centers.shape[0]
    centers_key = delayed(np.asarray(centers, dtype=np.float64)[None], pure=True)
    parts = [
        delayed(_batch_stats_task, pure=True)(x, w, q, centers_key, off, k)
        for x, w, q, off in (data_blocks[i] for i in chunks)
    ]
    (total,) = dask.compute(tree_reduce(parts, kernel.combine_stats), retries=RETRIES)
    return total


def fit_minibatch(
    data: DaskData,
    centers: np.ndarray,
    *,
    batch_size: int,
    max_iter: int,
    patience: int = 10,
    seed: int = 0,
    tol: float = 0.0,
    on_iteration: Callable[[MinibatchReport], None] | None = None,
    final_pass: bool = True,
) -> MinibatchResult:
    """Mini-batch k-means from ``centers`` (k, d); see the module docstring for the update.

    Dask work: one ``dask.compute`` per iteration, over the batch's chunks only (about
    ``batch_size`` rows), and one final pass over all rows (``stats_pass``) for the true
    inertia and cluster sizes. Labels are not written; the caller does that. A caller whose
    labelling pass computes the inertia anyway (``passes.label_files``) can skip the final
    pass with ``final_pass=False``: ``inertia`` is then NaN and ``cluster_sizes`` empty.

    Stopping: the per-row batch loss (weighted loss of the batch under the centres it was
    assigned with, divided by the batch's total weight) is smoothed by an exponentially
    weighted average with ``alpha = min(1, max(2 b / (n + 1), 2 / (patience + 1)))`` for a
    batch of ``b`` rows out of ``n`` (scikit-learn's half-epoch window, but never longer than
    ``patience`` batches, so a huge dataset still stops). An iteration improves when the
    average falls below ``(1 - tol)`` times its best value so far; the fit stops after
    ``patience`` iterations in a row without improvement ("no-improvement"), or after
    ``max_iter`` iterations ("max-iter").

    Empty centres: a centre that has never received any weight (``v_j = 0``) after a batch is
    moved to one of the batch's rows farthest from their centre (``optimizer.relocate_empty``;
    no extra pass), and its next rows then replace it entirely. A centre that merely received
    no rows in one batch keeps its position.

    History records: iteration, loss (per-row batch loss), ewa_loss, rows (rows in the batch),
    rows_read (cumulative), chunks (how many), cluster_sizes (batch weight per centre), seconds.
    """
    centers = np.array(centers, dtype=np.float64)
    if centers.ndim != 2 or centers.shape[1] != data.n_features:
        raise ValueError(f"centers has shape {centers.shape}; expected (k, {data.n_features}).")
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("max_iter", max_iter, 1),
        ("patience", patience, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name}={value!r} should be an integer >= {low}.")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol={tol!r} should be >= 0.")
    k = centers.shape[0]
    n = data.n_rows
    sizes = np.asarray(data.X.chunks[0], dtype=np.int64)
    blocks = data.blocks()
    v = np.zeros(k)
    history: list[dict[str, Any]] = []
    all_notes: list[str] = []
    rows_read = 0
    ewa = math.nan
    best = math.inf
    stale = 0
    stop_reason = "max-iter"
    iteration = 0
    # the workers' chunk buffers are freed however the fit ends (see fit.fit_means)
    try:
        while iteration < max_iter:
            started = time.perf_counter()
            iteration += 1
            chunks = choose_chunks(sizes, batch_size, seed, iteration)
            stats = _batch_pass(blocks, chunks, centers)
            rows = int(stats.n_rows)
            rows_read += rows
            c = stats.counts[0]
            total = float(c.sum())
            notes: list[str] = []
            if total > 0:
                v += c
                has = c > 0
                rate = c[has] / v[has]
                centers[has] = (1.0 - rate)[:, None] * centers[has] + stats.sums[0][has] / v[has, None]
                batch_loss = float(stats.loss[0]) / total
                alpha = min(1.0, max(2.0 * rows / (n + 1), 2.0 / (patience + 1)))
                ewa = batch_loss if math.isnan(ewa) else (1 - alpha) * ewa + alpha * batch_loss
            else:
                batch_loss = math.nan
                notes.append(f"iteration {iteration}: the batch has total weight 0; no update.")
            if np.any(v <= 0):
                moved, moved_notes = optimizer.relocate_empty(
                    centers[None], replace(stats, counts=v[None])
                )
                centers = moved[0]
                notes += moved_notes
            if ewa < best * (1.0 - tol):
                best = ewa
                stale = 0
            else:
                stale += 1
            record = {
                "iteration": iteration,
                "loss": batch_loss,
                "ewa_loss": ewa,
                "rows": rows,
                "rows_read": rows_read,
                "chunks": int(chunks.size),
                "cluster_sizes": c.tolist(),
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            all_notes += notes
            if on_iteration is not None:
                on_iteration(
                    MinibatchReport(iteration, record["seconds"], record, notes, centers.copy())
                )
            if stale >= patience:
                stop_reason = "no-improvement"
                break

        inertia = math.nan
        sizes_final = np.zeros(0)
        if final_pass:
            final = stats_pass(data, centers[None])
            rows_read += int(final.n_rows)
            inertia = float(final.loss[0])
            sizes_final = final.counts[0]
            empty = np.flatnonzero(sizes_final <= 0)
            if empty.size:
                all_notes.append(
                    f"centres {empty.tolist()} have no rows in the full data; kept where they are."
                )
    finally:
        release_buffers()
    return MinibatchResult(
        centers=centers,
        inertia=inertia,
        n_iter=iteration,
        rows_read=rows_read,
        stop_reason=stop_reason,
        history=history,
        cluster_sizes=sizes_final.tolist(),
        notes=all_notes,
    )
