"""The parallel-in-time methods (quasi-DEER, DEER) against the sequential runner and a loop."""

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
from jaxrnn._src import parallel


def _user_cell():
    """A user's cell with a two-leaf carry and no project/recur split."""

    def step(params, carry, x):
        h, m = carry["h"], carry["m"]
        h = jnp.tanh(x @ params["w"] + h @ params["u"] + 0.5 * m)
        m = 0.7 * m + 0.3 * jnp.sin(h)
        return {"h": h, "m": m}, h * 2.0

    def init(key, input_size, *, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return {
            "w": jax.random.normal(k1, (input_size, 4), dtype) * 0.5,
            "u": jax.random.normal(k2, (4, 4), dtype) * 0.3,
        }

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        zeros = jnp.zeros((*batch_shape, 4), dtype)
        return {"h": zeros, "m": zeros}

    return jaxrnn.make_cell(step, init, initial_carry, name="user", output_size=4)


CELLS = {
    "elman_tanh": lambda: jaxrnn.elman(5),
    "elman_relu": lambda: jaxrnn.elman(5, activation="relu"),
    "gru": lambda: jaxrnn.gru(5),
    "lstm": lambda: jaxrnn.lstm(5),
    "lstm_nobias": lambda: jaxrnn.lstm(4, use_bias=False),
    "lstm_proj": lambda: jaxrnn.lstm(5, proj_size=3),
    "user": _user_cell,
}
INPUT, TIME = 3, 11

# Every cell forward or backward in time (or both); DEER (full Jacobians) on a subset, since its
# code path does not depend on the cell.
CASES = [
    ("elman_tanh", "quasi_deer", False),
    ("elman_relu", "quasi_deer", True),
    ("gru", "quasi_deer", False),
    ("gru", "quasi_deer", True),
    ("lstm", "quasi_deer", True),
    ("lstm_nobias", "quasi_deer", False),
    ("lstm_proj", "quasi_deer", False),
    ("user", "quasi_deer", False),
    ("user", "quasi_deer", True),
    ("lstm_proj", "deer", False),
    ("user", "deer", True),
]


def _setup(name, key, batch_shape=(2,), dtype=jnp.float32):
    cell = CELLS[name]()
    k1, k2, k3 = jax.random.split(key, 3)
    params = cell.init(k1, INPUT, dtype=dtype)
    xs = jax.random.normal(k2, (*batch_shape, TIME, INPUT), dtype)
    return cell, params, xs, k3


@pytest.mark.parametrize("name,method,reverse", CASES)
def test_matches_python_loop_with_lengths_mask_resets(name, method, reverse):
    cell, params, xs, key = _setup(name, jax.random.PRNGKey(0))
    lengths, mask, resets = random_flags(key, (2,), TIME)
    flags = dict(seq_lengths=lengths, mask=mask, resets=resets, reverse=reverse)
    run = jax.jit(functools.partial(jaxrnn.unroll, cell, method=method, **flags))
    ys, carry = run(params, xs)
    want_ys, want_carry = reference_unroll(cell, params, xs, **flags)
    assert_trees_close(ys, want_ys, atol=5e-5)
    assert_trees_close(carry, want_carry, atol=5e-5)


@pytest.mark.parametrize(
    "batch_shape,time_major", [((2, 3), False), ((), False), ((2,), True)], ids=str
)
def test_batch_dims_and_layout(batch_shape, time_major):
    cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(1), batch_shape)
    carry = jax.tree_util.tree_map(
        lambda a: jax.random.normal(jax.random.PRNGKey(2), a.shape),
        cell.initial_carry(batch_shape),
    )
    xs_in = jnp.moveaxis(xs, -2, 0) if time_major else xs
    run = lambda m: jaxrnn.unroll(cell, params, xs_in, carry, method=m, time_major=time_major)
    ys, final = jax.jit(lambda: run("quasi_deer"))()
    want_ys, want_final = reference_unroll(cell, params, xs, carry)
    if time_major:
        want_ys = jnp.moveaxis(want_ys, -2, 0)
    assert_trees_close(ys, want_ys, atol=5e-5)
    assert_trees_close(final, want_final, atol=5e-5)


