"""Progress lines and notes of a run: to the run's log (and so the Prefect UI) and to the
command line, whose console shows Prefect's own log records only from errors up."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["progress_logger", "tell"]

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
