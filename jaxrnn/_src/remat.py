"""Memory-bounded backpropagation through a scan: checkpoint every ``k`` steps."""

from __future__ import annotations

import math

import jax
from jax import lax


def chunk_size(time: int, remat: bool | int | None) -> int | None:
    """Steps per checkpointed chunk: ``None`` (no remat), ``ceil(sqrt(time))`` for ``True``."""
    if remat is None or remat is False:
        return None
    if remat is True:
        return max(1, math.isqrt(time - 1) + 1) if time > 1 else 1
    return int(remat)


def scan(body, carry, xs, *, reverse: bool, unroll, remat: bool | int | None):
    """``lax.scan(body, carry, xs)``, but with ``remat`` only every ``k``-th carry is kept for
    the backward pass; each chunk of ``k`` steps is recomputed from it (``jax.checkpoint``).

    Peak memory of the backward pass goes from ``O(T)`` step residuals to ``O(T/k + k)``
    (``O(sqrt(T))`` for ``k = sqrt(T)``) for the price of a second forward pass. ``xs`` may hold
    ``None`` leaves (as ``lax.scan`` allows).
    """
    time = jax.tree_util.tree_leaves(xs)[0].shape[0]
    k = chunk_size(time, remat)
    if k is None or k >= time:
        return lax.scan(body, carry, xs, reverse=reverse, unroll=unroll)
    n_chunks, rest = divmod(time, k)
    split = n_chunks * k
    head = jax.tree_util.tree_map(lambda a: a[:split].reshape((n_chunks, k) + a.shape[1:]), xs)
    tail = jax.tree_util.tree_map(lambda a: a[split:], xs)

    @jax.checkpoint
    def chunk(c, xs_chunk):
        return lax.scan(body, c, xs_chunk, reverse=reverse, unroll=unroll)

    def run_head(c):
        c, ys = lax.scan(chunk, c, head, reverse=reverse)
        return c, jax.tree_util.tree_map(lambda y: y.reshape((split,) + y.shape[2:]), ys)

    def run_tail(c):
        return chunk(c, tail) if rest else (c, None)

    if reverse:  # the tail is the end of time: it runs first
        carry, ys_tail = run_tail(carry)
        carry, ys_head = run_head(carry)
    else:
        carry, ys_head = run_head(carry)
        carry, ys_tail = run_tail(carry)
    if ys_tail is None:
        return carry, ys_head
    return carry, jax.tree_util.tree_map(
        lambda a, b: jax.numpy.concatenate([a, b], axis=0), ys_head, ys_tail
    )