@pytest.mark.parametrize("name", ["elman_tanh", "elman_relu", "gru", "lstm", "lstm_nobias"])
def test_analytic_jacobian_diagonal_equals_autodiff(name):
    cell, params, xs, key = _setup(name, jax.random.PRNGKey(3))
    carry = jax.tree_util.tree_map(
        lambda a: jax.random.normal(key, a.shape), cell.initial_carry((2,))
    )
    xw = cell.project(params, xs[:, 0])
    rule = parallel._diag_rule(cell, params)
    new, y, diag = jax.jit(rule)(params, carry, xw)
    flat = parallel._Flat(carry, 1)
    f = lambda s, x: flat.ravel(cell.recur(params, flat.unravel(s), x)[0])
    jac = jax.jit(jax.vmap(jax.jacfwd(f)))(flat.ravel(carry), xw)  # (batch, D, D)
    want_new, want_y = cell.recur(params, carry, xw)
    assert_trees_close((new, y), (want_new, want_y), atol=1e-6)
    np.testing.assert_allclose(flat.ravel(diag), jnp.diagonal(jac, axis1=1, axis2=2), atol=1e-5)


def _loss(cell, method, flags, params, xs, carry):
    ys, final = jaxrnn.unroll(cell, params, xs, carry, method=method, **flags)
    leaves = jax.tree_util.tree_leaves(final)
    return jnp.sum(jnp.sin(ys) * jnp.cos(xs[..., :1])) + sum(jnp.sum(c**2) for c in leaves)


def _random_carry(cell, key, batch_shape=(2,), dtype=jnp.float32):
    return jax.tree_util.tree_map(
        lambda a: 0.5 * jax.random.normal(key, a.shape, dtype), cell.initial_carry(batch_shape)
    )


@pytest.mark.parametrize(
    "name,method,reverse",
    [("gru", "quasi_deer", False), ("lstm", "quasi_deer", True), ("user", "deer", False)],
)  # fmt: skip
def test_gradients_equal_sequential(name, method, reverse):
    cell, params, xs, key = _setup(name, jax.random.PRNGKey(4))
    carry = _random_carry(cell, key)
    lengths, mask, resets = random_flags(jax.random.PRNGKey(5), (2,), TIME)
    flags = dict(seq_lengths=lengths, mask=mask, resets=resets, reverse=reverse)
    grad = lambda m: jax.jit(jax.grad(functools.partial(_loss, cell, m, flags), (0, 1, 2)))(
        params, xs, carry
    )
    assert_trees_close(grad(method), grad("sequential"), atol=2e-4, rtol=1e-4)


def test_check_grads_float64():
    """quasi-DEER's parallel adjoint (DEER's is compared with the scan in float32 above)."""
    method = "quasi_deer"
    with jax.enable_x64(True):
        cell, params, xs, key = _setup("gru", jax.random.PRNGKey(6), (2,), jnp.float64)
        xs = xs[:, :5]
        carry = _random_carry(cell, key, dtype=jnp.float64)
        resets = jnp.zeros((2, 5), bool).at[0, 2].set(True)
        flags = dict(seq_lengths=jnp.array([5, 3]), resets=resets)
        loss = jax.jit(functools.partial(_loss, cell, method, flags))
        check_grads(loss, (params, xs, carry), 1, modes=["rev"], atol=1e-6, rtol=1e-6, eps=1e-6)


def test_convergence_report():
    cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(7))
    run = jax.jit(
        lambda m: jaxrnn.unroll(cell, params, xs, method=m, return_info=True), static_argnums=0
    )
    _, _, quasi = run("quasi_deer")
    _, _, deer = run("deer")
    _, _, seq = run("sequential")
    assert bool(quasi.converged) and bool(deer.converged) and bool(seq.converged)
    assert 1 <= int(deer.iterations) <= int(quasi.iterations) <= TIME
    assert float(quasi.residual) <= 1e-5 and float(deer.residual) <= 1e-5
    assert int(seq.iterations) == 0 and float(seq.residual) == 0.0


def test_tighter_tol_takes_more_iterations_and_damping_keeps_the_solution():
    cell, params, xs, _ = _setup("lstm", jax.random.PRNGKey(8))
    run = lambda **kw: jax.jit(
        functools.partial(jaxrnn.unroll, cell, method="quasi_deer", return_info=True, **kw)
    )(params, xs)
    ys_loose, _, loose = run(tol=1e-2)
    ys_tight, _, tight = run(tol=1e-6)
    ys_damped, _, damped = run(tol=1e-6, damping=0.5)
    want, _ = jaxrnn.unroll(cell, params, xs)
    assert int(loose.iterations) < int(tight.iterations)
    assert bool(damped.converged) and int(damped.iterations) >= int(tight.iterations)
    np.testing.assert_allclose(ys_tight, want, atol=1e-5)
    np.testing.assert_allclose(ys_damped, want, atol=1e-5)


