"""The persistent Pallas kernels (Elman, LSTM, GRU), run in Pallas's interpreter.

On a GPU the same kernels compile with Triton; ``benchmarks/pallas_gpu.py`` checks them there
against `jaxrnn.unroll` before timing them. Here the CUDA lowering is checked as far as it runs
without a GPU: down to the Triton custom calls.
"""

from __future__ import annotations

import functools
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_CELLS,
    INPUT_SIZE,
    MODES,
    assert_trees_close,
    fast_loss,
    fresh_key,
    load_script,
    mode_inputs,
    random_carry,
    random_like,
    reference_unroll,
)
from jax.test_util import check_grads
from test_fastpath import jit_fresh, reference_path

import jaxrnn
from jaxrnn._src import fastpath, pallas_rnn

TIME, BATCH, FEATURES, HIDDEN = 7, 5, 3, 16  # a batch that is padded to the block of 16
PALLAS_HIDDEN = 16  # `jaxrnn.unroll` on the kernels: the smallest hidden size they take
CELLS = {
    "elman_tanh": lambda h: jaxrnn.elman(h),
    "elman_relu": lambda h: jaxrnn.elman(h, activation="relu"),
    "lstm": lambda h: jaxrnn.lstm(h),
    "gru": lambda h: jaxrnn.gru(h),
    "gru_nobias": lambda h: jaxrnn.gru(h, use_bias=False),
}


@pytest.fixture(params=sorted(CELLS))
def name(request):
    return request.param


def _inputs(name, dtype=jnp.float32, hidden=HIDDEN, batch=BATCH):
    cell = CELLS[name](hidden)
    params = cell.init(fresh_key(), FEATURES, dtype=dtype)
    xs = jax.random.normal(fresh_key(), (TIME, batch, FEATURES), dtype)
    return cell, params, xs, random_carry(cell, (batch,), dtype)


def _kernel(cell, **kw):
    return lambda p, xs, c: pallas_rnn.sequence(cell, p, xs, c, interpret=True, **kw)


def test_equals_the_loop_over_cell_step(name):
    cell, params, xs, carry = _inputs(name)
    ys, final = jax.jit(_kernel(cell))(params, xs, carry)
    assert ys.shape == (TIME, BATCH, HIDDEN)
    assert_trees_close((ys, final), reference_unroll(cell, params, xs, carry, time_major=True))


@pytest.mark.parametrize("stream", [True, False])
def test_streamed_and_held_weights_agree(name, stream):
    """``stream_weights`` reloads W_h every step instead of holding it: same numbers."""
    cell, params, xs, carry = _inputs(name)
    got = _kernel(cell, stream_weights=stream)(params, xs, carry)
    assert_trees_close(got, jaxrnn.unroll(cell, params, xs, carry, time_major=True))
    loss = lambda p: jnp.sum(_kernel(cell, stream_weights=stream)(p, xs, carry)[0] ** 2)
    want = lambda p: jnp.sum(jaxrnn.unroll(cell, p, xs, carry, time_major=True)[0] ** 2)
    assert_trees_close(jax.grad(loss)(params), jax.grad(want)(params), rtol=1e-4, atol=1e-5)


def test_several_programs_and_default_carry(name):
    """Batch 40 in blocks of 16: three programs, the last one padded."""
    cell, params, xs, _ = _inputs(name, hidden=32, batch=40)
    got = _kernel(cell)(params, xs, None)
    assert_trees_close(got, jaxrnn.unroll(cell, params, xs, time_major=True))


def _assert_same_gradients(cell, run, scan, params, xs, carry):
    """``jax.grad`` of a random weighting of outputs and final carry: ``run`` against ``scan``."""
    w_ys = jax.random.normal(fresh_key(), (*xs.shape[:2], HIDDEN))
    w_carry = random_carry(cell, xs.shape[1:2])

    def grad_of(f):
        def loss(p, xs, c):
            ys, final = f(p, xs, c)
            terms = jax.tree_util.tree_map(lambda a, w: jnp.sum(a * w), final, w_carry)
            return jnp.sum(ys * w_ys) + sum(jax.tree_util.tree_leaves(terms))

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    got, want = grad_of(run)(params, xs, carry), grad_of(scan)(params, xs, carry)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_gradients_equal_the_scan(name):
    cell, params, xs, carry = _inputs(name)
    scan = lambda p, xs, c: jaxrnn.unroll(cell, p, xs, c, time_major=True)
    _assert_same_gradients(cell, _kernel(cell), scan, params, xs, carry)


