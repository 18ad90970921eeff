"""The persistent Pallas Elman kernels, run in Pallas's interpreter, against the reference.

On a GPU the same kernels compile with Triton; ``benchmarks/pallas_gpu.py`` checks them there
against the scan before timing them. Here the CUDA lowering is checked as far as it runs
without a GPU: down to the Triton custom calls.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_trees_close, fresh_key, reference_unroll
from jax.test_util import check_grads

import jaxrnn
from jaxrnn._src import pallas_elman

TIME, BATCH, FEATURES, HIDDEN = 7, 5, 3, 16  # a batch that is padded to the block of 16


def _inputs(activation, dtype=jnp.float32, hidden=HIDDEN, batch=BATCH):
    cell = jaxrnn.elman(hidden, activation=activation)
    params = cell.init(fresh_key(), FEATURES, dtype=dtype)
    xs = jax.random.normal(fresh_key(), (TIME, batch, FEATURES), dtype)
    h0 = jax.random.normal(fresh_key(), (batch, hidden), dtype)
    return cell, params, xs, h0


def _kernel(activation, **kw):
    return lambda p, xs, h0: pallas_elman.elman_sequence(
        p, xs, h0, activation=activation, interpret=True, **kw
    )


@pytest.mark.parametrize("activation", pallas_elman.ACTIVATIONS)
def test_equals_the_loop_over_cell_step(activation):
    cell, params, xs, h0 = _inputs(activation)
    hs, h_last = jax.jit(_kernel(activation))(params, xs, h0)
    want_ys, want_h = reference_unroll(cell, params, xs, h0, time_major=True)
    assert hs.shape == (TIME, BATCH, HIDDEN) and h_last.shape == (BATCH, HIDDEN)
    assert_trees_close((hs, h_last), (want_ys, want_h))


def test_several_programs_and_default_carry():
    """Batch 40 in blocks of 16: three programs, the last one padded."""
    cell, params, xs, _ = _inputs("tanh", hidden=32, batch=40)
    hs, h_last = _kernel("tanh")(params, xs, None)
    want = jaxrnn.unroll(cell, params, xs, time_major=True)
    assert_trees_close((hs, h_last), want)


@pytest.mark.parametrize("activation", pallas_elman.ACTIVATIONS)
def test_gradients_equal_the_scan(activation):
    cell, params, xs, h0 = _inputs(activation)
    w_ys = jax.random.normal(fresh_key(), (TIME, BATCH, HIDDEN))
    w_h = jax.random.normal(fresh_key(), (BATCH, HIDDEN))

    def loss(run):
        def f(p, xs, h0):
            ys, h = run(p, xs, h0)
            return jnp.sum(ys * w_ys) + jnp.sum(h * w_h)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    got = loss(_kernel(activation))(params, xs, h0)
    scan = lambda p, xs, h0: jaxrnn.unroll(cell, p, xs, h0, time_major=True)
    want = loss(scan)(params, xs, h0)
    assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", pallas_elman.ACTIVATIONS)
def test_check_grads_float64(activation):
    with jax.enable_x64(True):
        _, params, xs, h0 = _inputs(activation, dtype=jnp.float64)
        check_grads(
            lambda p, xs, h0: _kernel(activation)(p, xs, h0),
            (params, xs, h0),
            order=1,
            modes=("rev",),
            eps=1e-6,
        )


def test_no_bias_and_bfloat16_weights():
    cell = jaxrnn.elman(HIDDEN, use_bias=False)
    params = cell.init(fresh_key(), FEATURES)
    xs = jax.random.normal(fresh_key(), (TIME, BATCH, FEATURES))
    hs, _ = _kernel("tanh")(params, xs, None)
    assert_trees_close(hs, jaxrnn.unroll(cell, params, xs, time_major=True)[0])
    # W_h held in bfloat16, products accumulated in float32: the loop with W_h rounded.
    hs16, _ = _kernel("tanh", weight_dtype=jnp.bfloat16)(params, xs, None)
    rounded = params._replace(w_h=params.w_h.astype(jnp.bfloat16).astype(jnp.float32))
    h = jnp.zeros((BATCH, HIDDEN))
    for t in range(TIME):
        h = jnp.tanh(
            xs[t] @ params.w_x + (h.astype(jnp.bfloat16).astype(jnp.float32) @ rounded.w_h)
        )
        np.testing.assert_allclose(hs16[t], h, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda p: jnp.sum(_kernel("tanh")(p, xs, None)[0] ** 2))(params)
    assert grads.b_x is None and grads.b_h is None


def test_lowers_to_triton_for_cuda():
    """Pallas's Triton lowering accepts both kernels (compiling them to PTX needs a GPU)."""
    _, params, xs, h0 = _inputs("tanh", hidden=128, batch=8)

    def loss(p, xs, h0):
        return jnp.sum(pallas_elman.elman_sequence(p, xs, h0)[0] ** 2)

    for f in (lambda p, xs, h0: pallas_elman.elman_sequence(p, xs, h0), jax.grad(loss)):
        text = jax.jit(f).trace(params, xs, h0).lower(lowering_platforms=("cuda",)).as_text()
        calls = re.findall(r"custom_call @([\w$.]+)", text)
        assert calls and set(calls) == {"__gpu$xla.gpu.triton"}, calls


def test_bad_arguments_are_named():
    _, params, xs, h0 = _inputs("tanh")
    run = pallas_elman.elman_sequence
    with pytest.raises(
        ValueError, match=r"activation must be one of \('tanh', 'relu'\), got 'gelu'"
    ):
        run(params, xs, activation="gelu")
    with pytest.raises(ValueError, match=r"block_batch must be a power of two >= 16, got 24"):
        run(params, xs, block_batch=24)
    with pytest.raises(ValueError, match=r"xs must be \(time, batch, 3\), got shape \(7, 5, 4\)"):
        run(params, jnp.ones((TIME, BATCH, 4)))
    with pytest.raises(ValueError, match=r"h0 must have shape \(5, 16\), got \(5, 8\)"):
        run(params, xs, jnp.ones((BATCH, 8)))
    wide = jaxrnn.elman(48).init(fresh_key(), FEATURES)
    with pytest.raises(ValueError, match=r"hidden size must be one of .* got 48"):
        run(wide, xs)


def test_gpu_benchmark_script_runs_in_the_interpreter(tmp_path):
    """``benchmarks/pallas_gpu.py`` (run on a lent GPU) does not rot: a tiny interpreted run."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "pallas_gpu.py"
    spec = importlib.util.spec_from_file_location("pallas_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "pallas.json"
    argv = ["--interpret", "--cells", "elman:4:6:16", "--reps", "1", "--no-torch"]
    report = module.main([*argv, "--warps", "4", "--out", str(out)])
    for dtype, bound in (("float32", 1e-5), ("bfloat16", 5e-2)):
        errors = report["check"][dtype]["pallas_w4"]
        assert errors["out_rel_err"] < bound and errors["grad_rel_err"] < bound, errors
    assert {r["dtype"] for r in report["rows"]} == {"float32", "bfloat16"}
    assert set(report["rows"][0]["ms"]) == {
        "jaxrnn/fwd", "jaxrnn/fwdbwd", "pallas_w4/fwd", "pallas_w4/fwdbwd"
    }  # fmt: skip
    assert out.exists() and out.with_suffix(".md").exists()
