"""``kmeans-gd``: the command line. Parses arguments and runs the Prefect flows.

Known errors (bad input, bad parameters, an existing output, an unreachable scheduler) end as
one line on stderr and exit code 2, with no traceback and nothing written.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from flows.progress import progress_logger
from flows.serve import add_arguments as add_serve_arguments

__all__ = ["main"]

EXIT_USAGE = 2


def _prepare_prefect_environment() -> None:
    """Settings applied before Prefect is imported.

    With no Prefect server configured, each run starts a temporary one; registering the
    block types and sending telemetry are most of its start-up and useless for a run that
    ends with the process. Prefect's own console output is kept to errors: the command line
    prints its own progress lines, and every log still reaches the API (and so the UI).
    """
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        os.environ.setdefault("PREFECT_API_BLOCKS_REGISTER_ON_START", "false")
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    # Prefect may already be imported (``python -m flows.cli`` imports the flows first) and
    # has then set up its console handler; quiet that one directly. Otherwise it is imported
    # only once the inputs are checked.
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.CRITICAL)


def _feature_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"'{text}' should be column names separated by commas.")
    return names


def _cluster_parameter(args: argparse.Namespace) -> dict[str, Any]:
    if args.scheduler:
        if args.workers is not None or args.memory_limit is not None:
            raise _UsageError("--scheduler cannot be combined with --workers or --memory-limit.")
        return {"kind": "scheduler", "address": args.scheduler}
    return {
        "kind": "local",
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "memory_limit": args.memory_limit,
    }


class _UsageError(ValueError):
    pass


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Dask cluster (default: an embedded LocalCluster)")
    group.add_argument("--scheduler", metavar="ADDRESS", help="existing scheduler, e.g. tcp://host:8786")
    group.add_argument("--workers", type=int, metavar="N", help="embedded cluster: worker processes")
    group.add_argument("--threads-per-worker", type=int, metavar="N", help="embedded cluster: threads per worker")
    group.add_argument("--memory-limit", metavar="SIZE", help="embedded cluster: memory limit per worker, e.g. 512MB")


class _Parser(argparse.ArgumentParser):
    """Usage errors in the same one-line form as every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"kmeans-gd: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kmeans-gd",
        description="K-means fitted by gradient descent on Dask: Parquet in, labelled Parquet out.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit k-means to Parquet data and write labels and model.json")
    fit.add_argument("input", help="Parquet file, directory or glob (local path or fsspec URI)")
    fit.add_argument("output", help="output directory (model.json, labels/)")
    fit.add_argument("-k", "--k", type=int, required=True, help="number of clusters")
    fit.add_argument("--features", type=_feature_list, help="feature columns, comma separated")
    fit.add_argument("--id-column", help="id column: never a feature, copied to the labels")
    fit.add_argument("--weight-column", help="sample weight column (>= 0)")
    fit.add_argument("--init", default="auto", metavar="METHOD_OR_PATH",
                     help="auto (default: k-means|| unless the data are small, then k-means++), k-means||,"
                     " k-means++, random, or a warm start: a model.json or a Parquet file of k centres")
    fit.add_argument("--n-init", type=int, default=1, help="restarts evaluated together (default 1)")
    fit.add_argument("--max-iter", type=int, default=100, help="most iterations (default 100)")
    fit.add_argument("--tol", type=float, default=1e-4, help="relative loss decrease to stop at (default 1e-4)")
    fit.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    fit.add_argument("--step", default="newton", help="newton (default), damped, fixed or minibatch")
    fit.add_argument("--learning-rate", type=float, help="step of --step fixed (default 0.1)")
    fit.add_argument("--alpha", type=float, help="fraction of the Newton step for --step damped (default 0.5)")
    fit.add_argument("--batch-size", type=int, help="rows per batch for --step minibatch (default 1000000)")
    fit.add_argument("--patience", type=int, default=10,
                     help="--step minibatch: batches without improvement before stopping (default 10)")
    fit.add_argument("--oversampling", type=float, default=2.0,
                     help="k-means||: candidates per round, as a multiple of k (default 2)")
    fit.add_argument("--init-rounds", type=int, default=5, help="k-means||: sampling rounds (default 5)")
    fit.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    fit.add_argument("--cache", default="auto", help="auto (default), memory or none (stream from Parquet)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing output")
    fit.add_argument("--no-resume", dest="resume", action="store_false",
                     help="ignore the checkpoint of an interrupted run and start over")
    fit.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    _add_cluster_options(fit)

    predict = sub.add_parser("predict", help="label Parquet data with a saved model")
    predict.add_argument("model", help="model.json (or the fit's output directory); path or fsspec URL")
    predict.add_argument("input", help="Parquet file, directory or glob")
    predict.add_argument("output", help="output directory: one labelled file per input file")
    predict.add_argument("--overwrite", action="store_true", help="replace an existing output")
    _add_cluster_options(predict)

    generate = sub.add_parser("generate", help="write Gaussian blobs to Parquet, file by file")
    generate.add_argument("output", help="output directory")
    generate.add_argument("--rows", type=int, required=True)
    generate.add_argument("--dims", type=int, required=True)
    generate.add_argument("--centers", type=int, required=True)
    generate.add_argument("--files", type=int, default=1)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--row-group-rows", type=int, default=65_536)
    generate.add_argument("--overwrite", action="store_true")

    demo = sub.add_parser("demo", help="generate a small dataset and fit it")
    demo.add_argument("--dir", help="where to put the demo data and output (default: a new temporary directory)")
    demo.add_argument("--rows", type=int, default=200_000)
    demo.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    _add_cluster_options(demo)

    serve = sub.add_parser(
        "serve",
        help="serve kmeans-fit/served and kmeans-predict/served from this process (no work pool)",
    )
    add_serve_arguments(serve)
    return parser


