"""``KMeans``: the estimator, with the parameter and attribute names of scikit-learn and dask-ml."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import dask.array as da
import numpy as np

from . import initialization, kernel, optimizer
from .fit import FitResult, FitState, IterationReport, fit_means
from .passes import DaskData, data_from_array, stats_pass

__all__ = ["KMeans", "initial_centers", "validate_n_clusters"]

INIT_METHODS = ("k-means||", "k-means++", "random")


def _check_number(name: str, value: Any, *, low: float, high: float | None = None,
                  integer: bool = False, low_open: bool = False) -> None:
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name}={value!r} should be {'an int' if integer else 'a number'}.")
    if (value <= low) if low_open else (value < low):
        raise ValueError(f"{name}={value!r} should be {'>' if low_open else '>='} {low}.")
    if high is not None and value > high:
        raise ValueError(f"{name}={value!r} should be <= {high}.")


def validate_n_clusters(n_clusters: int, n_samples: int) -> None:
    """The check every entry point makes once the number of rows is known."""
    if n_samples < n_clusters:
        raise ValueError(f"n_samples={n_samples} should be >= n_clusters={n_clusters}.")


def initial_centers(
    data: DaskData,
    n_clusters: int,
    *,
    init: str | np.ndarray = "k-means++",
    n_init: int = 1,
    seed: int = 0,
    sample_size: int | None = None,
) -> np.ndarray:
    """Initial means for ``n_init`` restarts, shape (n_init, k, d).

    ``k-means||`` runs over all rows (one pass per round); ``k-means++`` and ``random`` work
    on one uniform sample of rows (one pass over the chunks
    that hold them); each restart draws from it with its own seed derived from ``seed``.
    """
    d = data.n_features
    if not isinstance(init, str):
        centers = np.asarray(init, dtype=np.float64)
        if centers.shape != (n_clusters, d):
            raise ValueError(
                f"init has shape {centers.shape}; expected (n_clusters, n_features)"
                f" = ({n_clusters}, {d})."
            )
        if not np.isfinite(centers).all():
            raise ValueError("init holds NaN or infinite values.")
        return np.repeat(centers[None], n_init, axis=0)
    if init not in INIT_METHODS:
        raise ValueError(f"init={init!r} should be one of {', '.join(INIT_METHODS)} or an array.")
    if init == "k-means||":
        return initialization.kmeans_parallel(data, n_clusters, seed=seed, n_init=n_init)
    size = sample_size or max(10_000, 50 * n_clusters)
    rows, weights = initialization.sample_rows(data, size, seed)
    seeds = np.random.SeedSequence(seed).generate_state(n_init)
    method: Callable[..., np.ndarray] = (
        initialization.kmeans_plusplus if init == "k-means++" else initialization.random_rows
    )
    return np.stack([method(rows, weights, n_clusters, int(s)) for s in seeds])


class KMeans:
    """K-means fitted by gradient descent on Dask arrays.

    Each iteration computes, in one pass over the data, the per-cluster sums and counts of the
    rows nearest to each mean, and moves the means along the gradient of the loss
    ``sum_i min_j ||x_i - mu_j||^2``. The default Newton step gives exactly Lloyd's update.
    Computes with whatever Dask scheduler is active (a distributed ``Client`` if one exists).

    Parameters
    ----------
    n_clusters : int, default=8
        Number of means.
    init : {'k-means||', 'k-means++', 'random'} or array of shape (n_clusters, n_features), \
