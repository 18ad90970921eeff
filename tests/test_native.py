"""The native CPU kernel (`jaxrnn._src.native`): the recurrence of the built-in cells on CPU.

Its outputs against the specification (a Python loop over ``cell.step``) in every runner
mode, over hidden sizes and thread counts that reach its vector and scalar code and its
chunking; derivatives through it (it runs the gradient pass's primal and its backward loop)
against XLA's scan; its placement; and its fallback to XLA's loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_CELLS,
    INPUT_SIZE,
    MODES,
    TIME,
    assert_trees_close,
    fast_loss,
    fresh_key,
    mode_inputs,
    random_carry,
    reference_unroll,
)

import jaxrnn
from jaxrnn._src import fastpath, native

if jax.default_backend() != "cpu" or native._compiler() is None:
    pytest.skip(
        "the native kernel needs the CPU backend and a C++ compiler", allow_module_level=True
    )


MAIN = ("elman_tanh", "elman_relu", "lstm", "gru")
SHIPPED_GRADIENT_KINDS = fastpath.NATIVE_GRADIENT_KINDS


@pytest.fixture(autouse=True)
def every_gradient_on_the_kernels(monkeypatch):
    """The Elman cell's gradient pass runs XLA's loops by default (measured faster); here
    every kind's runs the kernels, so that both are tested for all of them."""
    monkeypatch.setattr(fastpath, "NATIVE_GRADIENT_KINDS", tuple(native.KIND_CODES))


def forward(cell, params, xs, carry=None, **kwargs):
    """The forward-only pass, jitted afresh (so it is traced under the current settings)."""
    return jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c, **kwargs))(params, xs, carry)


def test_the_kernel_builds_here():
    assert native.available()
    path = native._build(native._compiler())
    assert path.exists() and native._build(native._compiler()) == path  # cached


def test_both_passes_run_the_kernel():
    cell = jaxrnn.lstm(8)
    params = cell.init(fresh_key(), 3)
    xs = jax.random.normal(fresh_key(), (2, 5, 3))
    fwd = jax.jit(lambda p, x: jaxrnn.unroll(cell, p, x)).lower(params, xs).as_text()
    assert native.TARGET in fwd
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x)[0]))
    text = jax.jit(grad).lower(params, xs).as_text()
    assert native.TARGET in text and native.TARGET_BACKWARD in text
    # forward mode runs XLA's tangent loop (the backward kernel is reverse mode's transpose)
    jvp = lambda p, x: jax.jvp(lambda x: jaxrnn.unroll(cell, p, x)[0], (x,), (x,))  # noqa: E731
    assert native.TARGET_BACKWARD not in jax.jit(jvp).lower(params, xs).as_text()
    assert fastpath.placements("lstm", 2, 8, jnp.float32, backend="cpu") == ("native", "native")


def test_the_elman_gradient_pass_keeps_xla_by_default(monkeypatch):
    monkeypatch.setattr(fastpath, "NATIVE_GRADIENT_KINDS", SHIPPED_GRADIENT_KINDS)
    assert SHIPPED_GRADIENT_KINDS == ("lstm", "gru")
    for kind in ("elman_tanh", "elman_relu"):
        assert fastpath.placements(kind, 2, 8, jnp.float32, backend="cpu") == ("native", "hoisted")
    cell = jaxrnn.elman(8)
    params = cell.init(fresh_key(), 3)
    xs = jax.random.normal(fresh_key(), (2, 5, 3))
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x)[0]))
    text = jax.jit(grad).lower(params, xs).as_text()
    assert native.TARGET not in text and native.TARGET_BACKWARD not in text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": jnp.float64},
        {"dtype": jnp.bfloat16},
        {"dtype": jnp.float32, "matmul_dtype": jnp.bfloat16},
        {"dtype": jnp.float32, "sharded": True},
        {"dtype": jnp.float32, "empty": True},
        {"dtype": jnp.float32, "backend": "gpu"},
    ],
)
def test_placement_keeps_xla_where_the_kernel_does_not_apply(kwargs):
    assert "native" not in fastpath.placements("gru", 4, 8, **kwargs)


