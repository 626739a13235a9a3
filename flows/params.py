"""Typed flow parameters shared by the flows, the deployments and the CLI.

Each parameter is a flat type with bounds (``Annotated``) and a description (the flow's
docstring, ``Args:``), so the Prefect UI
renders a form that explains every field and refuses bad values before any work starts; the CLI
validates through the same flow signature, so both give the same message. The Dask cluster is
the one structured parameter: a discriminated union, which the UI renders as a choice.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.cluster import ClusterClassSpec, ClusterSpec, LocalClusterSpec, SchedulerSpec

__all__ = [
    "ClusterChoice",
    "ClusterClass",
    "ExistingScheduler",
    "LocalDask",
    "to_cluster_spec",
]


class LocalDask(BaseModel):
    """An embedded Dask LocalCluster with worker processes, started and stopped by the run."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["local"] = "local"
    workers: Annotated[int | None, Field(ge=1, le=512, description="Worker processes (default: min(2, cores)).")] = None
    threads_per_worker: Annotated[int | None, Field(ge=1, le=256, description="Threads per worker (default 1).")] = None
    memory_limit: Annotated[
        str | None,
        Field(pattern=r"^\s*\d+(\.\d+)?\s*([kKmMgGtT]i?[bB]|[bB])?\s*$|^auto$",
              description="Memory limit per worker, e.g. '512MB' or '4GiB' (default: Dask's 'auto')."),
    ] = None


class ExistingScheduler(BaseModel):
    """An existing Dask scheduler; TLS settings come from Dask's configuration."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["scheduler"] = "scheduler"
    address: Annotated[
        str,
        Field(pattern=r"^(tcp|tls|ucx|inproc)://\S+$",
              description="Scheduler address, e.g. tcp://scheduler:8786 or tls://scheduler:8786."),
    ]


class ClusterClass(BaseModel):
    """Any Dask cluster class by import path, e.g. dask_kubernetes.operator.KubeCluster."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["class"] = "class"
    cluster_class: Annotated[
        str,
        Field(pattern=r"^[A-Za-z_][\w.]*[.:][A-Za-z_]\w*$",
              description="Import path of the cluster class, e.g. dask_jobqueue.SLURMCluster."),
    ]
    kwargs: Annotated[dict[str, Any], Field(description="Keyword arguments for the class.")] = {}
    adapt_minimum: Annotated[int | None, Field(ge=0, description="Adaptive scaling: fewest workers.")] = None
    adapt_maximum: Annotated[int | None, Field(ge=1, description="Adaptive scaling: most workers.")] = None


ClusterChoice = Annotated[LocalDask | ExistingScheduler | ClusterClass, Field(discriminator="kind")]


def to_cluster_spec(choice: LocalDask | ExistingScheduler | ClusterClass) -> ClusterSpec:
    """The engine's cluster spec for a validated flow parameter."""
    if isinstance(choice, LocalDask):
        return LocalClusterSpec(
            n_workers=choice.workers,
            threads_per_worker=choice.threads_per_worker,
            memory_limit=choice.memory_limit,
        )
    if isinstance(choice, ExistingScheduler):
        return SchedulerSpec(address=choice.address)
    return ClusterClassSpec(
        cluster_class=choice.cluster_class,
        kwargs=dict(choice.kwargs),
        adapt_minimum=choice.adapt_minimum,
        adapt_maximum=choice.adapt_maximum,
    )
