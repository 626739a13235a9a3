"""Tests for pipeline.optimizer: the step rules, the gradient and empty-mean relocation.

Statistics come from the real kernel on small data; the loss for finite differences is a
brute-force ``sum_i w_i min_j ||x_i - mu_j||^2`` over an explicit distance matrix.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import blobs

from pipeline import optimizer
from pipeline.kernel import ChunkStats, chunk_stats
from pipeline.optimizer import (
    DampedNewtonStep,
    FixedStep,
    NewtonStep,
    gradient,
    make_step_rule,
    relocate_empty,
)


def _brute_loss(X: np.ndarray, w: np.ndarray, centers: np.ndarray) -> tuple[float, np.ndarray]:
    D = ((X[:, None, :] - centers[None, :, :]) ** 2).sum(axis=-1)
    return float(w @ D.min(axis=1)), D.argmin(axis=1)


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted blobs and two restarts of means that are not at a fixed point."""
    X = blobs(n=400, d=3, k=4, seed=seed, spread=1.0)
    rng = np.random.default_rng(seed)
    w = rng.uniform(0.2, 3.0, size=len(X))
    true = np.random.default_rng(seed).uniform(-10, 10, size=(4, 3))  # the blob centres
    centers = np.stack([true + rng.normal(scale=1.5, size=true.shape) for _ in range(2)])
    return X, w, centers


def test_gradient_matches_finite_differences() -> None:
    X, w, centers = _data()
    stats = chunk_stats(X, centers, weights=w)
    g = gradient(centers, stats)
    assert g.shape == centers.shape
    h = 1e-4
    checked = 0
    for r in range(2):
        _, labels = _brute_loss(X, w, centers[r])
        for j in range(4):
            for f in range(3):
                plus, minus = centers[r].copy(), centers[r].copy()
                plus[j, f] += h
                minus[j, f] -= h
                loss_p, lab_p = _brute_loss(X, w, plus)
                loss_m, lab_m = _brute_loss(X, w, minus)
                # the loss is quadratic in mu_j while no label changes: check that holds
                assert (lab_p == labels).all() and (lab_m == labels).all()
                fd = (loss_p - loss_m) / (2 * h)
                assert g[r, j, f] == pytest.approx(fd, rel=1e-6, abs=1e-6 * np.abs(g).max())
                checked += 1
    assert checked == 24
    assert np.abs(g).max() > 1.0  # the means are away from a fixed point


def test_gradient_formula_on_hand_computed_stats() -> None:
    X = np.array([[0.0], [2.0], [9.0], [13.0]])
    centers = np.array([[[0.0], [10.0]]])
    stats = chunk_stats(X, centers, weights=np.array([1.0, 3.0, 0.5, 2.0]))
    # mean 0: S = 6, n = 4 -> -2 (6 - 0) = -12;  mean 1: S = 30.5, n = 2.5 -> -2 (30.5 - 25) = -11
    np.testing.assert_array_equal(gradient(centers, stats), [[[-12.0], [-11.0]]])


def test_newton_step_is_lloyd_exactly() -> None:
    X, w, centers = _data(1)
    stats = chunk_stats(X, centers, weights=w)
    assert (stats.counts > 0).all()
    result = NewtonStep().step(centers, stats)
    np.testing.assert_array_equal(result.centers, stats.sums / stats.counts[..., None])
    assert result.learning_rate is None and result.notes == []
    # and it is the gradient step with eta_j = 1 / (2 n_j)
    eta = 1.0 / (2.0 * stats.counts[..., None])
    np.testing.assert_allclose(result.centers, centers - eta * gradient(centers, stats), rtol=1e-12)
    # Lloyd's update zeroes the gradient under the same labels
    np.testing.assert_allclose(gradient(result.centers, stats), 0.0, atol=1e-9)


def test_newton_leaves_an_empty_mean_in_place() -> None:
    X = np.array([[0.0], [1.0]])
    centers = np.array([[[0.5], [100.0]]])
    stats = chunk_stats(X, centers)
    result = NewtonStep().step(centers, stats)
    np.testing.assert_array_equal(result.centers, [[[0.5], [100.0]]])
    assert np.isfinite(result.centers).all()