# The runner's modes with one batch axis, given to the kernels time-major.
FLAG_MODES = sorted(
    m
    for m, (shape, spec) in MODES.items()
    if len(shape) == 1 and set(spec) & {"reverse", "seq_lengths", "mask", "resets"}
)


def _mode(cell, mode, dtype=jnp.float32):
    """``(xs, carry, kwargs)`` of one runner mode, time-major, without ``unroll``."""
    xs, carry, kwargs = mode_inputs(cell, mode, dtype)
    kwargs.pop("unroll", None)
    if not kwargs.pop("time_major", False):
        xs = jnp.swapaxes(xs, 0, 1)
        for k in ("mask", "resets"):
            if k in kwargs:
                kwargs[k] = kwargs[k].T
    return xs, carry, kwargs


@pytest.mark.parametrize("mode", FLAG_MODES)
def test_lengths_masks_resets_and_reverse_equal_the_loop(name, mode):
    """Outputs against the loop over ``cell.step``; gradients against `jaxrnn.unroll`."""
    cell = CELLS[name](HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = _mode(cell, mode)
    run = lambda p, xs, c: pallas_rnn.sequence(cell, p, xs, c, interpret=True, **kwargs)
    got = jax.jit(run)(params, xs, carry)
    want = reference_unroll(cell, params, xs, carry, time_major=True, **kwargs)
    assert_trees_close(got, want)
    if carry is None:
        carry = cell.initial_carry((xs.shape[1],))
    scan = lambda p, xs, c: jaxrnn.unroll(cell, p, xs, c, time_major=True, **kwargs)
    _assert_same_gradients(cell, run, scan, params, xs, carry)


@pytest.mark.parametrize("mode", ["everything", "everything_time_major_reverse"])
def test_check_grads_float64_with_flags(name, mode):
    with jax.enable_x64(True):
        cell = CELLS[name](HIDDEN)
        params = cell.init(fresh_key(), INPUT_SIZE, dtype=jnp.float64)
        xs, carry, kwargs = _mode(cell, mode, jnp.float64)
        run = lambda p, xs, c: pallas_rnn.sequence(cell, p, xs, c, interpret=True, **kwargs)
        check_grads(run, (params, xs, carry), order=1, modes=("rev",), eps=1e-6)


def test_check_grads_float64(name):
    with jax.enable_x64(True):
        cell, params, xs, carry = _inputs(name, dtype=jnp.float64)
        check_grads(_kernel(cell), (params, xs, carry), order=1, modes=("rev",), eps=1e-6)


def test_bfloat16_weights_equal_the_loop_with_rounded_products():
    """``weight_dtype=bfloat16``: both operands of ``h·W_h`` rounded, f32 accumulation."""
    cell, params, xs, _ = _inputs("lstm")
    ys, _ = _kernel(cell, weight_dtype=jnp.bfloat16)(params, xs, None)
    bf = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
    h = c = jnp.zeros((BATCH, HIDDEN))
    for t in range(TIME):
        z = xs[t] @ params.w_x + params.b_x + params.b_h + bf(h) @ bf(params.w_h)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        np.testing.assert_allclose(ys[t], h, rtol=1e-5, atol=1e-5)


def test_lowers_to_triton_for_cuda(name, monkeypatch):
    """Pallas's Triton lowering accepts every kernel (compiling to PTX needs a GPU)."""
    cell, params, xs, carry = _inputs(name, hidden=128, batch=8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA below

    def loss(p, xs, c):
        return jnp.sum(pallas_rnn.sequence(cell, p, xs, c)[0] ** 2)

    for f in (lambda p, xs, c: pallas_rnn.sequence(cell, p, xs, c), jax.grad(loss)):
        text = jax.jit(f).trace(params, xs, carry).lower(lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"custom_call @([\w$.]+)", text)
        assert calls and set(calls) == {"__gpu$xla.gpu.triton"}, calls


@pytest.mark.parametrize("cell_name", ["elman_tanh", "elman_relu", "lstm", "gru"])
def test_unroll_gradient_on_the_kernels_lowers_to_triton_for_cuda(cell_name, monkeypatch):
    """`jaxrnn.unroll`'s gradient on the kernels, the backward loop on the backward kernel
    (`pallas_rnn.tangent_transpose`), with lengths and resets in reverse: Pallas's Triton
    lowering accepts both kernels; the rest is XLA's."""
    cell = FAST_CELLS[cell_name](128)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (8, 12, INPUT_SIZE))
    kwargs = {
        "seq_lengths": jnp.array([12, 0, 3, 12, 5, 7, 1, 12]),
        "resets": jax.random.bernoulli(fresh_key(), 0.2, (8, 12)),
        "reverse": True,
    }
    monkeypatch.setattr(fastpath, "placements", lambda *a, **k: ("pallas", "pallas"))
    monkeypatch.setattr(fastpath, "pallas_backward", lambda *a: True)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # lowered for CUDA below
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x, **kwargs)[0] ** 2))
    text = jax.jit(grad).trace(params, xs).lower(lowering_platforms=("cuda",)).as_text()
    calls = re.findall(r"custom_call @([\w$.]+)", text)
    assert calls.count("__gpu$xla.gpu.triton") == 2, calls


