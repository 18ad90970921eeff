"""Parity with Flax's linen cells and ``flax.linen.RNN``: converted params, same outputs."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxrnn
from jaxrnn import interop

_SEEDS = itertools.count(500)
INPUT_SIZE, HIDDEN = 3, 5
TIME_NNX = 3
RANDOM_BIAS = nn.initializers.normal(0.5)  # Flax initialises biases to zero; test real ones

FLAX_CELLS = {
    "simple_tanh": lambda: nn.SimpleCell(HIDDEN, bias_init=RANDOM_BIAS),
    "simple_relu": lambda: nn.SimpleCell(HIDDEN, activation_fn=nn.relu, bias_init=RANDOM_BIAS),
    "lstm": lambda: nn.LSTMCell(HIDDEN, bias_init=RANDOM_BIAS),
    "optimized_lstm": lambda: nn.OptimizedLSTMCell(HIDDEN, bias_init=RANDOM_BIAS),
    "gru": lambda: nn.GRUCell(HIDDEN, bias_init=RANDOM_BIAS),
}


def _key():
    return jax.random.PRNGKey(next(_SEEDS))


@pytest.fixture(params=sorted(FLAX_CELLS))
def flax_cell(request):
    return FLAX_CELLS[request.param]()


def _random_flax_carry(flax_cell, batch):
    if isinstance(flax_cell, nnx.Module):
        carry = flax_cell.initialize_carry((batch, INPUT_SIZE), rngs=nnx.Rngs(0))
    else:
        carry = flax_cell.initialize_carry(_key(), (batch, INPUT_SIZE))
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    keys = jax.random.split(_key(), len(leaves))
    return treedef.unflatten([jax.random.normal(k, a.shape) for k, a in zip(keys, leaves)])


def test_one_step_equals_flax_cell(flax_cell):
    x = jax.random.normal(_key(), (4, INPUT_SIZE))
    carry = _random_flax_carry(flax_cell, 4)
    variables = flax_cell.init(_key(), carry, x)
    cell, params = interop.from_flax(flax_cell, variables)
    expected_carry, expected_y = flax_cell.apply(variables, carry, x)
    new_carry, y = cell.step(params, interop.carry_from_flax(cell, carry), x)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
        interop.carry_to_flax(cell, new_carry),
        expected_carry,
    )


@pytest.mark.parametrize("reverse", [False, True])
def test_sequence_equals_flax_rnn(flax_cell, reverse):
    """``flax.linen.RNN`` with seq_lengths (and reverse, keep_order) vs ``jaxrnn.unroll``."""
    batch, time = 3, 6
    xs = jax.random.normal(_key(), (batch, time, INPUT_SIZE))
    lengths = jnp.array([6, 4, 1])
    carry = _random_flax_carry(flax_cell, batch)
    rnn = nn.RNN(flax_cell, return_carry=True, reverse=reverse, keep_order=True)
    variables = rnn.init(_key(), xs, initial_carry=carry, seq_lengths=lengths)
    expected_carry, expected_ys = rnn.apply(variables, xs, initial_carry=carry, seq_lengths=lengths)
    cell, params = interop.from_flax(rnn, variables)
    ys, final = jax.jit(
        lambda p, xs, c: jaxrnn.unroll(cell, p, xs, c, seq_lengths=lengths, reverse=reverse)
    )(params, xs, interop.carry_from_flax(cell, carry))
    valid = np.arange(time)[None, :] < np.asarray(lengths)[:, None]
    # Flax leaves its outputs in the padding unspecified; jaxrnn's are zero.
    np.testing.assert_allclose(ys[valid], np.asarray(expected_ys)[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ys[~valid], 0.0)
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
        interop.carry_to_flax(cell, final),
        expected_carry,
    )


def test_converted_params_have_flax_param_count(flax_cell):
    """jaxrnn fills Flax's missing biases with exact zeros; every Flax weight is used once."""
    x = jnp.ones((1, INPUT_SIZE))
    variables = flax_cell.init(_key(), flax_cell.initialize_carry(_key(), x.shape), x)
    cell, params = interop.from_flax(flax_cell, variables)
    flax_leaves = jax.tree_util.tree_leaves(variables["params"])
    ours = jax.tree_util.tree_leaves(params)
    nonzero = sum(int(np.count_nonzero(np.asarray(a))) for a in ours)
    assert nonzero == sum(int(np.count_nonzero(np.asarray(a))) for a in flax_leaves)
    assert isinstance(params, cell.params_type)


def test_gru_hidden_bias_stays_inside_reset_gate():
    """Flax's GRUCell puts b_hn inside r * (W_hn h + b_hn), as jaxrnn.gru; a large b_hn shows
    any difference."""
    flax_cell = nn.GRUCell(HIDDEN, bias_init=nn.initializers.constant(3.0))
    h = jax.random.normal(_key(), (2, HIDDEN))
    x = jax.random.normal(_key(), (2, INPUT_SIZE))
    variables = flax_cell.init(_key(), h, x)
    cell, params = interop.from_flax(flax_cell, variables)
    np.testing.assert_array_equal(params.b_h[: 2 * HIDDEN], 0.0)
    np.testing.assert_array_equal(params.b_h[2 * HIDDEN :], 3.0)
    np.testing.assert_allclose(
        cell.step(params, h, x)[1], flax_cell.apply(variables, h, x)[1], rtol=1e-5, atol=1e-6
    )


# --- Bad input ------------------------------------------------------------------------------


