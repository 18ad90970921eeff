"""The native CPU kernel (`jaxrnn._src.native`): the recurrence of the built-in cells on CPU.

Its outputs against the specification (a Python loop over ``cell.step``) in every runner
mode, over hidden sizes and thread counts that reach its vector and scalar code and its
chunking; derivatives through it (it runs the gradient pass's primal and its backward loop)
against XLA's scan; its placement; and its fallback to XLA's loop.
"""

from __future__ import annotations

import os
import pathlib
import platform
import re
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_CELLS,
    INPUT_SIZE,
    MODES,
    TIME,
    assert_gradient_kernel,
    assert_sums_close,
    assert_trees_close,
    check_gradient_kernel_under_vmap,
    fast_loss,
    fresh_key,
    gradient_kernel_at_every_size,
    gradient_kernel_operands,
    gradient_kernel_reference,
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
ROOT = pathlib.Path(__file__).resolve().parent.parent
# What `test_the_avx2_build_equals_the_reference` runs again on the AVX2 build (about
# 100 s there: the derivatives in two modes only, their compiles take most of the time).
PORTABLE_TESTS = (
    "test_kernel_equals_the_loop_over_step_in_every_mode",
    "test_kernel_over_sizes_and_threads",
    "test_backward_kernel_over_sizes_and_threads",
    "test_saturated_gates_and_nan_match_xla",
    "test_the_float32_gradient_kernel",
    "test_panel_blocks_give_the_same_sums",
    "(test_derivatives_through_the_kernel_equal_xla and everything)",
)
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


def test_the_elman_gradient_pass_keeps_xla_below_a_batch_of_8_and_256_units(monkeypatch):
    monkeypatch.setattr(fastpath, "NATIVE_GRADIENT_KINDS", SHIPPED_GRADIENT_KINDS)
    assert SHIPPED_GRADIENT_KINDS == ("lstm", "gru")
    assert fastpath.NATIVE_GRADIENT_MIN_BATCH == {"elman_tanh": 8, "elman_relu": 8}
    assert fastpath.NATIVE_GRADIENT_MIN_HIDDEN == {"elman_tanh": 256, "elman_relu": 256}
    for kind in ("elman_tanh", "elman_relu"):
        for batch, hidden, gradient in ((7, 8, "hoisted"), (8, 8, "native"),
                                        (7, 255, "hoisted"), (1, 256, "native")):  # fmt: skip
            placement = fastpath.placements(kind, batch, hidden, jnp.float32, backend="cpu")
            assert placement == ("native", gradient)
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x)[0]))
    for batch, hidden, on_kernels in ((2, 8, False), (8, 8, True), (2, 256, True)):
        cell = jaxrnn.elman(hidden)
        params = cell.init(fresh_key(), 3)
        xs = jax.random.normal(fresh_key(), (batch, 5, 3))
        text = jax.jit(grad).lower(params, xs).as_text()
        assert (native.TARGET in text and native.TARGET_BACKWARD in text) == on_kernels
        assert (native.TARGET in text or native.TARGET_BACKWARD in text) == on_kernels


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dtype": jnp.float64},
        {"dtype": jnp.bfloat16},
        {"dtype": jnp.float32, "matmul_dtype": jnp.float16},  # bfloat16: test_native_bf16
        {"dtype": jnp.float32, "sharded": True},
        {"dtype": jnp.float32, "empty": True},
        {"dtype": jnp.float32, "backend": "gpu"},
    ],
)
def test_placement_keeps_xla_where_the_kernel_does_not_apply(kwargs):
    assert "native" not in fastpath.placements("gru", 4, 8, **kwargs)


@pytest.fixture(params=["in_kernel", "hoisted"])
def projection(request, monkeypatch):
    """Where the input projection runs: in each step of the kernel, or before it, one matmul
    (`native.HOIST_TABLE` made to say so either way)."""
    table = ((0, 1 << 30),) if request.param == "hoisted" else ()
    monkeypatch.setattr(native, "HOIST_TABLE", table)
    return request.param


def _hoisted(text):
    """Whether lowered text passes the kernel a ``W_x`` of no rows (its projected inputs)."""
    return re.search(r"tensor<0x\d+xf32>", text) is not None


def test_the_shipped_hoisting_table():
    """At a small batch with a large ``W_x``; not at ``H = 128``, nor at a larger batch;
    from a smaller ``W_x`` where a core's L2 holds 2 MiB; where it holds less, at most 4 rows
    only at one row from 2^20 elements of ``W_x`` (the kernel projects blocks of steps
    itself there)."""
    assert native.HOIST_TABLE == native._hoist_table()
    assert native.hoists(1, 1024, 1024, 4) and native.hoists(16, 1024, 1024, 4)
    assert native.hoists(1, 1024, 1024, 1) and native.hoists(1, 512, 512, 4)
    assert not native.hoists(64, 1024, 1024, 4) and not native.hoists(32, 512, 512, 4)
    assert not native.hoists(8, 256, 256, 4)
    assert not any(native.hoists(b, 128, 128, 4) for b in (1, 2, 4, 16))
    assert not native.hoists(1, 64, 64, 1) and not native.hoists(1, 32, 32, 3)
    large_l2 = native.HOIST_TABLE == native.HOIST_TABLES["l2_2mib"]
    assert native.hoists(4, 512, 512, 4) == large_l2
    assert native.hoists(4, 512, 512, 1) == large_l2
    assert native.hoists(2, 256, 256, 4) == large_l2
    assert native.hoists(8, 512, 512, 4) == large_l2
    assert native.hoists(16, 512, 512, 3) == large_l2
    assert native.hoists(8, 1024, 1024, 1) == large_l2


def test_the_l2_size_is_read(monkeypatch):
    l2 = native._l2_bytes()
    assert l2 is None or l2 >= 64 << 10
    monkeypatch.setattr(native, "_l2_bytes", lambda: 2 << 20)
    assert native._hoist_table() == native.HOIST_TABLES["l2_2mib"]
    monkeypatch.setattr(native, "_l2_bytes", lambda: 1 << 20)
    assert native._hoist_table() == native.HOIST_TABLES["l2_under_2mib"]
    monkeypatch.setattr(native, "_l2_bytes", lambda: None)
    assert native._hoist_table() == native.HOIST_TABLES["l2_under_2mib"]


# Every runner mode for the main cells, at a hidden size of 40 on two threads: two chunks of
# units (16 and 24), so whole vectors and the scalar tail, and the step's hand-off; the input
# projection in the kernel and before it.
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("cell_name", MAIN)
def test_kernel_equals_the_loop_over_step_in_every_mode(cell_name, mode, projection, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    run = jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c, **kwargs))
    assert _hoisted(run.lower(params, xs, carry).as_text()) == (projection == "hoisted")
    actual = run(params, xs, carry)
    kwargs.pop("unroll", None)
    assert_trees_close(actual, reference_unroll(cell, params, xs, carry, **kwargs))