# Every runner mode for the main cells, at a hidden size of 40 on two threads: two chunks of
# units (16 and 24), so whole vectors and the scalar tail, and the step's hand-off.
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cell_name", MAIN)
def test_kernel_equals_the_loop_over_step_in_every_mode(cell_name, mode, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    actual = forward(cell, params, xs, carry, **kwargs)
    kwargs.pop("unroll", None)
    assert_trees_close(actual, reference_unroll(cell, params, xs, carry, **kwargs))


def _loss(cell, kwargs):
    return lambda params, xs, carry: fast_loss(cell, params, xs, carry, kwargs)


def _derivatives(cell, params, xs, carry, kwargs):
    """Reverse mode, forward mode and a Hessian-vector product (second order) of a loss,
    jitted afresh; the kernel runs the primal of the first two."""
    loss = _loss(cell, kwargs)
    args = (params, xs, carry)
    tangents = tuple(jax.tree_util.tree_map(lambda a: jnp.cos(3.0 * a), a) for a in args)

    def all_three(*args):
        grads = jax.grad(loss, argnums=(0, 1, 2))(*args)
        jvp = jax.jvp(loss, args, tangents)
        hvp = jax.jvp(lambda *a: jax.grad(loss)(*a), args, tangents)[1]
        return grads, jvp, hvp

    return jax.jit(all_three)(*args)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cell_name", MAIN)
def test_derivatives_through_the_kernel_equal_xla(cell_name, mode, monkeypatch):
    """The gradient pass runs the kernel for the primal and its residuals and the backward
    kernel for its backward loop; XLA's scan (itself tested against the reference in float64,
    `test_fastpath.py`) gives the same derivatives of first and second order."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    carry = random_carry(cell, xs.shape[:-2] if not kwargs.get("time_major") else xs.shape[1:-1])
    grad_fn = jax.grad(_loss(cell, kwargs))
    text = jax.jit(grad_fn).lower(params, xs, carry).as_text()
    assert native.TARGET in text and native.TARGET_BACKWARD in text
    actual = _derivatives(cell, params, xs, carry, kwargs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    text = jax.jit(lambda *a: grad_fn(*a)).lower(params, xs, carry).as_text()
    assert native.TARGET not in text and native.TARGET_BACKWARD not in text
    assert_trees_close(actual, _derivatives(cell, params, xs, carry, kwargs), rtol=2e-5, atol=2e-5)


# Sizes and thread counts: one thread with scalar code only (5), exactly one vector (16),
# uneven chunks (40 on 2, 50 on 3), more threads than cores (48 on 3, 64 on 4), and the
# defaults (auto threads) at sizes that take one (5) and two (130) threads; no bias.
@pytest.mark.parametrize(
    "hidden, threads",
    [(5, 0), (16, 1), (40, 2), (50, 3), (48, 3), (64, 4), (130, 0)],
)
@pytest.mark.parametrize("cell_name", sorted(FAST_CELLS))
def test_kernel_over_sizes_and_threads(cell_name, hidden, threads, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    cell = FAST_CELLS[cell_name](hidden)
    params = cell.init(fresh_key(), 7)
    xs = jax.random.normal(fresh_key(), (9, TIME, 7))
    carry = random_carry(cell, (9,))
    lengths = jnp.array([TIME, 0, 3, 1, 5, TIME, 2, 4, 6])
    resets = jax.random.bernoulli(fresh_key(), 0.3, (9, TIME))
    kwargs = {"seq_lengths": lengths, "resets": resets}
    actual = forward(cell, params, xs, carry, **kwargs)
    assert_trees_close(actual, reference_unroll(cell, params, xs, carry, **kwargs))


def _grads(cell, params, xs, carry, **kwargs):
    loss = _loss(cell, kwargs)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)


@pytest.mark.parametrize("hidden, threads", [(5, 0), (40, 2), (50, 3), (64, 4), (130, 0)])
@pytest.mark.parametrize("cell_name", sorted(FAST_CELLS))
def test_backward_kernel_over_sizes_and_threads(cell_name, hidden, threads, monkeypatch):
    """The backward loop's chunks are those of the forward one: scalar code only (5), uneven
    chunks (40 on 2, 50 on 3), more threads than cores (64 on 4), two by default (130); with
    lengths (so masked steps) and resets, against XLA's transposed loop."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    cell = FAST_CELLS[cell_name](hidden)
    params = cell.init(fresh_key(), 7)
    xs = jax.random.normal(fresh_key(), (9, TIME, 7))
    carry = random_carry(cell, (9,))
    kwargs = {
        "seq_lengths": jnp.array([TIME, 0, 3, 1, 5, TIME, 2, 4, 6]),
        "resets": jax.random.bernoulli(fresh_key(), 0.3, (9, TIME)),
    }
    actual = _grads(cell, params, xs, carry, **kwargs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, _grads(cell, params, xs, carry, **kwargs), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cell_name", MAIN)
def test_duplicated_chunks_publish_once(cell_name, monkeypatch):
    """Every thread computes every chunk not yet published (a thread the OS preempted gets
    its chunk computed by the others this way): one copy wins, results unchanged."""
    monkeypatch.setenv("JAXRNN_NATIVE_DUPLICATE", "1")
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "3")
    cell = FAST_CELLS[cell_name](48)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, "everything")
    actual = forward(cell, params, xs, carry, **kwargs)
    grads = _grads(cell, params, xs, carry, **kwargs)  # the backward kernel duplicates too
    kwargs.pop("unroll", None)
    assert_trees_close(actual, reference_unroll(cell, params, xs, carry, **kwargs))
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(grads, _grads(cell, params, xs, carry, **kwargs), rtol=2e-5, atol=2e-5)


