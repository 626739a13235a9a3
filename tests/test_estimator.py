"""Tests for pipeline.estimator.KMeans: agreement with scikit-learn's Lloyd, hand-computed fits,
restarts, determinism, weights, history, stopping rules, predict/score and validation."""

from __future__ import annotations

import re

import dask
import dask.array as da
import numpy as np
import pytest
from conftest import blobs, lloyd_reference
from sklearn.cluster import KMeans as SKKMeans

from pipeline import KMeans, assign_labels, data_from_array, initial_centers
from pipeline.fit import STOP_REASONS, IterationReport

HISTORY_KEYS = {
    "iteration",
    "loss",
    "relative_change",
    "changed_labels",
    "gradient_norm",
    "cluster_sizes",
    "seconds",
}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# --------------------------------------------------------------------------------------------
# agreement with scikit-learn
# --------------------------------------------------------------------------------------------


def test_matches_sklearn_lloyd_float64(dask_client) -> None:
    X = blobs(n=3000, d=4, k=5, seed=1, spread=2.0)
    init = X[[0, 1, 2, 3, 4]].copy()  # a poor start: several iterations with changing labels
    ours = KMeans(n_clusters=5, init=init, tol=0).fit(X)
    ref = SKKMeans(n_clusters=5, init=init, n_init=1, algorithm="lloyd", tol=0).fit(X)
    assert ours.n_iter_ > 3
    assert _rel(ours.cluster_centers_, ref.cluster_centers_) < 1e-5
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), ref.labels_)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    # both stop at the first pass whose labels equal the previous pass's
    assert ours.stop_reason_ == "no-label-changed"
    assert ours.n_iter_ == ref.n_iter_


def test_matches_sklearn_lloyd_float32(dask_client) -> None:
    """float32: the same labels, but looser centres and inertia. Both compute distances with
    float32 products, yet scikit-learn also accumulates the per-cluster sums in float32
    (relative error ~1e-7 x rows per chunk) while the kernel accumulates them in float64, and
    scikit-learn's inertia is a float32 sum; so the two agree to ~1e-6, not to 1e-12."""
    X = blobs(n=3000, d=4, k=5, seed=2, spread=1.0).astype(np.float32)
    init = X[[0, 1, 2, 3, 4]].copy()
    ours = KMeans(n_clusters=5, init=init, tol=0).fit(X)
    ref = SKKMeans(n_clusters=5, init=init, n_init=1, algorithm="lloyd", tol=0).fit(X)
    assert _rel(ours.cluster_centers_, ref.cluster_centers_) < 1e-4
    np.testing.assert_array_equal(ours.predict(X), ref.labels_)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-5)
    assert ours.cluster_centers_.dtype == np.float64


@pytest.mark.parametrize("as_dask", [False, True])
def test_float32_far_from_zero_matches_float64_lloyd(as_dask: bool) -> None:
    """Blobs 1e5 from the origin in float32 (2 significant digits below their spread): fitted
    less the midpoint of X's range, the means, labels and inertia are a float64 Lloyd's on the
    same float32 values; predict and score shift X alike. Unshifted, the labels were noise."""
    rng = np.random.default_rng(4)
    truth = rng.uniform(-40, 40, size=(5, 2))
    X = (truth[rng.integers(0, 5, 4000)] + rng.normal(0, 3, (4000, 2)) + 1e5).astype(np.float32)
    init = truth + 1e5 + 3.0
    C, labels, inertia = lloyd_reference(X, init)
    data = da.from_array(X, chunks=(1000, 2)) if as_dask else X
    ours = KMeans(n_clusters=5, init=init, tol=0).fit(data)
    np.testing.assert_allclose(ours.cluster_centers_, C, rtol=0, atol=1e-4)
    assert ours.inertia_ == pytest.approx(inertia, rel=1e-6)
    np.testing.assert_array_equal(np.asarray(ours.predict(data)), labels)
    assert -ours.score(data) == pytest.approx(inertia, rel=1e-6)