# The input projection in the kernel, a block of steps at once where a step has at most 4
# rows (16 rows a block, `projection_block` in the C++): one sequence of 37 steps at 1-5 rows
# (blocks of 16, 8, 5 and 4 steps, each with a shorter last one, and none at 5 rows), and two
# runs of a vmap (2-10 rows a step, not one block); forward and reverse; chunks of units on
# 3 threads, each thread also computing the others' chunks (the block recomputed where a
# thread changes chunks); the gradient pass against XLA's loops.
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru"])
def test_blocked_input_projection_over_batches_and_lengths(cell_name, batch, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "3")
    monkeypatch.setattr(native, "HOIST_TABLE", ())
    cell = FAST_CELLS[cell_name](48)
    params = cell.init(fresh_key(), 7)
    xs = jax.random.normal(fresh_key(), (2, batch, 37, 7))
    lengths = jnp.asarray(np.resize([37, 20, 1, 33, 16], (2, batch)), jnp.int32)
    carry = random_carry(cell, (batch,))
    for reverse in (False, True):
        kwargs = {"seq_lengths": lengths[0], "reverse": reverse}

        def run(p, x, c, n, r=reverse):
            return jaxrnn.unroll(cell, p, x, c, seq_lengths=n, reverse=r)

        one = jax.jit(run)
        assert not _hoisted(one.lower(params, xs[0], carry, lengths[0]).as_text())
        undisturbed = one(params, xs[0], carry, lengths[0])
        assert_trees_close(undisturbed, reference_unroll(cell, params, xs[0], carry, **kwargs))
        runs = jax.jit(jax.vmap(run, in_axes=(None, 0, None, 0)))(params, xs, carry, lengths)
        for k in range(2):
            want = reference_unroll(
                cell, params, xs[k], carry, seq_lengths=lengths[k], reverse=reverse
            )
            assert_trees_close(jax.tree_util.tree_map(lambda a, k=k: a[k], runs), want)
        monkeypatch.setenv("JAXRNN_NATIVE_DUPLICATE", "1")
        # A new function, so that it is traced again and the kernel call takes the setting
        # (jit caches by function: `one` would run its first compilation).
        duplicated = jax.jit(lambda *a: run(*a))(params, xs[0], carry, lengths[0])
        for got, want in zip(
            jax.tree_util.tree_leaves(duplicated), jax.tree_util.tree_leaves(undisturbed)
        ):
            np.testing.assert_array_equal(got, want)
        monkeypatch.delenv("JAXRNN_NATIVE_DUPLICATE")
        grads = _grads(cell, params, xs[0], carry, **kwargs)
        monkeypatch.setenv("JAXRNN_NATIVE", "0")
        expected = _grads(cell, params, xs[0], carry, **kwargs)
        monkeypatch.delenv("JAXRNN_NATIVE")
        assert_trees_close(grads, expected, rtol=2e-5, atol=2e-5)


# Weights too large to stay in L2, which the kernels' matmuls prefetch block by block
# (`gemm_acc`, from 1 MiB of a chunk's weights): LSTM and GRU of 530 units on two threads,
# chunks of 256 and 274 units (32-column panels, then 8 columns left over, or for the GRU a
# 16-column panel and 6), inputs of 301 (k-blocks of 256 and 45), 13 rows (row tiles of 8, 4
# and 1); the forward pass equals the loop over `step`, the gradient XLA's loops.
@pytest.mark.parametrize("projection", ["in_kernel", "hoisted"])
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_weights_larger_than_a_cache(cell_name, projection, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    monkeypatch.setattr(native, "HOIST_TABLE", ((0, 1 << 30),) if projection == "hoisted" else ())
    cell = FAST_CELLS[cell_name](530)
    params = cell.init(fresh_key(), 301)
    xs = jax.random.normal(fresh_key(), (13, 3, 301))
    carry = random_carry(cell, (13,))
    run = jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c))
    assert _hoisted(run.lower(params, xs, carry).as_text()) == (projection == "hoisted")
    assert_trees_close(run(params, xs, carry), reference_unroll(cell, params, xs, carry))
    grad = jax.jit(jax.grad(lambda *a: fast_loss(cell, *a, {}), argnums=(0, 1, 2)))
    assert _hlo(grad, params, xs, carry)[0] == [native.TARGET, native.TARGET_BACKWARD]
    actual = grad(params, xs, carry)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    expected = jax.jit(jax.grad(lambda *a: fast_loss(cell, *a, {}), argnums=(0, 1, 2)))
    assert_trees_close(actual, expected(params, xs, carry), rtol=2e-5, atol=2e-5)


