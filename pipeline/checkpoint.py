"""Checkpoints: the fit loop's state after every iteration, saved atomically next to the output.

A checkpoint is one JSON file, ``OUTPUT.checkpoint.json`` beside ``OUTPUT``, holding the
:class:`~pipeline.fit.FitState` and a key made of the data's fingerprint and every parameter
that changes the result. Rerunning the same command resumes from it and ends with the same
result as an uninterrupted run: the state is complete and floats round-trip exactly through
JSON. A checkpoint whose key differs is refused, never used silently.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .fit import FitState
from .parquet_io import InputError

__all__ = [
    "CheckpointMismatchError",
    "checkpoint_path",
    "checkpoint_record",
    "load_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
    "write_checkpoint",
]

FORMAT = "kmeans-gd/checkpoint/v1"


class CheckpointMismatchError(InputError):
    """A checkpoint exists but was made with other data or other parameters."""


def checkpoint_path(output: str | os.PathLike[str]) -> str:
    """Where the checkpoint of a run writing ``output`` lives: a sibling file."""
    final = os.path.abspath(os.fspath(output))
    return final + ".checkpoint.json"


def _state_to_json(state: FitState) -> dict[str, Any]:
    return {
        "iteration": state.iteration,
        "centers": state.centers.tolist(),
        "previous": None if state.previous is None else state.previous.tolist(),
        "last_loss": state.last_loss.tolist(),
        "last_shift": state.last_shift.tolist(),
        "active": state.active.tolist(),
        "stop_reason": list(state.stop_reason),
        "final_loss": state.final_loss.tolist(),
        "history": [list(records) for records in state.history],  # records, once made, stay
    }


def _state_from_json(record: dict[str, Any]) -> FitState:
    previous = record["previous"]
    return FitState(
        iteration=int(record["iteration"]),
        centers=np.asarray(record["centers"], dtype=np.float64),
        previous=None if previous is None else np.asarray(previous, dtype=np.float64),
        last_loss=np.asarray(record["last_loss"], dtype=np.float64),
        last_shift=np.asarray(record["last_shift"], dtype=np.float64),
        active=np.asarray(record["active"], dtype=bool),
        stop_reason=list(record["stop_reason"]),
        final_loss=np.asarray(record["final_loss"], dtype=np.float64),
        history=record["history"],
    )


def checkpoint_record(key: dict[str, Any], state: FitState) -> dict[str, Any]:
    """What ``write_checkpoint`` writes: a copy of the state, which the fit may go on changing
    while the copy is written."""
    return {"format": FORMAT, "key": key, "state": _state_to_json(state)}


def save_checkpoint(path: str, key: dict[str, Any], state: FitState) -> None:
    """Write the state atomically: a reader sees the previous checkpoint or this one, whole."""
    write_checkpoint(path, checkpoint_record(key, state))


def write_checkpoint(path: str, record: dict[str, Any]) -> None:
    """Write a ``checkpoint_record`` atomically (see ``save_checkpoint``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(record, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str, key: dict[str, Any]) -> FitState | None:
    """The saved state if a checkpoint exists and was made with the same key; else None.

    Raises
    ------
    CheckpointMismatchError
        The checkpoint was made with other data or parameters; the message names what differs.
    """
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        saved_key, state = record["key"], record["state"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointMismatchError(
            f"checkpoint '{path}' is unreadable ({exc}); delete it or pass --no-resume."
        ) from None
    saved_key = json.loads(json.dumps(saved_key))
    current = json.loads(json.dumps(key))  # compare as JSON sees them (tuples become lists)
    if saved_key != current:
        differ = sorted(
            name
            for name in set(saved_key) | set(current)
            if saved_key.get(name) != current.get(name)
        )
        raise CheckpointMismatchError(
            f"checkpoint '{path}' was made with other data or parameters (differs in:"
            f" {', '.join(differ)}); delete it or pass --no-resume to start over."
        )
    return _state_from_json(state)


def remove_checkpoint(path: str) -> None:
    """Remove a checkpoint once the run it belongs to has written its output."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
