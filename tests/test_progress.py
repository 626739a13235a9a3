"""flows.progress: the bookkeeping run in the background while the passes go on."""

from __future__ import annotations

import contextvars
import threading

import pytest

from flows.progress import in_background

_RUN = contextvars.ContextVar("run", default="none")


def test_a_call_runs_in_another_thread_with_the_callers_context_while_the_caller_goes_on() -> None:
    release = threading.Event()
    seen: list[tuple[int, str, bool]] = []

    def call(i: int) -> None:
        if i == 0:
            assert release.wait(10)
        seen.append((i, _RUN.get(), threading.current_thread() is threading.main_thread()))

    _RUN.set("flow-run-1")
    with in_background() as run:
        run(lambda: call(0))
        assert seen == []  # queued and returned: the call is still waiting
        release.set()
        run(lambda: call(1))  # waits for the call before
        assert seen == [(0, "flow-run-1", False)]
        run(lambda: call(2))
    # on exit the pending call has finished
    assert seen == [(0, "flow-run-1", False), (1, "flow-run-1", False), (2, "flow-run-1", False)]


def _fail() -> None:
    raise OSError(28, "No space left on device")


def test_a_failed_call_is_raised_by_the_next_run_which_queues_nothing() -> None:
    seen: list[int] = []
    with pytest.raises(OSError, match="No space left"), in_background() as run:
        run(_fail)
        run(lambda: seen.append(1))
    assert seen == []


def test_a_failed_call_is_raised_on_exit() -> None:
    with pytest.raises(OSError, match="No space left"), in_background() as run:
        run(_fail)


def test_the_callers_own_error_is_not_replaced() -> None:
    with pytest.raises(KeyboardInterrupt), in_background() as run:
        run(_fail)
        raise KeyboardInterrupt