# The float32 matmuls run over a panel of W in blocks of rows (`panel_rows` in the C++: 256 where
# L1 has 48 KiB or more, else all rows at once), the first block's tiles starting from the
# biases. Blocks of 16, 100 and 256 rows and all rows (K = 290 and 300 in the forward pass,
# 1200 in the backward one; 9 rows, so an odd last one; chunks of 144 and 156 units, so
# 16-column panels and, for the GRU's forward and the backward, 4 and 12 columns left over)
# give the sums of the kernel's own choice bit for bit, and the loop over `step`.
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_panel_blocks_give_the_same_sums(cell_name, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    monkeypatch.setattr(native, "HOIST_TABLE", ())
    cell = FAST_CELLS[cell_name](300)
    params = cell.init(fresh_key(), 290)
    xs = jax.random.normal(fresh_key(), (9, 4, 290))
    carry = random_carry(cell, (9,))

    grad = jax.grad(_loss(cell, {}), argnums=(0, 1, 2))

    def both(p, x, c):  # jitted anew per setting, so that the kernel calls take it
        return jaxrnn.unroll(cell, p, x, c), grad(p, x, c)

    assert _hlo(grad, params, xs, carry)[0] == [native.TARGET, native.TARGET_BACKWARD]
    chosen = jax.jit(lambda *a: both(*a))(params, xs, carry)
    assert_trees_close(chosen[0], reference_unroll(cell, params, xs, carry))
    for rows in (16, 100, 256, 1 << 20):
        monkeypatch.setenv("JAXRNN_NATIVE_PANEL_ROWS", str(rows))
        blocked = jax.jit(lambda *a: both(*a))(params, xs, carry)
        for got, want in zip(jax.tree_util.tree_leaves(blocked), jax.tree_util.tree_leaves(chosen)):
            np.testing.assert_array_equal(got, want)


# Batch-major callers (the default) and time-major ones: the forward pass's kernel reads and
# writes the caller's layout, so XLA cancels the runner's moves to time-major and back.
LAYOUT_MODES = [
    "batch_major", "two_batch_dims", "mask", "everything", "no_batch", "time_major",
    "everything_time_major_reverse",
]  # fmt: skip


def _layout_case(cell_name, mode):
    """``unroll`` of a main cell in a runner mode, and its ``(params, xs, carry)``."""
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    return (lambda p, x, c: jaxrnn.unroll(cell, p, x, c, **kwargs)), (params, xs, carry)


@pytest.mark.parametrize("mode", LAYOUT_MODES)
@pytest.mark.parametrize("cell_name", MAIN)
def test_the_forward_pass_moves_no_sequence(cell_name, mode, projection):
    run, args = _layout_case(cell_name, mode)
    text = jax.jit(run).lower(*args).compile().as_text()
    assert native.TARGET in text
    moves = re.findall(r"= f32\[[^\]]*\]\{[^}]*\} (?:transpose|copy)\(", text)
    assert not moves, moves


# The gradient pass too: its kernels read and write the caller's layout, and the input and
# weight gradients' matmuls run on it, so that no sequence moves between the layouts; the
# only copies left of sequence arrays are the weight gradients' transposed operands (rank 2)
# and, for the Elman cell, the loss's cotangent (`cos`) fused with the copy that the backward
# kernel's writing over it asks for.
@pytest.mark.parametrize("mode", LAYOUT_MODES)
@pytest.mark.parametrize("cell_name", MAIN)
def test_the_gradient_pass_moves_no_sequence(cell_name, mode, projection):
    run, args = _layout_case(cell_name, mode)
    grad = jax.grad(lambda *a: jnp.sum(jnp.sin(run(*a)[0])), argnums=(0, 1, 2))
    text = jax.jit(grad).lower(*args).compile().as_text()
    entry = text[text.index("\nENTRY") :]
    assert native.TARGET in entry and native.TARGET_BACKWARD in entry
    moves = re.findall(r"%(\w*(?:transpose|copy)\w*) = f32\[(\d+(?:,\d+){2,})\]", entry)
    assert not [m for m in moves if not m[0].startswith("cosine")], moves


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("save", [False, True])
@pytest.mark.parametrize("kind", sorted(native.KIND_CODES))
def test_the_kernel_takes_either_layout(kind, save, reverse, projection):
    """`native.forward` on ``(batch, time, ·)`` arrays (``batch_major``) gives the outputs,
    carry and residuals of the same call on ``(time, batch, ·)``, moved."""
    assert native.available()  # builds and registers the kernel when this test runs first
    batch, hidden, features = 5, 24, 7
    width = hidden * {"lstm": 4, "gru": 3}.get(kind, 1)
    draw = lambda *shape: jax.random.normal(fresh_key(), shape)  # noqa: E731
    w_x, b_x, w_h, b_in = draw(features, width), draw(width), draw(hidden, width), draw(width)
    carry = (draw(batch, hidden), draw(batch, hidden)) if kind == "lstm" else (draw(batch, hidden),)
    xs = draw(TIME, batch, features)
    if projection == "hoisted":  # the kernel reads the projected inputs
        xs, w_x = fastpath._project(xs, w_x, b_x), None
    mask = jax.random.bernoulli(fresh_key(), 0.7, (TIME, batch))
    resets = jax.random.bernoulli(fresh_key(), 0.3, (TIME, batch))
    args = (w_x, b_x, w_h, b_in, carry)
    expected = native.forward(kind, xs, *args, mask, resets, reverse, save)
    actual = native.forward(
        kind, jnp.swapaxes(xs, 0, 1), *args, mask.T, resets.T, reverse, save, batch_major=True
    )
    moved = jax.tree_util.tree_map(lambda a: jnp.swapaxes(a, 0, 1), (actual[0], actual[2:]))
    assert_trees_close((moved[0], actual[1], moved[1]), (expected[0], expected[1], expected[2:]))


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
    _derivatives_equal_xla(cell_name, mode, monkeypatch)


@pytest.mark.parametrize("mode", ["no_batch", "two_batch_dims", "everything",
                                  "everything_time_major_reverse"])  # fmt: skip
@pytest.mark.parametrize("cell_name", MAIN)
def test_derivatives_with_the_projection_hoisted_equal_xla(cell_name, mode, monkeypatch):
    monkeypatch.setattr(native, "HOIST_TABLE", ((0, 1 << 30),))
    _derivatives_equal_xla(cell_name, mode, monkeypatch)


def _derivatives_equal_xla(cell_name, mode, monkeypatch):
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
    (grads, jvp, hvp) = _derivatives(cell, params, xs, carry, kwargs)
    # Batch-major callers' weight gradients sum the rows in another order than XLA's loop.
    assert_sums_close((actual[0], actual[2]), (grads, hvp), rtol=2e-5, atol=2e-5)
    # The loss and its tangent are sums of about a thousand float32 terms: rounding alone
    # moved one by 5e-5 (relative) once.
    assert_trees_close(actual[1], jvp, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("cell_name", MAIN)
def test_the_backward_kernel_writes_over_its_residual(cell_name):
    """The backward kernel's input cotangent takes the buffer of the residual as wide as it
    (`native.RESIDUAL_WIDTHS`), so the gradient pass allocates one sequence array less; the
    Elman's, whose residual may be the outputs themselves, that of the outputs' cotangent."""
    cell = FAST_CELLS[cell_name](16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (8, TIME, INPUT_SIZE))
    grad = jax.grad(lambda p, x: jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x)[0])), argnums=(0, 1))
    text = jax.jit(grad).lower(params, xs).compile().as_text()
    calls = [line for line in text.splitlines() if native.TARGET_BACKWARD in line]
    operand = 0 if cell_name.startswith("elman") else 3
    alias = f"output_to_operand_aliasing={{{{0}}: ({operand}, {{}})}}"
    assert len(calls) == 1 and alias in calls[0]


def _forward_results(text):
    """The result shapes of the one forward kernel call in compiled HLO ``text``."""
    target = f'custom_call_target="{native.TARGET}"'
    (call,) = [line for line in text.splitlines() if target in line]
    return re.findall(r"f32\[([\d,]*)\]", call.split("custom-call(")[0])


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cell_name", MAIN)
def test_elman_residual_is_the_outputs_without_a_mask(cell_name, masked):
    """Without a mask the Elman's residual ``h`` is its output: the gradient pass's forward
    kernel writes ys and h_in and no residual array. With a mask (ys is zero where h is not)
    and for the other kinds it writes them."""
    cell = FAST_CELLS[cell_name](16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (8, TIME, INPUT_SIZE))
    lengths = jnp.array([TIME, 3, 5, 1, TIME, 2, 4, 6]) if masked else None

    def loss(p, x):
        return jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x, seq_lengths=lengths)[0]))

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile().as_text()
    # ys, h_T, c_T, h_in, then the four residual arrays.
    ys, _, _, h_in, res0, *_ = _forward_results(text)
    assert ys == h_in and ys.endswith(",16")
    expect_empty = cell_name.startswith("elman") and not masked
    assert (res0 == "0") == expect_empty, res0


@pytest.mark.parametrize("jit", [True, False])
@pytest.mark.parametrize("cell_name", MAIN)
def test_one_residual_feeds_two_backward_calls(cell_name, jit, monkeypatch):
    """Two backward calls on the same residuals (a vjp applied twice, in one jitted function
    or eagerly): the buffer the first writes over is not the second's input."""
    cell = FAST_CELLS[cell_name](16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, TIME, INPUT_SIZE))
    cts = jax.random.normal(fresh_key(), (2, 3, TIME, 16))

    def twice(p, x, cts):
        _, pullback = jax.vjp(lambda p, x: jaxrnn.unroll(cell, p, x)[0], p, x)
        return pullback(cts[0]), pullback(cts[1])

    run = jax.jit(twice) if jit else twice
    actual = run(params, xs, cts)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    expected = jax.jit(lambda *a: twice(*a))(params, xs, cts)
    assert_trees_close(actual, expected, rtol=2e-5, atol=2e-5)


