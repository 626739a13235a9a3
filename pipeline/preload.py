"""Dask nanny preload for deployed workers: ``dask worker --preload-nanny pipeline.preload``,
or ``DASK_DISTRIBUTED__NANNY__PRELOAD='["pipeline.preload"]'`` (what ``deploy/`` sets).

Before a nanny starts its worker process, a short-lived process compiles the kernel into
numba's on-disk cache, or finds it there, so that the worker loads it instead of compiling it
(some 13 s of CPU, and about 90 MB of the worker's memory kept for good: 360 against 269 MiB
at the baseline probe of a 512MB worker). In a process of its own because the nanny shares
its container's memory limit with the worker: what compiling takes is given back when it ends.
The cache must be on a path both see (numba's default next to the package, or
``NUMBA_CACHE_DIR``, as the image sets).
"""

from __future__ import annotations

import logging
import subprocess
import sys

__all__ = ["dask_setup"]

logger = logging.getLogger(__name__)

_LOAD = "from pipeline.cluster import load_engine; load_engine()"


def dask_setup(nanny: object) -> None:
    """Called by the nanny when it starts, before it starts its worker."""
    done = subprocess.run(
        [sys.executable, "-c", _LOAD], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        # the worker then compiles the kernel itself, as it would without this preload
        last = done.stderr.strip().splitlines()[-1:] or ["no message"]
        logger.warning("kmeans-gd: the kernel could not be compiled ahead of the worker: %s", last[0])