@pytest.mark.parametrize("alpha", [0.25, 0.5, 1.0])
def test_damped_step(alpha: float) -> None:
    X, w, centers = _data(2)
    stats = chunk_stats(X, centers, weights=w)
    lloyd = stats.sums / stats.counts[..., None]
    result = DampedNewtonStep(alpha=alpha).step(centers, stats)
    np.testing.assert_allclose(result.centers, centers + alpha * (lloyd - centers), rtol=1e-14)
    eta = alpha / (2.0 * stats.counts[..., None])
    np.testing.assert_allclose(result.centers, centers - eta * gradient(centers, stats), rtol=1e-12)
    if alpha == 1.0:
        np.testing.assert_allclose(result.centers, NewtonStep().step(centers, stats).centers)
    # a damped step never increases the loss from these means (it is convex along the path)
    for r in range(2):
        before, _ = _brute_loss(X, w, centers[r])
        after, _ = _brute_loss(X, w, result.centers[r])
        assert after < before


def _stats_with_counts(centers: np.ndarray, counts: list[float]) -> ChunkStats:
    """1-D rows placed so mean j gets exactly counts[j] unit-weight rows."""
    rows = np.concatenate([np.full(int(c), centers[0, j, 0] + 0.25) for j, c in enumerate(counts)])
    return chunk_stats(rows[:, None], centers, n_far=len(counts))


def test_fixed_step_is_lr_times_gradient_over_n() -> None:
    X, w, centers = _data(3)
    stats = chunk_stats(X, centers, weights=w)
    N = w.sum()
    lr = 0.2
    assert lr < N / stats.counts.max()  # stable: no clip
    result = FixedStep(learning_rate=lr).step(centers, stats)
    np.testing.assert_allclose(
        result.centers, centers - lr * gradient(centers, stats) / N, rtol=1e-12
    )
    assert result.learning_rate == lr
    assert result.notes == []
    # equivalently a fraction 2 lr n_j / N of the way to Lloyd's update
    frac = 2 * lr * stats.counts[..., None] / N
    lloyd = stats.sums / stats.counts[..., None]
    np.testing.assert_allclose(result.centers, centers + frac * (lloyd - centers), rtol=1e-12)


def test_fixed_step_clips_unstable_rate_with_a_note() -> None:
    centers = np.array([[[0.0], [10.0], [20.0]]])
    stats = _stats_with_counts(centers, [2, 2, 4])  # N = 8, max n_j = 4: N / max n_j = 2
    lloyd = stats.sums / stats.counts[..., None]

    below = FixedStep(learning_rate=1.999).step(centers, stats)
    assert below.notes == [] and below.learning_rate == 1.999

    for lr in (2.0, 50.0):  # at and above N / max n_j
        result = FixedStep(learning_rate=lr).step(centers, stats)
        assert result.learning_rate == 1.0  # N / (2 max n_j)
        assert len(result.notes) == 1
        assert re.fullmatch(
            rf"learning_rate={lr:g} is unstable for the current cluster sizes \(largest cluster"
            r" holds 50\.0% of the weight\); clipped to 1\.",
            result.notes[0],
        )
        # the clipped rate is Newton's step for the largest cluster
        np.testing.assert_allclose(result.centers[0, 2], lloyd[0, 2], rtol=1e-15)
        np.testing.assert_allclose(
            result.centers, centers - 1.0 * gradient(centers, stats) / 8.0, rtol=1e-15
        )


def test_relocate_empty_mean_to_farthest_row() -> None:
    X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [30.0]])
    centers = np.array([[[1.0], [10.5], [1000.0]]])
    stats = chunk_stats(X, centers, n_far=3)
    assert stats.counts[0, 2] == 0
    moved, notes = relocate_empty(centers, stats)
    # the farthest row from its mean is 30 (squared distance 19.5^2 from 10.5)
    np.testing.assert_array_equal(moved, [[[1.0], [10.5], [30.0]]])
    assert notes == [
        "restart 0: mean 2 had no rows; moved to row 5 (squared distance 380.25 from its mean)."
    ]
    assert centers[0, 2, 0] == 1000.0  # the input is not modified