def _transparent_huge_pages():
    """The system's transparent-huge-page mode ("always", "madvise", "never"), or None."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found and found.group(1)


NEEDS_HUGE_PAGES = pytest.mark.skipif(
    _transparent_huge_pages() not in ("madvise", "always"),
    reason="the system does not give transparent huge pages",
)


def _thp_faults():
    """Page faults the whole system has served with a huge page so far (/proc/vmstat)."""
    with open("/proc/vmstat") as stats:
        return next(int(line.split()[1]) for line in stats if line.startswith("thp_fault_alloc "))


@pytest.mark.parametrize("cell_name", MAIN)
def test_huge_page_advice_leaves_results_unchanged(cell_name, monkeypatch):
    """Both kernels with and without the advice under their large results (each at least
    4 MiB here): bit for bit the same, forward and gradients."""
    cell = FAST_CELLS[cell_name](128)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (64, 160, INPUT_SIZE))
    outs = {}
    for advice in ("1", "0"):
        monkeypatch.setenv("JAXRNN_NATIVE_HUGEPAGES", advice)
        outs[advice] = forward(cell, params, xs), _grads(cell, params, xs, None)
    jax.tree.map(np.testing.assert_array_equal, outs["1"], outs["0"])


@NEEDS_HUGE_PAGES
def test_fresh_large_results_get_huge_pages(monkeypatch):
    """LSTM B128 T128 H256: the gate slopes, 64 MiB, lie in memory mapped afresh (glibc maps
    every block past 32 MiB), and their faults take huge pages where the system allows."""
    cell = jaxrnn.lstm(256)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (128, 128, INPUT_SIZE))
    loss = lambda p, x: jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x)[0]))  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(grads(params, xs))
    before = _thp_faults()
    jax.block_until_ready(grads(params, xs))
    assert _thp_faults() - before >= 16  # 32 of the 64 MiB at least, in 2 MiB pages


def _minor_faults():
    """Page faults served so far in this process without reading from disk."""
    import resource  # Unix only

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@NEEDS_HUGE_PAGES
def test_results_under_4_mib_in_fresh_memory_get_huge_pages(monkeypatch):
    """A two-layer bidirectional LSTM's gradient, B16 T256 H128: 66 MiB of XLA's temporaries in
    one block that glibc maps afresh in each call, most of the kernels' results 2 MiB, none
    2 MiB-aligned. The advice covers the 2 MiB pages each result touches: with it a call takes
    22-31 huge pages and 1 100-5 900 faults in all (the count depends on where the block
    falls against 2 MiB), without it about 17 000, and with the rule before (only inside
    results of 4 MiB or more) about 10 800. The gradients are the same bit for bit."""
    net = jaxrnn.stack(jaxrnn.lstm(128), 2, bidirectional=True)
    params = net.init(fresh_key(), 128)
    xs = jax.random.normal(fresh_key(), (16, 256, 128))
    loss = lambda p, x: jnp.sum(jnp.sin(net.apply(p, x)[0]))  # noqa: E731
    faults, huge, grads = {}, {}, {}
    for advice in ("0", "1"):
        monkeypatch.setenv("JAXRNN_NATIVE_HUGEPAGES", advice)
        fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
        temp = fn.lower(params, xs).compile().memory_analysis().temp_size_in_bytes
        assert temp > 48 << 20  # past glibc's 32 MiB: mapped afresh
        jax.block_until_ready(fn(params, xs))
        counts = []
        for _ in range(3):
            before, before_huge = _minor_faults(), _thp_faults()
            grads[advice] = jax.block_until_ready(fn(params, xs))
            counts.append((_minor_faults() - before, _thp_faults() - before_huge))
        faults[advice] = min(c[0] for c in counts)
        huge[advice] = max(c[1] for c in counts)
    assert faults["0"] > 5000 and faults["1"] < faults["0"] / 2, faults
    assert huge["1"] >= 18, huge  # 36 MiB at least; the rule before gave about 12
    jax.tree.map(np.testing.assert_array_equal, grads["1"], grads["0"])


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


def _sized_inputs(cell_name, hidden):
    """A cell of this size on 9 sequences, with lengths (so masked steps) and resets."""
    cell = FAST_CELLS[cell_name](hidden)
    params = cell.init(fresh_key(), 7)
    xs = jax.random.normal(fresh_key(), (9, TIME, 7))
    kwargs = {
        "seq_lengths": jnp.array([TIME, 0, 3, 1, 5, TIME, 2, 4, 6]),
        "resets": jax.random.bernoulli(fresh_key(), 0.3, (9, TIME)),
    }
    return cell, params, xs, random_carry(cell, (9,)), kwargs


def _grads(cell, params, xs, carry, **kwargs):
    loss = _loss(cell, kwargs)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, carry)


@pytest.mark.parametrize("hidden, threads", [(5, 0), (40, 2), (50, 3), (130, 0)])
@pytest.mark.parametrize("cell_name", sorted(FAST_CELLS))
def test_hoisted_projection_over_sizes_and_threads(cell_name, hidden, threads, monkeypatch):
    """The kernel reading projected inputs (its gate columns, bias included): every cell,
    with and without biases, over chunkings, with lengths and resets, forward and gradients."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    monkeypatch.setattr(native, "HOIST_TABLE", ((0, 1 << 30),))
    cell, params, xs, carry, kwargs = _sized_inputs(cell_name, hidden)
    assert_trees_close(
        forward(cell, params, xs, carry, **kwargs),
        reference_unroll(cell, params, xs, carry, **kwargs),
    )
    actual = _grads(cell, params, xs, carry, **kwargs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, _grads(cell, params, xs, carry, **kwargs), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("hidden, threads", [(5, 0), (40, 2), (50, 3), (64, 4), (130, 0)])
@pytest.mark.parametrize("cell_name", sorted(FAST_CELLS))
def test_backward_kernel_over_sizes_and_threads(cell_name, hidden, threads, monkeypatch):
    """The backward loop's chunks are those of the forward one: scalar code only (5), uneven
    chunks (40 on 2, 50 on 3), more threads than cores (64 on 4), two by default (130); with
    lengths (so masked steps) and resets, against XLA's transposed loop."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    cell, params, xs, carry, kwargs = _sized_inputs(cell_name, hidden)
    actual = _grads(cell, params, xs, carry, **kwargs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, _grads(cell, params, xs, carry, **kwargs), rtol=2e-5, atol=2e-5)


# ---- row groups: the rows as independent groups, one thread each -----------------------------


def _one_chunk(monkeypatch, fn):
    """``fn()`` with every row and unit in one chunk on one thread: the kernels' plainest
    partition, which the others must reproduce."""
    with monkeypatch.context() as m:
        m.setenv("JAXRNN_NATIVE_THREADS", "1")
        m.setenv("JAXRNN_NATIVE_GROUPS", "1")
        return fn()


@pytest.mark.parametrize("groups", [2, 3, 4, 9])
@pytest.mark.parametrize("cell_name", MAIN)
def test_row_groups_give_the_results_of_one_chunk(cell_name, groups, monkeypatch):
    """The rows cut into groups (uneven: 9 rows into 2, 4; one row each into 9), each run
    apart: with lengths and resets, the forward pass, the gradient pass (forward kernel with
    residuals and backward kernel) and the final carry equal one chunk's and the
    specification's."""
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", str(groups))
    cell, params, xs, carry, kwargs = _sized_inputs(cell_name, 40)
    run = lambda: (forward(cell, params, xs, carry, **kwargs),  # noqa: E731
                   _grads(cell, params, xs, carry, **kwargs))  # fmt: skip
    actual = run()
    assert_trees_close(actual, _one_chunk(monkeypatch, run), rtol=1e-6, atol=1e-6)
    assert_trees_close(actual[0], reference_unroll(cell, params, xs, carry, **kwargs))


@pytest.mark.parametrize("cell_name", MAIN)
def test_small_groups_setting_changes_only_the_partition(cell_name, monkeypatch):
    """`native.SMALL_GROUPS` (set by the size of L2) decides whether the kernels' own choice
    cuts 9 rows on 2 threads into groups of 4 and 5 rows, or cuts the units instead: both
    give one chunk's results, forward and gradients, with lengths and resets."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell, params, xs, carry, kwargs = _sized_inputs(cell_name, 40)
    run = lambda: (forward(cell, params, xs, carry, **kwargs),  # noqa: E731
                   _grads(cell, params, xs, carry, **kwargs))  # fmt: skip
    expected = _one_chunk(monkeypatch, run)
    for small in (True, False):
        monkeypatch.setattr(native, "SMALL_GROUPS", small)
        assert_trees_close(run(), expected, rtol=1e-6, atol=1e-6)
    assert_trees_close(expected[0], reference_unroll(cell, params, xs, carry, **kwargs))


@pytest.mark.parametrize("mode", ["batch_major", "everything_time_major_reverse"])
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_row_groups_across_the_runs_of_a_vmap(cell_name, mode, monkeypatch):
    """Under `vmap` the kernels' rows are runs, one per example; 4 groups over 3 runs of 3
    (or 4) rows start inside runs (the input rows of a step are then gathered). Per-example
    outputs and gradients equal one chunk's and XLA's."""
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", "4")
    cell = FAST_CELLS[cell_name](32)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)

    def per_example(params, xs, carry, arrays):
        kwargs = {**arrays, **static}
        grad = jax.grad(lambda p, x, c: fast_loss(cell, p, x, c, kwargs), argnums=(0, 1, 2))
        return jaxrnn.unroll(cell, params, xs, carry, **kwargs), grad(params, xs, carry)

    fn = jax.jit(jax.vmap(per_example, in_axes=(None, 0, None if carry is None else 0, 0)))
    args = (params, xs, carry, arrays)
    actual = fn(*args)
    assert_trees_close(actual, _one_chunk(monkeypatch, lambda: jax.jit(fn)(*args)),
                       rtol=1e-6, atol=1e-6)  # fmt: skip
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)


def test_a_bad_group_count_is_named(monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", "-2")
    cell = jaxrnn.gru(16)
    params = cell.init(fresh_key(), 3)
    xs = jax.random.normal(fresh_key(), (2, 5, 3))
    msg = "JAXRNN_NATIVE_GROUPS must be a non-negative integer, got '-2'"
    with pytest.raises(ValueError, match=re.escape(msg)):
        forward(cell, params, xs)


@pytest.mark.parametrize("groups", ["0", "2"])
@pytest.mark.parametrize("cell_name", MAIN)
def test_duplicated_chunks_publish_once(cell_name, groups, monkeypatch):
    """Every thread computes every chunk not yet published (a thread the OS preempted gets
    its chunk computed by the others this way): one copy wins, results unchanged; also with
    the rows in groups, where a thread done with its own group joins the others'. Every
    chunk's weights come from their spare copy (what a thread packs when the chunk's packer
    may have been preempted): the same results, bit for bit."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "3")
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", groups)  # also threads sharing a group's chunk
    cell = FAST_CELLS[cell_name](48)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, "everything")
    undisturbed = forward(cell, params, xs, carry, **kwargs)
    monkeypatch.setenv("JAXRNN_NATIVE_DUPLICATE", "1")
    actual = forward(cell, params, xs, carry, **kwargs)
    grads = _grads(cell, params, xs, carry, **kwargs)  # the backward kernel duplicates too
    for got, want in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(undisturbed)):
        np.testing.assert_array_equal(got, want)
    kwargs.pop("unroll", None)
    assert_trees_close(actual, reference_unroll(cell, params, xs, carry, **kwargs))
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(grads, _grads(cell, params, xs, carry, **kwargs), rtol=2e-5, atol=2e-5)


