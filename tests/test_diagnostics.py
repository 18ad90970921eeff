"""Gradient diagnostics agree with jax.grad taken step by step, and the plots are written."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import jaxrnn
from jaxrnn import diagnostics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, B, F, H = 6, 2, 3, 4


@pytest.fixture(params=["elman", "lstm", "gru"])
def case(request):
    """A cell with random float64 params and fresh random inputs and readout weights."""
    with jax.enable_x64(True):
        cell = getattr(jaxrnn, request.param)(H)
        k1, k2, k3 = jax.random.split(jax.random.PRNGKey(hash(request.param) % 1000), 3)
        params = cell.init(k1, F, dtype=jnp.float64)
        xs = jax.random.normal(k2, (B, T, F), jnp.float64)
        weights = jax.random.normal(k3, (T, H), jnp.float64)
        yield cell, params, xs, weights


def _loss(weights):
    def loss_fn(ys, carry):
        # Every step's output and the final carry count, nonlinearly.
        h = jax.tree_util.tree_leaves(carry)[0]
        return jnp.sum(jnp.sin(ys) * weights) + 0.5 * jnp.sum(h**2)

    return loss_fn


def _with_h(carry, h):
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    return treedef.unflatten([h, *leaves[1:]])


def _reference_grads(cell, params, xs, loss_fn):
    """dL/dh_t for every t by a separate jax.grad per step, over a Python loop of cell.step."""
    carry, carries, ys = cell.initial_carry((B,), xs.dtype), [], []
    for t in range(T):
        carry, y = cell.step(params, carry, xs[:, t])
        carries.append(carry)
        ys.append(y)
    grads = []
    for t in range(T):

        def loss_from(h, t=t):
            c = _with_h(carries[t], h)
            outputs = [*ys[:t], h]
            for s in range(t + 1, T):
                c, y = cell.step(params, c, xs[:, s])
                outputs.append(y)
            return loss_fn(jnp.stack(outputs, axis=1), c)

        grads.append(jax.grad(loss_from)(jax.tree_util.tree_leaves(carries[t])[0]))
    return jnp.stack(grads)


def test_hidden_state_grads_match_jax_grad_per_step(case):
    cell, params, xs, weights = case
    with jax.enable_x64(True):
        loss_fn = _loss(weights)
        loss, grads = diagnostics.hidden_state_grads(cell, params, xs, loss_fn)
        expected = _reference_grads(cell, params, xs, loss_fn)
        ys, final = jaxrnn.unroll(cell, params, xs)
        np.testing.assert_allclose(loss, loss_fn(ys, final), rtol=1e-12)
        h_grads = jax.tree_util.tree_leaves(grads)[0]
        np.testing.assert_allclose(h_grads, expected, rtol=1e-10, atol=1e-12)
        norms = diagnostics.grad_norms(cell, params, xs, loss_fn)
        np.testing.assert_allclose(norms, jnp.sqrt(jnp.sum(expected**2, axis=(1, 2))), rtol=1e-10)


def test_jacobian_norms_match_per_step_jacobians(case):
    cell, params, xs, _ = case
    with jax.enable_x64(True):
        norms = diagnostics.jacobian_norms(cell, params, xs)
        assert norms.shape == (B, T)
        for b in range(B):
            carry = cell.initial_carry((), xs.dtype)
            for t in range(T):
                flat, unravel = ravel_pytree(carry)

                def f(v, t=t, b=b, unravel=unravel):
                    return ravel_pytree(cell.step(params, unravel(v), xs[b, t])[0])[0]

                jac = jax.jacrev(f)(flat)
                np.testing.assert_allclose(norms[b, t], np.linalg.norm(jac, 2), rtol=1e-9)
                carry, _ = cell.step(params, carry, xs[b, t])


def test_elman_gradient_vanishes_geometrically_with_small_weights():
    cell = jaxrnn.elman(8, recurrent_init=jaxrnn.initializers.orthogonal(0.5))
    params = cell.init(jax.random.PRNGKey(0), 2)
    xs = jax.random.normal(jax.random.PRNGKey(1), (1, 30, 2))
    norms = diagnostics.grad_norms(cell, params, xs, lambda ys, h: jnp.sum(ys[:, -1]))
    # |dh_t/dh_{t-1}| <= 0.5 * max tanh' <= 0.5, so each step back at least halves the norm.
    ratios = np.asarray(norms[:-1] / norms[1:])
    assert np.all(ratios <= 0.5 + 1e-6)


def test_plots_are_written(tmp_path):
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 20)]
    paths = [
        diagnostics.plot_loss_curves({"a": records}, str(tmp_path / "loss.png")),
        diagnostics.plot_grad_norms(
            {"elman": np.logspace(-8, 0, 10), "lstm": np.logspace(-2, 0, 10)},
            str(tmp_path / "grads.png"),
            jacobian_norms={"elman": np.full(10, 0.5)},
        ),
        diagnostics.plot_tanh(str(tmp_path / "tanh.png")),
    ]
    for path in paths:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_import_does_not_load_matplotlib():
    code = (
        "import sys, jaxrnn, jaxrnn.train, jaxrnn.tasks, jaxrnn.diagnostics, jaxrnn.cli; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'; "
        "assert jaxrnn.train.fit and jaxrnn.diagnostics.grad_norms"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
