"""The sequence-level fast path against the reference scan, in every mode, with gradients."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import pytest
from conftest import (
    INPUT_SIZE,
    MODES,
    TIME,
    assert_trees_close,
    fresh_key,
    mode_inputs,
    random_carry,
    random_like,
)
from jax.test_util import check_grads

import jaxrnn
from jaxrnn._src import fastpath

HIDDEN = 5
FAST_MARK = "name=_recurrence"  # how the fast path's custom_jvp shows in a jaxpr

FAST_CELLS = {
    "elman_tanh": lambda h: jaxrnn.elman(h),
    "elman_relu": lambda h: jaxrnn.elman(h, activation="relu"),
    "elman_nobias": lambda h: jaxrnn.elman(h, use_bias=False),
    "lstm": lambda h: jaxrnn.lstm(h),
    "lstm_nobias": lambda h: jaxrnn.lstm(h, use_bias=False),
    "gru": lambda h: jaxrnn.gru(h),
    "gru_nobias": lambda h: jaxrnn.gru(h, use_bias=False),
}


@contextlib.contextmanager
def reference_path():
    """Runs `jaxrnn.unroll` on the reference scan (the fast path switched off)."""
    original = fastpath.supports
    fastpath.supports = lambda cell, params: False
    try:
        yield
    finally:
        fastpath.supports = original


MAIN_CELLS = ("elman_tanh", "lstm", "gru")  # every mode; the variants get the hardest ones


@pytest.fixture(params=sorted(FAST_CELLS))
def cell(request):
    return FAST_CELLS[request.param](HIDDEN)


@pytest.fixture(params=[False, True], ids=["proj_in_loop", "proj_hoisted"])
def hoist(request, monkeypatch):
    """Both forms of the gradient pass's input projection (in the loop on CPU, else hoisted)."""
    monkeypatch.setattr(fastpath, "hoist_input_default", lambda backend=None: request.param)
    return request.param


def _loss(cell, params, xs, carry, kwargs):
    ys, final = jaxrnn.unroll(cell, params, xs, carry, **kwargs)
    leaves = jax.tree_util.tree_leaves(final)
    return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(leaf) * leaf) for leaf in leaves)


def _close(actual, expected, tol):
    assert_trees_close(actual, expected, rtol=tol, atol=tol)


def test_builtin_cells_take_the_fast_path(cell):
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE))
    assert fastpath.supports(cell, params)
    jaxpr = str(jax.make_jaxpr(lambda p, x: jaxrnn.unroll(cell, p, x))(params, xs))
    assert FAST_MARK in jaxpr
    with reference_path():
        jaxpr = str(jax.make_jaxpr(lambda p, x: jaxrnn.unroll(cell, p, x))(params, xs))
    assert FAST_MARK not in jaxpr


HOIST_MODES = ("no_batch", "two_batch_dims", "everything", "everything_time_major_reverse")
VARIANTS = sorted(set(FAST_CELLS) - set(MAIN_CELLS))
CASES = [(c, m, False) for c in MAIN_CELLS for m in sorted(MODES)]
CASES += [(c, m, True) for c in MAIN_CELLS for m in HOIST_MODES]
CASES += [(c, m, h) for c in VARIANTS for m in ("given_carry", "everything") for h in (False, True)]


@pytest.mark.parametrize("cell_name, mode, hoist", CASES)
def test_fast_path_equals_reference_scan(cell_name, mode, hoist, monkeypatch):
    monkeypatch.setattr(fastpath, "hoist_input_default", lambda backend=None: hoist)
    cell = FAST_CELLS[cell_name](HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)

    def outputs_and_grads(p, x, c):
        grads = jax.grad(_loss, argnums=(1, 2, 3))(cell, p, x, c, kwargs)
        return jaxrnn.unroll(cell, p, x, c, **kwargs), grads

    fast = jax.jit(outputs_and_grads)(params, xs, carry)
    with reference_path():
        ref = jax.jit(outputs_and_grads)(params, xs, carry)
    _close(fast, ref, 2e-5)


@pytest.mark.parametrize("mode", ["everything_time_major_reverse"])
def test_forward_mode_equals_reference(cell, mode, hoist):
    del hoist
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    tangents = (random_like(params), random_like(xs))

    def f(p, x):
        return jaxrnn.unroll(cell, p, x, carry, **kwargs)

    fast = jax.jvp(f, (params, xs), tangents)
    with reference_path():
        ref = jax.jvp(f, (params, xs), tangents)
    _close(fast, ref, 2e-5)


@pytest.mark.parametrize("cell_name", MAIN_CELLS)
def test_check_grads_order_2(cell_name):
    """Order 2, forward and reverse, in float64 (ReLU's kink is left to the HVP test below)."""
    cell = FAST_CELLS[cell_name](HIDDEN)
    with jax.enable_x64(True):
        params = cell.init(fresh_key(), INPUT_SIZE, dtype=jnp.float64)
        xs, carry, kwargs = mode_inputs(cell, "everything_time_major_reverse", dtype=jnp.float64)
        f = jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c, **kwargs))
        check_grads(f, (params, xs, carry), order=2, modes=("fwd", "rev"), eps=1e-4)