def test_thread_counts_agree_at_a_benchmark_size(monkeypatch):
    """B16 T64 H128 LSTM: one thread against two and three (the kernel's own partitions).
    The weight and bias gradients, 1024 rows each summed on the gradient kernel in runs of
    rows, one per thread (`native.kernel_gradients`), agree to float32 sums in another
    order."""
    assert native.kernel_gradients(16 * 64, 32, 128)
    cell = jaxrnn.lstm(128)
    params = cell.init(fresh_key(), 32)
    xs = jax.random.normal(fresh_key(), (16, 64, 32))
    outs = {}
    for threads in ("1", "2", "3"):
        monkeypatch.setenv("JAXRNN_NATIVE_THREADS", threads)
        outs[threads] = forward(cell, params, xs), _grads(cell, params, xs, None)
    for threads in ("2", "3"):
        assert_trees_close(outs[threads][0], outs["1"][0], rtol=1e-6, atol=1e-6)
        assert_sums_close(outs[threads][1], outs["1"][1], rtol=1e-6, atol=1e-6, scale=1e-5)
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


# ---- vmap: the vmapped axis folds into the kernels' batch ------------------------------------

VMAP_MODES = ("batch_major", "no_batch", "two_batch_dims", "everything",
              "everything_time_major_reverse")  # fmt: skip
STATIC = ("time_major", "reverse", "unroll")


def _stacked_inputs(cell, mode, n=3):
    """``n`` independent draws of a mode's inputs, stacked on a leading axis: ``(xs, carry,
    arrays, static)``, ``arrays`` the keyword arguments that are arrays."""
    draws = [mode_inputs(cell, mode) for _ in range(n)]
    xs = jnp.stack([d[0] for d in draws])
    carry = None if draws[0][1] is None else jax.tree_util.tree_map(
        lambda *a: jnp.stack(a), *[d[1] for d in draws])  # fmt: skip
    static = {k: v for k, v in draws[0][2].items() if k in STATIC}
    arrays = {k: jnp.stack([d[2][k] for d in draws]) for k in draws[0][2] if k not in STATIC}
    return xs, carry, arrays, static


def _example(tree, i):
    """Example ``i`` of a tree stacked on a leading axis."""
    return jax.tree_util.tree_map(lambda a: a[i], tree)


def _hlo(fn, *args):
    """The FFI targets a jitted function calls, and how many loops it runs."""
    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r'custom_call_target="(jaxrnn[^"]+)"', text), text.count(" while(")


@pytest.mark.parametrize("mode", VMAP_MODES)
@pytest.mark.parametrize("name", MAIN)
def test_vmap_runs_the_kernel_once_over_every_example(name, mode):
    """Under `vmap` the examples fold into the kernel's batch: one call, no loop around it
    (an FFI call's own batching would run it once per example), each example's outputs those
    of the specification."""
    cell = FAST_CELLS[name](16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)

    def run(xs, carry, arrays):
        return jaxrnn.unroll(cell, params, xs, carry, **arrays, **static)

    fn = jax.vmap(run, in_axes=(0, None if carry is None else 0, 0))
    assert _hlo(fn, xs, carry, arrays) == ([native.TARGET], 0)
    actual = jax.jit(fn)(xs, carry, arrays)
    spec = {k: v for k, v in static.items() if k != "unroll"}
    for i in range(xs.shape[0]):
        expected = reference_unroll(
            cell, params, xs[i], _example(carry, i), **_example(arrays, i), **spec
        )
        assert_trees_close(_example(actual, i), expected)


def test_vmap_over_the_initial_carry_alone():
    """Shared inputs, one initial carry per example: the inputs are broadcast to the folded
    batch."""
    cell = jaxrnn.lstm(32)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, TIME, INPUT_SIZE))
    carries = random_carry(cell, (4, 3))
    fn = jax.vmap(lambda c: jaxrnn.unroll(cell, params, xs, c))
    assert _hlo(fn, carries) == ([native.TARGET], 0)
    actual = jax.jit(fn)(carries)
    for i in range(4):
        expected = reference_unroll(cell, params, xs, _example(carries, i))
        assert_trees_close(_example(actual, i), expected)


def _ensemble(cell, members):
    """``members`` sets of weights, drawn apart, stacked on a leading axis."""
    keys = jax.random.split(fresh_key(), members)
    return jax.vmap(lambda k: cell.init(k, INPUT_SIZE))(keys)


@pytest.mark.parametrize("mode", VMAP_MODES)
@pytest.mark.parametrize("name", MAIN)
def test_an_ensemble_runs_the_kernel_once(name, mode):
    """Batched weights (an ensemble under `vmap`): one kernel call over every member, no loop
    around it, each member's outputs those of the specification with its own weights."""
    cell = FAST_CELLS[name](16)
    params = _ensemble(cell, 3)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)

    def run(params, xs, carry, arrays):
        return jaxrnn.unroll(cell, params, xs, carry, **arrays, **static)

    fn = jax.vmap(run, in_axes=(0, 0, None if carry is None else 0, 0))
    assert _hlo(fn, params, xs, carry, arrays) == ([native.TARGET], 0)
    actual = jax.jit(fn)(params, xs, carry, arrays)
    spec = {k: v for k, v in static.items() if k != "unroll"}
    for i in range(3):
        expected = reference_unroll(
            cell, _example(params, i), xs[i], _example(carry, i), **_example(arrays, i), **spec
        )
        assert_trees_close(_example(actual, i), expected)