def _init(flax_cell):
    x = jnp.ones((1, INPUT_SIZE))
    return flax_cell.init(_key(), flax_cell.initialize_carry(_key(), x.shape), x)


def test_residual_simple_cell_is_refused():
    flax_cell = nn.SimpleCell(HIDDEN, residual=True)
    with pytest.raises(ValueError, match=r"SimpleCell\(residual=True\).*residual=False"):
        interop.from_flax(flax_cell, _init(flax_cell))


def test_unsupported_activation_is_refused():
    flax_cell = nn.LSTMCell(HIDDEN, activation_fn=nn.gelu)
    with pytest.raises(ValueError, match=r"LSTMCell.activation_fn must be one of \['tanh'\]"):
        interop.from_flax(flax_cell, _init(flax_cell))


def test_unknown_cell_is_refused():
    flax_cell = nn.MGUCell(HIDDEN)
    with pytest.raises(TypeError, match=r"from_flax: module must be one of .*got MGUCell"):
        interop.from_flax(flax_cell, _init(flax_cell))


def test_reversed_rnn_without_keep_order_is_refused():
    with pytest.raises(ValueError, match=r"reverse=True, keep_order=False.*keep_order=True"):
        interop.from_flax(nn.RNN(nn.GRUCell(HIDDEN), reverse=True), {})


def test_params_of_another_cell_are_refused():
    variables = _init(nn.GRUCell(HIDDEN))
    with pytest.raises(ValueError, match=r"params have no 'ii'"):
        interop.from_flax(nn.LSTMCell(HIDDEN), variables)
    with pytest.raises(ValueError, match=r"params\['ir'\]\['kernel'\] must have shape \(in, 4\)"):
        interop.from_flax(nn.GRUCell(4), variables)
    variables["params"]["hz"]["kernel"] = jnp.ones((4, HIDDEN))
    with pytest.raises(ValueError, match=r"params\['hz'\]\['kernel'\] must have shape \(5, 5\)"):
        interop.from_flax(nn.GRUCell(HIDDEN), variables)


@pytest.mark.parametrize("name", ["lstm", "gru"])
def test_bidirectional_equals_flax(name):
    """``flax.linen.Bidirectional`` of two RNNs is a one-layer bidirectional jaxrnn network."""
    batch, time = 3, 6
    bi = nn.Bidirectional(nn.RNN(FLAX_CELLS[name]()), nn.RNN(FLAX_CELLS[name]()), return_carry=True)
    xs = jax.random.normal(_key(), (batch, time, INPUT_SIZE))
    lengths = jnp.array([6, 3, 1])
    variables = bi.init(_key(), xs, seq_lengths=lengths)
    expected_carry, expected_ys = bi.apply(variables, xs, seq_lengths=lengths)
    net, params = interop.from_flax(bi, variables)
    ys, carries = jax.jit(lambda p, xs: net.apply(p, xs, seq_lengths=lengths))(params, xs)
    valid = np.arange(time)[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_allclose(ys[valid], np.asarray(expected_ys)[valid], rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
        interop.carry_to_flax(net, carries),
        expected_carry,
    )
    assert interop.carry_from_flax(net, expected_carry)[0][1].__class__ is type(carries[0][1])


def test_bidirectional_of_two_cell_types_is_refused():
    bi = nn.Bidirectional(nn.RNN(nn.GRUCell(HIDDEN)), nn.RNN(nn.SimpleCell(HIDDEN)))
    variables = bi.init(_key(), jnp.ones((1, 4, INPUT_SIZE)))
    with pytest.raises(ValueError, match=r"runs one cell type in both directions"):
        interop.from_flax(bi, variables)


NNX_CELLS = {
    "simple_tanh": lambda rngs: nnx.SimpleCell(INPUT_SIZE, HIDDEN, rngs=rngs),
    "simple_relu": lambda rngs: nnx.SimpleCell(
        INPUT_SIZE, HIDDEN, activation_fn=nnx.relu, rngs=rngs
    ),
    "lstm": lambda rngs: nnx.LSTMCell(INPUT_SIZE, HIDDEN, rngs=rngs),
    "optimized_lstm": lambda rngs: nnx.OptimizedLSTMCell(INPUT_SIZE, HIDDEN, rngs=rngs),
    "gru": lambda rngs: nnx.GRUCell(INPUT_SIZE, HIDDEN, rngs=rngs),
}


@pytest.mark.parametrize("name", sorted(NNX_CELLS))
def test_nnx_cell_steps_equal_flax(name):
    flax_cell = NNX_CELLS[name](nnx.Rngs(next(_SEEDS)))
    for _, variable in nnx.iter_graph(flax_cell):  # Flax's biases start at zero: randomise
        if isinstance(variable, nnx.Param) and variable[...].ndim == 1:
            variable[...] = jax.random.normal(_key(), variable[...].shape)
    cell, params = interop.from_flax(flax_cell)
    xs = jax.random.normal(_key(), (TIME_NNX, 2, INPUT_SIZE))
    flax_carry = _random_flax_carry(flax_cell, 2)
    carry = interop.carry_from_flax(cell, flax_carry)
    step = jax.jit(cell.step)
    for x in xs:
        flax_carry, expected = flax_cell(flax_carry, x)
        carry, y = step(params, carry, x)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6),
        interop.carry_to_flax(cell, carry),
        flax_carry,
    )


def test_linen_module_without_variables_is_refused():
    with pytest.raises(ValueError, match=r"a flax.linen module keeps no params; pass its var"):
        interop.from_flax(nn.GRUCell(HIDDEN))
