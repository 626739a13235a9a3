"""Larger than memory: kmeans-gd streaming Parquet data several times the workers' memory.

Run from the repository root (or as ``python bench/bench.py --mode streaming ...``)::

    python bench/streaming.py --workers 2 --memory-limit 512MB --dims 32 --k 64 --iters 5

Writes Gaussian blobs to Parquet (once, cached under ``bench/data/``, row group by row group)
of at least ``--ratio`` (default 4.5) times the workers' total memory limit, unless ``--rows``
is given; then, in the same invocation:

* one plain read of the same columns with pyarrow, file by file
  (``pyarrow.parquet.read_table(file, columns=features)``, pyarrow's own threads, the table
  dropped after each file), ``--read-reps`` times before the fit and as many after it (the
  machine's speed drifts over minutes); the fastest of all is the ratio's denominator;
* ``kmeans-gd fit DATA OUT -k K --id-column id --cache none --memory-limit LIMIT --workers N
  --threads-per-worker 1 --max-iter ITERS --tol 0`` in a subprocess, with the Dask workers'
  scratch directory (``DASK_TEMPORARY_DIRECTORY``) under the results directory, so that spilled
  bytes can be watched, and its process tree sampled from outside every 50 ms.

It prints the data size, the total limit and their ratio; the per-iteration seconds (from
model.json's history) against the plain read (target: at most 2x); each worker's peak memory
(model.json's ``workers_peak_memory``, the workers' own ``ru_maxrss``, and the peak RSS sampled
from outside) against its limit; the peak bytes spilled to disk and the number of worker
processes seen (more than ``--workers`` means a worker was restarted). A failed or stalled fit
(``--timeout``) is reported as such, with the end of its stderr, and the exit code is 1. JSON
goes to ``bench/results/streaming-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(HERE), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench as core  # bench/bench.py

MiB = 2.0**20


class SpillWatcher(core.Poller):
    """Peak total size of the files in the Dask workers' spill directories (``storage`` under
    each worker's directory in ``root``), polled every 0.2 s."""

    interval = 0.2

    def __init__(self, root: Path) -> None:
        self.root = root
        self.peak = 0

    def _size(self) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.root):
            if "storage" not in Path(dirpath).parts:
                continue
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total

    def _sample(self) -> None:
        self.peak = max(self.peak, self._size())