@pytest.mark.parametrize("mode", VMAP_MODES)
@pytest.mark.parametrize("name", MAIN)
def test_ensemble_gradients_run_both_kernels_once(monkeypatch, name, mode):
    """The gradient of an ensemble's summed loss: the forward and the backward kernel each run
    once over every member, equal to XLA's loops."""
    cell = FAST_CELLS[name](16)
    params = _ensemble(cell, 3)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)

    def loss(params, xs, carry, arrays):
        member = lambda p, x, c, a: fast_loss(cell, p, x, c, {**a, **static})  # noqa: E731
        axes = (0, 0, None if carry is None else 0, 0)
        return jnp.sum(jax.vmap(member, in_axes=axes)(params, xs, carry, arrays) ** 2)

    fn = jax.grad(loss, argnums=(0, 1, 2))
    args = (params, xs, carry, arrays)
    assert _hlo(fn, *args) == ([native.TARGET, native.TARGET_BACKWARD], 0)
    actual = jax.jit(fn)(*args)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)


# Members against threads (`spread_members` in the C++): fewer members than threads (one after
# another, each on every thread), as many, more (whole problems per thread: 5 members of 6 rows
# as 10 groups; of 9 rows one after another, not cut under 8 rows; 3 of 18 rows as 6 groups),
# one member, one thread; with forced groups of rows in each member; with forced duplication.
@pytest.mark.parametrize(
    "members, runs, threads, env",
    [(2, 2, 3, {}), (2, 2, 2, {}), (5, 2, 2, {}), (5, 3, 2, {}), (3, 6, 2, {}), (1, 2, 2, {}),
     (4, 2, 1, {}), (3, 2, 2, {"JAXRNN_NATIVE_GROUPS": "2"}),
     (2, 2, 3, {"JAXRNN_NATIVE_GROUPS": "2"}), (3, 2, 2, {"JAXRNN_NATIVE_DUPLICATE": "1"})],
)  # fmt: skip
@pytest.mark.parametrize("name", ["lstm", "gru", "elman_tanh"])
def test_ensembles_over_members_and_threads(name, members, runs, threads, env, monkeypatch):
    """Outputs and gradients of an ensemble (40 units, runs of 3 rows per member, lengths)
    against XLA's loops, over how its members meet the threads."""
    cell = FAST_CELLS[name](40)
    params = _ensemble(cell, members)
    xs = jax.random.normal(fresh_key(), (members, runs, 3, TIME, INPUT_SIZE))
    lengths = jax.random.randint(fresh_key(), (members, runs, 3), 0, TIME + 1)

    def member(p, x, n):
        return jax.vmap(lambda x, n: fast_loss(cell, p, x, None, {"seq_lengths": n}))(x, n)

    def both(params, xs, lengths):
        losses = jax.vmap(member)(params, xs, lengths)
        return losses, jax.grad(lambda p, x: jnp.sum(jax.vmap(member)(p, x, lengths)),
                                argnums=(0, 1))(params, xs)  # fmt: skip

    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert _hlo(both, params, xs, lengths) == (
        [native.TARGET, native.TARGET, native.TARGET_BACKWARD],
        0,
    )
    actual = jax.jit(both)(params, xs, lengths)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(both)(params, xs, lengths), rtol=2e-5, atol=2e-5)


def test_an_ensemble_over_shared_inputs_and_nested():
    """Batched weights with unbatched inputs (every member reads the same sequences), and an
    ensemble of ensembles (nested `vmap` over weights): one call, each member's outputs."""
    cell = jaxrnn.lstm(24)
    params = _ensemble(cell, 6)
    xs = jax.random.normal(fresh_key(), (2, TIME, INPUT_SIZE))
    shared = jax.vmap(lambda p: jaxrnn.unroll(cell, p, xs)[0])
    assert _hlo(shared, params) == ([native.TARGET], 0)
    nested = jax.vmap(jax.vmap(lambda p, x: jaxrnn.unroll(cell, p, x)[0]))
    grid = jax.tree_util.tree_map(lambda a: a.reshape(2, 3, *a.shape[1:]), params)
    many = jax.random.normal(fresh_key(), (2, 3, 2, TIME, INPUT_SIZE))
    assert _hlo(nested, grid, many) == ([native.TARGET], 0)
    ys, ys_nested = jax.jit(shared)(params), jax.jit(nested)(grid, many)
    for i in range(6):
        member = _example(params, i)
        np.testing.assert_allclose(
            ys[i], reference_unroll(cell, member, xs)[0], rtol=1e-5, atol=1e-5
        )
        np.testing.assert_allclose(
            ys_nested[i // 3, i % 3],
            reference_unroll(cell, member, many[i // 3, i % 3])[0],
            rtol=1e-5,
            atol=1e-5,
        )


def test_vmap_over_no_examples():
    cell = jaxrnn.lstm(16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (0, 3, TIME, INPUT_SIZE))
    ys = jax.jit(jax.vmap(lambda x: jaxrnn.unroll(cell, params, x)[0]))(xs)
    assert ys.shape == (0, 3, TIME, 16)
    grad = jax.vmap(jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x)[0])), (None, 0))
    grads = jax.jit(grad)(params, xs)
    assert grads.w_h.shape == (0, 16, 64) and grads.w_x.shape == (0, INPUT_SIZE, 64)


@pytest.mark.parametrize("mode", VMAP_MODES)
@pytest.mark.parametrize("name", MAIN)
def test_per_example_gradients_run_both_kernels_once(monkeypatch, name, mode):
    """``vmap(grad)``: the forward and the backward kernel each run once over all examples
    (`linear`'s batching rule keeps the hand transpose), equal to XLA's loops."""
    cell = FAST_CELLS[name](16)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)

    def per_example(params, xs, carry, arrays):
        grad = jax.grad(lambda p, x, c: fast_loss(cell, p, x, c, {**arrays, **static}),
                        argnums=(0, 1, 2))  # fmt: skip
        return grad(params, xs, carry)

    fn = jax.vmap(per_example, in_axes=(None, 0, None if carry is None else 0, 0))
    args = (params, xs, carry, arrays)
    assert _hlo(fn, *args) == ([native.TARGET, native.TARGET_BACKWARD], 0)
    actual = jax.jit(fn)(*args)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", MAIN)
def test_gradient_of_a_vmapped_loss_and_vmapped_second_order(monkeypatch, name):
    """``grad(vmap)`` runs both kernels once too, and its weight gradients are each one
    matmul over all examples' rows (`linear`'s ``leading`` fold), not a batched matmul per
    example summed afterwards; ``vmap`` of a Hessian-vector product (forward over reverse,
    through the batched linear primitive) equals XLA's."""
    cell = FAST_CELLS[name](24)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (4, 3, TIME, INPUT_SIZE))
    v = jax.random.normal(fresh_key(), xs.shape[1:])

    def loss(p, x):
        return fast_loss(cell, p, x, None, {})

    grad_of_vmap = jax.grad(lambda p, x: jnp.sum(jax.vmap(loss, (None, 0))(p, x)))
    assert _hlo(grad_of_vmap, params, xs) == ([native.TARGET, native.TARGET_BACKWARD], 0)
    text = jax.jit(grad_of_vmap).lower(params, xs).compile().as_text()
    dots = re.findall(r"= f32\[[\d,]*\]\{[\d,]*\} dot\([^\n]*", text)
    assert len(dots) >= 2, dots  # dW_x and dW_h
    assert not [d for d in dots if "batch_dims" in d], dots

    def hvp(p, x):
        ones = jax.tree_util.tree_map(jnp.ones_like, p)
        return jax.jvp(jax.grad(loss, argnums=1), (p, x), (ones, v))[1]

    both = lambda p, x: (grad_of_vmap(p, x), jax.vmap(hvp, (None, 0))(p, x))  # noqa: E731
    actual = jax.jit(both)(params, xs)
    monkeypatch.setenv("JAXRNN_NATIVE", "0")
    assert_trees_close(actual, jax.jit(both)(params, xs), rtol=2e-5, atol=2e-5)


