"""Step rules: how the reduced statistics move the means. Pure NumPy, no Dask.

With per-cluster weighted sums ``S_j`` and counts ``n_j`` of the rows nearest to mean ``mu_j``,
the gradient of the loss ``L(mu) = sum_i w_i min_j ||x_i - mu_j||^2`` is
``g_j = -2 (S_j - n_j mu_j)``. Every rule below is ``mu_j <- mu_j - eta_j g_j`` for some step
``eta_j``; they differ only in the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from .kernel import ChunkStats

__all__ = [
    "STEP_RULES",
    "DampedNewtonStep",
    "FixedStep",
    "NewtonStep",
    "StepResult",
    "StepRule",
    "gradient",
    "make_step_rule",
    "relocate_empty",
]

StepName = Literal["newton", "damped", "fixed"]
STEP_RULES: tuple[str, ...] = ("newton", "damped", "fixed")


def gradient(centers: np.ndarray, stats: ChunkStats) -> np.ndarray:
    """Gradient of the loss with respect to every mean: ``-2 (S_j - n_j mu_j)``."""
    return -2.0 * (stats.sums - stats.counts[..., None] * centers)


@dataclass
class StepResult:
    """New means, plus what the flow reports about the step."""

    centers: np.ndarray
    learning_rate: float | None = None  # the global step actually used by the fixed rule
    notes: list[str] = field(default_factory=list)


class StepRule(Protocol):
    """Maps the current means (n_init, k, d) and their statistics to new means.

    ``lands_on_lloyd`` says whether a step goes all the way to ``S_j / n_j``: only then are
    unchanged labels a fixed point (the next step would not move the means).
    """

    name: str

    @property
    def lands_on_lloyd(self) -> bool: ...

    def step(self, centers: np.ndarray, stats: ChunkStats) -> StepResult: ...


def _lloyd_targets(centers: np.ndarray, stats: ChunkStats) -> np.ndarray:
    """``S_j / n_j`` where a mean has rows, else the mean itself (an empty mean stays put)."""
    counts = stats.counts[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, stats.sums / counts, centers)


@dataclass
class NewtonStep:
    """``eta_j = 1 / (2 n_j)``: the Newton step of each mean's quadratic, i.e. Lloyd's update
    ``mu_j = S_j / n_j`` (computed in that form, so it is exactly Lloyd's)."""

    name: str = "newton"
    lands_on_lloyd: bool = True

    def step(self, centers: np.ndarray, stats: ChunkStats) -> StepResult:
        return StepResult(_lloyd_targets(centers, stats))


@dataclass
class DampedNewtonStep:
    """``eta_j = alpha / (2 n_j)``: a fraction ``alpha`` of the way to Lloyd's update."""

    alpha: float = 0.5
    name: str = "damped"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha} should be in (0, 1].")

    @property
    def lands_on_lloyd(self) -> bool:
        return self.alpha == 1.0

    def step(self, centers: np.ndarray, stats: ChunkStats) -> StepResult:
        target = _lloyd_targets(centers, stats)
        return StepResult(centers + self.alpha * (target - centers))


@dataclass
class FixedStep:
    """One global learning rate on the gradient of the mean loss ``L / N``.

    The update of mean j is then ``alpha_j = 2 lr n_j / N`` of the way to Lloyd's update, which
    overshoots once ``lr >= N / (2 n_j)`` and diverges at ``lr >= N / n_j``. A rate the current
    counts make unstable is clipped to ``N / (2 max_j n_j)`` (Newton's step for the largest
    cluster) and the clip is reported.
    """

    learning_rate: float = 0.1
    name: str = "fixed"
    lands_on_lloyd: bool = False

    def __post_init__(self) -> None:
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ValueError(f"learning_rate={self.learning_rate} should be > 0.")

    def step(self, centers: np.ndarray, stats: ChunkStats) -> StepResult:
        total = stats.counts.sum(axis=-1, keepdims=True)[..., None]  # N per restart
        largest = float(np.max(stats.counts / np.maximum(total[..., 0], 1e-300)))
        lr = self.learning_rate
        notes = []
        if largest > 0 and lr >= 1.0 / largest:
            clipped = 0.5 / largest
            notes.append(
                f"learning_rate={lr:g} is unstable for the current cluster sizes"
                f" (largest cluster holds {largest:.1%} of the weight); clipped to {clipped:g}."
            )
            lr = clipped
        new = centers - lr * gradient(centers, stats) / total
        return StepResult(new, learning_rate=lr, notes=notes)


def make_step_rule(
    step: str, *, learning_rate: float | None = None, alpha: float | None = None
) -> StepRule:
    """The step rule named ``step`` with its parameter."""
    if step == "newton":
        return NewtonStep()
    if step == "damped":
        return DampedNewtonStep(alpha=0.5 if alpha is None else alpha)
    if step == "fixed":
        return FixedStep(learning_rate=0.1 if learning_rate is None else learning_rate)
    raise ValueError(f"step={step!r} should be one of {', '.join(STEP_RULES)}.")


def relocate_empty(centers: np.ndarray, stats: ChunkStats) -> tuple[np.ndarray, list[str]]:
    """Move each mean with no rows to a row far from its own mean.

    The candidates are the rows farthest from their nearest mean, which every chunk returns in
    the same pass, so relocation costs no extra pass. Each empty mean takes the farthest
    candidate not already taken, skipping rows equal to a mean already placed, so the means
    stay distinct while the data has enough distinct rows.
    """
    centers = centers.copy()
    notes: list[str] = []
    for r in range(centers.shape[0]):
        empty = np.flatnonzero(stats.counts[r] <= 0)
        if empty.size == 0:
            continue
        used: set[int] = set()
        for j in empty:
            for c in range(stats.far_dist.shape[1]):
                row = stats.far_rows[r, c]
                if c in used or stats.far_dist[r, c] <= 0:
                    continue
                if np.any(np.all(centers[r] == row, axis=1)):
                    continue
                used.add(c)
                centers[r, j] = row
                notes.append(
                    f"restart {r}: mean {j} had no rows; moved to row {stats.far_index[r, c]}"
                    f" (squared distance {stats.far_dist[r, c]:.6g} from its mean)."
                )
                break
            else:
                notes.append(f"restart {r}: mean {j} has no rows and no distinct row to move to.")
    return centers, notes
