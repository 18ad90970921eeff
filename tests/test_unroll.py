"""`jaxrnn.unroll` against the plain Python loop over `cell.step`, for every cell and mode."""

from __future__ import annotations

import functools

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    INPUT_SIZE,
    MODES,
    TIME,
    assert_trees_close,
    fresh_key,
    mode_inputs,
    random_carry,
    reference_unroll,
)
from jax.test_util import check_grads

import jaxrnn


@pytest.mark.parametrize("mode", sorted(MODES))
def test_unroll_matches_python_loop(cell, params, mode):
    xs, carry, kwargs = mode_inputs(cell, mode)
    ys, final = jaxrnn.unroll(cell, params, xs, carry, **kwargs)
    kwargs.pop("unroll", None)  # the Python loop has no unroll factor
    ref_ys, ref_final = reference_unroll(cell, params, xs, carry, **kwargs)
    chex.assert_shape(ys, ref_ys.shape)
    assert_trees_close(ys, ref_ys)
    assert_trees_close(final, ref_final)


def test_padded_outputs_are_zero_and_carry_is_last_valid(params, cell):
    lengths = jnp.array([TIME, 0, 3, 1])
    xs = jax.random.normal(fresh_key(), (4, TIME, INPUT_SIZE))
    ys, final = jaxrnn.unroll(cell, params, xs, seq_lengths=lengths)
    for b, n in enumerate(np.asarray(lengths)):
        assert np.all(np.asarray(ys[b, n:]) == 0)
        _, alone = jaxrnn.unroll(cell, params, xs[b, :n])
        assert_trees_close(jax.tree_util.tree_map(lambda a, b=b: a[b], final), alone)


@pytest.mark.parametrize("reverse", [False, True])
def test_packed_row_equals_sequences_one_by_one(cell, params, reverse):
    lengths = [3, 1, 4, 2]
    starts = np.cumsum([0] + lengths[:-1])
    total = sum(lengths)
    xs = jax.random.normal(fresh_key(), (total, INPUT_SIZE))
    resets = np.zeros(total, bool)
    resets[starts] = True
    packed, _ = jaxrnn.unroll(cell, params, xs, resets=jnp.asarray(resets), reverse=reverse)
    for s, n in zip(starts, lengths):
        alone, _ = jaxrnn.unroll(cell, params, xs[s : s + n], reverse=reverse)
        np.testing.assert_allclose(packed[s : s + n], alone, rtol=1e-5, atol=1e-6)


def test_length_zero_sequence(cell, params):
    xs = jax.random.normal(fresh_key(), (2, 0, INPUT_SIZE))
    carry = random_carry(cell, (2,))
    ys, final = jaxrnn.unroll(cell, params, xs, carry)
    assert ys.shape == (2, 0, cell.output_size)
    assert_trees_close(final, carry, rtol=0, atol=0)
    _, default = jaxrnn.unroll(cell, params, xs)
    assert_trees_close(default, cell.initial_carry((2,)), rtol=0, atol=0)


def test_step_equals_recur_of_project(cell, params):
    x = jax.random.normal(fresh_key(), (3, INPUT_SIZE))
    carry = random_carry(cell, (3,))
    expected = cell.step(params, carry, x)
    actual = cell.recur(params, carry, cell.project(params, x))
    assert_trees_close(actual, expected, rtol=1e-6, atol=1e-6)


def test_step_drops_into_lax_scan(cell, params):
    xs = jax.random.normal(fresh_key(), (TIME, 2, INPUT_SIZE))
    final, ys = jax.lax.scan(functools.partial(cell.step, params), cell.initial_carry((2,)), xs)
    ys2, final2 = jaxrnn.unroll(cell, params, xs, time_major=True)
    assert_trees_close(ys2, ys)
    assert_trees_close(final2, final)


def test_jit_and_vmap_agree(cell, params):
    xs = jax.random.normal(fresh_key(), (3, TIME, INPUT_SIZE))
    lengths = jnp.array([TIME, 2, 4])
    eager = jaxrnn.unroll(cell, params, xs, seq_lengths=lengths)
    jitted = jax.jit(lambda p, x, n: jaxrnn.unroll(cell, p, x, seq_lengths=n))(params, xs, lengths)
    mapped = jax.vmap(lambda x, n: jaxrnn.unroll(cell, params, x, seq_lengths=n))(xs, lengths)
    assert_trees_close(jitted, eager)
    assert_trees_close(mapped, eager)


def test_float64(cell):
    with jax.enable_x64(True):
        params = cell.init(fresh_key(), INPUT_SIZE, dtype=jnp.float64)
        xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE), jnp.float64)
        ys, final = jaxrnn.unroll(cell, params, xs)
        assert ys.dtype == jnp.float64
        assert all(leaf.dtype == jnp.float64 for leaf in jax.tree_util.tree_leaves(final))
        ref_ys, _ = reference_unroll(cell, params, xs)
        np.testing.assert_allclose(ys, ref_ys, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "seq_lengths"])
def test_check_grads_float64(cell, with_lengths):
    with jax.enable_x64(True):
        params = cell.init(fresh_key(), 3, dtype=jnp.float64)
        xs = jax.random.normal(fresh_key(), (2, 4, 3), jnp.float64)
        carry = random_carry(cell, (2,), jnp.float64)
        lengths = jnp.array([4, 2]) if with_lengths else None

        def f(params, xs, carry):
            return jaxrnn.unroll(cell, params, xs, carry, seq_lengths=lengths)

        # eps=1e-6: float64 leaves room for a smaller step than the default 1e-4, whose
        # second-order truncation error reached 2.4e-5 relative on some random draws.
        check_grads(
            f, (params, xs, carry), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5, eps=1e-6
        )


def test_nan_propagates_and_padding_nan_is_ignored(cell, params):
    xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE))
    poisoned = xs.at[0, 2].set(jnp.nan)
    ys, _ = jaxrnn.unroll(cell, params, poisoned)
    assert np.all(np.isnan(np.asarray(ys[0, 2:])))
    assert not np.any(np.isnan(np.asarray(ys[1])))
    # NaN in the padding of a length-2 sequence: outputs and gradients stay finite.
    lengths = jnp.array([2, TIME])

    def loss(params):
        ys, _ = jaxrnn.unroll(cell, params, poisoned, seq_lengths=lengths)
        return jnp.sum(ys**2)

    assert np.isfinite(loss(params))
    grads = jax.grad(loss)(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(
    time=st.integers(0, 5),
    batch=st.integers(1, 3),
    reverse=st.booleans(),
    data=st.data(),
)
def test_random_lengths_and_masks_match_python_loop(time, batch, reverse, data):
    cell = jaxrnn.gru(3)
    params = cell.init(fresh_key(), 2)
    xs = jax.random.normal(fresh_key(), (batch, time, 2))
    lengths = jnp.array(
        data.draw(st.lists(st.integers(0, time + 2), min_size=batch, max_size=batch))
    )
    flat = data.draw(st.lists(st.booleans(), min_size=batch * time, max_size=batch * time))
    mask = jnp.array(flat, bool).reshape(batch, time)
    kwargs = {"seq_lengths": lengths, "mask": mask, "resets": ~mask, "reverse": reverse}
    ys, final = jaxrnn.unroll(cell, params, xs, **kwargs)
    ref_ys, ref_final = reference_unroll(cell, params, xs, **kwargs)
    assert_trees_close(ys, ref_ys)
    assert_trees_close(final, ref_final)