def _warns_once_and_keeps_xla(message, cell):
    """Where the kernel cannot be built: `available` is False and warns once, matching
    ``message``, and ``cell`` (8 units) runs XLA's loop, equal to the reference. Loads the
    kernel afresh (``_load``'s cache cleared before and after)."""
    native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=f"native CPU kernel is unavailable.*{message}"):
            assert not native.available()
        assert not native.available()  # the warning came once
        assert "native" not in fastpath.placements(cell.kind, 2, 8, jnp.float32, backend="cpu")
        params = cell.init(fresh_key(), 3)
        xs = jax.random.normal(fresh_key(), (2, 5, 3))
        assert_trees_close(forward(cell, params, xs), reference_unroll(cell, params, xs))
    finally:
        native._load.cache_clear()


def test_without_a_compiler_it_warns_once_and_keeps_xla(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
    _warns_once_and_keeps_xla("no C", jaxrnn.lstm(8))


@pytest.mark.parametrize(
    "arch, message",
    [
        (
            "native;x",
            "JAXRNN_NATIVE_ARCH must be a -march name such as native or x86-64-v3, got 'native;x'",
        ),
        ("no-such-cpu", "-march=no-such-cpu .* failed"),
    ],
)
def test_an_arch_it_cannot_build_warns_and_keeps_xla(arch, message, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXRNN_NATIVE_ARCH", arch)
    monkeypatch.setenv("JAXRNN_CACHE_DIR", str(tmp_path))
    _warns_once_and_keeps_xla(message, jaxrnn.gru(8))


def test_the_arch_names_the_build(monkeypatch, tmp_path):
    monkeypatch.delenv("JAXRNN_NATIVE_ARCH", raising=False)
    assert native._arch() == "native"
    monkeypatch.setenv("JAXRNN_NATIVE_ARCH", " x86-64-v3 ")
    assert native._arch() == "x86-64-v3"
    # each -march gets its own file in the cache (the flags are part of its name)
    monkeypatch.setattr(native, "_cache_dir", lambda: tmp_path)
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(native.subprocess, "run", run)
    monkeypatch.setattr(native.os, "replace", lambda a, b: pathlib.Path(b).touch())
    first = native._build("c++")
    monkeypatch.setenv("JAXRNN_NATIVE_ARCH", "x86-64")
    second = native._build("c++")
    assert first != second
    assert [c for c in calls[0] if c.startswith("-march")] == ["-march=x86-64-v3"]
    assert [c for c in calls[1] if c.startswith("-march")] == ["-march=x86-64"]


@pytest.mark.skipif(not native.on_x86_64(), reason="x86-64-v3 is an x86 baseline")
def test_the_avx2_build_equals_the_reference():
    """The kernel built for ``x86-64-v3`` (AVX2 and FMA, none of the AVX-512 code: 8-lane
    vectors, tiles of 3 rows), as on a CPU without AVX-512, where it runs by default: this
    module's tests of its results and derivatives, in a fresh process (the kernel is
    registered once per process)."""
    env = dict(os.environ, JAXRNN_NATIVE_ARCH="x86-64-v3")
    env.pop("JAXRNN_NATIVE", None)
    tests = " or ".join(PORTABLE_TESTS)
    cmd = [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-k", tests]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    summary = done.stdout.strip().splitlines()[-1:]
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.fullmatch(r"\d+ passed, \d+ deselected in .*", summary[0] if summary else ""), summary


def _in_a_fresh_process(code, **env):
    """Runs ``code`` in a new Python with ``env`` added (``JAXRNN_NATIVE`` unset); its stdout."""
    env = dict(os.environ, **env)
    env.pop("JAXRNN_NATIVE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


_LSTM_UNROLL = (
    "import warnings; warnings.simplefilter('error')\n"
    "import jax, jax.numpy as jnp, numpy as np, jaxrnn\n"
    "from jaxrnn._src import fastpath, native\n"
    "cell = jaxrnn.lstm(8); p = cell.init(jax.random.PRNGKey(0), 3)\n"
    "xs = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 3))\n"
    "run = lambda p, x: jaxrnn.unroll(cell, p, x)[0]\n"
)


@pytest.mark.skipif(not native.on_x86_64(), reason="x86-64-v3 is an x86 baseline")
def test_the_avx2_build_runs_by_default():
    """Built for AVX2 without AVX-512, the kernel runs, in 8 lanes, without a warning."""
    code = _LSTM_UNROLL + (
        "assert native.available() and native.vector_lanes() == 8\n"
        "assert 'native' in fastpath.placements('lstm', 2, 8, jnp.float32, backend='cpu')\n"
        "assert native.TARGET in jax.jit(run).lower(p, xs).as_text()\n"
        "print('ok')\n"
    )
    assert _in_a_fresh_process(code, JAXRNN_NATIVE_ARCH="x86-64-v3") == "ok"


@pytest.mark.skipif(not native.on_x86_64(), reason="x86-64 is an x86 baseline")
def test_without_avx2_it_keeps_xla_without_a_warning():
    """Built for x86-64's baseline (SSE2: no vector of the kernel is one register), the kernel
    is not used unless forced (`native.available`); forced, its results equal XLA's loop's."""
    code = _LSTM_UNROLL + (
        "assert native._load() and native.vector_lanes() == 0 and not native.available()\n"
        "assert 'native' not in fastpath.placements('lstm', 2, 8, jnp.float32, backend='cpu')\n"
        "f = jax.jit(run)\n"
        "assert native.TARGET not in f.lower(p, xs).as_text()\n"
        "import os; os.environ['JAXRNN_NATIVE'] = 'always'\n"
        "g = jax.jit(lambda p, x: run(p, x))\n"
        "assert native.available() and native.TARGET in g.lower(p, xs).as_text()\n"
        "np.testing.assert_allclose(g(p, xs), f(p, xs), rtol=2e-5, atol=2e-6)\n"
        "print('ok')\n"
    )
    assert _in_a_fresh_process(code, JAXRNN_NATIVE_ARCH="x86-64") == "ok"


@pytest.mark.parametrize(
    "machine, flags",
    [("aarch64", None), ("arm64", None), ("x86_64", frozenset({"sse2", "avx"}))],
)
def test_where_the_kernel_would_stay_off_it_is_not_compiled(machine, flags, monkeypatch):
    """On ARM, or an x86 CPU that Linux lists without AVX2 and FMA, `available` is False
    without compiling the kernel (no compiler run, no warning), and the cell runs XLA's loop,
    equal to the reference; ``JAXRNN_NATIVE=always`` still builds it."""
    tried = []
    monkeypatch.setattr(platform, "machine", lambda: machine)
    monkeypatch.setattr(native, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(native, "_compiler", lambda: tried.append(1))
    monkeypatch.delenv("JAXRNN_NATIVE_ARCH", raising=False)
    monkeypatch.delenv("JAXRNN_NATIVE", raising=False)
    native._load.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not native._may_have_vectors()
            assert not native.available()
            cell = jaxrnn.gru(8)
            assert "native" not in fastpath.placements(cell.kind, 2, 8, jnp.float32, backend="cpu")
            params = cell.init(fresh_key(), 3)
            xs = jax.random.normal(fresh_key(), (2, 5, 3))
            assert_trees_close(forward(cell, params, xs), reference_unroll(cell, params, xs))
        assert tried == []
        monkeypatch.setenv("JAXRNN_NATIVE", "always")
        with pytest.warns(RuntimeWarning, match="native CPU kernel is unavailable.*no C"):
            assert not native.available()  # forced: it tries to build (here: no compiler)
        assert tried == [1]
    finally:
        native._load.cache_clear()


def test_named_arch_or_unknown_flags_leave_it_to_the_build(monkeypatch):
    """On x86 the build answers (`vector_lanes`) where the CPU's flags are unknown or
    ``JAXRNN_NATIVE_ARCH`` names a CPU, and where the flags list AVX2 and FMA."""
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("JAXRNN_NATIVE_ARCH", raising=False)
    for flags in (None, frozenset({"sse2", "avx", "avx2", "fma"})):
        monkeypatch.setattr(native, "_cpu_flags", lambda flags=flags: flags)
        assert native._may_have_vectors()
    monkeypatch.setattr(native, "_cpu_flags", lambda: frozenset({"sse2"}))
    assert not native._may_have_vectors()
    monkeypatch.setenv("JAXRNN_NATIVE_ARCH", "x86-64-v3")
    assert native._may_have_vectors()


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


# ---- the float32 input and weight gradients on the kernel (`native.kernel_gradients`) -------


@pytest.fixture
def gradients_on_the_kernel(monkeypatch):
    """`native.kernel_gradients` made to say yes at every size."""
    gradient_kernel_at_every_size(monkeypatch)


def test_the_shipped_gradient_rule():
    """From 200 rows where the inputs and units are 256 or fewer together; up to 512, from 8
    rows per input and unit; wider, never."""
    assert (native.GRADIENT_MIN_ROWS, native.GRADIENT_NARROW) == (200, 256)
    assert (native.GRADIENT_WIDEST, native.GRADIENT_ROWS_PER_WIDTH) == (512, 8)
    assert native.kernel_gradients(200, 128, 128) and not native.kernel_gradients(199, 128, 128)
    assert native.kernel_gradients(200, 16, 40) and not native.kernel_gradients(100, 16, 40)
    assert not native.kernel_gradients(4095, 256, 256) and native.kernel_gradients(4096, 256, 256)
    assert not native.kernel_gradients(3071, 128, 256) and native.kernel_gradients(3072, 128, 256)
    assert not native.kernel_gradients(1 << 20, 512, 1)  # 513 wide
    assert not native.kernel_gradients(1 << 20, 512, 512)
    cell = jaxrnn.gru(16)
    params = cell.init(fresh_key(), 8)
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x)[0]))
    for batch, on_kernel in ((3, False), (4, True)):  # 150 and 200 rows
        text = jax.jit(grad).lower(params, jnp.ones((batch, 50, 8))).as_text()
        assert (native.TARGET_GRADIENTS in text) == on_kernel
        assert native.TARGET_BACKWARD in text


@pytest.mark.parametrize(
    "rows, features, hidden, gates, merged, want_dx, threads",
    [
        (7, 5, 3, 4, True, True, 0),  # one block of 8 rows, every width off the tiles
        (300, 33, 40, 3, False, True, 2),  # two blocks of 152 rows, the GRU's separate ct_h
        (513, 64, 48, 4, True, False, 3),  # three threads on two cores, no dx
        (1000, 17, 130, 1, True, True, 1),  # four blocks of 250 rows, one thread
        (260, 20, 70, 4, False, True, 2),  # 280 columns: a slice of 256, then 24
        (777, 300, 100, 3, True, True, 2),  # 300 inputs: panels of 32, 16 and 12 columns
    ],
)
def test_the_float32_gradient_kernel(
    rows, features, hidden, gates, merged, want_dx, threads, monkeypatch
):
    """`native.input_and_weight_gradients` in float32 against float64 products: ``ct_x
    W_xᵀ``, ``xᵀ ct_x``, ``hᵀ ct_h`` and the sums of ``ct_x`` and ``ct_h`` over the rows (the
    bias gradients), within float32 rounding of sums of up to a thousand terms; and bit for
    bit the same in a second call."""
    assert native.available()  # registers the kernels
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    operands = gradient_kernel_operands(rows, features, hidden, gates, merged)

    def fn(*a):
        return native.input_and_weight_gradients(*a, want_dx=want_dx, f32_operands=True)

    got = jax.jit(fn)(*operands)
    # The same sums from call to call, whichever thread took which rows.
    jax.tree.map(np.testing.assert_array_equal, got, jax.jit(fn)(*operands))
    assert (got[0] is None) == (not want_dx)
    assert_gradient_kernel(got, gradient_kernel_reference(*operands), 2e-6)


def test_the_float32_gradient_kernel_under_vmap():
    """Under ``vmap`` the examples become the kernel's members (`conftest`'s check)."""
    assert native.available()
    check_gradient_kernel_under_vmap(
        lambda *a: native.input_and_weight_gradients(*a, f32_operands=True)
    )


@pytest.mark.parametrize("mode", ["no_batch", "two_batch_dims", "everything",
                                  "everything_time_major_reverse"])  # fmt: skip
@pytest.mark.parametrize("cell_name", MAIN)
def test_derivatives_with_the_gradient_kernel_equal_xla(
    cell_name, mode, gradients_on_the_kernel, monkeypatch
):
    """The input and weight gradients on the kernel, in every layout and with lengths,
    resets and reverse: the same derivatives of first and second order as XLA's scan."""
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    carry = random_carry(cell, xs.shape[:-2] if not kwargs.get("time_major") else xs.shape[1:-1])
    text = jax.jit(jax.grad(_loss(cell, kwargs))).lower(params, xs, carry).as_text()
    assert native.TARGET_GRADIENTS in text
    _derivatives_equal_xla(cell_name, mode, monkeypatch)


@pytest.mark.parametrize("mode", ["batch_major", "everything_time_major_reverse"])
@pytest.mark.parametrize("name", MAIN)
def test_vmapped_gradients_on_the_gradient_kernel(monkeypatch, name, mode, gradients_on_the_kernel):
    """Per-example gradients and an ensemble's: each kernel runs once over every example, equal
    to XLA's loops."""
    cell = FAST_CELLS[name](16)
    xs, carry, arrays, static = _stacked_inputs(cell, mode)
    axes = (0, None if carry is None else 0, 0)

    def loss(p, x, c, a):
        return fast_loss(cell, p, x, c, {**a, **static})

    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)), in_axes=(None, *axes))
    ensemble = jax.grad(
        lambda p, *a: jnp.sum(jax.vmap(loss, in_axes=(0, *axes))(p, *a) ** 2), argnums=(0, 1, 2)
    )
    kernels = [native.TARGET, native.TARGET_BACKWARD, native.TARGET_GRADIENTS]
    for fn, params in ((per_example, cell.init(fresh_key(), INPUT_SIZE)),
                       (ensemble, _ensemble(cell, 3))):  # fmt: skip
        args = (params, xs, carry, arrays)
        assert _hlo(fn, *args) == (kernels, 0)
        actual = jax.jit(fn)(*args)
        with monkeypatch.context() as m:
            m.setenv("JAXRNN_NATIVE", "0")
            assert_trees_close(actual, jax.jit(fn)(*args), rtol=2e-5, atol=2e-5)