def plain_read(files: list[Path], columns: list[str], reps: int) -> dict[str, Any]:
    """Seconds of one read of ``columns`` from every file, one file at a time (best of reps)."""
    import pyarrow.parquet as pq

    times = []
    for _ in range(reps):
        t = time.perf_counter()
        nbytes = 0
        for f in files:
            table = pq.read_table(f, columns=columns)
            nbytes += table.nbytes
            del table
        times.append(time.perf_counter() - t)
    return {"seconds": min(times), "all": times, "bytes": nbytes}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/streaming.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--memory-limit", default="512MB", help="per worker (default 512MB)")
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows (default: enough for --ratio times the total memory limit)",
    )
    p.add_argument(
        "--ratio",
        type=float,
        default=4.5,
        help="data size / total memory limit when --rows is not given (default 4.5)",
    )
    p.add_argument("--dims", type=int, default=32)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--iters", type=int, default=5, help="kmeans-gd --max-iter (default 5)")
    p.add_argument("--init", default="k-means++", help="kmeans-gd --init (default k-means++)")
    p.add_argument("--cache", default="none", help="kmeans-gd --cache (default none)")
    p.add_argument(
        "--files",
        type=int,
        default=None,
        help="Parquet files (default: about 128 MiB of features each, at least 2 per worker)",
    )
    p.add_argument("--centers", type=int, default=None, help="true blob centres (default 16 k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--read-reps", type=int, default=2)
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        help="seconds after which the fit is stopped and reported as stalled (default 3600)",
    )
    p.add_argument("--keep-outputs", action="store_true")
    p.add_argument("--data-dir", type=Path, default=HERE / "data")
    p.add_argument("--results-dir", type=Path, default=HERE / "results")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from dask.utils import format_bytes, parse_bytes

    started = _dt.datetime.now()
    stamp = started.strftime(core.STAMP)
    load_start = os.getloadavg()
    limit = parse_bytes(args.memory_limit)
    total_limit = args.workers * limit
    d = args.dims
    rows = args.rows or math.ceil(args.ratio * total_limit / (4 * d))
    nbytes = rows * d * 4
    files = args.files or max(2 * args.workers, math.ceil(nbytes / (128 * MiB)))
    centers = args.centers or 16 * args.k
    data, gen = core.parquet_data(args.data_dir, rows, d, centers, files, args.seed)
    paths = sorted(data.glob("*.parquet"))
    disk = sum(f.stat().st_size for f in paths)
    ratio = nbytes / total_limit
    print(f"data: {data}: {rows} x {d} float32 = {format_bytes(nbytes)} of features in memory, "
          f"{format_bytes(disk)} of Parquet in {len(paths)} files"
          + (f" (generated in {gen:.1f} s)" if gen else " (cached)"), flush=True)  # fmt: skip
    print(
        f"workers: {args.workers} x {format_bytes(limit)} = {format_bytes(total_limit)}; "
        f"data / total limit = {ratio:.2f} (target >= 4)",
        flush=True,
    )
    if ratio < 4:
        print(
            f"warning: the data is only {ratio:.2f} times the workers' total memory limit",
            flush=True,
        )

    features = [f"x{j}" for j in range(d)]
    read = plain_read(paths, features, args.read_reps)
    print(
        f"plain pyarrow read of the {d} feature columns, file by file: {read['seconds']:.3f} s "
        f"(best of {args.read_reps}: {', '.join(f'{t:.3f}' for t in read['all'])})",
        flush=True,
    )

    work = args.results_dir / f"streaming-{stamp}"
    scratch = work / "dask-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DASK_TEMPORARY_DIRECTORY=str(scratch))
    extra = ["--init", args.init, "--max-iter", str(args.iters), "--tol", "0",
             "--seed", str(args.seed), "--cache", args.cache, "--memory-limit", args.memory_limit,
             "--workers", str(args.workers), "--threads-per-worker", "1"]  # fmt: skip
    print("running: kmeans-gd fit ... " + " ".join(extra), flush=True)
    with SpillWatcher(scratch) as spill:
        r = core.run_cli_fit(
            data, work / "out", args.k, extra, env=env, timeout=args.timeout, quiet=False
        )
    r["spilled_peak_bytes"] = spill.peak
    # read again after the fit: the machine's speed drifts over minutes, and the fastest read
    # of all is the ratio's denominator (the conservative choice)
    after = plain_read(paths, features, args.read_reps)
    read = {"seconds": min(read["seconds"], after["seconds"]), "all": read["all"] + after["all"],
            "bytes": read["bytes"]}  # fmt: skip
    print(
        f"plain read again after the fit: {', '.join(f'{t:.3f}' for t in after['all'])} s;"
        f" best of all {read['seconds']:.3f} s",
        flush=True,
    )
    tree = r["process_tree"]
    failures = [f"the fit {r['failure']}"] if r["failure"] else []

    lines = [
        (
            f"streaming: rows={rows} dims={d} k={args.k} workers={args.workers}x1 thread "
            f"memory_limit={args.memory_limit} cache={args.cache} max_iter={args.iters}; "
            f"load average {load_start[0]:.1f} -> {os.getloadavg()[0]:.1f}"
        ),
        f"  data (features, float32)     {format_bytes(nbytes):>12}   Parquet on disk {format_bytes(disk)}",
        f"  workers' total memory limit  {format_bytes(total_limit):>12}   data / limit {ratio:.2f} (target >= 4)",
        f"  plain pyarrow read           {read['seconds']:>10.3f} s",
    ]
    checks: dict[str, Any] = {"data_over_limit": ratio}
    model = r.get("model")
    if model:
        per = r["per_iter"]
        med = statistics.median(per)
        checks["per_iter_over_plain_read"] = med / read["seconds"]
        checks["cache"] = model["parameters"].get("cache")
        lines += [
            (
                f"  kmeans-gd per iteration      {med:>10.3f} s   (median of {len(per)}; min "
                f"{min(per):.3f}, max {max(per):.3f}); / plain read = {med / read['seconds']:.2f} "
                "(target <= 2)"
            ),
            (
                f"  kmeans-gd seconds            init {model['seconds']['init']:.2f}, iterations "
                f"{model['seconds']['iterations']:.2f}, labels {model['seconds']['labels']:.2f}, "
                f"total {model['seconds']['total']:.2f}; subprocess wall {r['wall']:.1f} s"
            ),
            f"  inertia {model['inertia']:.6e}, {model['n_iter']} iterations ({model['stop_reason']})",
        ]
        peaks = model.get("workers_peak_memory") or {}
        for i, (addr, rss) in enumerate(sorted(peaks.items())):
            lines.append(f"  worker {i} ({addr}) peak (ru_maxrss) {rss / MiB:8.0f} MiB = "
                         f"{rss / limit:6.1%} of its {limit / MiB:.0f} MiB limit")  # fmt: skip
        checks["worker_peak_over_limit"] = [rss / limit for rss in peaks.values()]
    else:
        lines.append(f"  kmeans-gd: FAILED after {r['wall']:.1f} s ({failures[0]})")
        done = r["printed_iterations"]
        if done:
            per = [sec for _, sec in done]
            med = statistics.median(per)
            lines.append(
                f"  iterations finished before the failure: {len(done)}, per iteration {med:.3f} s "
                f"(median; min {min(per):.3f}, max {max(per):.3f}); / plain read = "
                f"{med / read['seconds']:.2f} (target <= 2)"
            )
        else:
            lines.append("  no iteration finished before the failure")
    sampled = tree["worker_rss_peaks_mb"]
    for i, mb in enumerate(sampled):
        lines.append(f"  worker process {i} peak RSS sampled from outside {mb:8.0f} MiB = "
                     f"{mb * MiB / limit:6.1%} of its limit")  # fmt: skip
    restarts = max(0, len(sampled) - args.workers)
    lines.append(f"  spilled to disk (peak)       {format_bytes(spill.peak):>12}   worker processes seen "
                 f"{len(sampled)} (restarts: {restarts})")  # fmt: skip
    checks.update({"spilled_peak_bytes": spill.peak, "worker_restarts": restarts,
                   "worker_sampled_peak_over_limit": [mb * MiB / limit for mb in sampled]})  # fmt: skip
    verdict = {
        "data >= 4x total limit": ratio >= 4,
        "fit finished": model is not None,
        "per iteration <= 2x plain read": bool(model) and checks["per_iter_over_plain_read"] <= 2,
        "every worker's peak < its limit": bool(model)
        and all(v < 1 for v in checks.get("worker_peak_over_limit", [2]))
        and all(v < 1 for v in checks["worker_sampled_peak_over_limit"]),
        "no spilling": spill.peak == 0,
        "no worker restarts": restarts == 0,
    }
    lines.append("  " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in verdict.items()))
    printed = "\n".join(lines)
    print()
    print(printed)
    if failures:
        tail = r["output_tail"].splitlines()[-15:]
        print("FAILED: " + "; ".join(failures))
        print("  end of its output:\n    " + "\n    ".join(tail))

    record = {
        "config": vars(args) | {"rows": rows, "files": files, "centers": centers},
        "data": {"path": str(data), "bytes_in_memory": nbytes, "bytes_parquet": disk},
        "memory_limit_per_worker": limit, "total_memory_limit": total_limit,
        "plain_read": read, "fit": {k: v for k, v in r.items() if k != "model"},
        "model": {k: model[k] for k in ("seconds", "history", "workers_peak_memory", "inertia",
                                        "n_iter", "stop_reason", "parameters") if k in model}
        if model else None,
        "checks": checks, "verdict": verdict, "failures": failures, "printed": printed,
    }  # fmt: skip
    out = core.write_record(args.results_dir, "streaming", started, record, load_start=load_start)
    if not args.keep_outputs:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nwritten {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