def test_matches_sklearn_with_sample_weight() -> None:
    X = blobs(n=800, d=3, k=4, seed=3, spread=2.0)
    w = np.random.default_rng(3).uniform(0.1, 5.0, size=len(X))
    init = X[[0, 1, 2, 3]].copy()
    ours = KMeans(n_clusters=4, init=init, tol=0).fit(X, sample_weight=w)
    ref = SKKMeans(n_clusters=4, init=init, n_init=1, algorithm="lloyd", tol=0).fit(
        X, sample_weight=w
    )
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), ref.labels_)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)


def test_works_without_a_distributed_client() -> None:
    X = blobs(n=600, d=2, k=3, seed=4)
    init = X[[0, 1, 2]].copy()
    with dask.config.set(scheduler="sync"):
        ours = KMeans(n_clusters=3, init=init, tol=0).fit(X)
        labels = ours.predict(da.from_array(X, chunks=(100, 2))).compute()
        score = ours.score(X)
    ref = SKKMeans(n_clusters=3, init=init, n_init=1, algorithm="lloyd", tol=0).fit(X)
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(labels, ref.labels_)
    assert score == pytest.approx(-ref.inertia_, rel=1e-10)


# --------------------------------------------------------------------------------------------
# a fit computed by hand
# --------------------------------------------------------------------------------------------


def test_tiny_dataset_hand_computed() -> None:
    X = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    km = KMeans(n_clusters=2, init=np.array([[0.0], [1.0]])).fit(X)
    # pass 1: means (0, 1): labels 0|1 1 1 1 1, loss 0+0+1+81+100+121 = 303 -> means (0, 7.2)
    # pass 2: labels 0 0 0|1 1 1 (2 changed), loss 0+1+4+2.8^2+3.8^2+4.8^2 = 50.32 -> (1, 11)
    # pass 3: same labels: stop on the evaluated means (1, 11), inertia 1+0+1+1+0+1 = 4
    np.testing.assert_allclose(km.cluster_centers_, [[1.0], [11.0]], rtol=1e-15)
    assert km.inertia_ == pytest.approx(4.0, rel=1e-12)
    assert km.n_iter_ == 3
    assert km.stop_reason_ == "no-label-changed"
    losses = [rec["loss"] for rec in km.history_]
    np.testing.assert_allclose(losses, [303.0, 50.32, 4.0], rtol=1e-12)
    assert [rec["changed_labels"] for rec in km.history_] == [None, 2, 0]
    assert [rec["cluster_sizes"] for rec in km.history_] == [[1.0, 5.0], [3.0, 3.0], [3.0, 3.0]]
    # gradient -2 (S_j - n_j mu_j): pass 1 (0, -2 (36 - 5)); pass 2 (-2 (3 - 0), -2 (33 - 21.6))
    norms = [rec["gradient_norm"] for rec in km.history_]
    np.testing.assert_allclose(norms, [62.0, np.hypot(6.0, 22.8), 0.0], rtol=1e-12, atol=1e-12)
    assert km.history_[0]["relative_change"] is None
    assert km.history_[1]["relative_change"] == pytest.approx((303 - 50.32) / 303, rel=1e-12)
    np.testing.assert_array_equal(km.predict(X), [0, 0, 0, 1, 1, 1])
    assert km.restarts_ == [
        {
            "inertia": km.inertia_,
            "n_iter": 3,
            "stop_reason": "no-label-changed",
            "loss": losses,
        }
    ]


def test_docstring_example() -> None:
    X = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    km = KMeans(n_clusters=2, init=np.array([[0.0, 0.0], [10.0, 0.0]])).fit(X)
    np.testing.assert_array_equal(km.cluster_centers_, [[0.0, 0.5], [10.0, 0.5]])
    assert km.inertia_ == 1.0
    assert km.n_features_in_ == 2


# --------------------------------------------------------------------------------------------
# restarts and determinism
# --------------------------------------------------------------------------------------------


