"""End to end, Parquet in to labels out: kmeans-gd's command line against dask-ml.

Run from the repository root (or as ``python bench/bench.py --mode e2e ...``)::

    python bench/e2e.py --rows 10000000 --dims 32 --k 64 --iters 20 --workers 2

The data (Gaussian blobs, columns ``id, x0 .. x{d-1}`` float32) are written once to Parquet
with ``pipeline.generate.generate_blobs`` under ``bench/data/`` and reused. Then, one after the
other, on the same data and the same embedded LocalCluster settings (``--workers`` processes x
1 thread, Dask's default memory limit):

(a) kmeans-gd: the real CLI in a subprocess, ``kmeans-gd fit DATA OUT -k K --id-column id
    --init k-means|| --max-iter ITERS+1 --tol 0 --workers W --threads-per-worker 1``; its
    phases from ``model.json`` (``seconds``: init, iterations, labels, total), the wall time of
    the subprocess (which adds Python start-up, imports and Prefect's temporary API server);
(b) dask-ml: ``dask.dataframe.read_parquet(columns) -> to_dask_array(lengths=True)`` (persisted
    on the workers, as dask-ml's documentation asks; ``--no-daskml-persist`` to stream it) ->
    ``dask_ml.cluster.KMeans(init='k-means||', max_iter=ITERS, tol=0).fit`` -> ``predict`` ->
    the ``cluster`` column written with ``to_parquet`` (kmeans-gd writes id, cluster and
    distance); timed from the cluster's start, phases
    from dask-ml's own "Finished ... in" log records (init, Lloyd loops).

Each tool's timed run starts from the same page cache: every data file is read through once
(``warm_page_cache``, untimed) right before it. Without this kmeans-gd, run first, read the
files from disk whenever the system had reclaimed them since the last run (10M x 32: its init
17.7 s instead of 13.3 s in one such run), and dask-ml, run next, found them where kmeans-gd
had just read them.

kmeans-gd counts passes and ends on a pass that evaluates its final means, so it runs with
``max_iter = iters + 1`` and makes ``iters`` Lloyd steps like dask-ml (``--literal-max-iter``
to pass ``iters``). The inertia of both results is then recomputed the same way (float64, on the
workers, outside the timings); each tool's own figure is kept too (dask-ml's ``inertia_`` is a
sum of distances, not squared distances). The table is printed and written as JSON to
``bench/results/e2e-<timestamp>.json``. No process holds all the rows: generation is row group
by row group, both fits run on the workers, the driver only gets means and small results.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench as core  # bench/bench.py


class _DaskMLTimes(logging.Handler):
    """dask-ml's "Finished <what> in H:MM:SS" records (its ``_timer``), in order, and when the
    first Lloyd loop started (the end of the initialisation)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[str, float]] = []
        self.first_loop_started: float | None = None
        self.last_loop_finished: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "Finished %s in %s":
            what = str(record.args[0])
            self.records.append((what, record.args[1].total_seconds()))
            if what.startswith("Lloyd loop"):
                self.last_loop_finished = record.created
        elif (
            record.msg == "Starting %s"
            and str(record.args[0]).startswith("Lloyd loop")
            and self.first_loop_started is None
        ):
            self.first_loop_started = record.created


@contextlib.contextmanager
def _daskml_times() -> Iterator[_DaskMLTimes]:
    logger = logging.getLogger("dask_ml")
    handler = _DaskMLTimes()
    old = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old[0])
        logger.propagate = old[1]


def warm_page_cache(data: Path) -> float:
    """Read every Parquet file of ``data`` through once, discarding the bytes, so that the run
    timed next finds them in the page cache as the other tool's run does; seconds taken."""
    t = time.perf_counter()
    for path in sorted(data.glob("*.parquet")):
        with open(path, "rb", buffering=0) as f:
            while f.read(16 << 20):
                pass
    return time.perf_counter() - t


