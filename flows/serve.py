"""Serve ``kmeans-fit`` and ``kmeans-predict`` from one long-running process, without a work pool.

``prefect deploy`` with ``deploy/prefect.yaml`` needs a work pool and a worker; this is the
lighter alternative for one machine: a single process registers both deployments with the
Prefect server, runs their schedules and the runs triggered from the UI or the API, and keeps
going until it is stopped (Ctrl-C or SIGTERM pause both deployments, so no schedule fires
while nothing serves them).

The deployments are ``kmeans-fit/served`` and ``kmeans-predict/served``. Their parameters are
checked here against the flow signatures before anything is registered, and the server enforces
the same schema on every run created later, so a bad value is refused with the field's name.

Command line: ``kmeans-gd serve`` (or ``python -m flows.serve``), see :func:`add_arguments`.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from collections.abc import Sequence
from typing import Any

__all__ = [
    "FIT_REQUIRED",
    "PREDICT_REQUIRED",
    "SERVED_DEPLOYMENT",
    "ServeError",
    "add_arguments",
    "build_deployments",
    "main",
    "run_from_args",
    "serve",
]

#: Name of both served deployments: ``kmeans-fit/served`` and ``kmeans-predict/served``.
#: Different from the names in deploy/prefect.yaml, so serving never replaces a work-pool deployment.
SERVED_DEPLOYMENT = "served"

#: Parameters without a default: a schedule can only create runs if the deployment has them.
FIT_REQUIRED = ("input", "output", "k")
PREDICT_REQUIRED = ("model", "input", "output")


class ServeError(ValueError):
    """Bad arguments for :func:`serve`: a cron string, a parameter, the limit or the API URL."""


def _check_cron(what: str, cron: str | None) -> None:
    if cron is None:
        return
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ServeError(f"{what}={cron!r} is not a valid cron string, e.g. '0 2 * * *'.") from None


def _check_parameters(flow: Any, what: str, parameters: dict[str, Any], *, complete: bool) -> None:
    """Check the given parameters against the flow signature, one by one.

    A deployment may hold only some parameters (the rest given per run), so each given value is
    validated on its own type; when ``complete`` (a schedule will create runs from these alone)
    the whole set is validated as Prefect does when it starts a run.
    """
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(parameters, dict):
        raise ServeError(f"{what} should be a mapping of parameter names to values.")
    hints = typing.get_type_hints(flow.fn, include_extras=True)
    hints.pop("return", None)
    unknown = sorted(set(parameters) - set(hints))
    if unknown:
        raise ServeError(
            f"{what}: unknown parameter(s) {', '.join(unknown)} for flow {flow.name!r};"
            f" its parameters are {', '.join(hints)}."
        )
    problems: list[str] = []
    for name, value in parameters.items():
        try:
            TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as exc:
            for error in exc.errors():
                where = ".".join(str(part) for part in (name, *error["loc"]))
                problems.append(f"{where}: {error['msg']}")
    if problems:
        raise ServeError(f"{what}: invalid parameters: " + "; ".join(problems))
    if complete:
        required = FIT_REQUIRED if flow.name == "kmeans-fit" else PREDICT_REQUIRED
        missing = [name for name in required if name not in parameters]
        if missing:
            raise ServeError(
                f"{what}: a schedule needs every required parameter; missing {', '.join(missing)}."
            )


def _check_api_configured() -> None:
    from prefect.settings import get_current_settings

    if not get_current_settings().api.url:
        raise ServeError(
            "no Prefect API configured: start a server (`prefect server start`) and set"
            " PREFECT_API_URL, e.g. `prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )


def build_deployments(
    cron_fit: str | None = None,
    cron_predict: str | None = None,
    fit_parameters: dict[str, Any] | None = None,
    predict_parameters: dict[str, Any] | None = None,
) -> list[Any]:
    """The two ``RunnerDeployment`` objects :func:`serve` serves, after checking every argument."""
    from prefect.types.entrypoint import EntrypointType

    from .fit import kmeans_fit
    from .predict import kmeans_predict

    fit_parameters = dict(fit_parameters or {})
    predict_parameters = dict(predict_parameters or {})
    _check_cron("cron_fit", cron_fit)
    _check_cron("cron_predict", cron_predict)
    _check_parameters(kmeans_fit, "fit_parameters", fit_parameters, complete=cron_fit is not None)
    _check_parameters(
        kmeans_predict, "predict_parameters", predict_parameters, complete=cron_predict is not None
    )
    # Module entrypoints (flows.fit.kmeans_fit): runs import the installed package, whatever
    # the working directory of the serving process.
    return [
        kmeans_fit.to_deployment(
            name=SERVED_DEPLOYMENT,
            cron=cron_fit,
            parameters=fit_parameters,
            tags=["kmeans-gd", "served"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
        kmeans_predict.to_deployment(
            name=SERVED_DEPLOYMENT,
            cron=cron_predict,
            parameters=predict_parameters,
            tags=["kmeans-gd", "served"],
            entrypoint_type=EntrypointType.MODULE_PATH,
        ),
    ]


def serve(
    cron_fit: str | None = None,
    cron_predict: str | None = None,
    fit_parameters: dict | None = None,
    predict_parameters: dict | None = None,
    limit: int | None = None,
) -> None:
    """Serve ``kmeans-fit/served`` and ``kmeans-predict/served`` until interrupted.

    Parameters
    ----------
    cron_fit, cron_predict : str or None
        Cron schedule of each deployment (server time zone UTC), e.g. ``"0 2 * * *"`` for a
        nightly re-fit and ``"0 * * * *"`` for hourly labelling. None: runs only when triggered.
    fit_parameters, predict_parameters : dict or None
        Default parameters of each deployment, overridable per run. With a schedule they must
        include the flow's required parameters (fit: input, output, k; predict: model, input,
        output). ``cluster`` is a mapping such as ``{"kind": "local", "workers": 2}``.
    limit : int or None
        Most flow runs executing at once in this process (None: no limit).

    Raises
    ------
    ServeError
        Before anything is registered: a bad cron string, an unknown or invalid parameter, a
        schedule without its required parameters, a bad limit, or no Prefect API configured.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ServeError(f"limit={limit!r} should be a positive integer or None.")
    deployments = build_deployments(cron_fit, cron_predict, fit_parameters, predict_parameters)
    _check_api_configured()

    import prefect

    prefect.serve(*deployments, limit=limit)


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"should be a JSON object: {text!r}")
    return value


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"should be NAME=VALUE: {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string, e.g. input=/data/points
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kmeans-gd serve``; :func:`run_from_args` runs them."""
    parser.add_argument(
        "--cron-fit", metavar="CRON", help="schedule of kmeans-fit/served, e.g. '0 2 * * *'"
    )
    parser.add_argument(
        "--cron-predict", metavar="CRON", help="schedule of kmeans-predict/served, e.g. '0 * * * *'"
    )
    parser.add_argument(
        "--fit-params", type=_json_object, default={}, metavar="JSON",
        help='default kmeans-fit parameters as a JSON object, e.g. \'{"input": "data/", "output": "out/", "k": 8}\'',
    )  # fmt: skip
    parser.add_argument(
        "--fit-param", type=_key_value, action="append", default=[], metavar="NAME=VALUE",
        help="one kmeans-fit parameter (VALUE parsed as JSON, else a string); repeatable, overrides --fit-params",
    )  # fmt: skip
    parser.add_argument(
        "--predict-params",
        type=_json_object,
        default={},
        metavar="JSON",
        help="default kmeans-predict parameters as a JSON object",
    )
    parser.add_argument(
        "--predict-param",
        type=_key_value,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one kmeans-predict parameter; repeatable",
    )
    parser.add_argument(
        "--limit", type=int, metavar="N", help="most flow runs at once (default: no limit)"
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Serve with the options of :func:`add_arguments`; raises :class:`ServeError` on bad ones."""
    serve(
        cron_fit=args.cron_fit,
        cron_predict=args.cron_predict,
        fit_parameters={**args.fit_params, **dict(args.fit_param)},
        predict_parameters={**args.predict_params, **dict(args.predict_param)},
        limit=args.limit,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flows.serve``: the same as ``kmeans-gd serve``."""
    parser = argparse.ArgumentParser(
        prog="kmeans-gd serve",
        description="Serve kmeans-fit/served and kmeans-predict/served from this process.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_from_args(args)
    except ServeError as exc:
        print(f"kmeans-gd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
