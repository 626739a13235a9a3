"""``KMeans``: the estimator, with the parameter and attribute names of scikit-learn and dask-ml."""

from __future__ import annotations

import dataclasses
import numbers
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import dask
import dask.array as da
import numpy as np

from . import initialization, kernel, optimizer
from .fit import FitResult, FitState, fit_means
from .minibatch import fit_minibatch
from .model import read_init_centers
from .passes import DaskData, data_from_array, stats_pass

__all__ = [
    "INIT_METHODS",
    "STEPS",
    "KMeans",
    "check_init",
    "check_minibatch_restarts",
    "init_sample_size",
    "initial_centers",
    "resolve_init",
    "validate_n_clusters",
]

#: Initialisation methods by name; ``init`` may also be an array or the path of a warm start.
INIT_METHODS = ("auto", "k-means||", "k-means++", "random")

#: Step rules by name: the full-batch rules of ``optimizer`` and mini-batch.
STEPS = ("newton", "damped", "fixed", "minibatch")

#: Rows per mini-batch when ``batch_size`` is not given.
DEFAULT_BATCH_SIZE = 1_000_000


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


def init_sample_size(n_clusters: int, sample_size: int | None = None) -> int:
    """Rows sampled for k-means++ and random initialisation."""
    return sample_size or max(10_000, 50 * n_clusters)


def resolve_init(
    init: str | os.PathLike[str] | np.ndarray, n_rows: int, n_clusters: int,
    sample_size: int | None = None,
) -> str:
    """The initialisation ``init`` stands for: ``auto`` is k-means|| unless every row fits in
    the k-means++ sample (k-means++ then sees all rows, in one pass); ``warm-start`` for a
    path, ``given`` for an array."""
    if isinstance(init, str) and init in INIT_METHODS:
        if init == "auto":
            small = n_rows <= init_sample_size(n_clusters, sample_size)
            return "k-means++" if small else "k-means||"
        return init
    if isinstance(init, str | os.PathLike):
        return "warm-start"
    return "given"


def check_init(init: Any) -> None:
    """Refuse an ``init`` that is a string but neither a method nor an existing path."""
    if isinstance(init, str) and init in INIT_METHODS:
        return
    if isinstance(init, str | os.PathLike) and not os.path.exists(init):
        raise ValueError(
            f"init={os.fspath(init)!r} should be one of {', '.join(INIT_METHODS)}, an array, or"
            " the path of a model.json or a Parquet file of centres."
        )


def check_minibatch_restarts(n_init: int, init: Any) -> None:
    """Restarts are evaluated together by the full-batch rules only."""
    if n_init > 1 and isinstance(init, str) and init in INIT_METHODS:
        raise ValueError(
            f"n_init={n_init} is not supported with step='minibatch' (each restart would read"
            " batches of its own); use n_init=1."
        )