def test_bad_arguments_are_named():
    cell, params, xs, carry = _inputs("lstm")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match=r"compile for a GPU .* default backend is 'cpu'"):
            pallas_rnn.sequence(cell, params, xs)
    run = functools.partial(pallas_rnn.sequence, interpret=True)
    with pytest.raises(ValueError, match=r"block_batch must be a power of two >= 16, got 24"):
        run(cell, params, xs, block_batch=24)
    with pytest.raises(ValueError, match=r"xs must be \(time, batch, 3\), got shape \(7, 5, 4\)"):
        run(cell, params, jnp.ones((TIME, BATCH, 4)))
    with pytest.raises(ValueError, match=r"carry must be cell.initial_carry\(\(5,\)\) with leaves"):
        run(cell, params, xs, carry.h)
    projected = jaxrnn.lstm(HIDDEN, proj_size=4)
    with pytest.raises(ValueError, match=r"without proj_size or jaxrnn.gru\(...\), got 'lstm"):
        run(projected, projected.init(fresh_key(), FEATURES), xs)
    with pytest.raises(
        ValueError, match=r"mask must have shape \(7, 5\) \(time-major.*got shape \(5, 7\)"
    ):
        run(cell, params, xs, mask=jnp.ones((BATCH, TIME), bool))
    with pytest.raises(TypeError, match=r"resets must be a bool array, got dtype int32"):
        run(cell, params, xs, resets=jnp.ones((TIME, BATCH), jnp.int32))
    with pytest.raises(ValueError, match=r"seq_lengths must have shape \(5,\) .* got shape \(7,\)"):
        run(cell, params, xs, seq_lengths=jnp.ones((TIME,), jnp.int32))
    wide = jaxrnn.gru(48)
    with pytest.raises(ValueError, match=r"hidden size must be one of .* got 48"):
        run(wide, wide.init(fresh_key(), FEATURES), xs)


def test_gpu_benchmark_script_runs_in_the_interpreter(tmp_path):
    """``benchmarks/pallas_gpu.py`` (run on a lent GPU) does not rot: a tiny interpreted run."""
    module = load_script("benchmarks/pallas_gpu.py")
    out = tmp_path / "pallas.json"
    argv = ["--interpret", "--cells", "lstm:4:6:16,gru:4:6:16", "--reps", "1", "--no-torch"]
    report = module.main([*argv, "--warps", "4", "--out", str(out)])
    for kind in ("lstm", "gru"):
        for dtype, bound in (("float32", 1e-5), ("bfloat16", 5e-2)):
            for flags in ("", "/lengths_resets_reverse"):
                for run in ("pallas_w4", "unroll_pallas", "unroll_pallas_bwd"):
                    errors = report["check"][f"{kind}/{dtype}{flags}"][run]
                    assert errors["out_rel_err"] < bound, errors
                    assert errors["grad_rel_err"] < bound, errors
    assert len(report["rows"]) == 4
    assert set(report["rows"][0]["ms"]) == {
        "jaxrnn/fwd", "jaxrnn/fwdbwd", "pallas_w4/fwd", "pallas_w4/fwdbwd",
        "unroll_pallas/fwd", "unroll_pallas/fwdbwd",
        "unroll_pallas_bwd/fwd", "unroll_pallas_bwd/fwdbwd",
    }  # fmt: skip
    assert out.exists() and out.with_suffix(".md").exists()
    # benchmarks/gpu_tables.py reads this report (interpreted timings: the bounds mean nothing)
    gpu_tables = load_script("benchmarks/gpu_tables.py")
    table, reasons = gpu_tables.pallas_table(json.loads(out.read_text()))
    assert set(table) <= {(k, d) for k in ("lstm", "gru") for d in ("float32", "bfloat16")}
    assert sum(r.startswith("check ") and r.endswith("-> ok") for r in reasons) == 8
    assert sum("unroll_pallas" in r and " ms, jaxrnn " in r for r in reasons) >= 4
    table, reasons = gpu_tables.pallas_backward_table(json.loads(out.read_text()))
    assert set(table) <= {(k, d) for k in ("lstm", "gru") for d in ("float32", "bfloat16")}
    assert sum(r.startswith("check ") and r.endswith("-> ok") for r in reasons) == 8
    assert sum("unroll_pallas_bwd" in r and " ms, unroll_pallas " in r for r in reasons) == 4


