"""Quality: final inertia of kmeans-gd, scikit-learn and dask-ml on hard, known structure.

Run from the repository root (or as ``python bench/bench.py --mode quality ...``)::

    python bench/quality.py --rows 200000 --dims 8 --k 10 --seeds 5 --n-init 3 --workers 2

The data are ``--k`` overlapping Gaussian blobs of very unequal sizes (geometric, the largest
``--size-ratio`` times the smallest, default 100) and spreads (geometric, the widest
``--spread-ratio`` times the tightest, default 10; spreads shuffled against sizes, so that some
small blobs are wide and some large ones tight), their centres uniform in ``[-10, 10]^d``.
Generated in memory from ``--data-seed`` (float64, then float32: what every method is given).
For each fit seed ``0 .. --seeds - 1``, one after the other:

(a) kmeans-gd: ``pipeline.KMeans(n_clusters=k, init='k-means||', n_init=N, random_state=seed,
    max_iter, tol)`` on a distributed LocalCluster (``--workers`` processes x 1 thread), the rows
    a Dask array persisted on the workers;
(b) scikit-learn: ``KMeans(n_clusters=k, init='k-means++', n_init=N, random_state=seed,
    algorithm='lloyd', max_iter, tol)`` in this process on ``--workers`` BLAS/OpenMP threads;
(c) dask-ml: ``dask_ml.cluster.KMeans(n_clusters=k, init='k-means||', random_state=seed,
    max_iter, tol)`` on the same cluster and persisted array (dask-ml has no ``n_init`` for
    k-means||: one start; ``--skip-daskml`` to leave it out).

Every result's inertia is recomputed here, in float64, from its centres: the sum over rows of
the smallest squared distance to a centre (libraries' own figures are kept in the JSON only;
dask-ml's ``inertia_`` is a sum of distances, not of squared distances). A reference row gives
the inertia of the generating centres. The table (median, min and max inertia over the seeds,
median / kmeans-gd's median, median seconds per fit) is printed and written with every run to
``bench/results/quality-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench as core  # bench/bench.py


def make_blobs(rows: int, dims: int, k: int, seed: int, size_ratio: float,
               spread_ratio: float) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """Overlapping Gaussian blobs of geometric sizes (largest / smallest = ``size_ratio``) and
    geometric spreads (widest / tightest = ``spread_ratio``, tightest 0.5), shuffled against
    each other; centres uniform in ``[-10, 10]^dims``. Rows in a random order, float32."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(-10.0, 10.0, size=(k, dims))
    steps = np.arange(k) / max(1, k - 1)
    weights = size_ratio**steps
    sizes = np.floor(rows * weights / weights.sum()).astype(np.int64)
    sizes[-1] += rows - sizes.sum()
    spreads = 0.5 * spread_ratio ** rng.permutation(steps)
    truth = np.repeat(np.arange(k), sizes)
    X = centers[truth] + rng.standard_normal((rows, dims)) * spreads[truth, None]
    order = rng.permutation(rows)
    info = {"centers": centers, "sizes": sizes.tolist(), "spreads": spreads.tolist()}
    return np.ascontiguousarray(X[order], dtype=np.float32), info


def inertia(X: np.ndarray, centers: np.ndarray, block: int = 65536) -> float:
    """Sum over the rows of the smallest squared distance to ``centers``, in float64, each
    distance as the sum of squared differences (no expanded product)."""
    c = np.asarray(centers, dtype=np.float64)
    parts = []
    for lo in range(0, len(X), block):
        x = X[lo : lo + block].astype(np.float64)
        d2 = ((x[:, None, :] - c[None, :, :]) ** 2).sum(axis=2)
        parts.append(math.fsum(d2.min(axis=1)))
    return math.fsum(parts)


