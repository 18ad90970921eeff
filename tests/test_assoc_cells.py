"""mingru, minlstm and lru: step form (sequential runner) against their associative scans."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _parallel_reference import random_flags
from conftest import assert_trees_close, reference_unroll
from jax.test_util import check_grads

import jaxrnn

CELLS = {
    "mingru_log": lambda: jaxrnn.mingru(5),
    "mingru_linear": lambda: jaxrnn.mingru(5, log_space=False),
    "minlstm_log": lambda: jaxrnn.minlstm(5),
    "minlstm_linear": lambda: jaxrnn.minlstm(5, log_space=False, use_bias=False),
    "lru": lambda: jaxrnn.lru(4, 3, r_min=0.5, r_max=0.99),
}
INPUT, TIME = 3, 13


def _setup(name, key, batch_shape=(2,), dtype=jnp.float32):
    cell = CELLS[name]()
    k1, k2, k3 = jax.random.split(key, 3)
    params = cell.init(k1, INPUT, dtype=dtype)
    xs = jax.random.normal(k2, (*batch_shape, TIME, INPUT), dtype)
    carry = jax.tree_util.tree_map(
        lambda a: jax.random.normal(k3, a.shape, a.dtype), cell.initial_carry(batch_shape, dtype)
    )
    return cell, params, xs, carry


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("name", CELLS)
def test_step_loop_sequential_and_associative_agree(name, reverse):
    cell, params, xs, carry = _setup(name, jax.random.PRNGKey(0))
    lengths, mask, resets = random_flags(jax.random.PRNGKey(1), (2,), TIME)
    flags = dict(seq_lengths=lengths, mask=mask, resets=resets, reverse=reverse)
    want = reference_unroll(cell, params, xs, carry, **flags)
    run = lambda m: jax.jit(functools.partial(jaxrnn.unroll, cell, method=m, **flags))(
        params, xs, carry
    )
    assert_trees_close(run("sequential"), want, atol=1e-5)
    assert_trees_close(run("associative"), want, atol=1e-5)


@pytest.mark.parametrize("batch_shape", [(), (2, 3)], ids=str)
def test_batch_dims(batch_shape):
    cell, params, xs, carry = _setup("minlstm_log", jax.random.PRNGKey(2), batch_shape)
    got = jax.jit(functools.partial(jaxrnn.unroll, cell, method="associative"))(params, xs, carry)
    assert_trees_close(got, reference_unroll(cell, params, xs, carry), atol=1e-5)


def _loss(cell, method, flags, params, xs, carry):
    ys, final = jaxrnn.unroll(cell, params, xs, carry, method=method, **flags)
    return jnp.sum(jnp.sin(ys)) + jnp.sum(jnp.abs(final) ** 2)


@pytest.mark.parametrize("name", ["minlstm_log", "lru"])
def test_gradients_equal_sequential(name):
    cell, params, xs, carry = _setup(name, jax.random.PRNGKey(3))
    lengths, mask, resets = random_flags(jax.random.PRNGKey(4), (2,), TIME)
    flags = dict(seq_lengths=lengths, mask=mask, resets=resets, reverse=True)
    grad = lambda m: jax.jit(jax.grad(functools.partial(_loss, cell, m, flags), (0, 1, 2)))(
        params, xs, carry
    )
    got, want = grad("associative"), grad("sequential")
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(got))
    assert_trees_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ["mingru_log"])
def test_check_grads_float64(name):
    with jax.enable_x64(True):
        cell, params, xs, carry = _setup(name, jax.random.PRNGKey(5), dtype=jnp.float64)
        flags = dict(seq_lengths=jnp.array([TIME, 7]), resets=jnp.zeros((2, TIME), bool))
        loss = jax.jit(functools.partial(_loss, cell, "associative", flags))
        check_grads(loss, (params, xs, carry), 1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_quasi_deer_on_a_linear_cell_converges_at_once():
    cell, params, xs, carry = _setup("mingru_log", jax.random.PRNGKey(6))
    run = functools.partial(jaxrnn.unroll, cell, method="quasi_deer", return_info=True)
    ys, final, info = jax.jit(run)(params, xs, carry)
    assert int(info.iterations) == 1  # the diagonal Jacobian is exact: one Newton step
    assert_trees_close((ys, final), jaxrnn.unroll(cell, params, xs, carry), atol=1e-5)


def test_log_space_scan_is_stable_on_long_saturated_sequences():
    """Gates near 0 and 1 over many steps: products of coefficients underflow in linear space
    but not in log space; both must stay finite and equal the sequential result."""
    cell = jaxrnn.mingru(4)
    params = cell.init(jax.random.PRNGKey(7), INPUT)
    xs = 8.0 * jax.random.normal(jax.random.PRNGKey(8), (1, 2000, INPUT))
    run = lambda m: jax.jit(functools.partial(jaxrnn.unroll, cell, method=m))(params, xs)
    want, got = run("sequential"), run("associative")
    assert bool(jnp.all(jnp.isfinite(got[0])))
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)


def test_lru_ring_initialisation():
    cell = jaxrnn.lru(256, 2, r_min=0.4, r_max=0.9, max_phase=np.pi / 4)
    params = cell.init(jax.random.PRNGKey(9), INPUT)
    lam = jnp.exp(-jnp.exp(params.nu_log) + 1j * jnp.exp(params.theta_log))
    assert float(jnp.abs(lam).min()) >= 0.4 - 1e-6 and float(jnp.abs(lam).max()) <= 0.9 + 1e-6
    assert float(jnp.angle(lam).min()) >= 0.0 and float(jnp.angle(lam).max()) <= np.pi / 4 + 1e-6
    # |lambda|^2 uniform on [r_min^2, r_max^2]: its mean is the midpoint.
    assert abs(float(jnp.mean(jnp.abs(lam) ** 2)) - (0.16 + 0.81) / 2) < 0.05
    np.testing.assert_allclose(
        jnp.exp(params.gamma_log), jnp.sqrt(1 - jnp.abs(lam) ** 2), rtol=1e-5
    )
    assert cell.initial_carry((2,)).dtype == jnp.complex64


@pytest.mark.parametrize(
    "factory,match",
    [
        (lambda: jaxrnn.mingru(0), "hidden_size must be a positive int, got 0"),
        (lambda: jaxrnn.lru(4, 2, r_min=0.9, r_max=0.5), "r_min < r_max"),
    ],
)
def test_bad_configuration(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_params_of_another_size_are_rejected():
    cell = jaxrnn.mingru(5)
    params = jaxrnn.mingru(4).init(jax.random.PRNGKey(0), INPUT)
    with pytest.raises(ValueError, match=r"params.w_x must have shape \(input_size, 10\)"):
        jaxrnn.unroll(cell, params, jnp.ones((2, TIME, INPUT)))
