"""Checkpoints of a training state with ``flax.serialization`` (msgpack), written atomically."""

from __future__ import annotations

import os
import re

import flax.serialization
import jax

_NAME = re.compile(r"^checkpoint_(\d+)\.msgpack$")


def checkpoint_steps(directory: str) -> list[int]:
    """The steps of the checkpoints in ``directory``, ascending (empty if none or no directory)."""
    if not os.path.isdir(directory):
        return []
    found = (_NAME.match(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def checkpoint_path(directory: str, step: int) -> str:
    """The file a checkpoint of ``step`` is written to."""
    return os.path.join(directory, f"checkpoint_{step:09d}.msgpack")


def save_checkpoint(directory: str, state, *, keep: int = 3) -> str:
    """Writes ``state`` (a pytree with an int ``step`` field) to ``directory``.

    The bytes come from ``flax.serialization.to_bytes`` and are written to a temporary file
    that is then renamed, so an interrupted write never leaves a truncated checkpoint. Only the
    newest ``keep`` checkpoints are kept.

    Args:
      directory: created if missing.
      state: a `TrainState` (or any pytree with a ``step`` attribute).
      keep: how many checkpoints to keep.

    Returns:
      The path written.
    """
    os.makedirs(directory, exist_ok=True)
    step = int(state.step)
    path = checkpoint_path(directory, step)
    data = flax.serialization.to_bytes(jax.device_get(state))
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    for old in checkpoint_steps(directory)[:-keep]:
        os.remove(checkpoint_path(directory, old))
    return path


def restore_checkpoint(directory: str, target, step: int | None = None):
    """Reads the checkpoint of ``step`` (default the newest) into the structure of ``target``.

    Args:
      directory: the checkpoint directory.
      target: a state of the same structure (e.g. a freshly initialised `TrainState`); its
        values are replaced.
      step: which checkpoint; default the newest.

    Returns:
      The restored state, or ``None`` when there is no checkpoint.

    Raises:
      FileNotFoundError: ``step`` was given and has no checkpoint.
    """
    steps = checkpoint_steps(directory)
    if step is None:
        if not steps:
            return None
        step = steps[-1]
    path = checkpoint_path(directory, step)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"restore_checkpoint: no checkpoint of step {step} in {directory!r}; "
            f"found steps {steps}."
        )
    with open(path, "rb") as f:
        return flax.serialization.from_bytes(jax.device_get(target), f.read())