def fit_kmeans_gd(X: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from pipeline import KMeans

    km = KMeans(n_clusters=args.k, init="k-means||", n_init=args.n_init, random_state=seed,
                max_iter=args.max_iter, tol=args.tol)  # fmt: skip
    t = time.perf_counter()
    km.fit(X)
    seconds = time.perf_counter() - t
    return {"centers": np.asarray(km.cluster_centers_, dtype=np.float64), "seconds": seconds,
            "n_iter": int(km.n_iter_), "stop_reason": km.stop_reason_,
            "own_inertia": float(km.inertia_),
            "restarts": [{key: v for key, v in r.items() if key in ("inertia", "n_iter", "stop_reason")}
                         for r in km.restarts_]}  # fmt: skip


def fit_sklearn(X: np.ndarray, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    km = KMeans(n_clusters=args.k, init="k-means++", n_init=args.n_init, random_state=seed,
                algorithm="lloyd", max_iter=args.max_iter, tol=args.tol)  # fmt: skip
    with threadpool_limits(limits=args.workers):
        t = time.perf_counter()
        km.fit(X)
        seconds = time.perf_counter() - t
    return {"centers": km.cluster_centers_.astype(np.float64), "seconds": seconds,
            "n_iter": int(km.n_iter_), "own_inertia": float(km.inertia_)}  # fmt: skip


def fit_daskml(X: Any, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from dask_ml.cluster import KMeans

    km = KMeans(n_clusters=args.k, init="k-means||", random_state=seed, max_iter=args.max_iter,
                tol=args.tol)  # fmt: skip
    t = time.perf_counter()
    km.fit(X)
    seconds = time.perf_counter() - t
    return {"centers": np.asarray(km.cluster_centers_, dtype=np.float64), "seconds": seconds,
            "n_iter": int(km.n_iter_), "own_inertia": float(km.inertia_)}  # fmt: skip


METHODS = {
    "kmeans-gd": "pipeline.KMeans(init='k-means||', n_init=N), LocalCluster",
    "scikit-learn": "KMeans(init='k-means++', n_init=N, algorithm='lloyd')",
    "dask-ml": "dask_ml.cluster.KMeans(init='k-means||'), one start (no n_init), LocalCluster",
}


def table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "n_init", "median inertia", "min", "max", "median / kmeans-gd",
            "median s", "median n_iter")  # fmt: skip

    lines = [head]
    for r in rows:
        lines.append((
            r["method"], str(r["n_init"]),
            *(core.fmt(r[key], ".6e") for key in ("median", "min", "max")),
            core.fmt(r["ratio_to_kmeans_gd"], ".4f"), core.fmt(r["median_seconds"], ".2f"),
            core.fmt(r["median_n_iter"], "g"),
        ))  # fmt: skip
    return core.aligned_table(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dims", type=int, default=8)
    p.add_argument(
        "--k", type=int, default=10, help="clusters fitted and blobs generated (default 10)"
    )
    p.add_argument("--seeds", type=int, default=5, help="fit seeds 0 .. SEEDS-1 (default 5)")
    p.add_argument(
        "--n-init",
        type=int,
        default=3,
        help="starts for kmeans-gd and scikit-learn (default 3; dask-ml: always 1)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="cluster workers x 1 thread; scikit-learn's threads (default 2)",
    )
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument(
        "--size-ratio", type=float, default=100.0, help="largest / smallest blob (default 100)"
    )
    p.add_argument(
        "--spread-ratio",
        type=float,
        default=10.0,
        help="widest / tightest blob's standard deviation (default 10)",
    )
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument(
        "--chunk-rows",
        type=int,
        default=None,
        help="rows per Dask chunk (default: two chunks per worker)",
    )
    p.add_argument("--skip-daskml", action="store_true")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import dask.array as da
    import distributed

    from pipeline.cluster import LocalClusterSpec, dask_client

    started = _dt.datetime.now()
    load_start = os.getloadavg()
    X, info = make_blobs(args.rows, args.dims, args.k, args.data_seed, args.size_ratio,
                         args.spread_ratio)  # fmt: skip
    print(
        f"data: {args.rows} x {args.dims} float32, {args.k} blobs, sizes {info['sizes']}, "
        f"spreads {[round(s, 2) for s in info['spreads']]} (data seed {args.data_seed})",
        flush=True,
    )
    reference = inertia(X, info["centers"])
    methods = [m for m in METHODS if not (m == "dask-ml" and args.skip_daskml)]
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    spec = LocalClusterSpec(n_workers=args.workers, threads_per_worker=1)
    with dask_client(spec) as client:
        client.run(core._warm_up, args.k, args.dims)
        chunk_rows = args.chunk_rows or -(-args.rows // (2 * args.workers))
        Xd = da.from_array(X, chunks=(chunk_rows, args.dims)).persist()
        distributed.wait(Xd)
        for seed in range(args.seeds):
            for m in methods:
                if m == "kmeans-gd":
                    r = fit_kmeans_gd(Xd, args, seed)
                elif m == "scikit-learn":
                    r = fit_sklearn(X, args, seed)
                else:
                    r = fit_daskml(Xd, args, seed)
                r["seed"] = seed
                r["inertia"] = inertia(X, r.pop("centers"))
                runs[m].append(r)
                print(
                    f"seed {seed} {m}: inertia {r['inertia']:.6e}, {r['n_iter']} iterations, "
                    f"{r['seconds']:.2f} s",
                    flush=True,
                )
        del Xd

    rows = []
    for m in methods:
        inert = [r["inertia"] for r in runs[m]]
        rows.append({
            "method": m, "n_init": 1 if m == "dask-ml" else args.n_init,
            "median": statistics.median(inert), "min": min(inert), "max": max(inert),
            "median_seconds": statistics.median(r["seconds"] for r in runs[m]),
            "median_n_iter": statistics.median(r["n_iter"] for r in runs[m]),
            "inertias": inert,
        })  # fmt: skip
    base = rows[0]["median"]
    for row in rows:
        row["ratio_to_kmeans_gd"] = row["median"] / base
    rows.append({"method": "reference: generating centres", "n_init": "-", "median": reference,
                 "min": None, "max": None, "ratio_to_kmeans_gd": reference / base,
                 "median_seconds": None, "median_n_iter": None})  # fmt: skip
    printed = table(rows)
    load_end = os.getloadavg()
    print()
    print(
        f"quality: rows={args.rows} dims={args.dims} k={args.k} seeds={args.seeds} "
        f"n_init={args.n_init} max_iter={args.max_iter} tol={args.tol:g} "
        f"workers={args.workers}x1 thread, chunks of {chunk_rows} rows; load average {load_start[0]:.1f} -> {load_end[0]:.1f}"
    )
    print(printed)
    print(
        "inertia: recomputed here in float64 from each result's centres (sum of the smallest "
        "squared distance); min/max/median over the fit seeds."
    )
    print(
        f"note: tol={args.tol:g} is each library's own stopping rule (kmeans-gd: relative loss "
        "decrease or centre shift; scikit-learn: centre shift / feature variance; dask-ml: "
        "absolute squared centre shift); --tol 0 runs all of them to convergence or --max-iter."
    )
    if "dask-ml" in runs:
        print("note: dask-ml has no n_init for k-means||: one start per seed.")

    record = {
        "config": vars(args),
        "data": {"sizes": info["sizes"], "spreads": info["spreads"], "centers": info["centers"],
                 "reference_inertia": reference},
        "methods": {m: METHODS[m] for m in methods}, "table": rows, "runs": runs,
        "printed": printed,
    }  # fmt: skip
    out = core.write_record(args.results_dir, "quality", started, record,
                            load_start=load_start, load_end=load_end)  # fmt: skip
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
