"""flows.progress: the bookkeeping run in the background while the passes go on."""

from __future__ import annotations

import contextvars
import threading

import pytest

from flows.progress import in_background

_RUN = contextvars.ContextVar("run", default="none")


def test_calls_run_in_order_in_another_thread_with_the_callers_context() -> None:
    release = threading.Event()
    seen: list[tuple[int, str, bool]] = []

    def call(i: int) -> None:
        if i == 0:
            assert release.wait(10)
        seen.append((i, _RUN.get(), threading.current_thread() is threading.main_thread()))

    _RUN.set("flow-run-1")
    with in_background() as run:
        for i in range(3):
            run(lambda i=i: call(i))
        assert seen == []  # queued, not run: the first call is still waiting
        release.set()
    # on exit every queued call has finished
    assert seen == [(0, "flow-run-1", False), (1, "flow-run-1", False), (2, "flow-run-1", False)]


def test_a_failed_call_is_raised_by_the_next_run() -> None:
    done = threading.Event()

    def fail() -> None:
        done.set()
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), in_background() as run:
        run(fail)
        assert done.wait(10)
        for _ in range(100):  # the failure is raised once the call has ended
            run(lambda: None)
            threading.Event().wait(0.01)
        pytest.fail("the failure was never raised")


def test_a_failed_call_is_raised_on_exit_after_the_queued_calls() -> None:
    queued = threading.Event()
    seen: list[int] = []

    def fail() -> None:
        assert queued.wait(10)
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"), in_background() as run:
        run(fail)
        run(lambda: seen.append(1))
        queued.set()
    assert seen == [1]


def test_the_callers_own_error_is_not_replaced() -> None:
    def fail() -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(KeyboardInterrupt), in_background() as run:
        run(fail)
        raise KeyboardInterrupt
