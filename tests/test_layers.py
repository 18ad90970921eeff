"""`jaxrnn.stack`: multi-layer, bidirectional networks against per-layer reference loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CELL_FACTORIES, INPUT_SIZE, assert_trees_close, fresh_key, reference_unroll

import jaxrnn

CONFIGS = {
    "one_layer": (1, False),
    "two_layers": (2, False),
    "bidirectional": (1, True),
    "two_layers_bidirectional": (2, True),
}


def _reference_stack(net, params, xs, *, seq_lengths=None):
    ys, finals = xs, []
    for layer, cell in enumerate(net.cells):
        outs, layer_finals = [], []
        for d in range(2 if net.bidirectional else 1):
            y, c = reference_unroll(
                cell, params[layer][d], ys, reverse=d == 1, seq_lengths=seq_lengths
            )
            outs.append(y)
            layer_finals.append(c)
        ys = np.concatenate(outs, axis=-1)
        finals.append(tuple(layer_finals))
    return ys, tuple(finals)


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru", "lstm_proj"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "seq_lengths"])
def test_stack_matches_reference(cell_name, config, with_lengths):
    num_layers, bidirectional = CONFIGS[config]
    net = jaxrnn.stack(CELL_FACTORIES[cell_name](), num_layers, bidirectional=bidirectional)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, 5, INPUT_SIZE))
    lengths = jnp.array([5, 0, 2]) if with_lengths else None
    ys, carries = net.apply(params, xs, seq_lengths=lengths)
    ref_ys, ref_carries = _reference_stack(net, params, xs, seq_lengths=lengths)
    assert ys.shape == (3, 5, net.output_size)
    assert_trees_close(ys, ref_ys)
    assert_trees_close(carries, ref_carries)


def test_stack_time_major_and_given_carry():
    net = jaxrnn.stack(jaxrnn.lstm(6), 2, bidirectional=True)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, 5, INPUT_SIZE))
    carry = jax.tree_util.tree_map(
        lambda a: jax.random.normal(fresh_key(), a.shape), net.initial_carry((3,))
    )
    ys, carries = net.apply(params, xs, carry)
    ys_tm, carries_tm = net.apply(params, jnp.swapaxes(xs, 0, 1), carry, time_major=True)
    assert_trees_close(jnp.swapaxes(ys_tm, 0, 1), ys)
    assert_trees_close(carries_tm, carries)
    ys0, _ = net.apply(params, xs)
    assert not np.allclose(ys0, ys)  # the given carry was used


def test_mixed_cells_per_layer():
    net = jaxrnn.stack([jaxrnn.gru(6), jaxrnn.lstm(4, proj_size=2)], 2, bidirectional=True)
    params = net.init(fresh_key(), INPUT_SIZE)
    assert params[1][0].w_x.shape == (12, 16)
    ys, _ = net.apply(params, jax.random.normal(fresh_key(), (2, 5, INPUT_SIZE)))
    assert ys.shape == (2, 5, 4)


def test_dropout_only_between_layers_and_only_with_key():
    xs = jax.random.normal(fresh_key(), (4, 6, INPUT_SIZE))
    one = jaxrnn.stack(jaxrnn.gru(8), 1, dropout=0.5)
    p1 = one.init(fresh_key(), INPUT_SIZE)
    # No dropout after the last layer: a one-layer net is unchanged by a key.
    assert_trees_close(one.apply(p1, xs, key=fresh_key()), one.apply(p1, xs), rtol=0, atol=0)

    two = jaxrnn.stack(jaxrnn.gru(8), 2, dropout=0.5)
    p2 = two.init(fresh_key(), INPUT_SIZE)
    plain_ys, plain_carries = two.apply(p2, xs)
    assert_trees_close(two.apply(p2, xs), (plain_ys, plain_carries), rtol=0, atol=0)
    key = fresh_key()
    drop_ys, drop_carries = two.apply(p2, xs, key=key)
    assert not np.allclose(drop_ys, plain_ys)
    assert_trees_close(drop_carries[0], plain_carries[0], rtol=0, atol=0)  # first layer intact
    assert_trees_close(two.apply(p2, xs, key=key), (drop_ys, drop_carries), rtol=0, atol=0)


def test_dropout_matches_manual_inverted_dropout():
    cells = [jaxrnn.elman(8), jaxrnn.elman(3)]
    net = jaxrnn.stack(cells, 2, dropout=0.25)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (2, 5, INPUT_SIZE))
    key = fresh_key()
    ys, _ = net.apply(params, xs, key=key)
    h1, _ = jaxrnn.unroll(cells[0], params[0][0], xs)
    kept = jax.random.bernoulli(jax.random.fold_in(key, 0), 0.75, h1.shape)
    expected, _ = jaxrnn.unroll(cells[1], params[1][0], jnp.where(kept, h1 / 0.75, 0.0))
    assert_trees_close(ys, expected)
    assert 0.5 < float(jnp.mean(kept)) < 0.95


def test_stack_bad_params_and_carry():
    net = jaxrnn.stack(jaxrnn.gru(4), 2, bidirectional=True)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jnp.ones((2, 3, INPUT_SIZE))
    with pytest.raises(ValueError, match=r"params must hold 2 layers \(from net.init\), got 1"):
        net.apply(params[:1], xs)
    with pytest.raises(ValueError, match=r"params\[0\] must hold 2 direction\(s\), got 1"):
        net.apply((params[0][:1], params[1]), xs)
    with pytest.raises(ValueError, match=r"carry must hold 2 layers of 2 direction\(s\)"):
        net.apply(params, xs, jnp.zeros((2, 4)))


def test_stack_grad_and_jit():
    net = jaxrnn.stack(jaxrnn.lstm(4), 2, bidirectional=True, dropout=0.1)
    params = net.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (2, 5, INPUT_SIZE))
    key = fresh_key()

    def loss(params):
        ys, _ = net.apply(params, xs, seq_lengths=jnp.array([5, 3]), key=key)
        return jnp.sum(ys**2)

    eager = jax.grad(loss)(params)
    jitted = jax.jit(jax.grad(loss))(params)
    assert_trees_close(jitted, eager)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(eager))
