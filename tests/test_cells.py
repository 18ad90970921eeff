"""Cells: params layout, the math of each cell written out, initializers, the public surface."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_key

import jaxrnn
from jaxrnn import initializers

sigmoid = jax.nn.sigmoid


def _inputs(cell, batch=3, input_size=4):
    params = cell.init(fresh_key(), input_size)
    x = jax.random.normal(fresh_key(), (batch, input_size))
    carry = jax.tree_util.tree_map(
        lambda a: jax.random.normal(fresh_key(), a.shape), cell.initial_carry((batch,))
    )
    return params, carry, x


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_elman_math(activation):
    cell = jaxrnn.elman(6, activation=activation)
    p, h, x = _inputs(cell)
    act = jnp.tanh if activation == "tanh" else jax.nn.relu
    expected = act(x @ p.w_x + p.b_x + h @ p.w_h + p.b_h)
    h1, y = cell.step(p, h, x)
    np.testing.assert_allclose(h1, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, h1)


def test_lstm_math_gate_order_ifgo():
    cell = jaxrnn.lstm(6)
    p, (h, c), x = _inputs(cell)
    z = x @ p.w_x + p.b_x + h @ p.w_h + p.b_h
    i, f, g, o = (z[:, k * 6 : (k + 1) * 6] for k in range(4))
    c1 = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h1 = sigmoid(o) * jnp.tanh(c1)
    carry, y = cell.step(p, jaxrnn.LSTMCarry(h, c), x)
    np.testing.assert_allclose(carry.c, c1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(carry.h, h1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, h1, rtol=1e-6, atol=1e-6)


def test_lstm_projection_math():
    cell = jaxrnn.lstm(6, proj_size=2)
    p, (h, c), x = _inputs(cell)
    assert p.w_h.shape == (2, 24) and p.w_p.shape == (6, 2) and h.shape == (3, 2)
    z = x @ p.w_x + p.b_x + h @ p.w_h + p.b_h
    i, f, g, o = jnp.split(z, 4, axis=-1)
    c1 = sigmoid(f) * c + sigmoid(i) * jnp.tanh(g)
    h1 = (sigmoid(o) * jnp.tanh(c1)) @ p.w_p
    carry, _ = cell.step(p, jaxrnn.LSTMCarry(h, c), x)
    np.testing.assert_allclose(carry.h, h1, rtol=1e-6, atol=1e-6)


def test_gru_math_pytorch_form():
    cell = jaxrnn.gru(6)
    p, h, x = _inputs(cell)
    xw, hw = x @ p.w_x + p.b_x, h @ p.w_h + p.b_h
    r = sigmoid(xw[:, :6] + hw[:, :6])
    z = sigmoid(xw[:, 6:12] + hw[:, 6:12])
    n = jnp.tanh(xw[:, 12:] + r * hw[:, 12:])  # reset gate after the recurrent matmul
    expected = (1 - z) * n + z * h
    h1, _ = cell.step(p, h, x)
    np.testing.assert_allclose(h1, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("factory", "gates"), [(jaxrnn.elman, 1), (jaxrnn.lstm, 4), (jaxrnn.gru, 3)]
)
@pytest.mark.parametrize("use_bias", [True, False])
def test_params_layout_and_pytorch_init(factory, gates, use_bias):
    hidden, input_size = 16, 7
    cell = factory(hidden, use_bias=use_bias)
    p = cell.init(fresh_key(), input_size, dtype=jnp.bfloat16)
    assert p.w_x.shape == (input_size, gates * hidden) and p.w_x.dtype == jnp.bfloat16
    assert p.w_h.shape == (hidden, gates * hidden)
    if use_bias:
        assert p.b_x.shape == p.b_h.shape == (gates * hidden,)
    else:
        assert p.b_x is None and p.b_h is None
    bound = 1 / np.sqrt(hidden)
    for leaf in jax.tree_util.tree_leaves(p):
        leaf = np.asarray(leaf, np.float32)
        assert np.all(np.abs(leaf) <= bound) and np.std(leaf) > bound / 4


def test_orthogonal_and_identity_are_blockwise():
    w = initializers.orthogonal()(fresh_key(), (8, 32))
    for k in range(4):
        block = w[:, 8 * k : 8 * (k + 1)]
        np.testing.assert_allclose(block.T @ block, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(
        initializers.identity(0.5)(fresh_key(), (4, 12)), np.tile(0.5 * np.eye(4), (1, 3))
    )
    with pytest.raises(
        ValueError,
        match=r"expected a shape \(hidden, gates \* hidden\), got "
        r"\(4, 6\)",
    ):
        initializers.orthogonal()(fresh_key(), (4, 6))


def test_irnn_is_an_integrator_at_init():
    cell = jaxrnn.elman(
        4,
        activation="relu",
        kernel_init=initializers.identity(),
        recurrent_init=initializers.identity(),
        bias_init=initializers.zeros,
        recurrent_bias_init=initializers.zeros,
    )
    p = cell.init(fresh_key(), 4)
    xs = jnp.abs(jax.random.normal(fresh_key(), (10, 4)))
    ys, _ = jaxrnn.unroll(cell, p, xs)
    np.testing.assert_allclose(ys, jnp.cumsum(xs, axis=0), rtol=1e-5)


def test_forget_gate_bias():
    cell = jaxrnn.lstm(5, recurrent_bias_init=initializers.forget_gate_bias(1.0))
    p = cell.init(fresh_key(), 3)
    np.testing.assert_array_equal(p.b_h[5:10], np.ones(5))
    np.testing.assert_array_equal(p.b_h[:5], np.zeros(5))
    with pytest.raises(ValueError, match=r"expected a shape \(4 \* hidden,\), got \(6,\)"):
        initializers.forget_gate_bias()(fresh_key(), (6,))


def test_make_cell_with_project_and_recur():
    def project(p, xs):
        return xs @ p

    def recur(p, h, xw):
        del p
        h = jnp.tanh(xw + h)
        return h, h

    cell = jaxrnn.make_cell(
        None,
        lambda key, n, dtype=jnp.float32: jax.random.normal(key, (n, 3), dtype),
        lambda batch_shape=(), dtype=jnp.float32: jnp.zeros((*batch_shape, 3), dtype),
        project=project,
        recur=recur,
        output_size=3,
    )
    p = cell.init(fresh_key(), 2)
    x, h = jax.random.normal(fresh_key(), (2,)), jax.random.normal(fresh_key(), (3,))
    np.testing.assert_allclose(cell.step(p, h, x)[0], jnp.tanh(x @ p + h), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`project` and `recur` go together"):
        jaxrnn.make_cell(None, cell.init, cell.initial_carry, project=project)


def test_public_surface_imports():
    for name in jaxrnn.__all__:
        assert getattr(jaxrnn, name) is not None, name
    for name in initializers.__all__:
        assert getattr(initializers, name) is not None, name
    assert "_src" not in jaxrnn.__all__