def run_daskml(
    data: Path, out: Path, args: argparse.Namespace, features: list[str]
) -> dict[str, Any]:
    """dask-ml end to end on an embedded cluster like kmeans-gd's; returns timings, means, own
    inertia, workers' peak memory, and the exact inertia of ``extra_centers`` (computed after
    the timings on the same cluster)."""
    import dask.dataframe as dd
    from dask_ml.cluster import KMeans

    from pipeline.cluster import LocalClusterSpec, dask_client, workers_peak_memory

    spec = LocalClusterSpec(n_workers=args.workers, threads_per_worker=1)
    r: dict[str, Any] = {}
    t0 = time.perf_counter()
    with dask_client(spec) as client:
        r["cluster_start"] = time.perf_counter() - t0
        t = time.perf_counter()
        df = dd.read_parquet(str(data), columns=["id", *features])
        X = df[features].to_dask_array(lengths=True)
        if args.daskml_persist:
            X = X.persist()
            import distributed

            distributed.wait(X)
        r["load"] = time.perf_counter() - t
        r["chunks"] = [int(c) for c in X.chunks[0]]
        km = KMeans(n_clusters=args.k, init=args.daskml_init, max_iter=args.iters, tol=0.0,
                    random_state=args.seed)  # fmt: skip
        with _daskml_times() as times:
            t, wall0 = time.perf_counter(), time.time()
            km.fit(X)
            r["fit"] = time.perf_counter() - t
            wall1 = time.time()
        loops = [s for what, s in times.records if what.startswith("Lloyd loop")]
        # init: from fit's start to the first Lloyd loop (input checks, k-means|| rounds, the
        # final k-means++ on the candidates); fit_tail: after the last loop (labels, inertia)
        r["init"] = times.first_loop_started - wall0 if times.first_loop_started else None
        r["init_rounds"] = sum(1 for what, _ in times.records if what.startswith("init iteration"))
        r["fit_tail"] = wall1 - times.last_loop_finished if times.last_loop_finished else None
        r["iterations"] = sum(loops)
        r["per_iter"] = loops
        r["n_iter"] = int(km.n_iter_)
        r["log_records"] = times.records
        t = time.perf_counter()
        labels = km.predict(X)
        # the cluster column only: joining the id column of the dataframe to the persisted
        # array's labels fails in dask (dask-expr: "lost dependencies")
        table = dd.from_dask_array(labels).to_frame(name="cluster")
        table.to_parquet(str(out / "labels"), write_index=False)
        r["labels"] = time.perf_counter() - t
        r["total"] = time.perf_counter() - t0
        r["workers_peak_memory"] = workers_peak_memory(client)
        r["centers"] = np.asarray(km.cluster_centers_, dtype=np.float64)
        r["own_inertia"] = float(km.inertia_)
        del X, df, labels, table
        if args.extra_centers is not None:
            Xi = dd.read_parquet(str(data), columns=features).to_dask_array(lengths=True)
            r["exact_inertias"] = core.exact_inertias(
                Xi, {**args.extra_centers, "dask-ml": r["centers"]}
            )
    return r


def exact_inertias_on_cluster(data: Path, features: list[str], centers: dict[str, np.ndarray],
                              workers: int) -> dict[str, float]:  # fmt: skip
    import dask.dataframe as dd

    from pipeline.cluster import LocalClusterSpec, dask_client

    with dask_client(LocalClusterSpec(n_workers=workers, threads_per_worker=1)):
        X = dd.read_parquet(str(data), columns=features).to_dask_array(lengths=True)
        return core.exact_inertias(X, centers)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("method", "total s", "wall s", "load s", "init s", "iters s", "s/iter", "labels s",
            "other s", "n_iter", "inertia (exact)", "own inertia", "workers peak MB", "x kmeans-gd")  # fmt: skip
    lines = [head]
    for r in rows:
        lines.append((
            r["method"],
            *(core.fmt(r.get(key), ".2f") for key in ("total", "wall", "load", "init", "iterations")),
            core.fmt(r.get("s_per_iter"), ".3f"), core.fmt(r.get("labels"), ".2f"),
            core.fmt(r.get("other"), ".2f"), core.fmt(r.get("n_iter"), "d"),
            core.fmt(r.get("inertia"), ".6e"), core.fmt(r.get("own_inertia"), ".6e"),
            r.get("workers_peak", "-"), core.fmt(r.get("ratio"), ".2f"),
        ))  # fmt: skip
    return core.aligned_table(lines)


