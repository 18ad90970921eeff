"""A plain Python loop over ``cell.step``: the reference every runner mode must equal."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def python_loop(cell, params, xs, carry=None, *, reverse=False, seq_lengths=None, mask=None,
                resets=None):  # fmt: skip
    """``unroll``'s docstring loop, one sequence at a time; ``xs: (*batch, time, features)``."""
    batch_shape, time = xs.shape[:-2], xs.shape[-2]
    rows = int(np.prod(batch_shape))
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    flat = lambda a, n: jnp.reshape(a, (rows,) + a.shape[n:])
    xs_rows = flat(xs, len(batch_shape))
    carry_rows = jax.tree_util.tree_map(lambda a: flat(a, len(batch_shape)), carry)
    lengths = np.full(rows, time) if seq_lengths is None else np.reshape(seq_lengths, rows)
    mask = np.ones((rows, time), bool) if mask is None else np.reshape(mask, (rows, time))
    resets = np.zeros((rows, time), bool) if resets is None else np.reshape(resets, (rows, time))
    step = jax.jit(cell.step)
    ys, finals = [], []
    for b in range(rows):
        c = jax.tree_util.tree_map(lambda a, b=b: a[b], carry_rows)
        zero = cell.initial_carry((), xs.dtype)
        out = [None] * time
        for t in reversed(range(time)) if reverse else range(time):
            inside = t < lengths[b]
            if resets[b, t] and inside and not reverse:
                c = zero
            if mask[b, t] and inside:
                c, out[t] = step(params, c, xs_rows[b, t])
            if resets[b, t] and inside and reverse:
                c = zero
        y_shape = jax.eval_shape(step, params, c, xs_rows[b, 0])[1]
        ys.append(jnp.stack([jnp.zeros(y_shape.shape, y_shape.dtype) if y is None else y
                             for y in out]))  # fmt: skip
        finals.append(c)
    ys = jnp.reshape(jnp.stack(ys), (*batch_shape, time) + ys[0].shape[1:])
    final = jax.tree_util.tree_map(
        lambda *a: jnp.reshape(jnp.stack(a), batch_shape + a[0].shape), *finals
    )
    return ys, final


def random_flags(key, batch_shape, time):
    """Random ``seq_lengths``, ``mask`` and ``resets`` (each drawn fresh)."""
    k1, k2, k3 = jax.random.split(key, 3)
    lengths = jax.random.randint(k1, batch_shape, 0, time + 2)
    mask = jax.random.bernoulli(k2, 0.8, (*batch_shape, time))
    resets = jax.random.bernoulli(k3, 0.15, (*batch_shape, time))
    return lengths, mask, resets


def assert_trees_close(a, b, atol, rtol=0.0):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)