def test_relocate_several_empty_means_stay_distinct() -> None:
    # rows 20 and 21 duplicate the farthest value: the second empty mean must skip them
    X = np.array([[0.0], [1.0], [2.0], [-9.0], [9.0], [9.0], [-7.0]])
    centers = np.array([[[1.0], [500.0], [600.0], [700.0]]])
    stats = chunk_stats(X, centers, offset=15, n_far=4)
    moved, notes = relocate_empty(centers, stats)
    # distances from 1: -9 -> 100, 9 -> 64 (twice), -7 -> 64; ties by index: 18, 19, 20, 21
    np.testing.assert_array_equal(stats.far_index, [[18, 19, 20, 21]])
    np.testing.assert_array_equal(moved[0, :, 0], [1.0, -9.0, 9.0, -7.0])
    assert len(np.unique(moved[0], axis=0)) == 4
    assert [n.split(";")[0] for n in notes] == [
        "restart 0: mean 1 had no rows",
        "restart 0: mean 2 had no rows",
        "restart 0: mean 3 had no rows",
    ]
    assert "moved to row 21" in notes[2]


def test_relocate_reports_when_no_distinct_row_is_left() -> None:
    X = np.array([[3.0], [3.0], [3.0]])
    centers = np.array([[[3.0], [50.0]]])
    stats = chunk_stats(X, centers, n_far=2)
    moved, notes = relocate_empty(centers, stats)
    np.testing.assert_array_equal(moved, centers)
    assert notes == ["restart 0: mean 1 has no rows and no distinct row to move to."]


def test_relocate_works_per_restart() -> None:
    X = np.array([[0.0], [1.0], [8.0]])
    centers = np.array([[[0.5], [8.0]], [[0.5], [100.0]]])
    stats = chunk_stats(X, centers, n_far=2)
    moved, notes = relocate_empty(centers, stats)
    np.testing.assert_array_equal(moved[0], centers[0])  # restart 0 has no empty mean
    np.testing.assert_array_equal(moved[1], [[0.5], [8.0]])
    assert len(notes) == 1 and notes[0].startswith("restart 1: mean 1 had no rows; moved to row 2")


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: DampedNewtonStep(alpha=0), ValueError, "alpha=0 should be in (0, 1]."),
        (lambda: DampedNewtonStep(alpha=1.5), ValueError, "alpha=1.5 should be in (0, 1]."),
        (lambda: DampedNewtonStep(alpha=-0.1), ValueError, "alpha=-0.1 should be in (0, 1]."),
        (lambda: FixedStep(learning_rate=-1), ValueError, "learning_rate=-1 should be > 0."),
        (lambda: FixedStep(learning_rate=0), ValueError, "learning_rate=0 should be > 0."),
        (lambda: FixedStep(learning_rate=float("inf")), ValueError, "learning_rate=inf"),
        (lambda: FixedStep(learning_rate=float("nan")), ValueError, "learning_rate=nan"),
        (
            lambda: make_step_rule("bogus"),
            ValueError,
            "step='bogus' should be one of newton, damped, fixed.",
        ),
        (lambda: make_step_rule("damped", alpha=0), ValueError, "alpha=0 should be in (0, 1]."),
        (
            lambda: make_step_rule("fixed", learning_rate=-1),
            ValueError,
            "learning_rate=-1 should be > 0.",
        ),
    ],
)
def test_validation(build, error, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        build()


def test_make_step_rule_defaults() -> None:
    assert isinstance(make_step_rule("newton"), NewtonStep)
    damped = make_step_rule("damped")
    assert isinstance(damped, DampedNewtonStep) and damped.alpha == 0.5
    assert make_step_rule("damped", alpha=0.3).alpha == 0.3
    fixed = make_step_rule("fixed")
    assert isinstance(fixed, FixedStep) and fixed.learning_rate == 0.1
    assert make_step_rule("fixed", learning_rate=2.5).learning_rate == 2.5
    assert optimizer.STEP_RULES == ("newton", "damped", "fixed")
    assert [make_step_rule(s).name for s in optimizer.STEP_RULES] == list(optimizer.STEP_RULES)
