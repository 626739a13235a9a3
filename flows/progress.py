"""Progress lines and notes of a run: to the run's log (and so the Prefect UI) and to the
command line, whose console shows Prefect's own log records only from errors up; and the
bookkeeping of each iteration (checkpoint, progress artifact), done while the next pass runs."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["in_background", "progress_logger", "tell"]

#: The command line prints this logger's records (``flows.cli``); nothing else handles it.
progress_logger = logging.getLogger("kmeans_gd.progress")


def tell(logger: Any, line: str | None, notes: Sequence[str] = ()) -> None:
    """A line for the run's log and the command line; notes as warnings to both."""
    if line is not None:
        logger.info(line)
        progress_logger.info(line)
    for note in notes:
        logger.warning(note)
        progress_logger.info(note)


@contextlib.contextmanager
def in_background() -> Iterator[Callable[[Callable[[], object]], None]]:
    """Yield ``run(call)``, which waits for the call queued before (raising its error, if it
    failed), queues ``call`` to a thread of its own and returns.

    So at most one call is pending at a time, and when ``run`` returns every earlier call is
    done. Each call runs with the caller's context variables (Prefect's run context). On exit
    the pending call is waited for and its error raised; an error of the caller's own is never
    replaced.

    An iteration's checkpoint (written and fsync'ed) and progress artifact (a call to the
    Prefect API) took 27-38 ms between two passes of 0.9 s (10M x 32 rows, k = 64, a local
    temporary server); with a remote API or a network filesystem, more.
    """
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kmeans-gd-bookkeeping")
    pending: Future[object] | None = None

    def run(call: Callable[[], object]) -> None:
        nonlocal pending
        if pending is not None:
            done, pending = pending, None
            done.result()
        pending = executor.submit(contextvars.copy_context().run, call)

    try:
        yield run
    except BaseException:
        executor.shutdown(wait=True)
        raise
    executor.shutdown(wait=True)
    if pending is not None:
        pending.result()
