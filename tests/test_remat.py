"""Checkpointed (remat) backprop of the sequential runner: same values, less memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from _parallel_reference import random_flags
from conftest import assert_trees_close

import jaxrnn
from jaxrnn._src import fastpath
from jaxrnn._src import remat as remat_lib


def _loss(cell, remat, flags, params, xs):
    ys, final = jaxrnn.unroll(cell, params, xs, remat=remat, **flags)
    leaves = jax.tree_util.tree_leaves(final)
    return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(c**2) for c in leaves)


@pytest.mark.parametrize(
    "factory,remat,reverse",
    [(lambda: jaxrnn.lstm(4), True, False), (lambda: jaxrnn.gru(4), 3, True),
     (lambda: jaxrnn.elman(4), 4, False), (lambda: jaxrnn.mingru(4), 50, True)],
    ids=["lstm-sqrt", "gru-3-reverse", "elman-4-divides", "mingru-longer-than-T"],
)  # fmt: skip
def test_remat_equals_plain_scan(factory, remat, reverse):
    cell = factory()
    params = cell.init(jax.random.PRNGKey(0), 3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, 12, 3))
    lengths, mask, resets = random_flags(jax.random.PRNGKey(2), (2,), 12)
    flags = dict(seq_lengths=lengths, mask=mask, resets=resets, reverse=reverse)
    # The loss reads every output and the final carry.
    grad = lambda r: jax.jit(jax.value_and_grad(functools.partial(_loss, cell, r, flags), (0, 1)))(
        params, xs
    )
    assert_trees_close(grad(remat), grad(None), atol=1e-5)


def test_chunk_size():
    assert remat_lib.chunk_size(100, True) == 10
    assert remat_lib.chunk_size(101, True) == 11
    assert remat_lib.chunk_size(100, 7) == 7
    assert remat_lib.chunk_size(100, None) is None and remat_lib.chunk_size(100, False) is None


def _temp_bytes(cell, remat, input_size=8, batch=4, time=1024):
    params = cell.init(jax.random.PRNGKey(0), input_size)
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, time, input_size))
    grad = jax.jit(jax.grad(functools.partial(_loss, cell, remat, {})))
    stats = grad.lower(params, xs).compile().memory_analysis()
    assert stats is not None, "the CPU backend reports compiled memory statistics"
    return stats.temp_size_in_bytes


def test_remat_lowers_compiled_memory():
    # remat runs the reference scan: compare with the reference scan without it (an LSTM with
    # a projection has no fast path). Per-step residuals (gates, cell states) of 1024 steps vs
    # 32 chunk boundaries and one 32-step chunk; what stays O(T) is the hoisted input
    # projection, its gradient and ``ys`` (measured on CPU: 26.9 MB -> 13.6 MB).
    cell = jaxrnn.lstm(64, proj_size=48)
    plain, sqrt_t = _temp_bytes(cell, None), _temp_bytes(cell, True)
    assert sqrt_t < 0.8 * plain, (plain, sqrt_t)


def test_lstm_fast_path_needs_no_more_memory_than_remat():
    # The LSTM's fast path stores only the gate derivatives (measured on XLA's loops: 13.8 MB,
    # as remat; on the native kernels 9.6 MB, their backward loop writing its cotangent over
    # the gate derivatives).
    cell = jaxrnn.lstm(64)
    assert _temp_bytes(cell, None) <= 1.05 * _temp_bytes(cell, True)


def test_gru_fast_path_memory_against_remat():
    # On the native kernels the backward loop writes its cotangent over [r, z, n] (measured:
    # 10.6 MB against 10.7 with remat); on XLA's loops remat saves (14.8 MB -> 10.7 MB).
    cell = jaxrnn.gru(64)
    fast, remat = _temp_bytes(cell, None), _temp_bytes(cell, True)
    if fastpath.placements("gru", 4, 64, jnp.float32)[1] == "native":
        assert fast <= 1.05 * remat, (fast, remat)
    else:
        assert remat < 0.8 * fast, (fast, remat)


def test_bad_remat():
    cell = jaxrnn.gru(4)
    params = cell.init(jax.random.PRNGKey(0), 3)
    with pytest.raises(ValueError, match="remat must be None, True or an int >= 1, got 0"):
        jaxrnn.unroll(cell, params, jnp.ones((2, 5, 3)), remat=0)
