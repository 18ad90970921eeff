"""Bad input: each raises at trace time with a message naming argument, expected and actual."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fresh_key

import jaxrnn


@pytest.fixture
def lstm_setup():
    cell = jaxrnn.lstm(8)
    params = cell.init(fresh_key(), 5)
    xs = jax.random.normal(fresh_key(), (3, 7, 5))
    return cell, params, xs


def _traced(fn, *args):
    """Runs under jit so the error must come from tracing, not from looking at values."""
    return jax.jit(fn)(*args)


def test_feature_size_mismatch(lstm_setup):
    cell, params, _ = lstm_setup
    xs = jax.random.normal(fresh_key(), (3, 7, 6))
    with pytest.raises(
        ValueError,
        match=r"unroll: xs has 6 features but params were built for "
        r"input_size=5",
    ):
        _traced(lambda x: jaxrnn.unroll(cell, params, x), xs)


def test_integer_xs(lstm_setup):
    cell, params, _ = lstm_setup
    with pytest.raises(
        TypeError,
        match=r"unroll: xs must be a floating-point array, got dtype "
        r"int32",
    ):
        jaxrnn.unroll(cell, params, jnp.ones((3, 7, 5), jnp.int32))


def test_xs_without_time_axis(lstm_setup):
    cell, params, _ = lstm_setup
    with pytest.raises(
        ValueError,
        match=r"xs must have shape \(\*batch, time, features\).*got "
        r"shape \(5,\)",
    ):
        jaxrnn.unroll(cell, params, jnp.ones(5))


def test_carry_wrong_shape(lstm_setup):
    cell, params, xs = lstm_setup
    carry = cell.initial_carry((2,))
    with pytest.raises(
        ValueError,
        match=r"unroll: carry\.h must have shape \(3, 8\).*got shape "
        r"\(2, 8\)",
    ):
        _traced(lambda c: jaxrnn.unroll(cell, params, xs, c), carry)


def test_carry_wrong_structure(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(
        ValueError,
        match=r"unroll: carry must have the structure of "
        r"cell\.initial_carry\(\), LSTMCarry.*got ArrayImpl",
    ):
        jaxrnn.unroll(cell, params, xs, jnp.zeros((3, 8)))


def test_seq_lengths_wrong_shape(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \(3,\).*got shape \(4,\)"):
        jaxrnn.unroll(cell, params, xs, seq_lengths=jnp.array([1, 2, 3, 4]))


def test_seq_lengths_not_integer(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(
        TypeError,
        match=r"seq_lengths must be an integer array, got dtype "
        r"float32",
    ):
        jaxrnn.unroll(cell, params, xs, seq_lengths=jnp.array([1.0, 2.0, 3.0]))


@pytest.mark.parametrize("name", ["mask", "resets"])
def test_flags_wrong_shape_and_dtype(lstm_setup, name):
    cell, params, xs = lstm_setup
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3, 7\).*got shape \(7, 3\)"):
        jaxrnn.unroll(cell, params, xs, **{name: jnp.ones((7, 3), bool)})
    with pytest.raises(TypeError, match=rf"{name} must be a bool array, got dtype int32"):
        jaxrnn.unroll(cell, params, xs, **{name: jnp.ones((3, 7), jnp.int32)})


def test_params_of_another_cell_type(lstm_setup):
    cell, _, xs = lstm_setup
    gru_params = jaxrnn.gru(8).init(fresh_key(), 5)
    with pytest.raises(TypeError, match=r"params must be LSTMParams, got GRUParams"):
        jaxrnn.unroll(cell, gru_params, xs)


def test_params_of_another_hidden_size(lstm_setup):
    cell, _, xs = lstm_setup
    params = jaxrnn.lstm(4).init(fresh_key(), 5)
    with pytest.raises(ValueError, match=r"params\.w_h must have shape \(8, 32\), got \(4, 16\)"):
        jaxrnn.unroll(cell, params, xs)


def test_params_with_bias_for_cell_without(lstm_setup):
    _, params, xs = lstm_setup
    with pytest.raises(ValueError, match=r"use_bias=False but the params have biases"):
        jaxrnn.unroll(jaxrnn.lstm(8, use_bias=False), params, xs)


def test_not_a_cell(lstm_setup):
    _, params, xs = lstm_setup
    with pytest.raises(TypeError, match=r"cell must be a jaxrnn\.Cell.*got function"):
        jaxrnn.unroll(lambda p, c, x: (c, x), params, xs)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: jaxrnn.elman(0), r"elman: hidden_size must be a positive int, got 0"),
        (lambda: jaxrnn.elman(4, activation="gelu"), r"activation must be one of .*got 'gelu'"),
        (lambda: jaxrnn.lstm(4, proj_size=4), r"proj_size must be smaller than hidden_size=4"),
        (lambda: jaxrnn.gru(2.5), r"gru: hidden_size must be a positive int, got 2\.5"),
        (lambda: jaxrnn.stack(jaxrnn.gru(3), 0), r"num_layers must be an int >= 1, got 0"),
        (lambda: jaxrnn.stack(jaxrnn.gru(3), 2, dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configuration(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_unroll_factor(lstm_setup):
    cell, params, xs = lstm_setup
    with pytest.raises(ValueError, match=r"unroll must be an int >= 1 or a bool, got 0"):
        jaxrnn.unroll(cell, params, xs, unroll=0)


@pytest.mark.parametrize("name", ["reverse", "time_major"])
@pytest.mark.parametrize(
    ("value", "shown"),
    [("no", r"'no' of type str"), (jnp.array(True), r"Array\(True.* of type ArrayImpl")],
)
def test_structural_flags_must_be_python_bools(lstm_setup, name, value, shown):
    """A string would silently count as true; an array would fail deep inside the trace."""
    cell, params, xs = lstm_setup
    with pytest.raises(TypeError, match=rf"unroll: {name} must be a Python bool .*got {shown}"):
        _traced(lambda x: jaxrnn.unroll(cell, params, x, **{name: value}), xs)
    # numpy's bool is accepted, and means the same as Python's
    ys, _ = jaxrnn.unroll(cell, params, xs, **{name: np.bool_(False)})
    assert ys.shape == (3, 7, 8)