def _close_progress() -> None:
    """End the progress output (a progress bar ends its line) before the summary or an error."""
    for handler in list(progress_logger.handlers):
        handler.close()
        progress_logger.removeHandler(handler)


def _print_summary(result: dict[str, Any], seconds: float) -> None:
    _close_progress()
    sizes = ", ".join(str(round(size)) for size in result["cluster_sizes"])
    print(
        f"done: {result['n_rows']} rows, inertia {result['inertia']:.6g},"
        f" {result['n_iter']} iterations ({result['stop_reason']}), wall time {seconds:.1f} s\n"
        f"cluster sizes: {sizes}\n"
        f"model: {os.path.join(result['output'], 'model.json')}\n"
        f"labels: {os.path.join(result['output'], 'labels')}"
    )


def _validated(flow: Any, parameters: dict[str, Any]) -> dict[str, Any]:
    """Validate as the Prefect API does, so the CLI and the UI refuse the same values."""
    from prefect.exceptions import ParameterTypeError

    try:
        return flow.validate_parameters(parameters)
    except ParameterTypeError as exc:
        problems = [line.strip(" -") for line in str(exc).splitlines()[1:] if line.strip()]
        raise _UsageError("invalid parameters: " + "; ".join(problems)) from None


def _run_fit(args: argparse.Namespace) -> int:
    from flows.inputs import check_fit_data, check_fit_options

    # the data and the output first, before Prefect is imported (see flows.inputs)
    dataset = check_fit_data(
        args.input, args.output, features=args.features, id_column=args.id_column,
        weight_column=args.weight_column, dtype=args.dtype, overwrite=args.overwrite,
    )  # fmt: skip
    from flows.fit import kmeans_fit

    parameters = {
        "input": args.input, "output": args.output, "k": args.k, "features": args.features,
        "id_column": args.id_column, "weight_column": args.weight_column, "init": args.init,
        "n_init": args.n_init, "max_iter": args.max_iter, "tol": args.tol, "seed": args.seed,
        "step": args.step, "learning_rate": args.learning_rate, "alpha": args.alpha,
        "batch_size": args.batch_size, "patience": args.patience, "oversampling": args.oversampling,
        "init_rounds": args.init_rounds, "dtype": args.dtype, "cache": args.cache, "cluster": _cluster_parameter(args),
        "overwrite": args.overwrite, "resume": args.resume,
    }  # fmt: skip
    _validated(kmeans_fit, parameters)
    check_fit_options(dataset, args.input, args.k, init=args.init, step=args.step, n_init=args.n_init)
    started = time.perf_counter()
    result = kmeans_fit(**parameters)
    _print_summary(result, time.perf_counter() - started)
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    from flows.inputs import check_predict_inputs

    check_predict_inputs(args.model, args.input, args.output, overwrite=args.overwrite)
    from flows.predict import kmeans_predict

    parameters = {
        "model": args.model, "input": args.input, "output": args.output,
        "cluster": _cluster_parameter(args), "overwrite": args.overwrite,
    }  # fmt: skip
    _validated(kmeans_predict, parameters)
    started = time.perf_counter()
    result = kmeans_predict(**parameters)
    print(
        f"done: {result['n_rows']} rows labelled, inertia {result['inertia']:.6g},"
        f" wall time {time.perf_counter() - started:.1f} s\nlabels: {result['output']}"
    )
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from pipeline.generate import generate_blobs

    data = generate_blobs(
        args.output, rows=args.rows, dims=args.dims, centers=args.centers, files=args.files,
        seed=args.seed, row_group_rows=args.row_group_rows, overwrite=args.overwrite,
    )  # fmt: skip
    print(f"wrote {data.rows} rows x {data.dims} features in {len(data.files)} files to {data.path}")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from pipeline.generate import generate_blobs

    root = args.dir or tempfile.mkdtemp(prefix="kmeans-gd-demo-")
    data_dir, out_dir = os.path.join(root, "data"), os.path.join(root, "output")
    data = generate_blobs(data_dir, rows=args.rows, dims=8, centers=6, files=4, seed=0, overwrite=True)
    print(f"demo data: {data.rows} rows x {data.dims} features in {len(data.files)} files at {data_dir}")
    fit_args = _parser().parse_args(
        ["fit", data_dir, out_dir, "-k", "6", "--id-column", "id", "--overwrite"]
        + (["--quiet"] if args.quiet else [])
        + (["--scheduler", args.scheduler] if args.scheduler else [])
        + (["--workers", str(args.workers)] if args.workers else [])
    )
    return _run_fit(fit_args)