def test_n_init_chooses_best_restart() -> None:
    X = blobs(n=1500, d=2, k=6, seed=5, spread=1.5)
    km = KMeans(n_clusters=6, init="random", n_init=4, random_state=3, tol=0).fit(X)
    assert len(km.restarts_) == 4
    inertias = [r["inertia"] for r in km.restarts_]
    assert len(set(np.round(inertias, 6))) > 1  # the restarts really differ
    assert km.inertia_ == min(inertias)
    best = int(np.argmin(inertias))
    assert km.n_iter_ == km.restarts_[best]["n_iter"]
    assert km.stop_reason_ == km.restarts_[best]["stop_reason"]
    assert -km.score(X) == pytest.approx(km.inertia_, rel=1e-10)
    # each restart run alone from its own initial means gives the same inertia
    starts = initial_centers(data_from_array(X), 6, init="random", n_init=4, seed=3)
    for r in range(4):
        alone = KMeans(n_clusters=6, init=starts[r], tol=0).fit(X)
        assert alone.inertia_ == pytest.approx(inertias[r], rel=1e-9)
        assert alone.n_iter_ == km.restarts_[r]["n_iter"]


def test_same_random_state_gives_identical_centres() -> None:
    X = blobs(n=2000, d=3, k=4, seed=6)
    a = KMeans(n_clusters=4, n_init=2, random_state=11).fit(X)
    b = KMeans(n_clusters=4, n_init=2, random_state=11).fit(X)
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert a.inertia_ == b.inertia_
    assert a.random_state_ == 11
    c = KMeans(n_clusters=4, random_state=None).fit(X)
    assert isinstance(c.random_state_, int)
    d = KMeans(n_clusters=4, random_state=c.random_state_).fit(X)
    np.testing.assert_array_equal(c.cluster_centers_, d.cluster_centers_)


def test_chunking_does_not_change_the_result(dask_client) -> None:
    X = blobs(n=2000, d=3, k=5, seed=7, spread=2.0)
    small = KMeans(n_clusters=5, n_init=2, random_state=5).fit(da.from_array(X, chunks=(97, 3)))
    large = KMeans(n_clusters=5, n_init=2, random_state=5).fit(da.from_array(X, chunks=(1000, 3)))
    whole = KMeans(n_clusters=5, n_init=2, random_state=5).fit(X)
    assert _rel(small.cluster_centers_, large.cluster_centers_) < 1e-6
    assert _rel(whole.cluster_centers_, large.cluster_centers_) < 1e-6
    assert small.inertia_ == pytest.approx(large.inertia_, rel=1e-9)
    assert small.n_iter_ == large.n_iter_


def test_workers_and_threads_do_not_change_the_result(dask_client) -> None:
    """The same means, bit for bit, on the session's 2 workers x 1 thread, on 1 worker x 2
    threads, and with no cluster at all: the randomness is keyed by row and the reduction
    order is fixed, whoever computes which chunk."""
    from distributed import Client, LocalCluster

    X = da.from_array(blobs(n=6000, d=3, k=5, seed=12, spread=2.5), chunks=(777, 3))
    params = {"n_clusters": 5, "init": "k-means||", "n_init": 2, "random_state": 4, "tol": 0}
    two_workers = KMeans(**params).fit(X)
    with (
        LocalCluster(n_workers=1, threads_per_worker=2, dashboard_address=":0") as cluster,
        Client(cluster),
    ):
        two_threads = KMeans(**params).fit(X)
    with dask.config.set(scheduler="sync"):
        no_cluster = KMeans(**params).fit(X)
    for other in (two_threads, no_cluster):
        np.testing.assert_array_equal(other.cluster_centers_, two_workers.cluster_centers_)
        assert other.inertia_ == two_workers.inertia_ and other.n_iter_ == two_workers.n_iter_


def test_kmeans_parallel_init_finds_every_blob() -> None:
    X = blobs(n=3000, d=3, k=5, seed=8, spread=0.5)
    chunked = da.from_array(X, chunks=(401, 3))
    km = KMeans(5, init="k-means||", n_init=2, random_state=3).fit(chunked)
    truth = SKKMeans(5, n_init=10, random_state=0).fit(X)
    assert km.inertia_ == pytest.approx(truth.inertia_, rel=1e-6)
    assert len(km.restarts_) == 2
    again = KMeans(5, init="k-means||", n_init=2, random_state=3).fit(X)
    np.testing.assert_allclose(again.cluster_centers_, km.cluster_centers_, rtol=1e-6)


