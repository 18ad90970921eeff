"""A recurrent cell with a linear readout, as pure functions, and its loss on a task."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src.cell import Cell
from jaxrnn._src.unroll import unroll


class Readout(NamedTuple):
    """A linear readout ``y = h W + b``."""

    w: jax.Array  # shape=(hidden, output_size)
    b: jax.Array  # shape=(output_size,)


class ModelParams(NamedTuple):
    """Parameters of a `SequenceModel`: the cell's and the readout's."""

    cell: Any
    readout: Readout


class SequenceModel(NamedTuple):
    """A cell unrolled over a sequence, followed by a linear readout.

    Attributes:
      init: ``init(key, input_size) -> ModelParams``.
      apply: ``apply(params, xs, carry=None) -> (outputs, carry)`` with ``xs: (batch, time,
        input_size)``; ``outputs`` is ``(batch, output_size)`` for readout ``"last"`` and
        ``(batch, time, output_size)`` for ``"all"``.
      initial_carry: ``initial_carry(batch_size) -> carry`` (zeros).
      cell: the `Cell`.
      readout: ``"last"`` or ``"all"``.
    """

    init: Callable[..., ModelParams]
    apply: Callable[..., tuple[jax.Array, Any]]
    initial_carry: Callable[[int], Any]
    cell: Cell
    readout: str


def sequence_model(cell: Cell, output_size: int, *, readout: str = "last") -> SequenceModel:
    """Builds a `SequenceModel`: ``jaxrnn.unroll`` of ``cell`` and a linear readout.

    Args:
      cell: a `Cell` (its ``output_size`` must be known).
      output_size: the readout's output size.
      readout: ``"last"`` reads the final step's output, ``"all"`` every step's.

    Returns:
      A `SequenceModel`.

    Raises:
      ValueError: an unknown ``readout`` or a cell without ``output_size``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> from jaxrnn import train
      >>> model = train.sequence_model(jaxrnn.gru(8), 3, readout="all")
      >>> params = model.init(jax.random.PRNGKey(0), 2)
      >>> outputs, carry = model.apply(params, jnp.ones((4, 5, 2)))
      >>> outputs.shape, carry.shape
      ((4, 5, 3), (4, 8))
    """
    if readout not in ("last", "all"):
        raise ValueError(f"sequence_model: readout must be 'last' or 'all', got {readout!r}.")
    if cell.output_size is None:
        raise ValueError(
            f"sequence_model: the cell {cell.name!r} has no output_size; build it with "
            "make_cell(..., output_size=...)."
        )
    hidden = cell.output_size

    def init(key, input_size: int) -> ModelParams:
        k_cell, k_out = jax.random.split(key)
        scale = 1.0 / jnp.sqrt(hidden)
        w = jax.random.uniform(k_out, (hidden, output_size), jnp.float32, -scale, scale)
        return ModelParams(cell.init(k_cell, input_size), Readout(w, jnp.zeros(output_size)))

    def apply(params: ModelParams, xs: jax.Array, carry=None):
        ys, carry = unroll(cell, params.cell, xs, carry)
        if readout == "last":
            ys = ys[..., -1, :]
        return ys @ params.readout.w + params.readout.b, carry

    def initial_carry(batch_size: int):
        return cell.initial_carry((batch_size,))

    return SequenceModel(init, apply, initial_carry, cell, readout)


def task_loss(model: SequenceModel, task) -> Callable:
    """The loss of ``model`` on ``task`` in the carry form `fit` and `make_train_step` take.

    Args:
      model: a `SequenceModel` whose readout matches ``task.readout``.
      task: a ``jaxrnn.tasks.Task``.

    Returns:
      ``loss_fn(params, batch, carry) -> (loss, carry)``; ``carry=None`` starts from zeros.
    """
    if model.readout != task.readout:
        raise ValueError(
            f"task_loss: task {task.name!r} needs readout {task.readout!r}, the model has "
            f"{model.readout!r}."
        )

    def loss_fn(params, batch, carry=None):
        outputs, carry = model.apply(params, batch.inputs, carry)
        return task.loss(outputs, batch.targets), carry

    return loss_fn


def task_metric(model: SequenceModel, task) -> Callable:
    """``metric_fn(params, batch) -> scalar``: the task's metric of ``model`` on a batch."""

    def metric_fn(params, batch):
        outputs, _ = model.apply(params, batch.inputs)
        return task.metric(outputs, batch.targets)

    return metric_fn
