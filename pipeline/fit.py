"""The fit loop: one pass of statistics per iteration, a step, and the stopping rules.

Every iteration evaluates the current means of each still-running restart in one pass over the
data, then checks the stopping rules on those evaluated means, and only then steps. A restart
therefore always ends on means whose loss was computed over all rows: its inertia is exact and
agrees with its labels, and no extra pass is needed to learn it.

The loop's whole state between iterations is a :class:`FitState`; the caller gets it after
every iteration through ``on_iteration`` (to log, report progress or checkpoint) and can resume
from it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from . import optimizer
from .kernel import ChunkStats
from .passes import DaskData, release_buffers, stats_pass

if TYPE_CHECKING:
    from .minibatch import MinibatchResult

__all__ = [
    "STOP_REASONS",
    "FitResult",
    "FitState",
    "IterationReport",
    "distinct_centers_note",
    "fit_means",
]

#: Why a restart stopped, in the order the rules are checked.
STOP_REASONS = ("no-label-changed", "loss-tol", "center-shift", "max-iter")


@dataclass
class FitState:
    """Everything the loop needs to continue: saved by checkpoints, taken by ``fit_means``."""

    iteration: int
    centers: np.ndarray  # (n_init, k, d): next to evaluate; a stopped restart's final means
    previous: np.ndarray | None  # means evaluated in the last pass, to count changed labels
    last_loss: np.ndarray  # (n_init,) loss of ``previous``; NaN before the first pass
    last_shift: np.ndarray  # (n_init,) squared shift of the last step
    active: np.ndarray  # (n_init,) bool
    stop_reason: list[str | None]
    final_loss: np.ndarray  # (n_init,) inertia of a stopped restart; NaN while running
    history: list[list[dict[str, Any]]]  # per restart, one record per evaluated pass

    @classmethod
    def start(cls, centers: np.ndarray) -> FitState:
        n_init = centers.shape[0]
        return cls(
            iteration=0,
            centers=np.asarray(centers, dtype=np.float64),
            previous=None,
            last_loss=np.full(n_init, np.nan),
            last_shift=np.full(n_init, np.inf),
            active=np.ones(n_init, dtype=bool),
            stop_reason=[None] * n_init,
            final_loss=np.full(n_init, np.nan),
            history=[[] for _ in range(n_init)],
        )

    @property
    def done(self) -> bool:
        return not bool(self.active.any())


@dataclass
class IterationReport:
    """What one iteration did, for the caller's logging and progress."""

    iteration: int
    seconds: float
    records: dict[int, dict[str, Any]]  # restart -> its history record for this pass
    notes: list[str]
    state: FitState

    @property
    def best_loss(self) -> float:
        return min(rec["loss"] for rec in self.records.values())


@dataclass
class FitResult:
    """The outcome of a fit: the best restart and a summary of all of them."""

    centers: np.ndarray  # (k, d) of the best restart
    inertia: float
    n_iter: int
    stop_reason: str
    best: int
    history: list[dict[str, Any]]  # the best restart's records
    restarts: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the caller should warn about

    @property
    def converged(self) -> bool:
        return self.stop_reason != "max-iter"

    @classmethod
    def from_minibatch(cls, result: MinibatchResult) -> FitResult:
        """A mini-batch fit (one restart) in the same shape as a full-batch one."""
        notes = list(result.notes)
        note = distinct_centers_note(result.centers)
        if note:
            notes.append(note)
        restart = {
            "inertia": result.inertia,
            "n_iter": result.n_iter,
            "stop_reason": result.stop_reason,
            "loss": [rec["loss"] for rec in result.history],
            "rows_read": result.rows_read,
        }
        return cls(
            centers=result.centers, inertia=result.inertia, n_iter=result.n_iter,
            stop_reason=result.stop_reason, best=0, history=result.history,
            restarts=[restart], notes=notes,
        )  # fmt: skip


def distinct_centers_note(centers: np.ndarray) -> str | None:
    """A message when means coincide, which happens only when the data hold fewer distinct
    rows (of positive weight) than k; None otherwise."""
    k = centers.shape[0]
    distinct = np.unique(centers, axis=0).shape[0]
    if distinct == k:
        return None
    return (
        f"only {distinct} distinct means for k={k}: the data hold fewer than {k} distinct rows"
        f" of positive weight, so {k - distinct} means repeat another and have no rows."
    )


def _mean_feature_variance(stats: ChunkStats) -> float:
    """Mean per-feature variance of the data, from the sums the pass already has."""
    total = float(stats.counts[0].sum())
    if total <= 0:
        return 0.0
    mean = stats.sums[0].sum(axis=0) / total
    return max(stats.sq_total / total - float(mean @ mean), 0.0) / stats.sums.shape[-1]