def initial_centers(
    data: DaskData,
    n_clusters: int,
    *,
    init: str | os.PathLike[str] | np.ndarray = "auto",
    n_init: int = 1,
    seed: int = 0,
    sample_size: int | None = None,
    oversampling: float = 2.0,
    rounds: int = 5,
    features: Sequence[str] | None = None,
) -> np.ndarray:
    """Initial means for ``n_init`` restarts, shape (n_init, k, d).

    ``k-means||`` runs over all rows (one pass per round, ``oversampling * k`` candidates
    expected per round); ``k-means++`` and ``random`` work on one uniform sample of rows (one
    pass over the chunks that hold them); each restart draws with its own seed derived from
    ``seed``. An array or a path (``model.json`` or a Parquet file of centres, columns named
    by ``features``) gives the same means to every restart.
    """
    d = data.n_features
    method = resolve_init(init, data.n_rows, n_clusters, sample_size)
    if method == "given":
        centers = np.asarray(init, dtype=np.float64)
        if centers.shape != (n_clusters, d):
            raise ValueError(
                f"init has shape {centers.shape}; expected (n_clusters, n_features)"
                f" = ({n_clusters}, {d})."
            )
        if not np.isfinite(centers).all():
            raise ValueError("init holds NaN or infinite values.")
        return np.repeat(centers[None], n_init, axis=0)
    if method == "warm-start":
        check_init(init)
        centers = read_init_centers(os.fspath(init), n_clusters, features, d)  # type: ignore[arg-type]
        return np.repeat(centers[None], n_init, axis=0)
    if method == "k-means||":
        return initialization.kmeans_parallel(
            data, n_clusters, seed=seed, n_init=n_init, oversampling=oversampling, rounds=rounds
        )
    rows, weights = initialization.sample_rows(
        data, init_sample_size(n_clusters, sample_size), seed
    )
    seeds = np.random.SeedSequence(seed).generate_state(n_init)
    pick: Callable[..., np.ndarray] = (
        initialization.kmeans_plusplus if method == "k-means++" else initialization.random_rows
    )
    return np.stack([pick(rows, weights, n_clusters, int(s)) for s in seeds])


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
    init : {'auto', 'k-means||', 'k-means++', 'random'}, array of shape (n_clusters, \
n_features) or path, default='auto'
        'k-means||': Bahmani et al.'s scalable k-means++ over all rows (``init_rounds`` rounds,
        about ``oversampling * n_clusters`` candidates per round, weighted reclustering);
        'k-means++': greedy k-means++ on a uniform sample of ``init_sample_size`` rows;
        'random': random rows; 'auto': k-means|| unless every row fits in that sample, then
        k-means++. A path is a warm start: a ``model.json`` of an earlier fit or a Parquet
        file of ``n_clusters`` centres.
    n_init : int, default=1
        Restarts, evaluated together: one pass per iteration serves all of them. Ignored for a
        given array or path (one start).
    max_iter : int, default=300
        Most iterations (passes over the data; batches for 'minibatch').
    tol : float, default=1e-4
        Stop when the relative loss decrease, or the squared centre shift relative to the mean
        feature variance, falls below ``tol``; also stops when no label changes. For
        'minibatch', the relative improvement of the smoothed batch loss that counts.
    random_state : int or None, default=None
        Seed of every random choice; None draws one (see ``random_state_``).
    step : {'newton', 'damped', 'fixed', 'minibatch'}, default='newton'
        'newton': step ``1/(2 n_j)`` (Lloyd's update); 'damped': ``alpha/(2 n_j)``; 'fixed': one
        ``learning_rate`` on the gradient of the mean loss; 'minibatch': Sculley's per-centre
        rates ``1/v_j`` on random batches of about ``batch_size`` rows (whole chunks), then
        one full pass for the inertia.
    learning_rate : float, optional
        Step of the 'fixed' rule (default 0.1).
    alpha : float, optional
        Fraction of the Newton step for 'damped' (default 0.5).
    batch_size : int, optional
        Rows per batch for 'minibatch' (default 1,000,000; at least one chunk).
    patience : int, default=10
        'minibatch' stops after this many batches without improvement of the smoothed loss.
    oversampling : float, default=2.0
        k-means||: expected candidates per round, as a multiple of ``n_clusters``.
    init_rounds : int, default=5
        k-means||: sampling rounds, one pass over the data each.
    init_sample_size : int, optional
        Rows sampled for k-means++ and random (default ``max(10000, 50 * n_clusters)``).
    on_iteration : callable, optional
        Called after each iteration with an ``IterationReport`` (a ``MinibatchReport`` for
        'minibatch').

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_clusters, n_features)
    inertia_ : float
        Sum of (weighted) squared distances of the rows to their nearest mean.
    n_iter_ : int
    history_ : list of dict
        Per iteration: loss, relative change, changed labels, gradient norm, cluster sizes,
        seconds ('minibatch': batch loss, smoothed loss, rows read).
    stop_reason_ : str
        One of 'no-label-changed', 'loss-tol', 'center-shift', 'max-iter'; 'minibatch':
        'no-improvement' or 'max-iter'.
    restarts_ : list of dict
        Inertia, iterations and stop reason of every restart.
    init_ : str
        The initialisation used: 'k-means||', 'k-means++', 'random', 'given' or 'warm-start'.
    random_state_ : int
        The seed used.

    Notes
    -----
    A feature whose values lie farther from zero than they spread is fitted less the midpoint
    of its range (one more pass over X), as scikit-learn fits X less its mean: in float32 the
    distances would otherwise lose the digits that tell the means apart
    (``kernel.origin_from_range``). ``predict`` and ``score`` shift X alike.

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
        init: str | os.PathLike[str] | np.ndarray = "auto",
        n_init: int = 1,
        max_iter: int = 300,
        tol: float = 1e-4,
        random_state: int | None = None,
        step: str = "newton",
        learning_rate: float | None = None,
        alpha: float | None = None,
        batch_size: int | None = None,
        patience: int = 10,
        oversampling: float = 2.0,
        init_rounds: int = 5,
        init_sample_size: int | None = None,
        on_iteration: Callable[[Any], None] | None = None,
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
        self.batch_size = batch_size
        self.patience = patience
        self.oversampling = oversampling
        self.init_rounds = init_rounds
        self.init_sample_size = init_sample_size
        self.on_iteration = on_iteration

    def _validate_params(self) -> optimizer.StepRule | None:
        """Check every parameter; the step rule, or None for 'minibatch'."""
        _check_number("n_clusters", self.n_clusters, low=1, integer=True)
        _check_number("n_init", self.n_init, low=1, integer=True)
        _check_number("max_iter", self.max_iter, low=1, integer=True)
        _check_number("tol", self.tol, low=0)
        if self.random_state is not None:
            _check_number("random_state", self.random_state, low=0, high=2**32 - 1, integer=True)
        if self.init_sample_size is not None:
            _check_number("init_sample_size", self.init_sample_size, low=1, integer=True)
        _check_number("oversampling", self.oversampling, low=0, low_open=True)
        _check_number("init_rounds", self.init_rounds, low=1, integer=True)
        _check_number("patience", self.patience, low=1, integer=True)
        if self.batch_size is not None:
            _check_number("batch_size", self.batch_size, low=1, integer=True)
        check_init(self.init)
        if self.step not in STEPS:
            raise ValueError(f"step={self.step!r} should be one of {', '.join(STEPS)}.")
        if self.step == "minibatch":
            check_minibatch_restarts(self.n_init, self.init)
            return None
        return optimizer.make_step_rule(
            self.step, learning_rate=self.learning_rate, alpha=self.alpha
        )

    def fit(self, X: Any, y: Any = None, sample_weight: Any = None) -> KMeans:
        """Fit the means to X, a NumPy or Dask array of shape (n_samples, n_features)."""
        step = self._validate_params()
        data = data_from_array(X, sample_weight)
        validate_n_clusters(self.n_clusters, data.n_rows)
        # fitted in the frame of X less its origin (kernel.origin_from_range); one more pass
        self._origin = kernel.origin_from_range(*dask.compute(data.X.min(axis=0), data.X.max(axis=0)))
        data = dataclasses.replace(data, X=self._shifted(data.X)).persist()
        seed = (
            int(np.random.SeedSequence().generate_state(1)[0])
            if self.random_state is None
            else int(self.random_state)
        )
        method = resolve_init(self.init, data.n_rows, self.n_clusters, self.init_sample_size)
        n_init = self.n_init if method in INIT_METHODS else 1
        centers = initial_centers(
            data, self.n_clusters, init=self.init, n_init=n_init, seed=seed,
            sample_size=self.init_sample_size, oversampling=self.oversampling,
            rounds=self.init_rounds,
        )  # fmt: skip
        if method not in INIT_METHODS:  # means given in X's frame
            centers = centers - self._origin
        if step is None:
            result = FitResult.from_minibatch(fit_minibatch(
                data, centers[0], batch_size=self.batch_size or DEFAULT_BATCH_SIZE,
                max_iter=self.max_iter, patience=self.patience, seed=seed, tol=self.tol,
                on_iteration=self.on_iteration,
            ))  # fmt: skip
        else:
            result = fit_means(
                data, FitState.start(centers), max_iter=self.max_iter, tol=self.tol, step=step,
                on_iteration=self.on_iteration,
            )  # fmt: skip
        for note in result.notes:
            warnings.warn(note, UserWarning, stacklevel=2)
        self._set_result(result, data.n_features, seed)
        self.init_ = method
        return self

    def _set_result(self, result: FitResult, n_features: int, seed: int) -> None:
        self.cluster_centers_ = result.centers + self._origin
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

    def _shifted(self, X: Any) -> Any:
        """X less the fitted origin, in X's dtype (exact in float32 near the origin)."""
        return X - self._origin.astype(X.dtype) if self._origin.any() else X

    def predict(self, X: Any) -> Any:
        """Index of the nearest mean for each row (a Dask array for Dask input)."""
        X = self._shifted(self._checked_input(X))
        centers = self.cluster_centers_ - self._origin
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
        data = data_from_array(self._shifted(self._checked_input(X)), sample_weight)
        stats = stats_pass(data, (self.cluster_centers_ - self._origin)[None])
        return -float(stats.loss[0])