class TestNonConvergence:
    """One Newton iteration cannot solve 11 steps of a GRU: every policy must say so."""

    @pytest.fixture
    def problem(self):
        cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(9))
        want = jaxrnn.unroll(cell, params, xs)
        run = lambda policy: jaxrnn.unroll(
            cell, params, xs, method="quasi_deer", max_iters=1, on_nonconvergence=policy,
            return_info=True,
        )  # fmt: skip
        return run, want

    def test_warn(self, problem):
        run, want = problem
        with pytest.warns(RuntimeWarning, match="did not converge in 1 iterations"):
            ys, _, info = run("warn")
            jax.block_until_ready(ys)
        assert not bool(info.converged) and int(info.iterations) == 1
        assert float(info.residual) > 1e-5
        assert not np.allclose(ys, want[0], atol=1e-4)

    def test_raise(self, problem):
        run, _ = problem
        with pytest.raises(Exception, match="did not converge"):
            jax.block_until_ready(run("raise"))

    def test_nan(self, problem):
        run, _ = problem
        ys, carry, info = run("nan")
        assert not bool(info.converged)
        assert bool(jnp.all(jnp.isnan(ys))) and bool(jnp.all(jnp.isnan(carry)))

    def test_sequential_fallback_is_exact_with_gradients(self, problem):
        run, want = problem
        ys, carry, info = run("sequential")
        assert not bool(info.converged)
        assert_trees_close((ys, carry), want, atol=1e-6)
        cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(9))
        loss = lambda m, **kw: (
            lambda p: jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, xs, method=m, **kw)[0]))
        )
        got = jax.jit(jax.grad(loss("quasi_deer", max_iters=1, on_nonconvergence="sequential")))
        want = jax.jit(jax.grad(loss("sequential")))
        assert_trees_close(got(params), want(params), atol=1e-5)


def test_auto_choice():
    gru, mingru = jaxrnn.gru(4), jaxrnn.mingru(4)
    resolve = parallel.resolve_method
    assert resolve(gru, "auto", 100_000, backend="cpu") == "sequential"
    assert resolve(mingru, "auto", 100_000, backend="cpu") == "sequential"
    assert resolve(gru, "auto", 100, backend="gpu") == "sequential"
    assert resolve(gru, "auto", 100_000, backend="gpu") == "quasi_deer"
    assert resolve(mingru, "auto", 100_000, backend="tpu") == "associative"
    assert resolve(gru, "deer", 10, backend="cpu") == "deer"
    if jax.default_backend() == "cpu":
        cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(10))
        got = jaxrnn.unroll(cell, params, xs, method="auto", return_info=True)
        want = jaxrnn.unroll(cell, params, xs)
        assert int(got[2].iterations) == 0  # the sequential scan ran
        assert_trees_close(got[:2], want, atol=0.0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="newton"), ValueError, "method must be one of"),
        (dict(method="quasi_deer", on_nonconvergence="ignore"), ValueError, "on_nonconvergence"),
        (dict(method="deer", max_iters=0), ValueError, "max_iters must be an int >= 1, got 0"),
        (dict(method="deer", tol=-1.0), ValueError, "tol must be a positive float"),
        (dict(method="quasi_deer", damping=-0.1), ValueError, "damping must be a float >= 0"),
        (dict(method="associative"), ValueError, "method='associative' needs a cell whose"),
        (dict(method="quasi_deer", remat=True), ValueError, "remat applies to method='seq"),
    ],
)
def test_bad_options(kwargs, error, match):
    cell, params, xs, _ = _setup("gru", jax.random.PRNGKey(11))
    with pytest.raises(error, match=match):
        jaxrnn.unroll(cell, params, xs, **kwargs)


def test_complex_carry_is_refused_by_newton_methods():
    cell = jaxrnn.lru(4, 2)
    params = cell.init(jax.random.PRNGKey(0), INPUT)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, TIME, INPUT))
    with pytest.raises(TypeError, match="needs a real floating-point carry.*complex64"):
        jaxrnn.unroll(cell, params, xs, method="quasi_deer")


def test_vmap_over_batch_equals_batched():
    cell, params, xs, _ = _setup("lstm", jax.random.PRNGKey(12))
    run = lambda x: jaxrnn.unroll(cell, params, x, method="quasi_deer")
    # Each vmapped row stops at its own convergence: equal to within the tolerance.
    assert_trees_close(jax.jit(jax.vmap(run))(xs), jax.jit(run)(xs), atol=5e-5)