# ----------------------------------------------------------------------------------------------
# `jaxrnn.unroll` with the kernels as the fast path's primal (the "pallas" placement).

PALLAS_MODES = (
    "no_batch",
    "two_batch_dims",
    "seq_lengths_two_batch_dims",
    "mask_reverse",
    "resets_reverse",
    "everything",
    "everything_time_major_reverse",
)
PALLAS_CASES = [(c, m) for c in ("elman_tanh", "lstm", "gru") for m in PALLAS_MODES]
PALLAS_CASES += [(c, "everything") for c in ("elman_relu", "elman_nobias", "lstm_nobias")]
PALLAS_CASES += [("gru_nobias", "everything")]


@pytest.fixture(params=["xla_backward", "kernel_backward"])
def on_the_kernels(monkeypatch, request):
    """Every pass of `jaxrnn.unroll` on the kernels (in the interpreter, off the GPU), the
    backward loop of reverse mode XLA's transposed scan or the backward kernel. Returns
    ``(whether it is the kernel, the list of the kernel's calls)``: one entry per call of
    `pallas_rnn.tangent_transpose` (the linear primitive calls it when XLA lowers it)."""
    monkeypatch.setattr(fastpath, "placements", lambda *a, **k: ("pallas", "pallas"))
    backward = request.param == "kernel_backward"
    monkeypatch.setattr(fastpath, "pallas_backward", lambda *a: backward)
    calls, transpose = [], pallas_rnn.tangent_transpose

    def counted(*args):
        calls.append(args[0])
        return transpose(*args)

    monkeypatch.setattr(pallas_rnn, "tangent_transpose", counted)
    return backward, calls


@pytest.mark.parametrize("cell_name, mode", PALLAS_CASES)
def test_unroll_on_the_kernels_equals_the_reference(cell_name, mode, on_the_kernels):
    cell = FAST_CELLS[cell_name](PALLAS_HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    kwargs.pop("unroll", None)

    def outputs_and_grads(p, x, c):
        grads = jax.grad(fast_loss, argnums=(1, 2, 3))(cell, p, x, c, kwargs)
        return jaxrnn.unroll(cell, p, x, c, **kwargs), grads

    jaxpr = str(jax.make_jaxpr(outputs_and_grads)(params, xs, carry))
    assert "pallas_call" in jaxpr
    got = jax.jit(outputs_and_grads)(params, xs, carry)
    backward, calls = on_the_kernels
    assert calls == ([cell.kind] if backward else [])  # the backward loop on the kernel
    with reference_path():
        want = jit_fresh(outputs_and_grads)(params, xs, carry)
    assert_trees_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru"])
def test_unroll_on_the_kernels_under_vmap(cell_name, on_the_kernels):
    """Per-example gradients (``vmap`` of ``grad``) of a reversed run with resets: the kernels
    and their transposes batch as XLA's loops do."""
    cell = FAST_CELLS[cell_name](PALLAS_HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs = jax.random.normal(fresh_key(), (3, 2, 6, INPUT_SIZE))
    resets = jax.random.bernoulli(fresh_key(), 0.3, (3, 2, 6))

    def loss(p, x, r):
        return jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x, resets=r, reverse=True)[0]))

    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, 0))
    got = jax.jit(per_example)(params, xs, resets)
    backward, calls = on_the_kernels
    assert calls == ([cell.kind] if backward else [])
    with reference_path():
        want = jit_fresh(per_example)(params, xs, resets)
    assert_trees_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cell_name", ["elman_tanh", "lstm", "gru"])