@pytest.mark.parametrize("init", ["k-means++", "random"])
def test_initial_centers(init: str) -> None:
    X = blobs(n=600, d=2, k=4, seed=15)
    w = np.where(np.arange(len(X)) % 3 == 0, 0.0, 1.0)
    data = data_from_array(X, sample_weight=w)
    starts = initial_centers(data, 4, init=init, n_init=3, seed=21)
    assert starts.shape == (3, 4, 2) and starts.dtype == np.float64
    for r in range(3):
        rows = [int(np.flatnonzero((X == c).all(axis=1))[0]) for c in starts[r]]
        assert len(set(rows)) == 4  # distinct rows of X
        assert all(w[i] > 0 for i in rows)  # never a row of weight 0
    assert not np.array_equal(starts[0], starts[1])  # each restart draws its own
    rechunked = data_from_array(da.from_array(X, chunks=(97, 2)), sample_weight=w)
    again = initial_centers(rechunked, 4, init=init, n_init=3, seed=21)
    np.testing.assert_array_equal(again, starts)  # drawn over global row indices
    given = initial_centers(data, 4, init=starts[0], n_init=2)
    np.testing.assert_array_equal(given, np.stack([starts[0], starts[0]]))


# --------------------------------------------------------------------------------------------
# sample weights
# --------------------------------------------------------------------------------------------


def test_integer_weights_equal_repeated_rows() -> None:
    X = blobs(n=400, d=2, k=3, seed=8, spread=2.5)
    w = np.random.default_rng(8).integers(0, 4, size=len(X))
    init = X[w > 0][:3].copy()
    weighted = KMeans(n_clusters=3, init=init, tol=0).fit(X, sample_weight=w)
    repeated = KMeans(n_clusters=3, init=init, tol=0).fit(np.repeat(X, w, axis=0))
    np.testing.assert_allclose(
        weighted.cluster_centers_, repeated.cluster_centers_, rtol=1e-12, atol=1e-12
    )
    assert weighted.inertia_ == pytest.approx(repeated.inertia_, rel=1e-12)
    assert weighted.score(X, sample_weight=w) == pytest.approx(
        repeated.score(np.repeat(X, w, axis=0)), rel=1e-12
    )
    sizes = weighted.history_[-1]["cluster_sizes"]
    assert sum(sizes) == w.sum()


def test_sample_weight_on_dask_input() -> None:
    X = blobs(n=500, d=2, k=3, seed=9)
    w = np.random.default_rng(9).uniform(0.5, 2.0, size=len(X))
    init = X[:3].copy()
    a = KMeans(n_clusters=3, init=init, tol=0).fit(X, sample_weight=w)
    b = KMeans(n_clusters=3, init=init, tol=0).fit(
        da.from_array(X, chunks=(60, 2)), sample_weight=da.from_array(w, chunks=77)
    )
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# history and stopping rules
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", ["newton", "damped", "fixed"])
def test_history_records(step: str) -> None:
    X = blobs(n=1000, d=2, k=4, seed=10, spread=1.5)
    reports: list[IterationReport] = []
    km = KMeans(
        n_clusters=4, init=X[:4].copy(), tol=1e-6, step=step, on_iteration=reports.append
    ).fit(X)
    assert len(km.history_) == km.n_iter_ == len(reports)
    assert km.stop_reason_ in STOP_REASONS
    for i, rec in enumerate(km.history_, start=1):
        expected = HISTORY_KEYS | ({"learning_rate"} if step == "fixed" else set())
        assert set(rec) == expected
        assert rec["iteration"] == i
        assert sum(rec["cluster_sizes"]) == len(X)
        assert rec["seconds"] >= 0
        assert reports[i - 1].records[0] is rec
        assert reports[i - 1].best_loss == rec["loss"]
    assert km.history_[-1]["loss"] == pytest.approx(km.inertia_, rel=1e-15)
    losses = np.array([rec["loss"] for rec in km.history_])
    if step in ("newton", "damped"):
        # Lloyd's and damped steps never increase the loss
        assert (np.diff(losses) <= 1e-12 * losses[:-1]).all()
        assert losses[-1] < losses[0]