@pytest.mark.parametrize("mode", ["everything_time_major_reverse"])
def test_second_order_equals_reference(cell, mode):
    """Hessian-vector products (forward over reverse) of the fast path and the reference."""
    with jax.enable_x64(True):
        params = cell.init(fresh_key(), INPUT_SIZE, dtype=jnp.float64)
        xs, carry, kwargs = mode_inputs(cell, mode, dtype=jnp.float64)
        tangents = (random_like(params), random_like(xs))
        grad = jax.grad(lambda p, x: _loss(cell, p, x, carry, kwargs), argnums=(0, 1))

        def hvp(p, x):
            return jax.jvp(grad, (p, x), tangents)

        fast = jax.jit(hvp)(params, xs)
        with reference_path():
            ref = jax.jit(hvp)(params, xs)
        _close(fast, ref, 1e-10)


def test_nan_in_padding_does_not_leak(cell):
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE))
    xs = xs.at[1, 3:].set(jnp.nan)
    lengths = jnp.array([TIME, 3])
    grads = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x, seq_lengths=lengths)[0]))(
        params, xs
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_jit_vmap_and_layers_match_reference():
    net = jaxrnn.stack(jaxrnn.lstm(HIDDEN), 2, bidirectional=True)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, TIME, INPUT_SIZE))
    lengths = jnp.array([TIME, 2, 4])

    def loss(p, x):
        ys, _ = net.apply(p, x, seq_lengths=lengths)
        return jnp.sum(jnp.tanh(ys))

    fast = jax.jit(jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0)))(params, xs[None])
    with reference_path():
        ref = jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))(params, xs[None])
    _close(fast, ref, 2e-5)


def test_projected_lstm_falls_back_to_the_reference_scan():
    cell = jaxrnn.lstm(HIDDEN, proj_size=3)
    params = cell.init(fresh_key(), INPUT_SIZE)
    assert not fastpath.supports(cell, params)
    xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE))
    jaxpr = str(jax.make_jaxpr(lambda p, x: jaxrnn.unroll(cell, p, x))(params, xs))
    assert FAST_MARK not in jaxpr


def test_user_cells_do_not_take_the_fast_path():
    cell = jaxrnn.make_cell(
        lambda p, h, x: (jnp.tanh(x @ p + h), h),
        lambda key, n, dtype=jnp.float32: jax.random.normal(key, (n, HIDDEN), dtype),
        lambda batch_shape=(), dtype=jnp.float32: jnp.zeros((*batch_shape, HIDDEN), dtype),
    )
    assert cell.kind is None
    assert not fastpath.supports(cell, cell.init(fresh_key(), INPUT_SIZE))


@pytest.mark.parametrize(
    "backend, batch, hidden",
    [("cpu", 1, 128), ("cpu", 64, 512), ("gpu", 8, 128), ("cuda", 256, 1024), ("tpu", 16, 64)],
)
def test_default_unroll_reads_the_measured_table(backend, batch, hidden):
    table = fastpath.UNROLL_TABLE["gpu" if backend in ("gpu", "cuda") else "cpu"]
    expected = next(f for bound, f in table if batch * hidden <= bound)
    assert fastpath.default_unroll(batch, hidden, backend) == expected


@pytest.mark.parametrize("unroll", [0, -1, 1.5, "8"])
def test_bad_unroll_is_rejected(unroll):
    cell = jaxrnn.gru(HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    with pytest.raises(ValueError, match="unroll must be an int >= 1 or a bool"):
        jaxrnn.unroll(cell, params, jnp.ones((2, TIME, INPUT_SIZE)), unroll=unroll)


def test_cudnn_lstm_weight_packing_matches_unroll():
    """The opt-in cuDNN path's packing, through jax.experimental.rnn's reference LSTM."""
    from jax.experimental import rnn

    cell = jaxrnn.lstm(HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, TIME, INPUT_SIZE))
    carry = random_carry(cell, (3,))
    lengths = jnp.array([TIME, 2, 4], jnp.int32)
    weights = rnn.unpack_lstm_weights(
        fastpath.pack_cudnn_lstm_weights(params), INPUT_SIZE, HIDDEN, 1, False
    )
    ys, h, c = rnn.lstm_ref(
        xs, carry.h[None], carry.c[None], *weights, lengths, INPUT_SIZE, HIDDEN, 1, 0.0, False
    )
    expected = jaxrnn.unroll(cell, params, xs, carry, seq_lengths=lengths)
    _close((ys, jaxrnn.LSTMCarry(h[0], c[0])), expected, 2e-5)
    if jax.default_backend() == "gpu":
        _close(fastpath.cudnn_lstm(params, xs, carry, lengths), expected, 2e-3)
