r"""A persistent Pallas kernel for the Elman RNN: the whole time loop inside one GPU kernel.

For small batches a GPU RNN is latency-bound: each step of a ``lax.scan`` is at least one
kernel launch, and a cuDNN step takes about 1–2 µs where XLA's loop takes 4 µs or more. Here
each program of the grid owns ``block_batch`` rows of the batch, loads :math:`W_h` once, keeps
:math:`h` in registers, and runs every step itself:

.. math::

    z_t = x_t W_x + b \;(\text{hoisted: one XLA matmul}), \qquad
    h_t = \phi(z_t + h_{t-1} W_h) \;(\text{the kernel}).

The gradient is a second persistent kernel that runs the recurrence backwards with
:math:`W_h^\top` held the same way,

.. math::

    \delta_t = (\bar y_t + \bar h_t) \odot \phi'(z_t), \qquad
    \bar h_{t-1} = \delta_t W_h^\top, \qquad \bar h_{T-1} = \bar h_T^{\text{carry}},

and the weight gradients are hoisted, one XLA matmul each over all steps:
:math:`\bar W_h = \sum_t h_{t-1}^\top \delta_t`, :math:`\bar W_x = \sum_t x_t^\top \delta_t`,
:math:`\bar b = \sum_t \delta_t`, :math:`\bar x_t = \delta_t W_x^\top`. It is a
``jax.custom_vjp``: reverse mode only.

Status: written for the Triton backend and tested on CPU in Pallas's interpreter (outputs and
gradients against the reference loop; the CUDA lowering is checked too). It has not been timed
on a GPU yet, so `jaxrnn.unroll` does not dispatch to it; ``benchmarks/pallas_gpu.sh`` runs the
evaluation (correctness on the GPU, then timings against the scan and cuDNN).

Backend: Pallas's Triton backend, which JAX 0.11 deprecates in favour of Mosaic GPU (Hopper
and newer). It still runs on JAX 0.11 and on GPUs older than Hopper; if the evaluation shows
that the persistent design pays, a Mosaic GPU port comes next, with the LSTM and GRU.

Limits: dense sequences (no ``seq_lengths``, ``mask`` or ``resets``; ``reverse`` by flipping
``xs``); a hidden size that is a power of two from 16 to 256 (``W_h`` must fit on chip); the
batch is padded to a multiple of ``block_batch`` (at least 16, the smallest Triton matmul).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxrnn._src.elman import ElmanParams

ACTIVATIONS = ("tanh", "relu")
HIDDEN_SIZES = (16, 32, 64, 128, 256)


def _act(z, activation):
    return jnp.tanh(z) if activation == "tanh" else jnp.maximum(z, 0.0)


def _act_grad(h, d, activation):
    """``d ⊙ φ'(z)`` written with the output ``h = φ(z)``."""
    if activation == "tanh":
        return d * (1.0 - h * h)
    return jnp.where(h > 0.0, d, 0.0)


def _forward_kernel(xw_ref, wh_ref, h0_ref, hs_ref, ht_ref, *, activation, acc):
    w = wh_ref[...]
    steps = xw_ref.shape[0]

    def step(t, h):
        hw = jnp.dot(h.astype(w.dtype), w, preferred_element_type=acc)
        h = _act(xw_ref[t].astype(acc) + hw, activation)
        hs_ref[t] = h.astype(hs_ref.dtype)
        return h

    h = lax.fori_loop(0, steps, step, h0_ref[...].astype(acc))
    ht_ref[...] = h.astype(ht_ref.dtype)


def _backward_kernel(hs_ref, wht_ref, gs_ref, gt_ref, dz_ref, dh0_ref, *, activation, acc):
    wt = wht_ref[...]
    steps = hs_ref.shape[0]

    def step(i, dh):
        t = steps - 1 - i
        d = gs_ref[t].astype(acc) + dh
        dz = _act_grad(hs_ref[t].astype(acc), d, activation)
        dz_ref[t] = dz.astype(dz_ref.dtype)
        return jnp.dot(dz.astype(wt.dtype), wt, preferred_element_type=acc)

    dh = lax.fori_loop(0, steps, step, gt_ref[...].astype(acc))
    dh0_ref[...] = dh.astype(dh0_ref.dtype)