def _stop_reason(
    state: FitState,
    r: int,
    loss: float,
    changed: int,
    tol: float,
    variance: float,
    max_iter: int,
    lands_on_lloyd: bool,
) -> str | None:
    previous = state.last_loss[r]
    if changed == 0 and lands_on_lloyd:  # a partial step still has a way to go
        return "no-label-changed"
    if math.isfinite(previous) and previous > 0 and (previous - loss) / previous < tol:
        return "loss-tol"
    if state.last_shift[r] <= tol * variance:
        return "center-shift"
    if state.iteration >= max_iter:
        return "max-iter"
    return None


def fit_means(
    data: DaskData,
    state: FitState,
    *,
    max_iter: int,
    tol: float,
    step: optimizer.StepRule,
    on_iteration: Callable[[IterationReport], None] | None = None,
    count_changed: bool | None = None,
) -> FitResult:
    """Run gradient-descent iterations from ``state`` until every restart stops.

    Parameters
    ----------
    data : DaskData
    state : FitState
        ``FitState.start(initial_means)`` for a new fit, or a checkpointed state to resume.
    max_iter : int
        Most passes over the data (iterations) per restart, counting those already in ``state``.
    tol : float
        Relative loss decrease, and centre shift relative to the mean feature variance, below
        which a restart stops.
    step : StepRule
    on_iteration : callable, optional
        Called after every iteration with an :class:`IterationReport`.
    count_changed : bool, optional
        Count the labels that changed since the previous means (for the ``no-label-changed``
        stop). By default only when the rows are held in memory: the kernel then remembers
        each chunk's labels, whereas on chunks streamed from Parquet it has to recompute the
        previous labels, which was measured to make the pass 4-5 times slower. Without the
        count a restart stops on the same means one pass later, by ``loss-tol`` or
        ``center-shift`` (a Lloyd step from means whose labels did not change does not move
        them).
    """
    k = state.centers.shape[1]
    if count_changed is None:
        count_changed = not data.streamed
    # the workers' chunk buffers are freed however the loop ends (a failed pass, a failed
    # checkpoint in on_iteration): on a long-lived cluster they would stay until the next fit
    try:
        while not state.done:
            started = time.perf_counter()
            run = np.flatnonzero(state.active)
            previous = None if state.previous is None or not count_changed else state.previous[run]
            stats = stats_pass(data, state.centers[run], previous=previous, n_far=k)
            state.iteration += 1
            variance = _mean_feature_variance(stats)
            grads = optimizer.gradient(state.centers[run], stats)
            step_result = step.step(state.centers[run], stats)
            moved, notes = optimizer.relocate_empty(step_result.centers, stats)
            notes = step_result.notes + notes
            new_previous = state.centers.copy()
            records: dict[int, dict[str, Any]] = {}
            for i, r in enumerate(run):
                loss = float(stats.loss[i])
                last = state.last_loss[r]
                record = {
                    "iteration": state.iteration,
                    "loss": loss,
                    "relative_change": float((last - loss) / last) if math.isfinite(last) and last else None,
                    "changed_labels": int(stats.changed[i]) if stats.changed[i] >= 0 else None,
                    "gradient_norm": float(np.linalg.norm(grads[i])),
                    "cluster_sizes": stats.counts[i].tolist(),
                    "seconds": None,  # filled below, once the whole iteration is timed
                }
                if step_result.learning_rate is not None:
                    record["learning_rate"] = step_result.learning_rate
                state.history[r].append(record)
                records[int(r)] = record
                reason = _stop_reason(
                    state, r, loss, int(stats.changed[i]), tol, variance, max_iter, step.lands_on_lloyd
                )
                if reason is not None:
                    state.active[r] = False
                    state.stop_reason[r] = reason
                    state.final_loss[r] = loss
                else:
                    state.last_shift[r] = float(((moved[i] - state.centers[r]) ** 2).sum())
                    state.centers[r] = moved[i]
                state.last_loss[r] = loss
            state.previous = new_previous
            seconds = time.perf_counter() - started
            for record in records.values():
                record["seconds"] = seconds
            if on_iteration is not None:
                on_iteration(IterationReport(state.iteration, seconds, records, notes, state))
    finally:
        release_buffers()
    return _result(state)


def _result(state: FitState) -> FitResult:
    best = int(np.nanargmin(state.final_loss))
    restarts = [
        {
            "inertia": float(state.final_loss[r]),
            "n_iter": len(state.history[r]),
            "stop_reason": state.stop_reason[r],
            "loss": [rec["loss"] for rec in state.history[r]],
        }
        for r in range(len(state.final_loss))
    ]
    centers = state.centers[best].copy()
    note = distinct_centers_note(centers)
    return FitResult(
        centers=centers,
        inertia=float(state.final_loss[best]),
        n_iter=len(state.history[best]),
        stop_reason=str(state.stop_reason[best]),
        best=best,
        history=state.history[best],
        restarts=restarts,
        notes=[note] if note else [],
    )