def test_thread_counts_agree_at_a_benchmark_size(monkeypatch):
    """B16 T64 H128 LSTM: one thread against two and three (the kernel's own partitions)."""
    cell = jaxrnn.lstm(128)
    params = cell.init(fresh_key(), 32)
    xs = jax.random.normal(fresh_key(), (16, 64, 32))
    outs = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("JAXRNN_NATIVE_THREADS", threads)
        outs[threads] = forward(cell, params, xs), _grads(cell, params, xs, None)
    assert_trees_close(outs["2"], outs["1"], rtol=1e-6, atol=1e-6)
    assert_trees_close(outs["3"], outs["1"], rtol=1e-6, atol=1e-6)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(forward(cell, params, xs), outs["1"][0])  # XLA's loop


def test_saturated_gates_and_nan_match_xla(monkeypatch):
    """Inputs 50× larger drive every sigmoid and tanh to its limits (the kernel's exp clamps
    its argument); a NaN in one row stays in that row, as in XLA."""
    cell = jaxrnn.lstm(32)
    params = cell.init(fresh_key(), 4)
    xs = 50.0 * jax.random.normal(fresh_key(), (3, TIME, 4))
    xs = xs.at[1, 2, 0].set(jnp.nan)
    actual = forward(cell, params, xs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    expected = forward(cell, params, xs)
    ys = np.asarray(actual[0])
    np.testing.assert_array_equal(np.isnan(ys), np.isnan(np.asarray(expected[0])))
    assert np.isnan(ys[1, 2:]).all() and not np.isnan(ys[[0, 2]]).any()
    assert_trees_close(actual, expected)


def test_vmap_over_sequences():
    cell = jaxrnn.gru(24)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (5, TIME, INPUT_SIZE))
    fn = jax.jit(jax.vmap(lambda x: jaxrnn.unroll(cell, params, x)[0]))
    np.testing.assert_allclose(fn(xs), reference_unroll(cell, params, xs)[0], rtol=1e-5, atol=1e-5)


def test_vmap_of_the_gradient(monkeypatch):
    """Per-example gradients: under `vmap` the backward loop runs XLA's transpose (`linear`'s
    batching rule), the forward loop the kernel once per example."""
    cell = jaxrnn.lstm(24)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (5, 3, TIME, INPUT_SIZE))

    def per_example(p, x):
        return jax.vmap(jax.grad(lambda p, x: jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x)[0]))),
                        in_axes=(None, 0))(p, x)  # fmt: skip

    actual = jax.jit(per_example)(params, xs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(per_example)(params, xs), rtol=2e-5, atol=2e-5)


def test_without_a_compiler_it_warns_once_and_keeps_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable.*no C"):
            assert not native.available()
        assert not native.available()  # the warning came once
        assert "native" not in fastpath.placements("lstm", 2, 8, jnp.float32, backend="cpu")
        cell = jaxrnn.lstm(8)
        params = cell.init(fresh_key(), 3)
        xs = jax.random.normal(fresh_key(), (2, 5, 3))
        assert_trees_close(forward(cell, params, xs), reference_unroll(cell, params, xs))
    finally:
        native._load.cache_clear()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert not native.enabled() and not native.available()
    assert fastpath.placements("lstm", 2, 8, jnp.float32, backend="cpu") == ("hoisted", "fused")


@pytest.mark.parametrize("value", ["two", "-1"])
def test_a_bad_thread_count_is_named(value, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", value)
    cell = jaxrnn.elman(4)
    params = cell.init(fresh_key(), 3)
    xs = jax.random.normal(fresh_key(), (2, 5, 3))
    msg = f"JAXRNN_NATIVE_THREADS must be a non-negative integer, got '{value}'"
    with pytest.raises(ValueError, match=msg):
        forward(cell, params, xs)
