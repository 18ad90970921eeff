"""Trace-time input validation. Every message names the argument, the expected and the actual
value, and what to do. Nothing here looks at array values, only shapes, dtypes and structure,
so all of it runs once while tracing, under ``jit`` and ``vmap`` alike."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src import sharding
from jaxrnn._src.cell import Cell


def check_cell(fn: str, cell) -> None:
    if not isinstance(cell, Cell):
        raise TypeError(
            f"{fn}: cell must be a jaxrnn.Cell (from jaxrnn.elman/lstm/gru or jaxrnn.make_cell), "
            f"got {type(cell).__name__}."
        )


def check_xs(fn: str, xs, min_ndim: int = 2) -> jax.Array:
    xs = jnp.asarray(xs) if not isinstance(xs, jax.Array) else xs
    if not jnp.issubdtype(xs.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: xs must be a floating-point array, got dtype {xs.dtype}; integer inputs are "
            f"usually token ids: embed them first, or cast with xs.astype(jnp.float32)."
        )
    if xs.ndim < min_ndim:
        raise ValueError(
            f"{fn}: xs must have shape (*batch, time, features) (at least {min_ndim} dims), got "
            f"shape {tuple(xs.shape)}. For a single sequence pass shape (time, features)."
        )
    return xs


def check_params(fn: str, cell: Cell, params, num_features: int) -> None:
    if cell.check_params is not None:
        try:
            cell.check_params(params)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{fn}: {e}") from None
    if cell.input_size_of is not None:
        input_size = cell.input_size_of(params)
        if input_size != num_features:
            raise ValueError(
                f"{fn}: xs has {num_features} features but params were built for "
                f"input_size={input_size}; pass xs of shape (..., {input_size}) or build params "
                f"with cell.init(key, {num_features})."
            )


def _describe(tree) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    del leaves
    return str(treedef)


def check_carry(fn: str, cell: Cell, carry, batch_shape: tuple, dtype) -> None:
    """The carry must have the structure and shapes of ``cell.initial_carry(batch_shape)``."""
    expected = jax.eval_shape(lambda: cell.initial_carry(batch_shape, dtype))
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    try:
        act_leaves, act_def = jax.tree_util.tree_flatten_with_path(carry)
    except Exception:  # pragma: no cover - defensive
        act_leaves, act_def = None, None
    if act_def is None or exp_def != act_def:
        exp_name = type(expected).__name__
        act_name = type(carry).__name__
        raise ValueError(
            f"{fn}: carry must have the structure of cell.initial_carry(), {exp_name} "
            f"{_describe(expected)}, got {act_name} {_describe(carry)}. For {cell.name} build it "
            f"with cell.initial_carry(batch_shape={batch_shape})."
        )
    for (path, e), (_, a) in zip(exp_leaves, act_leaves):
        shape = tuple(np.shape(a))
        if shape != tuple(e.shape):
            where = jax.tree_util.keystr(path) or ""
            raise ValueError(
                f"{fn}: carry{where} must have shape {tuple(e.shape)} (the batch shape "
                f"{batch_shape} of xs, then the state size), got shape {shape}."
            )


def check_seq_lengths(fn: str, seq_lengths, batch_shape: tuple):
    seq_lengths = jnp.asarray(seq_lengths)
    if not jnp.issubdtype(seq_lengths.dtype, jnp.integer):
        raise TypeError(
            f"{fn}: seq_lengths must be an integer array, got dtype {seq_lengths.dtype}; cast "
            f"with seq_lengths.astype(jnp.int32)."
        )
    if tuple(seq_lengths.shape) != tuple(batch_shape):
        raise ValueError(
            f"{fn}: seq_lengths must have shape {tuple(batch_shape)} (the batch shape of xs), "
            f"got shape {tuple(seq_lengths.shape)}."
        )
    return seq_lengths


def check_step_flags(fn: str, name: str, flags, expected_shape: tuple, layout: str):
    flags = jnp.asarray(flags)
    if flags.dtype != jnp.bool_:
        raise TypeError(
            f"{fn}: {name} must be a bool array, got dtype {flags.dtype}; use e.g. "
            f"{name}.astype(bool)."
        )
    if tuple(flags.shape) != tuple(expected_shape):
        raise ValueError(
            f"{fn}: {name} must have shape {tuple(expected_shape)} ({layout}, as xs without its "
            f"feature axis), got shape {tuple(flags.shape)}."
        )
    return flags


def check_matmul_dtype(fn: str, matmul_dtype, dtype):
    """``matmul_dtype`` as a floating ``jnp.dtype`` no wider than the inputs' ``dtype``."""
    try:
        md = jnp.dtype(matmul_dtype)
    except TypeError:
        md = None
    if md is None or not jnp.issubdtype(md, jnp.floating):
        raise TypeError(
            f"{fn}: matmul_dtype must be a floating dtype such as jnp.bfloat16, "
            f"got {md.name if md is not None else repr(matmul_dtype)}."
        )
    if jnp.finfo(md).bits > jnp.finfo(dtype).bits:
        raise ValueError(
            f"{fn}: matmul_dtype must be no wider than xs's dtype {jnp.dtype(dtype).name} "
            f"(products accumulate in it), got {md.name}."
        )
    return md


def check_time_unsharded(fn: str, xs: jax.Array, time_axis: int, layout: str) -> None:
    """The scan runs over time on one device: ``xs`` may not be sharded over its time axis."""
    part = sharding.axis_partition(xs, time_axis)
    if part is not None:
        raise ValueError(
            f"{fn}: xs must not be sharded over its time axis (axis {time_axis} of {layout}), "
            f"got xs of type {jax.typeof(xs).str_short()} (time over mesh axes {part!r}). "
            f"Shard the batch axes instead, or gather time first with "
            f"jax.sharding.reshard(xs, ...)."
        )


def check_static_flag(fn: str, name: str, value) -> bool:
    """``value`` as a Python bool: a flag that decides the program's structure while tracing
    (``reverse``, ``time_major``) must be one; a string or an array would be taken as true or
    fail deep inside the trace."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise TypeError(
        f"{fn}: {name} must be a Python bool (it is read while tracing), got {value!r} of type "
        f"{type(value).__name__}."
    )


def check_unroll_factor(fn: str, unroll) -> None:
    if isinstance(unroll, bool):
        return
    if not isinstance(unroll, (int, np.integer)) or unroll < 1:
        raise ValueError(f"{fn}: unroll must be an int >= 1 or a bool, got {unroll!r}.")