def test_stop_max_iter() -> None:
    X = blobs(n=1000, d=2, k=5, seed=4, spread=1.5)
    km = KMeans(n_clusters=5, init=X[:5].copy(), max_iter=2, tol=0).fit(X)
    assert km.n_iter_ == 2
    assert km.stop_reason_ == "max-iter"
    assert km.history_[-1]["changed_labels"] > 0
    # the means kept are those evaluated by the last pass: inertia agrees with them
    assert -km.score(X) == pytest.approx(km.inertia_, rel=1e-12)


def test_max_iter_counts_passes_not_updates() -> None:
    """Every restart ends on means evaluated by a pass, so ``max_iter`` passes make
    ``max_iter - 1`` updates: scikit-learn's ``max_iter=m`` (m updates) is ``max_iter=m + 1``."""
    X = blobs(n=1000, d=2, k=5, seed=4, spread=1.5)
    init = X[:5].copy()
    ours = KMeans(n_clusters=5, init=init, max_iter=3, tol=0).fit(X)
    ref = SKKMeans(n_clusters=5, init=init, n_init=1, algorithm="lloyd", tol=0, max_iter=2).fit(X)
    assert ours.stop_reason_ == "max-iter" and ref.n_iter_ == 2
    np.testing.assert_allclose(ours.cluster_centers_, ref.cluster_centers_, rtol=1e-12)
    assert ours.inertia_ == pytest.approx(ref.inertia_, rel=1e-10)
    once = KMeans(n_clusters=5, init=init, max_iter=1).fit(X)
    np.testing.assert_array_equal(once.cluster_centers_, init)  # one pass, no update


def test_stop_no_label_changed_on_separated_data() -> None:
    X = np.concatenate([np.random.default_rng(0).normal(size=(100, 2)) + c for c in (0, 50, 100)])
    km = KMeans(n_clusters=3, init=X[[0, 100, 200]].copy()).fit(X)
    assert km.stop_reason_ == "no-label-changed"
    assert km.n_iter_ == 2
    assert km.history_[-1]["changed_labels"] == 0


@pytest.mark.parametrize(
    ("step", "param"), [("damped", {"alpha": 0.5}), ("fixed", {"learning_rate": 0.75})]
)
def test_damped_and_fixed_steps_reach_lloyds_fixed_point(step: str, param: dict) -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(100, 2)) + c for c in ([0, 0], [20, 0], [0, 20])])
    init = X[[0, 100, 200]] + 3.0
    lloyd = KMeans(n_clusters=3, init=init, tol=1e-6).fit(X)
    # learning_rate 0.75 moves each mean (2 * 0.75 * 100 / 300) = 1/2 of the way, like alpha 0.5
    other = KMeans(n_clusters=3, init=init, tol=1e-6, step=step, **param).fit(X)
    np.testing.assert_allclose(other.cluster_centers_, lloyd.cluster_centers_, atol=0.05)
    assert other.inertia_ == pytest.approx(lloyd.inertia_, rel=1e-3)


def test_stop_loss_tol() -> None:
    X = blobs(n=1000, d=2, k=5, seed=4, spread=1.5)
    km = KMeans(n_clusters=5, init=X[:5].copy(), tol=0.01).fit(X)
    assert km.stop_reason_ == "loss-tol"
    last = km.history_[-1]
    assert last["changed_labels"] > 0
    assert last["relative_change"] < 0.01
    assert all(rec["relative_change"] >= 0.01 for rec in km.history_[1:-1])


def test_stop_center_shift() -> None:
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(size=(300, 2)), [1000.0, 0.0] + rng.normal(size=(300, 2))])
    init = np.array([[-0.5, 0.0], [0.5, 0.0], [999.5, 0.0], [1000.5, 0.0]])
    km = KMeans(n_clusters=4, init=init, tol=1e-4).fit(X)
    # the means barely move next to a mean feature variance of ~1.25e5
    assert km.stop_reason_ == "center-shift"
    assert km.history_[-1]["changed_labels"] > 0


# --------------------------------------------------------------------------------------------
# predict and score
# --------------------------------------------------------------------------------------------


