"""Flow-level retries for transient failures only.

A run that fails on something transient (a Dask worker lost after its task retries ran out, a
scheduler restart, a storage outage) is retried by Prefect and resumes from the checkpoint of
its last completed iteration. A run that fails on its input or parameters (a missing file, a NaN
in a feature, a checkpoint of other data, an unreachable scheduler address) would fail the same
way on every retry, so it is marked not to be retried and fails at once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["FLOW_RETRIES", "FLOW_RETRY_DELAY_SECONDS", "retry_only_transient_failures"]

#: Retries of a flow run after a transient failure; each resumes from the last checkpoint.
FLOW_RETRIES = 2
#: Seconds before a retry: time for a replaced worker or a restarted scheduler to come back.
FLOW_RETRY_DELAY_SECONDS = 20


@contextlib.contextmanager
def retry_only_transient_failures() -> Iterator[None]:
    """Run a flow body; on a ``ValueError`` (every input, parameter and configuration error of
    the engine is one), tell the Prefect API not to retry this flow run, then re-raise."""
    try:
        yield
    except ValueError:
        _no_more_retries()
        raise


def _no_more_retries() -> None:
    # The API decides on retries when the run proposes its Failed state, from the run's policy:
    # setting retries to 0 first makes that Failed state final.
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    policy = context.flow_run.empirical_policy.model_copy(update={"retries": 0})
    with get_client(sync_client=True) as client:
        client.update_flow_run(context.flow_run.id, empirical_policy=policy)
