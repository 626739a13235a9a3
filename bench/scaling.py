"""Scaling: kmeans-gd's seconds per iteration against rows and against workers.

Run from the repository root (or as ``python bench/bench.py --mode scaling ...``)::

    python bench/scaling.py --sizes 1000000,2500000,5000000,10000000 --dims 32 --k 64 \\
        --workers-list 1,2 --iters 10 --png bench/results/scaling.png

Uses bench.py's data (one ``.npy`` of the largest size, generated once; smaller sizes are its
first rows), its initial means (k-means++ on a sample, the same for every run), its chunking
(equal chunks, as many as kmeans-gd's 64 MiB chunks would make, a multiple of the largest
worker count, placed round robin and persisted on the workers) and its kmeans-gd runner
(``pipeline.KMeans``, ``max_iter = iters + 1``, ``tol=0``; per-iteration seconds from
``history_``). Rows are swept on ``max(--workers-list)`` workers; workers are swept at the
largest size. Each worker has one thread. Prints a table, writes JSON to
``bench/results/scaling-<timestamp>.json`` and draws a PNG (seconds per iteration against rows
with a least-squares line; against workers with the ideal ``t1 / workers``) to ``--png``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench as core  # bench/bench.py


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def chunk_rows_for(n: int, d: int, multiple: int) -> int:
    """bench.py's rule: as many chunks as kmeans-gd's default chunks would make, rounded up to
    a multiple of ``multiple``, all of equal size."""
    from pipeline import parquet_io

    n_chunks = -(-n // max(1, parquet_io.DEFAULT_CHUNK_BYTES // (4 * d)))
    n_chunks = -(-n_chunks // multiple) * multiple
    return -(-n // n_chunks)


def run_one(client: Any, path: Path, n: int, d: int, init: np.ndarray, iters: int,
            multiple: int, pids: list[int]) -> dict[str, Any]:  # fmt: skip
    chunk_rows = chunk_rows_for(n, d, multiple)
    X, held = core.persisted_array(client, path, chunk_rows, rows=n)
    with core.MemorySampler(pids) as mem:
        r = core.run_kmeans_gd(X, init, iters + 1)
    del X
    per = r["per_iter"]
    return {
        "rows": n, "chunk_rows": chunk_rows, "chunks_per_worker": held, "n_iter": r["n_iter"],
        "stop_reason": r["stop_reason"], "per_iter": per, "median": statistics.median(per),
        "min": min(per), "max": max(per), "total": r["total"], "own_inertia": r["own_inertia"],
        **mem.as_dict(),
    }  # fmt: skip


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    pred = slope * np.asarray(x) + intercept
    ss_res = float(((np.asarray(y) - pred) ** 2).sum())
    ss_tot = float(((np.asarray(y) - np.mean(y)) ** 2).sum())
    return {"slope_s_per_row": float(slope), "slope_s_per_million_rows": float(slope) * 1e6,
            "intercept_s": float(intercept), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}  # fmt: skip


def draw(png: Path, by_rows: list[dict[str, Any]], by_workers: list[dict[str, Any]],
         fit: dict[str, float], title: str) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    x = np.array([r["rows"] for r in by_rows], dtype=float)
    med = np.array([r["median"] for r in by_rows])
    lo = med - np.array([r["min"] for r in by_rows])
    hi = np.array([r["max"] for r in by_rows]) - med
    a.errorbar(x / 1e6, med, yerr=[lo, hi], fmt="o", capsize=3, label="median (min-max)")
    xs = np.linspace(0, x.max() * 1.05, 50)
    a.plot(xs / 1e6, fit["intercept_s"] + fit["slope_s_per_row"] * xs, "--",
           label=f"fit: {fit['intercept_s']:.3f} s + {fit['slope_s_per_million_rows']:.3f} s/M rows"
                 f" (R² {fit['r2']:.3f})")  # fmt: skip
    a.set_xlabel("rows (millions)")
    a.set_ylabel("seconds per iteration")
    a.set_title(f"against rows ({by_rows[0]['workers']} workers)")
    a.set_xlim(left=0)
    a.set_ylim(bottom=0)
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
    if by_workers:
        w = np.array([r["workers"] for r in by_workers], dtype=float)
        m = np.array([r["median"] for r in by_workers])
        b.plot(w, m, "o-", label="median")
        one = [r for r in by_workers if r["workers"] == 1]
        if one:
            b.plot(w, one[0]["median"] / w, ":", label="ideal t1 / workers")
        b.set_xticks(w)
        b.set_xlabel("workers (1 thread each)")
        b.set_ylabel("seconds per iteration")
        b.set_title(f"against workers ({by_workers[0]['rows'] / 1e6:g}M rows)")
        b.set_ylim(bottom=0)
        b.legend(fontsize=8)
        b.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/scaling.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=_ints,
        default=_ints("1000000,2500000,5000000,10000000"),
        help="rows, comma separated (default 1M,2.5M,5M,10M)",
    )
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--iters", type=int, default=10, help="Lloyd steps per run (default 10)")
    p.add_argument(
        "--workers-list",
        type=_ints,
        default=[1, 2],
        help="worker counts, comma separated (default 1,2)",
    )
    p.add_argument("--centers", type=int, default=None, help="true blob centres (default 16 k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--png", type=Path, default=HERE / "results" / "scaling.png")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from pipeline.cluster import LocalClusterSpec, dask_client

    started = _dt.datetime.now()
    load_start = os.getloadavg()
    sizes = sorted(set(args.sizes))
    workers_list = sorted(set(args.workers_list), reverse=True)
    big, d, k = sizes[-1], args.dims, args.k
    w_rows = workers_list[0]  # the rows sweep runs on the most workers
    centers = args.centers or 16 * k
    path = core.data_path(args.data_dir, big, d, centers, args.seed)
    gen = core.generate(path, big, d, centers, args.seed)
    print(f"data: {path} ({big} x {d} float32, {big * d * 4 / 2**30:.2f} GiB)"
          + (f", generated in {gen:.1f} s" if gen else ", cached"), flush=True)  # fmt: skip
    init = core.initial_means(path, k, args.seed)

    runs: list[dict[str, Any]] = []
    for w in workers_list:
        todo = sizes if w == w_rows else [big]
        with dask_client(LocalClusterSpec(n_workers=w, threads_per_worker=1)) as client:
            pids = list(client.run(os.getpid).values())
            client.run(core._warm_up, k, d)
            for n in todo:
                r = run_one(client, path, n, d, init, args.iters, w_rows, pids)
                r["workers"] = w
                runs.append(r)
                print(
                    f"workers={w} rows={n}: {r['median']:.3f} s/iter "
                    f"(min {r['min']:.3f}, max {r['max']:.3f}; {r['n_iter']} passes)",
                    flush=True,
                )

    by_rows = sorted((r for r in runs if r["workers"] == w_rows), key=lambda r: r["rows"])
    by_workers = sorted((r for r in runs if r["rows"] == big), key=lambda r: r["workers"])
    fit = linear_fit([r["rows"] for r in by_rows], [r["median"] for r in by_rows])
    base = by_workers[0]["median"] if by_workers and by_workers[0]["workers"] == 1 else None

    head = ("workers", "rows", "chunks", "s/iter med", "min", "max", "s/iter per M rows",
            "fit s/iter", "speed-up vs 1 worker", "workers RSS MB")  # fmt: skip
    lines = [head]
    for r in sorted(runs, key=lambda r: (r["workers"], r["rows"])):
        pred = (
            fit["intercept_s"] + fit["slope_s_per_row"] * r["rows"]
            if r["workers"] == w_rows
            else None
        )
        lines.append((
            str(r["workers"]), str(r["rows"]), f"{sum(r['chunks_per_worker'])}x{r['chunk_rows']}",
            f"{r['median']:.3f}", f"{r['min']:.3f}", f"{r['max']:.3f}",
            f"{r['median'] / r['rows'] * 1e6:.3f}", "-" if pred is None else f"{pred:.3f}",
            "-" if base is None or r["rows"] != big else f"{base / r['median']:.2f}",
            f"{r['workers_rss_peak_mb']:.0f}",
        ))  # fmt: skip
    printed = core.aligned_table(lines, first_left=False)
    load_end = os.getloadavg()
    title = (f"kmeans-gd, d={d}, k={k}, float32, {args.iters} Lloyd steps per run, "
             f"{os.cpu_count()} cores; load {load_start[0]:.1f} -> {load_end[0]:.1f}")  # fmt: skip
    print()
    print(title)
    print(printed)
    print(
        f"linear fit on {w_rows} workers: {fit['intercept_s']:.4f} s + "
        f"{fit['slope_s_per_million_rows']:.4f} s per million rows, R² {fit['r2']:.4f}"
    )
    for r in runs:
        if r["n_iter"] != args.iters + 1:
            print(
                f"note: workers={r['workers']} rows={r['rows']} stopped after {r['n_iter']} "
                f"passes ({r['stop_reason']})"
            )
    draw(args.png, by_rows, by_workers, fit, title)
    print(f"plot: {args.png}")

    record = {
        "config": vars(args) | {"centers": centers}, "data": {"path": str(path)},
        "runs": runs, "linear_fit": fit, "png": str(args.png), "printed": printed,
    }  # fmt: skip
    out_json = core.write_record(args.results_dir, "scaling", started, record,
                                 load_start=load_start, load_end=load_end)  # fmt: skip
    print(f"written {out_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