def test_predict_numpy_and_dask() -> None:
    X = blobs(n=700, d=3, k=4, seed=12)
    km = KMeans(n_clusters=4, random_state=0).fit(X)
    expected = assign_labels(X, km.cluster_centers_)[0]
    labels = km.predict(X)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
    lazy = km.predict(da.from_array(X, chunks=(123, 3)))
    assert isinstance(lazy, da.Array)
    np.testing.assert_array_equal(lazy.compute(), expected)
    np.testing.assert_array_equal(km.predict(X.astype(np.float32)), expected)
    np.testing.assert_array_equal(km.fit_predict(X), km.predict(X))
    # integer NumPy input is cast to float64
    Xi = np.round(X).astype(np.int64)
    np.testing.assert_array_equal(
        km.predict(Xi), assign_labels(Xi.astype(float), km.cluster_centers_)[0]
    )


def test_predict_accepts_lists() -> None:
    X = np.array([[0.0, 0.0], [0.0, 1.0], [10.0, 0.0], [10.0, 1.0]])
    km = KMeans(n_clusters=2, init=np.array([[0.0, 0.0], [10.0, 0.0]]))
    np.testing.assert_array_equal(km.fit_predict(X.tolist()), [0, 0, 1, 1])


def test_predict_integer_dask_array_like_numpy() -> None:
    X = np.array([[0], [1], [2], [3], [4], [5]], dtype=np.int64)
    km = KMeans(n_clusters=2, init=np.array([[0.0], [5.0]])).fit(X)
    np.testing.assert_allclose(km.cluster_centers_, [[1.0], [4.0]])
    np.testing.assert_array_equal(km.predict(X), [0, 0, 0, 1, 1, 1])
    # non-integer means: 0.9 and 3.9 (boundary 2.4) would truncate to 0 and 3 (boundary 1.5)
    km.cluster_centers_ = np.array([[0.9], [3.9]])
    np.testing.assert_array_equal(km.predict(X), [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(km.predict(da.from_array(X, chunks=2)).compute(), km.predict(X))


def test_score_is_minus_inertia() -> None:
    X = blobs(n=900, d=2, k=3, seed=13)
    km = KMeans(n_clusters=3, random_state=1, tol=0).fit(X)
    assert km.score(X) == pytest.approx(-km.inertia_, rel=1e-12)
    assert km.score(da.from_array(X, chunks=(100, 2))) == pytest.approx(-km.inertia_, rel=1e-12)
    w = np.full(len(X), 2.0)
    assert km.score(X, sample_weight=w) == pytest.approx(-2 * km.inertia_, rel=1e-12)
    sub = X[:10]
    expected = assign_labels(sub, km.cluster_centers_)[1].sum()
    assert km.score(sub) == pytest.approx(-expected, rel=1e-12)


def test_integer_input_is_fitted_as_float() -> None:
    X = np.round(blobs(n=300, d=2, k=3, seed=14) * 4).astype(np.int64)
    init = X[:3].astype(np.float64)
    a = KMeans(n_clusters=3, init=init, tol=0).fit(X)
    b = KMeans(n_clusters=3, init=init, tol=0).fit(X.astype(np.float64))
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------

X_SMALL = np.arange(20.0).reshape(10, 2)


@pytest.mark.parametrize(
    ("params", "X", "error", "message"),
    [
        ({"n_clusters": 0}, X_SMALL, ValueError, "n_clusters=0 should be >= 1."),
        ({"n_clusters": 2.5}, X_SMALL, TypeError, "n_clusters=2.5 should be an int."),
        ({"n_clusters": True}, X_SMALL, TypeError, "n_clusters=True should be an int."),
        ({"n_init": 0}, X_SMALL, ValueError, "n_init=0 should be >= 1."),
        ({"max_iter": 0}, X_SMALL, ValueError, "max_iter=0 should be >= 1."),
        ({"tol": -1}, X_SMALL, ValueError, "tol=-1 should be >= 0."),
        ({"tol": "a"}, X_SMALL, TypeError, "tol='a' should be a number."),
        ({"random_state": -1}, X_SMALL, ValueError, "random_state=-1 should be >= 0."),
        (
            {"init": "bogus"},
            X_SMALL,
            ValueError,
            ("init='bogus' should be one of auto, k-means||, k-means++, random, an array, or the"
            " path of a model.json or a Parquet file of centres."),
        ),
        ({"oversampling": 0}, X_SMALL, ValueError, "oversampling=0 should be > 0."),
        ({"init_rounds": 0}, X_SMALL, ValueError, "init_rounds=0 should be >= 1."),
        ({"patience": 0}, X_SMALL, ValueError, "patience=0 should be >= 1."),
        ({"batch_size": 0}, X_SMALL, ValueError, "batch_size=0 should be >= 1."),
        (
            {"step": "minibatch", "n_init": 3},
            X_SMALL,
            ValueError,
            "n_init=3 is not supported with step='minibatch'",
        ),
        (
            {"n_clusters": 2, "init": np.zeros((3, 2))},
            X_SMALL,
            ValueError,
            "init has shape (3, 2); expected (n_clusters, n_features) = (2, 2).",
        ),
        (
            {"n_clusters": 2, "init": np.array([[0.0, np.nan], [1.0, 1.0]])},
            X_SMALL,
            ValueError,
            "init holds NaN or infinite values.",
        ),
        (
            {"step": "bogus"},
            X_SMALL,
            ValueError,
            "step='bogus' should be one of newton, damped, fixed, minibatch.",
        ),
        (
            {"step": "fixed", "learning_rate": -1},
            X_SMALL,
            ValueError,
            "learning_rate=-1 should be > 0.",
        ),
        ({"step": "damped", "alpha": 2}, X_SMALL, ValueError, "alpha=2 should be in (0, 1]."),
        ({"n_clusters": 8}, X_SMALL[:5], ValueError, "n_samples=5 should be >= n_clusters=8."),
    ],
)
def test_parameter_validation(params, X, error, message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        KMeans(**params).fit(X)


def test_dask_input_of_wrong_ndim_is_refused() -> None:
    with pytest.raises(
        ValueError, match=re.escape("X should be 2-dimensional, got shape (4, 2, 2)")
    ):
        KMeans(n_clusters=2).fit(da.zeros((4, 2, 2), chunks=2))


@pytest.mark.parametrize("shape", [(5,), (4, 2, 2)])
def test_numpy_input_of_wrong_ndim_is_refused_with_a_clear_message(shape) -> None:
    with pytest.raises(
        ValueError, match=re.escape(f"X should be 2-dimensional, got shape {shape}")
    ):
        KMeans(n_clusters=2).fit(np.zeros(shape))


def test_sample_weight_shape_is_checked() -> None:
    with pytest.raises(
        ValueError, match=re.escape("sample_weight has shape (3,); expected (10,).")
    ):
        KMeans(n_clusters=2).fit(X_SMALL, sample_weight=np.ones(3))


def test_predict_validation() -> None:
    with pytest.raises(RuntimeError, match="not fitted yet"):
        KMeans(n_clusters=2).predict(X_SMALL)
    km = KMeans(n_clusters=2, random_state=0).fit(X_SMALL)
    with pytest.raises(ValueError, match=re.escape("X has shape (4, 3); expected (n_samples, 2).")):
        km.predict(np.zeros((4, 3)))
    with pytest.raises(ValueError, match=re.escape("expected (n_samples, 2)")):
        km.score(np.zeros((4, 3)))


# --------------------------------------------------------------------------------------------
# initialisation choices, warm starts, mini-batch, too few distinct rows
# --------------------------------------------------------------------------------------------


def test_auto_init_is_kmeans_plusplus_for_small_data_and_kmeans_parallel_otherwise() -> None:
    X = blobs(n=3000, k=4, seed=5)
    assert KMeans(4, random_state=0).fit(X).init_ == "k-means++"
    big = KMeans(4, random_state=0, init_sample_size=1000).fit(X)
    assert big.init_ == "k-means||"
    sk = SKKMeans(4, n_init=10, random_state=0).fit(X)
    assert big.inertia_ <= sk.inertia_ * (1 + 1e-6)


def test_kmeans_parallel_options_are_used() -> None:
    X = da.from_array(blobs(n=4000, k=6, seed=8), chunks=(700, -1))
    one_round = KMeans(6, init="k-means||", init_rounds=1, oversampling=0.5, random_state=1, max_iter=1)
    five = KMeans(6, init="k-means||", init_rounds=5, oversampling=4, random_state=1, max_iter=1)
    # the same seed gives other initial means when the rounds and oversampling differ
    assert not np.allclose(one_round.fit(X).cluster_centers_, five.fit(X).cluster_centers_)


def _write_centers(path, centers: np.ndarray, names: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"cluster": np.arange(len(centers))} | {
        name: centers[:, j] for j, name in enumerate(names)
    }), path)  # fmt: skip


def test_warm_start_from_a_model_file_or_parquet_of_centres(tmp_path) -> None:
    from pipeline.model import write_model

    X = blobs(n=3000, k=4, seed=9)
    first = KMeans(4, random_state=0, tol=0).fit(X)
    write_model(str(tmp_path / "model.json"), {
        "features": ["x0", "x1", "x2", "x3"], "centers": first.cluster_centers_,
    })  # fmt: skip
    _write_centers(tmp_path / "centres.parquet", first.cluster_centers_, ["x0", "x1", "x2", "x3"])
    for init in (tmp_path / "model.json", str(tmp_path), str(tmp_path / "centres.parquet")):
        warm = KMeans(4, init=init, n_init=3).fit(X)
        assert warm.init_ == "warm-start"
        assert len(warm.restarts_) == 1  # one start: the given means
        # already at Lloyd's fixed point: the second pass finds no label changed
        assert (warm.n_iter_, warm.stop_reason_) == (2, "no-label-changed")
        np.testing.assert_allclose(warm.cluster_centers_, first.cluster_centers_, rtol=1e-12)


@pytest.mark.parametrize(
    ("k", "message"),
    [
        (3, "holds 4 centres; k=3."),
        (5, "holds 4 centres; k=5."),
    ],
)
def test_warm_start_with_another_k_is_refused(tmp_path, k: int, message: str) -> None:
    X = blobs(n=500, d=2, k=4, seed=1)
    _write_centers(tmp_path / "c.parquet", X[:4], ["a", "b"])
    with pytest.raises(ValueError, match=re.escape(f"init file '{tmp_path / 'c.parquet'}' {message}")):
        KMeans(k, init=str(tmp_path / "c.parquet")).fit(X)


def test_warm_start_of_another_width_is_refused(tmp_path) -> None:
    X = blobs(n=500, d=3, k=4, seed=1)
    _write_centers(tmp_path / "c.parquet", X[:4, :2], ["a", "b"])
    with pytest.raises(ValueError, match=re.escape("has 2 features; the input has 3.")):
        KMeans(4, init=str(tmp_path / "c.parquet")).fit(X)


def test_minibatch_step_reaches_the_full_batch_inertia_reading_batches() -> None:
    X = da.from_array(blobs(n=40_000, d=4, k=5, seed=4, spread=1.5), chunks=(1000, -1))
    full = KMeans(5, init="k-means++", random_state=2).fit(X)
    reports: list = []
    mini = KMeans(
        5, init="k-means++", random_state=2, step="minibatch", batch_size=4000, patience=5,
        max_iter=100, on_iteration=reports.append,
    ).fit(X)  # fmt: skip
    assert mini.stop_reason_ in ("no-improvement", "max-iter")
    assert mini.inertia_ <= full.inertia_ * 1.05
    assert len(reports) == mini.n_iter_
    assert all(rec["rows"] == 4000 for rec in mini.history_)  # 4 chunks of 1000 per batch
    assert mini.restarts_[0]["rows_read"] == 4000 * mini.n_iter_ + 40_000  # + the final pass
    # its inertia is that of its means over all rows
    np.testing.assert_allclose(mini.inertia_, -mini.score(X), rtol=1e-9)


def test_fewer_distinct_rows_than_k_is_said_clearly() -> None:
    X = np.repeat(np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]]), 20, axis=0)
    with pytest.warns(UserWarning, match=re.escape("only 3 distinct means for k=5")):
        km = KMeans(5, random_state=0).fit(X)
    assert km.inertia_ == 0.0
