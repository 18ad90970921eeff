"""Sequence-level combinators: stacked, bidirectional networks with inter-layer dropout."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import checks
from jaxrnn._src import unroll as unroll_lib
from jaxrnn._src.cell import Cell


class Network(NamedTuple):
    """A stacked (and optionally bidirectional) recurrent network built by `stack`.

    Attributes:
      init: ``init(key, input_size, *, dtype=jnp.float32) -> params``; ``params[layer][d]`` is
        the params of direction ``d`` (0 forward, 1 backward) of ``layer``.
      apply: ``apply(params, xs, carry=None, *, seq_lengths=None, mask=None, resets=None,
        key=None, time_major=False, unroll=None, method="sequential") -> (ys, carries)``;
        ``carries[layer][d]`` is the final carry of that layer and direction. ``unroll`` and
        ``method`` go to `jaxrnn.unroll` for every layer and direction.
      initial_carry: ``initial_carry(batch_shape=(), dtype=jnp.float32) -> carries``.
      cells: the cell of each layer.
      num_layers, bidirectional, dropout: the configuration.
      output_size: features of ``ys``: the last cell's output size, times 2 if bidirectional.
    """

    init: Callable[..., Any]
    apply: Callable[..., Any]
    initial_carry: Callable[..., Any]
    cells: tuple
    num_layers: int
    bidirectional: bool
    dropout: float
    output_size: int | None


def stack(
    cell: Cell | Sequence[Cell],
    num_layers: int = 1,
    *,
    bidirectional: bool = False,
    dropout: float = 0.0,
) -> Network:
    r"""Stacks cells into a multi-layer, optionally bidirectional network (PyTorch's ``nn.LSTM``
    with ``num_layers``, ``bidirectional`` and ``dropout``).

    Layer :math:`l` reads the outputs of layer :math:`l-1`; a bidirectional layer runs one cell
    forward and another backward over each sequence's valid steps and concatenates their
    outputs, :math:`y_t = [\overrightarrow{y}_t ; \overleftarrow{y}_t]`. Between layers (not
    after the last) inverted dropout with rate ``dropout`` is applied when ``apply`` gets a
    ``key``; without a key the network is deterministic.

    Args:
      cell: one `Cell` for every layer, or a sequence of ``num_layers`` cells.
      num_layers: number of layers.
      bidirectional: add a backward direction to every layer.
      dropout: rate of the dropout between layers, in ``[0, 1)``.

    Returns:
      A `Network`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> net = jaxrnn.stack(jaxrnn.gru(16), num_layers=2, bidirectional=True, dropout=0.1)
      >>> params = net.init(jax.random.PRNGKey(0), input_size=4)
      >>> xs = jnp.ones((3, 9, 4))
      >>> ys, carries = net.apply(params, xs, seq_lengths=jnp.array([9, 5, 1]))
      >>> ys.shape, len(carries), len(carries[0]), carries[1][1].shape
      ((3, 9, 32), 2, 2, (3, 16))
    """
    fn = "stack"
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"{fn}: num_layers must be an int >= 1, got {num_layers!r}.")
    if isinstance(cell, Cell):
        cells = (cell,) * num_layers
    else:
        cells = tuple(cell)
        if len(cells) != num_layers:
            raise ValueError(
                f"{fn}: got {len(cells)} cells for num_layers={num_layers}; pass one cell or "
                f"exactly num_layers of them."
            )
    for c in cells:
        checks.check_cell(fn, c)
    if not (0.0 <= float(dropout) < 1.0):
        raise ValueError(f"{fn}: dropout must be in [0, 1), got {dropout!r}.")
    num_dirs = 2 if bidirectional else 1
    last = cells[-1].output_size
    output_size = None if last is None else last * num_dirs

    def init(key, input_size: int, *, dtype=jnp.float32):
        params = []
        size = input_size
        for layer, c in enumerate(cells):
            keys = jax.random.split(jax.random.fold_in(key, layer), num_dirs)
            params.append(tuple(c.init(k, size, dtype=dtype) for k in keys))
            if c.output_size is None and layer + 1 < num_layers:
                raise ValueError(
                    f"{fn}: layer {layer}'s cell {c.name} does not state its output_size, so "
                    f"the next layer's input size is unknown; give it to make_cell."
                )
            size = None if c.output_size is None else c.output_size * num_dirs
        return tuple(params)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return tuple(
            tuple(c.initial_carry(batch_shape, dtype) for _ in range(num_dirs)) for c in cells
        )

    def apply(
        params,
        xs,
        carry=None,
        *,
        seq_lengths=None,
        mask=None,
        resets=None,
        key=None,
        time_major: bool = False,
        unroll: int | bool | None = None,
        method: str = "sequential",
    ):
        """Runs the network; see `stack`. Returns ``(ys, carries)``."""
        if not isinstance(params, (tuple, list)) or len(params) != num_layers:
            got = len(params) if isinstance(params, (tuple, list)) else type(params).__name__
            raise ValueError(
                f"{fn}.apply: params must hold {num_layers} layers (from net.init), got {got}."
            )
        if carry is not None and (not isinstance(carry, (tuple, list)) or len(carry) != num_layers):
            raise ValueError(
                f"{fn}.apply: carry must hold {num_layers} layers of {num_dirs} direction(s) "
                f"(as net.initial_carry(batch_shape)), got {type(carry).__name__}."
            )
        use_dropout = key is not None and dropout > 0.0
        ys = xs
        carries = []
        for layer, c in enumerate(cells):
            layer_params = params[layer]
            if len(layer_params) != num_dirs:
                raise ValueError(
                    f"{fn}.apply: params[{layer}] must hold {num_dirs} direction(s), got "
                    f"{len(layer_params)}."
                )
            layer_carry = (None,) * num_dirs if carry is None else carry[layer]
            outs, finals = [], []
            for d in range(num_dirs):
                y, h = unroll_lib.unroll(
                    c,
                    layer_params[d],
                    ys,
                    layer_carry[d],
                    time_major=time_major,
                    reverse=d == 1,
                    unroll=unroll,
                    seq_lengths=seq_lengths,
                    mask=mask,
                    resets=resets,
                    method=method,
                )
                outs.append(y)
                finals.append(h)
            ys = outs[0] if num_dirs == 1 else jnp.concatenate(outs, axis=-1)
            carries.append(tuple(finals))
            if use_dropout and layer + 1 < num_layers:
                keep = 1.0 - dropout
                layer_key = jax.random.fold_in(key, layer)
                kept = jax.random.bernoulli(layer_key, keep, ys.shape)
                ys = jnp.where(kept, ys / keep, jnp.zeros((), ys.dtype))
        return ys, tuple(carries)

    return Network(
        init=init,
        apply=apply,
        initial_carry=initial_carry,
        cells=cells,
        num_layers=num_layers,
        bidirectional=bidirectional,
        dropout=float(dropout),
        output_size=output_size,
    )