def _peaks_mb(peaks: dict[str, int] | None) -> str:
    if not peaks:
        return "-"
    return "+".join(f"{v / 2**20:.0f}" for v in peaks.values())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/e2e.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--iters", type=int, default=20, help="Lloyd steps (default 20)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--files", type=int, default=16, help="Parquet files (default 16)")
    p.add_argument("--centers", type=int, default=None, help="true blob centres (default 16 k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--gd-init",
        default="k-means||",
        help="kmeans-gd's --init (default k-means||; k-means++ if the CLI lacks it)",
    )
    p.add_argument("--daskml-init", default="k-means||")
    p.add_argument(
        "--no-daskml-persist",
        dest="daskml_persist",
        action="store_false",
        help="do not persist dask-ml's array (every pass then re-reads Parquet)",
    )
    p.add_argument(
        "--literal-max-iter",
        action="store_true",
        help="kmeans-gd --max-iter ITERS instead of ITERS+1",
    )
    p.add_argument("--skip-daskml", action="store_true")
    p.add_argument("--skip-kmeans-gd", action="store_true")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="skip the untimed tiny kmeans-gd run that fills numba's on-disk cache",
    )
    p.add_argument("--keep-outputs", action="store_true", help="keep the labels written")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds after which the kmeans-gd subprocess is stopped (default none)",
    )
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    started = _dt.datetime.now()
    stamp = started.strftime(core.STAMP)
    load_start = os.getloadavg()
    centers = args.centers or 16 * args.k
    data, gen = core.parquet_data(
        args.data_dir, args.rows, args.dims, centers, args.files, args.seed
    )
    features = [f"x{j}" for j in range(args.dims)]
    nbytes = args.rows * args.dims * 4
    disk = sum(f.stat().st_size for f in data.glob("*.parquet"))
    print(f"data: {data} ({args.rows} x {args.dims} float32 = {nbytes / 2**30:.2f} GiB in memory, "
          f"{disk / 2**30:.2f} GiB Parquet in {args.files} files)"
          + (f", generated in {gen:.1f} s" if gen else ", cached"), flush=True)  # fmt: skip
    work = args.results_dir / f"e2e-{stamp}"
    work.mkdir(parents=True, exist_ok=True)
    gd_max_iter = args.iters if args.literal_max_iter else args.iters + 1
    runs: dict[str, dict[str, Any]] = {}
    failures: list[str] = []

    if not args.skip_kmeans_gd:
        if args.warmup:
            tiny, _ = core.parquet_data(args.data_dir, 20_000, args.dims, 64, 2, args.seed)
            w = core.run_cli_fit(tiny, work / "warmup", min(args.k, 64),
                            ["--init", args.gd_init, "--max-iter", "2", "--tol", "0",
                             "--workers", str(args.workers), "--threads-per-worker", "1"])  # fmt: skip
            print(
                f"kmeans-gd warm-up (untimed): exit {w['returncode']}, {w['wall']:.1f} s",
                flush=True,
            )
            shutil.rmtree(work / "warmup", ignore_errors=True)
        extra = ["--init", args.gd_init, "--max-iter", str(gd_max_iter), "--tol", "0",
                 "--seed", str(args.seed), "--workers", str(args.workers), "--threads-per-worker", "1"]  # fmt: skip
        warm = warm_page_cache(data)
        print(f"page cache warmed for kmeans-gd (untimed): {warm:.1f} s", flush=True)
        r = core.run_cli_fit(data, work / "kmeans-gd", args.k, extra, timeout=args.timeout)
        r["page_cache_warm_seconds"] = warm
        print(f"kmeans-gd: exit {r['returncode']}, wall {r['wall']:.1f} s", flush=True)
        if r["failure"]:
            failures.append(f"kmeans-gd fit {r['failure']}: {r['command']}\n{r['output_tail']}")
            print("FAILED: " + failures[-1], file=sys.stderr, flush=True)
        runs["kmeans-gd"] = r

    gd_centers = None
    if "model" in runs.get("kmeans-gd", {}):
        gd_centers = np.asarray(runs["kmeans-gd"]["model"]["centers"], dtype=np.float64)
    if not args.skip_daskml:
        args.extra_centers = {"kmeans-gd": gd_centers} if gd_centers is not None else {}
        (work / "dask-ml").mkdir(exist_ok=True)
        try:
            warm = warm_page_cache(data)
            print(f"page cache warmed for dask-ml (untimed): {warm:.1f} s", flush=True)
            runs["dask-ml"] = run_daskml(data, work / "dask-ml", args, features)
            runs["dask-ml"]["page_cache_warm_seconds"] = warm
            print(f"dask-ml: {runs['dask-ml']['total']:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001  (reported; kmeans-gd's figures are kept)
            failures.append(f"dask-ml failed: {type(exc).__name__}: {exc}")
            print("FAILED: " + failures[-1], file=sys.stderr, flush=True)
    exact = runs.get("dask-ml", {}).get("exact_inertias")
    if exact is None and gd_centers is not None:
        exact = exact_inertias_on_cluster(data, features, {"kmeans-gd": gd_centers}, args.workers)
    exact = exact or {}

    rows = []
    if "model" in runs.get("kmeans-gd", {}):
        r, m = runs["kmeans-gd"], runs["kmeans-gd"]["model"]
        sec = m["seconds"]
        per = r["per_iter"]
        rows.append({
            "method": "kmeans-gd (CLI)", "total": sec["total"], "wall": r["wall"], "load": None,
            "init": sec["init"], "iterations": sec["iterations"],
            "s_per_iter": float(np.median(per)) if per else None, "labels": sec["labels"],
            "other": sec["total"] - sec["init"] - sec["iterations"] - sec["labels"],
            "n_iter": int(m["n_iter"]), "inertia": exact.get("kmeans-gd"),
            "own_inertia": float(m["inertia"]), "workers_peak": _peaks_mb(m.get("workers_peak_memory")),
            "stop_reason": m.get("stop_reason"),
        })  # fmt: skip
    if "dask-ml" in runs:
        r = runs["dask-ml"]
        known = r["load"] + (r["init"] or 0) + r["iterations"] + r["labels"]
        rows.append({
            "method": "dask-ml", "total": r["total"], "wall": r["total"], "load": r["load"],
            "init": r["init"], "iterations": r["iterations"],
            "s_per_iter": float(np.median(r["per_iter"])) if r["per_iter"] else None,
            "labels": r["labels"], "other": r["total"] - known, "n_iter": r["n_iter"],
            "inertia": exact.get("dask-ml"), "own_inertia": r["own_inertia"],
            "workers_peak": _peaks_mb(r["workers_peak_memory"]),
        })  # fmt: skip
    if rows and rows[0]["method"].startswith("kmeans-gd"):
        for row in rows:
            row["ratio"] = row["total"] / rows[0]["total"]
    printed = table(rows) if rows else "(nothing finished)"
    load_end = os.getloadavg()
    print()
    print(f"end to end: rows={args.rows} dims={args.dims} k={args.k} iters={args.iters} "
          f"workers={args.workers}x1 thread files={args.files} kmeans-gd --init {args.gd_init} "
          f"--max-iter {gd_max_iter}; dask-ml init={args.daskml_init} persist={args.daskml_persist}; "
          f"load average {load_start[0]:.1f} -> {load_end[0]:.1f}")  # fmt: skip
    print(printed)
    print(
        "total: kmeans-gd = model.json seconds.total (the flow, from its start incl. the cluster's "
        "start); dask-ml = from the cluster's start to the labels written. wall: kmeans-gd's "
        "subprocess (adds Python, imports, Prefect's temporary server). other = total - the "
        "phases (cluster start, input checks; dask-ml: its extra inertia pass at the end of fit)."
    )
    checks = {}
    if len(rows) == 2 and rows[0]["method"].startswith("kmeans-gd"):
        checks = {"daskml_over_kmeans_gd_total": rows[1]["total"] / rows[0]["total"],
                  "daskml_over_kmeans_gd_wall": rows[1]["wall"] / rows[0]["wall"],
                  "target_total_ratio_at_least": 8.0}  # fmt: skip
        for key, v in checks.items():
            print(f"{key}: {v:.2f}")
    for row in rows:
        if row["n_iter"] != (gd_max_iter if row["method"].startswith("kmeans-gd") else args.iters):
            print(f"note: {row['method']} ran {row['n_iter']} iterations"
                  + (f" ({row['stop_reason']})" if row.get("stop_reason") else ""))  # fmt: skip
    for f in failures:
        print(f"FAILED: {f.splitlines()[0]}")

    record = {
        "config": {k: v for k, v in vars(args).items() if k != "extra_centers"},
        "data": {"path": str(data), "bytes_in_memory": nbytes, "bytes_parquet": disk, "centers": centers},
        "table": rows, "checks": checks, "failures": failures,
        "runs": {name: {k: v for k, v in r.items() if k not in ("centers", "model")} |
                 ({"model_seconds": r["model"]["seconds"], "history": r["model"]["history"],
                   "workers_peak_memory": r["model"].get("workers_peak_memory")} if "model" in r else {})
                 for name, r in runs.items()},
        "printed": printed,
    }  # fmt: skip
    out = core.write_record(args.results_dir, "e2e", started, record, load_start=load_start,
                            load_end=load_end)  # fmt: skip
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwritten {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
