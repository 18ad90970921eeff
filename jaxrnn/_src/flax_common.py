"""What the linen and NNX shells share: the params layout they store and the call they make.

The shells hold a jaxrnn `Cell` or `Network` and its params; the math stays in `jaxrnn.unroll`
and `Network.apply`. Params are stored as nested dicts, Flax's usual layout::

    cell:     {"w_x": ..., "w_h": ..., "b_x": ..., "b_h": ...}       (fields that are not None)
    network:  {"layer_0": {"forward": {...}, "backward": {...}}, "layer_1": ...}

and turned back into the cell's params NamedTuples before each call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxrnn._src import layers
from jaxrnn._src import unroll as unroll_lib
from jaxrnn._src.cell import Cell

_DIRECTIONS = ("forward", "backward")


def check_model(fn: str, model) -> None:
    if not isinstance(model, (Cell, layers.Network)):
        raise TypeError(
            f"{fn}: cell must be a jaxrnn.Cell (jaxrnn.lstm(...), ...) or a jaxrnn.Network "
            f"(jaxrnn.stack(...)), got {type(model).__name__}."
        )


def _is_namedtuple(x) -> bool:
    return isinstance(x, tuple) and hasattr(x, "_fields")


def _cell_to_dict(params, wrap: Callable):
    if _is_namedtuple(params):
        return {f: wrap(v) for f, v in zip(params._fields, params) if v is not None}
    return jax.tree_util.tree_map(wrap, params)


def _cell_from_dict(template, stored, unwrap: Callable):
    if _is_namedtuple(template):
        return type(template)(
            **{
                f: None if t is None else unwrap(stored[f])
                for f, t in zip(template._fields, template)
            }
        )
    treedef = jax.tree_util.tree_structure(template)
    return treedef.unflatten([unwrap(leaf) for leaf in treedef.flatten_up_to(stored)])


def params_to_dict(model, params, wrap: Callable = lambda v: v):
    """jaxrnn params -> nested dicts (``wrap`` applied to each array, e.g. ``nnx.Param``)."""
    if isinstance(model, Cell):
        return _cell_to_dict(params, wrap)
    return {
        f"layer_{layer}": {
            _DIRECTIONS[d]: _cell_to_dict(cell_params, wrap)
            for d, cell_params in enumerate(layer_params)
        }
        for layer, layer_params in enumerate(params)
    }


@functools.lru_cache(maxsize=256)
def _template(model, input_size: int, dtype):
    """The structure of ``model.init(key, input_size)``, as shape structs (nothing computed)."""
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: model.init(key, input_size, dtype=dtype))


def params_from_dict(model, stored, input_size: int, dtype, unwrap: Callable = lambda v: v):
    """The inverse of `params_to_dict`; ``input_size`` and ``dtype`` give the structure."""
    args = (model, int(input_size), jnp.dtype(dtype))
    try:
        template = _template(*args)
    except TypeError:  # an unhashable model: not cached
        template = _template.__wrapped__(*args)
    if isinstance(model, Cell):
        return _cell_from_dict(template, stored, unwrap)
    return tuple(
        tuple(
            _cell_from_dict(t, stored[f"layer_{layer}"][_DIRECTIONS[d]], unwrap)
            for d, t in enumerate(layer_template)
        )
        for layer, layer_template in enumerate(template)
    )


def needs_dropout_key(model) -> bool:
    return isinstance(model, layers.Network) and model.dropout > 0.0 and model.num_layers > 1


def run(
    fn: str,
    model,
    params,
    xs,
    carry,
    *,
    time_major: bool,
    reverse: bool,
    unroll: int | bool | None,
    method: str,
    seq_lengths,
    mask,
    resets,
    key,
):
    """Calls `jaxrnn.unroll` (a cell) or `Network.apply` (a network); returns ``(ys, carry)``."""
    if isinstance(model, Cell):
        return unroll_lib.unroll(
            model,
            params,
            xs,
            carry,
            time_major=time_major,
            reverse=reverse,
            unroll=unroll,
            method=method,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
        )
    if reverse:
        raise ValueError(
            f"{fn}: reverse=True runs a single cell backwards; a jaxrnn.Network sets its "
            f"directions with jaxrnn.stack(..., bidirectional=True). Pass a Cell, or "
            f"reverse=False."
        )
    return model.apply(
        params,
        xs,
        carry,
        seq_lengths=seq_lengths,
        mask=mask,
        resets=resets,
        key=key,
        time_major=time_major,
        unroll=unroll,
        method=method,
    )