default='k-means++'
        'k-means||': Bahmani et al.'s scalable k-means++ over all rows (5 rounds, 2k candidates
        per round, weighted reclustering); 'k-means++': greedy k-means++ on a uniform sample of
        rows; 'random': random rows.
    n_init : int, default=1
        Restarts, evaluated together: one pass per iteration serves all of them.
    max_iter : int, default=300
        Most iterations (passes over the data).
    tol : float, default=1e-4
        Stop when the relative loss decrease, or the squared centre shift relative to the mean
        feature variance, falls below ``tol``; also stops when no label changes.
    random_state : int or None, default=None
        Seed of every random choice; None draws one (see ``random_state_``).
    step : {'newton', 'damped', 'fixed'}, default='newton'
        'newton': step ``1/(2 n_j)`` (Lloyd's update); 'damped': ``alpha/(2 n_j)``; 'fixed': one
        ``learning_rate`` on the gradient of the mean loss.
    learning_rate : float, optional
        Step of the 'fixed' rule (default 0.1).
    alpha : float, optional
        Fraction of the Newton step for 'damped' (default 0.5).
    init_sample_size : int, optional
        Rows sampled for initialisation (default ``max(10000, 50 * n_clusters)``).
    on_iteration : callable, optional
        Called with an ``IterationReport`` after each iteration.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    inertia_ : float
        Sum of (weighted) squared distances of the rows to their nearest mean.
    n_iter_ : int
    history_ : list of dict
        Per iteration: loss, relative change, changed labels, gradient norm, cluster sizes,
        seconds.
    stop_reason_ : str
        One of 'no-label-changed', 'loss-tol', 'center-shift', 'max-iter'.
    restarts_ : list of dict
        Inertia, iterations and stop reason of every restart.
    random_state_ : int
        The seed used.

    Examples
    --------
    >>> import numpy as np
    >>> from pipeline import KMeans
    >>> X = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    >>> km = KMeans(n_clusters=2, init=np.array([[0.0, 0.0], [10.0, 0.0]])).fit(X)
    >>> km.cluster_centers_
    array([[ 0. ,  0.5],
           [10. ,  0.5]])
    >>> float(km.inertia_)
    1.0
    """

    def __init__(
        self,
        n_clusters: int = 8,
        *,
        init: str | np.ndarray = "k-means++",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int | None = None,
        step: str = "newton",
        learning_rate: float | None = None,
        alpha: float | None = None,
        init_sample_size: int | None = None,
        on_iteration: Callable[[IterationReport], None] | None = None,
    ) -> None:
        self.n_clusters = n_clusters
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.step = step
        self.learning_rate = learning_rate
        self.alpha = alpha
        self.init_sample_size = init_sample_size
        self.on_iteration = on_iteration

    def _validate_params(self) -> optimizer.StepRule:
        _check_number("n_clusters", self.n_clusters, low=1, integer=True)
        _check_number("n_init", self.n_init, low=1, integer=True)
        _check_number("max_iter", self.max_iter, low=1, integer=True)
        _check_number("tol", self.tol, low=0)
        if self.random_state is not None:
            _check_number("random_state", self.random_state, low=0, high=2**32 - 1, integer=True)
        if self.init_sample_size is not None:
            _check_number("init_sample_size", self.init_sample_size, low=1, integer=True)
        if isinstance(self.init, str) and self.init not in INIT_METHODS:
            raise ValueError(
                f"init={self.init!r} should be one of {', '.join(INIT_METHODS)} or an array."
            )
        return optimizer.make_step_rule(
            self.step, learning_rate=self.learning_rate, alpha=self.alpha
        )

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeans:
        """Fit the means to X, a NumPy or Dask array of shape (n_samples, n_features)."""
        step = self._validate_params()
        data = data_from_array(X, sample_weight)
        validate_n_clusters(self.n_clusters, data.n_rows)
        data = data.persist()
        seed = (
            int(np.random.SeedSequence().generate_state(1)[0])
            if self.random_state is None
            else int(self.random_state)
        )
        n_init = 1 if not isinstance(self.init, str) else self.n_init
        centers = initial_centers(
            data, self.n_clusters, init=self.init, n_init=n_init, seed=seed,
            sample_size=self.init_sample_size,
        )  # fmt: skip
        result = fit_means(
            data, FitState.start(centers), max_iter=self.max_iter, tol=self.tol, step=step,
            on_iteration=self.on_iteration,
        )  # fmt: skip
        self._set_result(result, data.n_features, seed)
        return self

    def _set_result(self, result: FitResult, n_features: int, seed: int) -> None:
        self.cluster_centers_ = result.centers
        self.inertia_ = result.inertia
        self.n_iter_ = result.n_iter
        self.history_ = result.history
        self.stop_reason_ = result.stop_reason
        self.restarts_ = result.restarts
        self.n_features_in_ = n_features
        self.random_state_ = seed

    def _checked_input(self, X: Any) -> Any:
        """X as a float Dask or NumPy array of the fitted width."""
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("This KMeans instance is not fitted yet; call fit first.")
        if not isinstance(X, da.Array):
            X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has shape {X.shape}; expected (n_samples, {self.n_features_in_})."
            )
        if X.dtype not in (np.float32, np.float64):
            X = X.astype(np.float64)
        return X

    def predict(self, X: Any) -> Any:
        """Index of the nearest mean for each row (a Dask array for Dask input)."""
        X = self._checked_input(X)
        centers = self.cluster_centers_
        if isinstance(X, da.Array):
            return X.rechunk({1: -1}).map_blocks(
                lambda block: kernel.assign_labels(block, centers)[0],
                drop_axis=1, dtype=np.int32,
            )  # fmt: skip
        return kernel.assign_labels(X, centers)[0]

    def fit_predict(self, X: Any, y: Any = None, sample_weight: Any = None) -> Any:
        return self.fit(X, sample_weight=sample_weight).predict(X)

    def score(self, X: Any, y: Any = None, sample_weight: Any = None) -> float:
        """Opposite of the (weighted) inertia of X under the fitted means."""
        data = data_from_array(self._checked_input(X), sample_weight)
        stats = stats_pass(data, self.cluster_centers_[None])
        return -float(stats.loss[0])