def _call(kernel, args, outs, block_batch, num_warps, interpret):
    """Runs ``kernel`` on a grid over batch blocks; every array is ``(T, B, H)`` or
    ``(B, H)``, except the ``(H, H)`` weight (always the second argument)."""

    def spec(shape):
        if len(shape) == 3:
            return pl.BlockSpec((shape[0], block_batch, shape[2]), lambda b: (0, b, 0))
        return pl.BlockSpec((block_batch, shape[1]), lambda b: (b, 0))

    batch = args[0].shape[1]
    weight_spec = pl.BlockSpec(args[1].shape, lambda b: (0, 0))
    in_specs = [spec(args[0].shape), weight_spec, *(spec(a.shape) for a in args[2:])]
    return pl.pallas_call(
        kernel,
        out_shape=outs,
        grid=(batch // block_batch,),
        in_specs=in_specs,
        out_specs=tuple(spec(o.shape) for o in outs),
        compiler_params=pl_triton.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
    )(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _sequence(params, xs, h0, config):
    return _sequence_fwd(params, xs, h0, config)[0]


def _project(params, xs):
    xw = jnp.einsum("tbf,fh->tbh", xs, params.w_x)
    for b in (params.b_x, params.b_h):
        if b is not None:
            xw = xw + b
    return xw


def _sequence_fwd(params, xs, h0, config):
    activation, block_batch, num_warps, weight_dtype, interpret = config
    acc = jnp.promote_types(xs.dtype, jnp.float32)
    xw = _project(params, xs)
    w_h = params.w_h.astype(weight_dtype)
    kernel = functools.partial(_forward_kernel, activation=activation, acc=acc)
    outs = (jax.ShapeDtypeStruct(xw.shape, xs.dtype), jax.ShapeDtypeStruct(h0.shape, xs.dtype))
    hs, ht = _call(kernel, (xw, w_h, h0), outs, block_batch, num_warps, interpret)
    return (hs, ht), (params, xs, h0, hs)


def _sequence_bwd(config, residuals, cotangents):
    activation, block_batch, num_warps, weight_dtype, interpret = config
    params, xs, h0, hs = residuals
    acc = jnp.promote_types(xs.dtype, jnp.float32)
    g_hs, g_ht = cotangents
    w_ht = params.w_h.T.astype(weight_dtype)
    kernel = functools.partial(_backward_kernel, activation=activation, acc=acc)
    outs = (jax.ShapeDtypeStruct(hs.shape, hs.dtype), jax.ShapeDtypeStruct(h0.shape, h0.dtype))
    g_ht = g_ht.astype(hs.dtype)
    dz, dh0 = _call(kernel, (hs, w_ht, g_hs, g_ht), outs, block_batch, num_warps, interpret)
    h_prev = jnp.concatenate([h0[None], hs[:-1]], axis=0)
    db = jnp.sum(dz, axis=(0, 1))
    grads = ElmanParams(
        w_x=jnp.einsum("tbf,tbh->fh", xs, dz).astype(params.w_x.dtype),
        w_h=jnp.einsum("tbh,tbk->hk", h_prev, dz).astype(params.w_h.dtype),
        b_x=None if params.b_x is None else db.astype(params.b_x.dtype),
        b_h=None if params.b_h is None else db.astype(params.b_h.dtype),
    )
    dxs = jnp.einsum("tbh,fh->tbf", dz, params.w_x).astype(xs.dtype)
    return grads, dxs, dh0.astype(h0.dtype)


_sequence.defvjp(_sequence_fwd, _sequence_bwd)


def elman_sequence(
    params: ElmanParams,
    xs: jax.Array,
    h0: jax.Array | None = None,
    *,
    activation: str = "tanh",
    block_batch: int = 16,
    num_warps: int = 8,
    weight_dtype=None,
    interpret: bool = False,
):
    """Runs an Elman RNN over time-major ``xs: (T, B, F)`` with the persistent kernels.

    Args:
      params: `ElmanParams` of ``jaxrnn.elman(H).init``.
      xs: ``(T, B, F)`` float32 or bfloat16 inputs, time-major.
      h0: ``(B, H)`` initial state; default zeros.
      activation: ``"tanh"`` or ``"relu"``, as the cell's.
      block_batch: batch rows per program (a power of two, at least 16); the batch is padded
        to a multiple of it.
      num_warps: Triton warps per program.
      weight_dtype: dtype ``W_h`` is held in on chip (default: ``xs.dtype``); the products
        accumulate in float32.
      interpret: run in Pallas's interpreter (any backend; for tests).

    Returns:
      ``(hs, h_T)``: ``(T, B, H)`` states (the outputs) and the final state.
    """
    fn = "elman_sequence"
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {ACTIVATIONS}, got {activation!r}.")
    hidden = params.w_h.shape[0]
    if hidden not in HIDDEN_SIZES:
        raise ValueError(
            f"{fn}: hidden size must be one of {HIDDEN_SIZES} (W_h is held on chip), got {hidden}."
        )
    if block_batch < 16 or block_batch & (block_batch - 1):
        raise ValueError(f"{fn}: block_batch must be a power of two >= 16, got {block_batch!r}.")
    if xs.ndim != 3 or xs.shape[-1] != params.w_x.shape[0]:
        raise ValueError(
            f"{fn}: xs must be (time, batch, {params.w_x.shape[0]}), got shape {xs.shape}."
        )
    steps, batch, _ = xs.shape
    if h0 is None:
        h0 = jnp.zeros((batch, hidden), xs.dtype)
    elif h0.shape != (batch, hidden):
        raise ValueError(f"{fn}: h0 must have shape {(batch, hidden)}, got {h0.shape}.")
    weight_dtype = jnp.dtype(xs.dtype if weight_dtype is None else weight_dtype)
    pad = -batch % block_batch
    if pad:
        xs = jnp.pad(xs, ((0, 0), (0, pad), (0, 0)))
        h0 = jnp.pad(h0, ((0, pad), (0, 0)))
    config = (activation, block_batch, num_warps, weight_dtype, interpret)
    hs, ht = _sequence(params, xs, h0.astype(xs.dtype), config)
    return hs[:, :batch], ht[:batch]