class _ProgressBar(logging.Handler):
    """On a terminal: one line redrawn in place, a bar of iterations out of ``--max-iter`` with
    the latest loss. Other messages (relocations, resume) are printed on lines of their own."""

    def __init__(self, max_iter: int, stream: Any) -> None:
        super().__init__()
        self.max_iter, self.stream = max_iter, stream

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("iteration "):
            self.stream.write(f"\r\033[K{message}\n")
            return
        fields = message.split()
        done = int(fields[1])
        width = 30
        filled = min(width, round(width * done / max(self.max_iter, 1)))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r\033[K[{bar}] {done}/{self.max_iter}  " + " ".join(fields[2:]))
        self.stream.flush()

    def close(self) -> None:
        if self.max_iter is not None:
            self.stream.write("\n")
            self.stream.flush()
        super().close()


def _progress_handler(args: argparse.Namespace) -> logging.Handler:
    """A progress bar on a terminal; plain lines for files, pipes and cron logs."""
    if sys.stdout.isatty() and hasattr(args, "max_iter"):
        return _ProgressBar(args.max_iter, sys.stdout)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def _run_serve(args: argparse.Namespace) -> int:
    from flows.serve import run_from_args

    return run_from_args(args)  # a ServeError is a ValueError: one line, exit code 2


_COMMANDS = {
    "fit": _run_fit, "predict": _run_predict, "generate": _run_generate, "demo": _run_demo,
    "serve": _run_serve,
}  # fmt: skip


class _Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler stopping the job), raised in the main thread
    so that the run unwinds as on Ctrl-C: the embedded cluster stops, a partial output is
    removed and the checkpoint kept. Left to the default action,
    the signal ended the process at once and its temporary Prefect server, stopped by
    Prefect at exit, kept running. Prefect's flow engine takes SIGTERM during a flow run and
    re-sends it to the handler it found: this one."""


def _raise_terminated(signum: int, frame: object) -> NoReturn:
    raise _Terminated


def _quiet_libraries() -> None:
    for name in ("distributed", "bokeh", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kmeans-gd`` console script."""
    args = _parser().parse_args(argv)
    if args.command != "serve":  # serving keeps Prefect's console logs of the runs it executes
        _prepare_prefect_environment()
    _quiet_libraries()
    progress_logger.propagate = False
    if not getattr(args, "quiet", False):
        handler = _progress_handler(args)
        progress_logger.addHandler(handler)
        progress_logger.setLevel(logging.INFO)

    from pipeline.cluster import ClusterConnectionError
    from pipeline.parquet_io import InputError

    # serving handles SIGTERM itself (it pauses its deployments)
    terminable = args.command != "serve" and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if terminable else None
    try:
        return _COMMANDS[args.command](args)
    except (InputError, _UsageError, ClusterConnectionError, FileExistsError) as exc:
        print(f"kmeans-gd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # parameter checks of the engine, e.g. n_samples < n_clusters
        print(f"kmeans-gd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kmeans-gd: interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("kmeans-gd: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if terminable:
            signal.signal(signal.SIGTERM, previous)
        _close_progress()


if __name__ == "__main__":
    sys.exit(main())