def test_unroll_on_the_kernels_keeps_forward_mode(cell_name, on_the_kernels):
    """``jax.jvp``, and ``check_grads`` of order 2 in both modes (float64): the kernel is the
    primal under the fast path's linear JVP rule."""
    cell = FAST_CELLS[cell_name](PALLAS_HIDDEN)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, "everything_time_major_reverse")
    kwargs.pop("unroll", None)
    tangents = (random_like(params), random_like(xs))
    f = lambda p, x: jaxrnn.unroll(cell, p, x, carry, **kwargs)  # noqa: E731
    got = jax.jvp(f, (params, xs), tangents)
    with reference_path():
        want = jax.jvp(f, (params, xs), tangents)
    assert_trees_close(got, want, rtol=2e-5, atol=2e-5)
    with jax.enable_x64(True):
        params = cell.init(fresh_key(), INPUT_SIZE, dtype=jnp.float64)
        xs, carry, kwargs = mode_inputs(cell, "everything", dtype=jnp.float64)
        kwargs.pop("unroll", None)
        g = jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c, **kwargs))
        # eps=1e-6, as in test_unroll: the default step's second-order truncation error
        # reached the 1e-5 tolerance on some random draws (LSTM, reverse over reverse: 4e-5).
        check_grads(g, (params, xs, carry), order=2, modes=("fwd", "rev"), eps=1e-6)


@pytest.mark.parametrize(
    "capability, measured", [("9.0", True), ("8.0", False), ("10.0", False), ("12.0", False)]
)
def test_the_kernels_run_only_on_the_measured_gpu_family(monkeypatch, capability, measured):
    """`PALLAS_TABLE` was measured on an H100 (9.0); other GPUs keep XLA's loop."""
    device = types.SimpleNamespace(compute_capability=capability)
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert fastpath._measured_gpu() is measured
    expected = ("pallas",) * 2 if measured else ("hoisted",) * 2
    assert fastpath.placements("elman_tanh", 8, 128, jnp.float32, backend="gpu") == expected
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace()])  # no capability
    assert not fastpath._measured_gpu()


def test_placements_follow_the_measured_table(monkeypatch):
    """The table as measured on an H100: the Elman RNN up to batch 8, the bfloat16 LSTM and GRU
    up to 64, not the float32 LSTM and GRU. Per (kind, dtype), GPU only, up to each pass's
    bound, without ``matmul_dtype``, a hidden size the kernels take and no larger than
    measured, an unsharded batch."""
    hoisted = ("hoisted", "hoisted")
    pallas = ("pallas", "pallas")
    f32, bf16 = jnp.float32, jnp.bfloat16
    # on a GPU of another family than the one measured (here: no GPU at all), never
    assert fastpath.placements("elman_tanh", 8, 128, f32, backend="gpu") == hoisted
    monkeypatch.setattr(fastpath, "_measured_gpu", lambda: True)
    assert fastpath.placements("elman_tanh", 8, 128, f32, backend="gpu") == pallas
    assert fastpath.placements("elman_tanh", 16, 128, f32, backend="gpu") == hoisted
    assert fastpath.placements("elman_relu", 8, 128, f32, backend="gpu") == hoisted
    assert fastpath.placements("lstm", 8, 128, f32, backend="gpu") == hoisted
    assert fastpath.placements("lstm", 64, 128, bf16, backend="gpu") == pallas
    assert fastpath.placements("gru", 8, 128, f32, backend="gpu") == hoisted
    assert fastpath.placements("gru", 65, 128, bf16, backend="gpu") == hoisted
    monkeypatch.setitem(fastpath.PALLAS_TABLE, ("lstm", "float32"), (64, 16, 128))
    place = functools.partial(fastpath.placements, "lstm", hidden=128, dtype=f32)
    assert place(8, backend="gpu") == pallas
    assert place(32, backend="gpu") == ("pallas", "hoisted")
    assert place(128, backend="gpu") == hoisted
    assert "pallas" not in place(8, backend="cpu")
    assert place(8, backend="gpu", matmul_dtype=bf16) == hoisted
    assert place(8, backend="gpu", sharded=True) == hoisted
    assert fastpath.placements("lstm", 8, 48, f32, backend="gpu") == hoisted
    assert fastpath.placements("lstm", 8, 64, f32, backend="gpu") == pallas
    # the kernels take bfloat16 at H=256, but the table was measured up to H=128
    assert fastpath.placements("lstm", 8, 256, bf16, backend="gpu") == hoisted
    assert fastpath.placements("lstm", 8, 128, jnp.float64, backend="gpu") == hoisted
