r"""Persistent Pallas kernels for the Elman RNN, LSTM and GRU: the time loop inside one kernel.

For small batches a GPU RNN is latency-bound: each step of a ``lax.scan`` is at least one
kernel launch, and a cuDNN step takes about 1–2 µs where XLA's loop takes 4 µs or more. Here
each program of the grid owns ``block_batch`` rows of the batch, loads :math:`W_h` once (one
``H × H`` block per gate), keeps the carry in registers, and runs every step itself. The input
projection is hoisted out, one XLA matmul over all steps:

.. math::

    Z^x = X W_x + b_x + b_h, \qquad z_t = Z^x_t + h_{t-1} W_h \;(\text{in the kernel}).

Elman: :math:`h_t = \phi(z_t)`. LSTM, gates :math:`i, f, g, o` as `jaxrnn.lstm`:
:math:`c_t = \sigma(f_t) c_{t-1} + \sigma(i_t)\tanh(g_t)`, :math:`h_t = \sigma(o_t)\tanh(c_t)`.
GRU, as `jaxrnn.gru`: :math:`r, z = \sigma(\cdot)`, :math:`n_t = \tanh(Z^x_{n,t} + r_t \odot
(h_{t-1} W_{hn} + b_{hn}))`, :math:`h_t = (1 - z_t) n_t + z_t h_{t-1}` (``b_hn`` stays in the
kernel).

The gradient is a second persistent kernel that runs the recurrence backwards with
:math:`W_h^\top` held the same way. It turns the output and carry cotangents into the
pre-activation cotangents :math:`\delta_t = \partial L / \partial z_t` (Elman:
:math:`\delta_t = (\bar y_t + \delta_{t+1} W_h^\top) \odot \phi'(z_t)`; LSTM: the usual
gate derivatives with the cell-state cotangent carried along), and the weight gradients are
hoisted, one XLA matmul each over all steps:

.. math::

    \bar W_h = \sum_t h_{t-1}^\top \delta_t, \quad \bar W_x = \sum_t x_t^\top \delta_t, \quad
    \bar b = \sum_t \delta_t, \quad \bar x_t = \delta_t W_x^\top.

`sequence` is a ``jax.custom_vjp``: reverse mode only.

`primal_scan` runs the forward kernel as the primal of `jaxrnn.unroll`'s fast path (its
``"pallas"`` placement): it returns the fast path's outputs and per-step residuals, and the
fast path's linear JVP rule does the rest, so forward mode, reverse mode (XLA's transposed
scan) and higher orders keep working. `tangent_transpose` runs that rule's reverse loop on the
backward kernels instead, from the same residuals, where `fastpath.PALLAS_BACKWARD_TABLE`
says (its measurement on a GPU is pending: the table comes from the `sequence` pair's).

Status: tested on CPU in Pallas's interpreter (outputs and gradients against the loop over
``cell.step`` and against `jaxrnn.unroll`; ``check_grads`` in float64; `jaxrnn.unroll` on the
``"pallas"`` placement against the reference scan, ``jax.jvp`` and ``check_grads`` of order 2),
and the CUDA lowering is checked down to the Triton calls. On an H100 (jax 0.11.2,
``benchmarks/pallas_gpu.sh``) it matched `jaxrnn.unroll` in every kind, dtype and flag mode,
and its timings filled ``fastpath.PALLAS_TABLE``: `jaxrnn.unroll` dispatches to it on GPU for
the Elman RNN (float32, bfloat16) up to batch 8 and for the bfloat16 LSTM and GRU up to
batch 64, at hidden sizes up to 128.

Backend: Pallas's Triton backend, which JAX 0.11 deprecates in favour of Mosaic GPU (Hopper
and newer). It still runs on JAX 0.11 and on GPUs older than Hopper; if the evaluation shows
that the persistent design pays, a Mosaic GPU port comes next.

``seq_lengths``, ``mask``, ``resets`` and ``reverse`` have `jaxrnn.unroll`'s meaning: each
kernel reads two per-step, per-row flags (take the step, or hold the carry; zero the carry
before the step), and its backward kernel passes the cotangents through skipped steps and
stops them at resets. ``reverse`` flips the inputs in time around the kernels.

Limits: no LSTM projection; a hidden size that is a power of two from 16 to 256 (the weights
must fit on chip: an LSTM at H = 128 holds 256 KiB of float32 weights, a GRU 192 KiB, so
``weight_dtype=jnp.bfloat16`` may be needed); the batch is padded to a multiple of
``block_batch`` (at least 16, the smallest Triton matmul).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from jaxrnn._src import checks, fastpath
from jaxrnn._src import unroll as unroll_lib
from jaxrnn._src.lstm import LSTMCarry

KINDS = ("elman_tanh", "elman_relu", "lstm", "gru")
HIDDEN_SIZES = (16, 32, 64, 128, 256)
# Recurrent weights up to this size are held in shared memory for the whole loop; larger ones
# are streamed one gate block at a time. Compiled for sm_90 with Triton 3.9 (no GPU needed;
# num_warps=8, no register spills but 4 bytes in the bf16 LSTM forward), the kernels use about
# the held weights' size plus 8–16 KiB of shared memory: Elman H128 f32 72–80 KiB, GRU H128
# f32 200–208 KiB, LSTM H128 bf16 132–136 KiB; LSTM H128 f32 would need 264 KiB held (over an
# H100's 227 KiB per block) and takes 72 KiB streamed. One H x H block must fit: Elman H256
# needs bfloat16 weights.
HELD_WEIGHT_BYTES = 200 * 1024
# The defaults of `sequence` and the settings of `primal_scan`: batch rows per program, warps.
BLOCK_BATCH = 16
NUM_WARPS = 8
_CARRY_LEAVES = {"elman_tanh": 1, "elman_relu": 1, "lstm": 2, "gru": 1}


# ----------------------------------------------------------------------------------------------
# Kernels. Refs of a program: "seq" (T, block_batch, n), "row" (block_batch, n), "full" weights.


def _gate(ref, g, hidden, t=None):
    """Gate ``g``'s columns of a ``(.., G·H)`` ref, at step ``t`` for a sequence ref."""
    cols = pl.ds(g * hidden, hidden)
    return ref[:, cols] if t is None else ref[t, :, cols]


def _held(load, n, stream):
    """``get(k)``: weight block ``k`` of ``n``, loaded once before the time loop (held on chip),
    or with ``stream`` loaded again right before each use in every step (from L2: for weights
    too large to stay in shared memory, one block at a time)."""
    if stream:
        return load
    held = [load(k) for k in range(n)]
    return lambda k: held[k]


def _row_blocks(wt_ref, hidden, n, stream):
    """``get(k)``: rows ``k·H:(k+1)·H`` of ``W_hᵀ``, gate ``k``'s block (held or streamed)."""
    return _held(lambda g: wt_ref[pl.ds(g * hidden, hidden), :], n, stream)


def _before(ref, t, first, acc, fresh):
    """The state that entered step ``t``: ``ref[t - 1]`` (``first`` at ``t = 0``), zero in
    the rows that ``fresh`` (a reset at ``t``) marks."""
    prev = jnp.where(t > 0, ref[jnp.maximum(t - 1, 0)].astype(acc), first)
    return jnp.where(fresh, 0.0, prev)


def _flags(keep_ref, reset_ref, t):
    """``(keep, fresh)`` of step ``t``, each ``(block_batch, 1)`` bool: the step is taken
    (``mask``), the carry restarts from zeros before it (``resets``)."""
    return keep_ref[t] > 0.5, reset_ref[t] > 0.5


def _elman_forward(
    xw_ref, w_ref, h0_ref, keep_ref, reset_ref, hs_ref, ht_ref, *, relu, acc, stream
):  # fmt: skip
    get_w = _held(lambda _: w_ref[...], 1, stream)

    def step(t, h):
        keep, fresh = _flags(keep_ref, reset_ref, t)
        h = jnp.where(fresh, 0.0, h)
        w = get_w(0)
        z = xw_ref[t].astype(acc) + jnp.dot(h.astype(w.dtype), w, preferred_element_type=acc)
        h = jnp.where(keep, jnp.maximum(z, 0.0) if relu else jnp.tanh(z), h)
        hs_ref[t] = h.astype(hs_ref.dtype)
        return h

    ht_ref[...] = lax.fori_loop(0, xw_ref.shape[0], step, h0_ref[...].astype(acc)).astype(
        ht_ref.dtype
    )


def _elman_backward(
    hs_ref, wt_ref, keep_ref, reset_ref, gs_ref, ght_ref, dz_ref, dh0_ref, *, relu, acc, stream
):  # fmt: skip
    get_wt = _held(lambda _: wt_ref[...], 1, stream)
    steps = hs_ref.shape[0]

    def step(i, dh):
        wt = get_wt(0)
        t = steps - 1 - i
        keep, fresh = _flags(keep_ref, reset_ref, t)
        d = gs_ref[t].astype(acc) + dh
        h = hs_ref[t].astype(acc)
        dz = jnp.where(h > 0.0, d, 0.0) if relu else d * (1.0 - h * h)
        dz = jnp.where(keep, dz, 0.0)
        dz_ref[t] = dz.astype(dz_ref.dtype)
        dh = jnp.where(keep, jnp.dot(dz.astype(wt.dtype), wt, preferred_element_type=acc), d)
        return jnp.where(fresh, 0.0, dh)

    dh0_ref[...] = lax.fori_loop(0, steps, step, ght_ref[...].astype(acc)).astype(dh0_ref.dtype)


def _lstm_forward(
    xw_ref, w_ref, h0_ref, c0_ref, keep_ref, reset_ref, hs_ref, cs_ref, acts_ref, ht_ref, ct_ref,
    *, acc, stream,
):  # fmt: skip
    hidden = h0_ref.shape[-1]
    get_w = _held(lambda g: _gate(w_ref, g, hidden), 4, stream)

    def step(t, carry):
        keep, fresh = _flags(keep_ref, reset_ref, t)
        h_in, c_in = (jnp.where(fresh, 0.0, a) for a in carry)
        hw = h_in.astype(w_ref.dtype)
        z = [
            _gate(xw_ref, g, hidden, t).astype(acc)
            + jnp.dot(hw, get_w(g), preferred_element_type=acc)
            for g in range(4)
        ]
        i, f, o = jax.nn.sigmoid(z[0]), jax.nn.sigmoid(z[1]), jax.nn.sigmoid(z[3])
        g = jnp.tanh(z[2])
        c = jnp.where(keep, f * c_in + i * g, c_in)
        h = jnp.where(keep, o * jnp.tanh(c), h_in)
        for k, a in enumerate((i, f, g, o)):
            acts_ref[t, :, pl.ds(k * hidden, hidden)] = a.astype(acts_ref.dtype)
        cs_ref[t] = c.astype(cs_ref.dtype)
        hs_ref[t] = h.astype(hs_ref.dtype)
        return h, c

    init = (h0_ref[...].astype(acc), c0_ref[...].astype(acc))
    h, c = lax.fori_loop(0, xw_ref.shape[0], step, init)
    ht_ref[...] = h.astype(ht_ref.dtype)
    ct_ref[...] = c.astype(ct_ref.dtype)


def _lstm_reverse(
    terms, steps, hidden, wt_ref, keep_ref, reset_ref, gs_ref, ght_ref, gct_ref, dz_ref,
    dh0_ref, dc0_ref, *, acc, stream,
):  # fmt: skip
    """The LSTM's backward loop, whatever its residuals: ``terms(t, d, dc, fresh)`` gives step
    ``t``'s gate cotangents ``(dz_i, dz_f, dz_g, dz_o)``, the cell state's cotangent ``dc_t``
    and the forget gate ``f``, from ``d`` (the cotangent of ``h_t``) and ``dc`` (of ``c_t``,
    from the step after). Writes ``dz`` (zero at skipped steps) and the initial carry's
    cotangents."""
    get_wt = _row_blocks(wt_ref, hidden, 4, stream)

    def step(k, carry):
        dh, dc = carry
        t = steps - 1 - k
        keep, fresh = _flags(keep_ref, reset_ref, t)
        d = gs_ref[t].astype(acc) + dh
        dz, dc_t, f = terms(t, d, dc, fresh)
        dh = jnp.zeros_like(d)
        for n in range(4):
            dz_n = jnp.where(keep, dz[n], 0.0)
            dz_ref[t, :, pl.ds(n * hidden, hidden)] = dz_n.astype(dz_ref.dtype)
            dh = dh + jnp.dot(dz_n.astype(wt_ref.dtype), get_wt(n), preferred_element_type=acc)
        # A skipped step passes both cotangents through; a reset stops them.
        dh = jnp.where(fresh, 0.0, jnp.where(keep, dh, d))
        return dh, jnp.where(fresh, 0.0, jnp.where(keep, dc_t * f, dc))

    init = (ght_ref[...].astype(acc), gct_ref[...].astype(acc))
    dh, dc = lax.fori_loop(0, steps, step, init)
    dh0_ref[...] = dh.astype(dh0_ref.dtype)
    dc0_ref[...] = dc.astype(dc0_ref.dtype)


def _lstm_backward(acts_ref, wt_ref, cs_ref, c0_ref, *refs, acc, stream):
    """`_lstm_reverse` from the forward kernel's gates and cell states."""
    hidden = c0_ref.shape[-1]
    c0 = c0_ref[...].astype(acc)

    def terms(t, d, dc, fresh):
        i, f, g, o = (_gate(acts_ref, n, hidden, t).astype(acc) for n in range(4))
        c_prev = _before(cs_ref, t, c0, acc, fresh)
        tc = jnp.tanh(cs_ref[t].astype(acc))
        dc_t = dc + d * o * (1.0 - tc * tc)
        dz = (
            dc_t * g * i * (1.0 - i),  # i
            dc_t * c_prev * f * (1.0 - f),  # f
            dc_t * i * (1.0 - g * g),  # g
            d * tc * o * (1.0 - o),  # o
        )
        return dz, dc_t, f

    _lstm_reverse(terms, cs_ref.shape[0], hidden, wt_ref, *refs, acc=acc, stream=stream)


def _lstm_tangent_backward(slopes_ref, f_ref, out_ref, wt_ref, *refs, acc, stream):
    """`_lstm_reverse` from the fast path's residuals (`fastpath.lstm_residuals`): the gate
    slopes ``[g·σ'(i), c_in·σ'(f), i·tanh'(g), tanh(c)·σ'(o)]``, ``f`` and ``o·tanh'(c)``,
    instead of the gates and cell states. ``gs`` is zero at skipped steps (`tangent_transpose`)."""
    hidden = f_ref.shape[-1]

    def terms(t, d, dc, fresh):
        del fresh
        dc_t = dc + d * out_ref[t].astype(acc)
        slope = lambda n: _gate(slopes_ref, n, hidden, t).astype(acc)  # noqa: E731
        dz = tuple(slope(n) * ct for n, ct in enumerate((dc_t, dc_t, dc_t, d)))
        return dz, dc_t, f_ref[t].astype(acc)

    _lstm_reverse(terms, f_ref.shape[0], hidden, wt_ref, *refs, acc=acc, stream=stream)


def _gru_forward(
    xw_ref, w_ref, bhn_ref, h0_ref, keep_ref, reset_ref, hs_ref, acts_ref, ht_ref, *, acc, stream
):  # fmt: skip
    """``xw`` holds ``x W_x + b_x`` plus ``b_h``'s r and z parts; ``b_hn`` stays inside ``r ⊙``."""
    hidden = h0_ref.shape[-1]
    get_w = _held(lambda g: _gate(w_ref, g, hidden), 3, stream)
    b_hn = bhn_ref[...].astype(acc)

    def step(t, h):
        keep, fresh = _flags(keep_ref, reset_ref, t)
        h = jnp.where(fresh, 0.0, h)
        hb = h.astype(w_ref.dtype)
        hw = [jnp.dot(hb, get_w(g), preferred_element_type=acc) for g in range(3)]
        r = jax.nn.sigmoid(_gate(xw_ref, 0, hidden, t).astype(acc) + hw[0])
        z = jax.nn.sigmoid(_gate(xw_ref, 1, hidden, t).astype(acc) + hw[1])
        hn = hw[2] + b_hn
        n = jnp.tanh(_gate(xw_ref, 2, hidden, t).astype(acc) + r * hn)
        h = jnp.where(keep, (1.0 - z) * n + z * h, h)
        for k, a in enumerate((r, z, n, hn)):
            acts_ref[t, :, pl.ds(k * hidden, hidden)] = a.astype(acts_ref.dtype)
        hs_ref[t] = h.astype(hs_ref.dtype)
        return h

    h = lax.fori_loop(0, xw_ref.shape[0], step, h0_ref[...].astype(acc))
    ht_ref[...] = h.astype(ht_ref.dtype)


def _gru_backward(
    acts_ref, wt_ref, hs_ref, h0_ref, keep_ref, reset_ref, gs_ref, ght_ref, dz_ref, dh0_ref, *,
    acc, stream,
):  # fmt: skip
    """``dz`` is the cotangent of the input pre-activations ``[x_r, x_z, x_n]``."""
    hidden = h0_ref.shape[-1]
    get_wt = _row_blocks(wt_ref, hidden, 3, stream)
    steps = hs_ref.shape[0]
    h0 = h0_ref[...].astype(acc)

    def step(k, dh):
        t = steps - 1 - k
        keep, fresh = _flags(keep_ref, reset_ref, t)
        r, z, n, hn = (_gate(acts_ref, m, hidden, t).astype(acc) for m in range(4))
        h_prev = _before(hs_ref, t, h0, acc, fresh)
        d = gs_ref[t].astype(acc) + dh
        dzn = jnp.where(keep, d * (1.0 - z) * (1.0 - n * n), 0.0)
        dzr = dzn * hn * r * (1.0 - r)
        dzz = jnp.where(keep, d * (h_prev - n) * z * (1.0 - z), 0.0)
        for m, dm in enumerate((dzr, dzz, dzn)):
            dz_ref[t, :, pl.ds(m * hidden, hidden)] = dm.astype(dz_ref.dtype)
        dh = jnp.where(keep, d * z, d)
        for g, dm in enumerate((dzr, dzz, dzn * r)):
            dh = dh + jnp.dot(dm.astype(wt_ref.dtype), get_wt(g), preferred_element_type=acc)
        return jnp.where(fresh, 0.0, dh)

    dh = lax.fori_loop(0, steps, step, ght_ref[...].astype(acc))
    dh0_ref[...] = dh.astype(dh0_ref.dtype)


def _gru_recurrent_cotangent(dz, r):
    """The GRU's cotangent of its recurrent pre-activations ``h W_h + b_h`` from ``dz``, that of
    its input ones ``[x_r, x_z, x_n]``: the recurrent n term is ``r ⊙ (h W_hn + b_hn)``, so its
    cotangent carries the factor ``r``."""
    hidden = r.shape[-1]
    return jnp.concatenate([dz[..., : 2 * hidden], dz[..., 2 * hidden :] * r], -1)


def _call(kernel, args, roles, outs, out_roles, config, acc, **static):
    """``pallas_call`` on a grid over batch blocks; ``roles`` say how each array is cut.

    ``kernel`` gets the accumulation dtype ``acc``, ``config.stream`` and ``static``.
    """

    def spec(role, shape):
        if role == "seq":
            return pl.BlockSpec((shape[0], config.block_batch, shape[2]), lambda b: (0, b, 0))
        if role == "row":
            return pl.BlockSpec((config.block_batch, shape[1]), lambda b: (b, 0))
        return pl.BlockSpec(shape, lambda b: (0, 0))

    return pl.pallas_call(
        functools.partial(kernel, acc=acc, stream=config.stream, **static),
        out_shape=outs,
        grid=(args[0].shape[1] // config.block_batch,),
        in_specs=[spec(r, a.shape) for r, a in zip(roles, args)],
        out_specs=tuple(spec(r, o.shape) for r, o in zip(out_roles, outs)),
        compiler_params=pl_triton.CompilerParams(num_warps=config.num_warps, num_stages=1),
        interpret=config.interpret,
    )(*args)


# ----------------------------------------------------------------------------------------------
# The sequence function and its VJP.


class _Config(NamedTuple):
    """Static settings of one call (hashable: the VJP's non-differentiable argument)."""

    kind: str
    block_batch: int
    num_warps: int
    weight_dtype: Any
    interpret: bool
    stream: bool


def _project(kind, params, xs):
    """``X W_x + b_x + b_h`` (for the GRU, ``b_h``'s n part is left out: it sits inside
    ``r ⊙ (h W_hn + b_hn)``)."""
    xw = jnp.einsum("tbf,fg->tbg", xs, params.w_x)
    if params.b_x is not None:
        xw = xw + params.b_x
    if params.b_h is not None:
        b_h = params.b_h
        if kind == "gru":
            two = 2 * (b_h.shape[0] // 3)
            b_h = jnp.concatenate([b_h[:two], jnp.zeros_like(b_h[two:])])
        xw = xw + b_h
    return xw


def _entering(states, first, fresh):
    """The state entering each step of a ``(T, B, H)`` sequence of carries: ``first``, then
    the previous step's, zero where ``fresh`` (the kernels' reset flag, ``(T, B, 1)``) is set."""
    prev = jnp.concatenate([first[None], states[:-1]], axis=0)
    return jnp.where(fresh > 0.5, jnp.zeros((), prev.dtype), prev)


def _block_fits(hidden: int, weight_dtype) -> bool:
    """Whether one ``H × H`` block of ``W_h`` in ``weight_dtype`` fits `HELD_WEIGHT_BYTES`."""
    return hidden * hidden * jnp.dtype(weight_dtype).itemsize <= HELD_WEIGHT_BYTES


def _streamed(w_h, weight_dtype) -> bool:
    """The default of ``stream_weights``: ``W_h`` in ``weight_dtype`` over `HELD_WEIGHT_BYTES`."""
    return w_h.size * jnp.dtype(weight_dtype).itemsize > HELD_WEIGHT_BYTES


def _struct(like, dtype):
    return jax.ShapeDtypeStruct(like.shape, dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _sequence(params, xs, carry, flags, config):
    """``flags = (keep, reset)``: ``(T, B, 1)`` arrays of 0/1 (mask; reset before the step)."""
    return _sequence_fwd(params, xs, carry, flags, config)[0]


def _sequence_fwd(params, xs, carry, flags, config):
    acc = jnp.promote_types(xs.dtype, jnp.float32)
    xw = _project(config.kind, params, xs)
    w_h = params.w_h.astype(config.weight_dtype)
    dt = xs.dtype
    if config.kind == "lstm":
        h0, c0 = carry
        seq_h = jax.ShapeDtypeStruct(xs.shape[:2] + h0.shape[-1:], dt)
        outs = (seq_h, seq_h, _struct(xw, dt), _struct(h0, dt), _struct(c0, dt))
        hs, cs, acts, ht, ct = _call(
            _lstm_forward, (xw, w_h, h0, c0, *flags),
            ("seq", "full", "row", "row", "seq", "seq"), outs, ("seq", "seq", "seq", "row", "row"),
            config, acc,
        )  # fmt: skip
        return (hs, (ht, ct)), (params, xs, carry, flags, hs, (cs, acts))
    if config.kind == "gru":
        (h0,) = carry
        hidden = h0.shape[-1]
        b_hn = jnp.zeros((1, hidden), acc) if params.b_h is None else params.b_h[None, 2 * hidden :]
        seq_h = jax.ShapeDtypeStruct(xs.shape[:2] + (hidden,), dt)
        seq_a = jax.ShapeDtypeStruct(xs.shape[:2] + (4 * hidden,), dt)
        hs, acts, ht = _call(
            _gru_forward, (xw, w_h, b_hn.astype(acc), h0, *flags),
            ("seq", "full", "full", "row", "seq", "seq"), (seq_h, seq_a, _struct(h0, dt)),
            ("seq", "seq", "row"), config, acc,
        )  # fmt: skip
        return (hs, (ht,)), (params, xs, carry, flags, hs, (acts,))
    (h0,) = carry
    hs, ht = _call(
        _elman_forward, (xw, w_h, h0, *flags), ("seq", "full", "row", "seq", "seq"),
        (_struct(xw, dt), _struct(h0, dt)), ("seq", "row"), config, acc,
        relu=config.kind == "elman_relu",
    )  # fmt: skip
    return (hs, (ht,)), (params, xs, carry, flags, hs, ())


def _sequence_bwd(config, residuals, cotangents):
    params, xs, carry, flags, hs, saved = residuals
    g_hs, g_carry = cotangents
    acc = jnp.promote_types(xs.dtype, jnp.float32)
    dt = xs.dtype
    w_ht = params.w_h.T.astype(config.weight_dtype)
    g_carry = tuple(g.astype(dt) for g in g_carry)
    if config.kind == "lstm":
        cs, acts = saved
        h0, c0 = carry
        dz, dh0, dc0 = _call(
            _lstm_backward,
            (acts, w_ht, cs, c0, *flags, g_hs.astype(dt), *g_carry),
            ("seq", "full", "seq", "row", "seq", "seq", "seq", "row", "row"),
            (_struct(acts, dt), _struct(h0, dt), _struct(c0, dt)),
            ("seq", "row", "row"),
            config,
            acc,
        )
        d_carry = (dh0, dc0)
    elif config.kind == "gru":
        (acts,) = saved
        (h0,) = carry
        hidden = h0.shape[-1]
        dz, dh0 = _call(
            _gru_backward,
            (acts, w_ht, hs, h0, *flags, g_hs.astype(dt), *g_carry),
            ("seq", "full", "seq", "row", "seq", "seq", "seq", "row"),
            (jax.ShapeDtypeStruct(xs.shape[:2] + (3 * hidden,), dt), _struct(h0, dt)),
            ("seq", "row"),
            config,
            acc,
        )
        d_carry = (dh0,)
        dz_h = _gru_recurrent_cotangent(dz, acts[..., :hidden])
    else:
        (h0,) = carry
        dz, dh0 = _call(
            _elman_backward, (hs, w_ht, *flags, g_hs.astype(dt), *g_carry),
            ("seq", "full", "seq", "seq", "seq", "row"), (_struct(hs, dt), _struct(h0, dt)),
            ("seq", "row"), config, acc,
            relu=config.kind == "elman_relu",
        )  # fmt: skip
        d_carry = (dh0,)
    if config.kind != "gru":
        dz_h = dz
    h_prev = _entering(hs, h0, flags[1])  # dz is zero at skipped steps
    grads = params._replace(
        w_x=jnp.einsum("tbf,tbg->fg", xs, dz).astype(params.w_x.dtype),
        w_h=jnp.einsum("tbh,tbg->hg", h_prev, dz_h).astype(params.w_h.dtype),
        b_x=None if params.b_x is None else jnp.sum(dz, axis=(0, 1)).astype(params.b_x.dtype),
        b_h=None if params.b_h is None else jnp.sum(dz_h, axis=(0, 1)).astype(params.b_h.dtype),
    )
    dxs = jnp.einsum("tbg,fg->tbf", dz, params.w_x).astype(xs.dtype)
    d_flags = tuple(jnp.zeros_like(a) for a in flags)
    return grads, dxs, tuple(d.astype(c.dtype) for d, c in zip(d_carry, carry)), d_flags


_sequence.defvjp(_sequence_fwd, _sequence_bwd)


def sequence(
    cell,
    params,
    xs: jax.Array,
    carry=None,
    *,
    reverse: bool = False,
    seq_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    block_batch: int = BLOCK_BATCH,
    num_warps: int = NUM_WARPS,
    weight_dtype=None,
    stream_weights: bool | None = None,
    interpret: bool = False,
):
    """Runs a built-in Elman, LSTM or GRU cell over time-major ``xs`` with the persistent kernels.

    The same function as ``jaxrnn.unroll(cell, params, xs, carry, time_major=True, reverse=...,
    seq_lengths=..., mask=..., resets=...)``. In the kernels a step is taken where the mask is
    set (else the carry is held) after the carry is zeroed where a reset is set; lengths
    become a mask, and ``reverse`` runs the kernels on time-flipped inputs, a reset then
    zeroing the carry after its step instead of before.

    Args:
      cell: ``jaxrnn.elman(H)`` (tanh or relu), ``jaxrnn.lstm(H)`` without ``proj_size``, or
        ``jaxrnn.gru(H)``.
      params: ``cell.init(...)``.
      xs: ``(T, B, F)`` float inputs, time-major.
      carry: the cell's carry for batch ``B`` (``(B, H)``, or ``LSTMCarry(h, c)``); default
        zeros.
      reverse, seq_lengths: as `jaxrnn.unroll`; ``seq_lengths`` is ``(B,)`` ints.
      mask, resets: as `jaxrnn.unroll` with ``time_major=True``: ``(T, B)`` bool.
      block_batch: batch rows per program (a power of two, at least 16); the batch is padded
        to a multiple of it.
      num_warps: Triton warps per program.
      weight_dtype: dtype the recurrent weights are held in on chip (default ``xs.dtype``);
        products accumulate in float32 (float64 for float64 inputs).
      stream_weights: reload ``W_h`` from global memory (L2) in every step instead of holding
        it in shared memory; default: only when it is larger than `HELD_WEIGHT_BYTES` (an
        LSTM at H = 128 in float32 needs 264 KiB of shared memory held, more than an H100's
        227 KiB per block).
      interpret: run in Pallas's interpreter (any backend; for tests).

    Returns:
      ``(ys, carry)``: ``(T, B, H)`` outputs and the final carry.
    """
    fn = "pallas_rnn.sequence"
    kind = getattr(cell, "kind", None)
    if kind not in KINDS or getattr(params, "w_p", None) is not None:
        raise ValueError(
            f"{fn}: cell must be jaxrnn.elman(...), jaxrnn.lstm(...) without proj_size or "
            f"jaxrnn.gru(...), got "
            f"{getattr(cell, 'name', cell)!r}."
        )
    backend = jax.default_backend()
    if not interpret and backend != "gpu":
        raise ValueError(
            f"{fn}: the kernels compile for a GPU (Pallas's Triton backend), but the default "
            f"backend is {backend!r}; pass interpret=True to run them in Pallas's interpreter."
        )
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
    steps, batch = xs.shape[:2]
    if seq_lengths is not None:
        seq_lengths = checks.check_seq_lengths(fn, seq_lengths, (batch,))
    if mask is not None:
        mask = checks.check_step_flags(fn, "mask", mask, (steps, batch), "time-major")
    if resets is not None:
        resets = checks.check_step_flags(fn, "resets", resets, (steps, batch), "time-major")
    mask, resets = unroll_lib.step_flags(steps, (batch,), seq_lengths, mask, resets)
    if carry is None:
        carry = cell.initial_carry((batch,), xs.dtype)
    leaves = tuple(jax.tree_util.tree_leaves(carry))
    if any(a.shape != (batch, hidden) for a in leaves) or len(leaves) != _CARRY_LEAVES[kind]:
        raise ValueError(
            f"{fn}: carry must be cell.initial_carry(({batch},)) with leaves of shape "
            f"{(batch, hidden)}, got shapes {[a.shape for a in leaves]}."
        )
    if mask is not None:
        # Skipped steps see a zero input, so NaN in the padding cannot leak into gradients.
        xs = jnp.where(mask[..., None], xs, jnp.zeros((), xs.dtype))
    weight_dtype = jnp.dtype(xs.dtype if weight_dtype is None else weight_dtype)
    if not _block_fits(hidden, weight_dtype):
        raise ValueError(
            f"{fn}: one {hidden}x{hidden} block of W_h in {weight_dtype.name} takes more than "
            f"{HELD_WEIGHT_BYTES // 1024} KiB of shared memory; pass weight_dtype=jnp.bfloat16."
        )
    if stream_weights is None:
        stream_weights = _streamed(params.w_h, weight_dtype)
    config = _Config(kind, block_batch, num_warps, weight_dtype, interpret, bool(stream_weights))
    run = _Run(xs, leaves, mask, resets, reverse, block_batch)
    hs, final = _sequence(params, run.xs, run.leaves, run.flags, config)
    ys, final = run.finish(hs, final)
    return ys, (LSTMCarry(*final) if kind == "lstm" else final[0])


class _Run:
    """One call's time-major ``(T, B, ·)`` arrays as the kernels take them: flipped in time for
    ``reverse``, the batch padded to a multiple of ``block_batch``, the mask and resets turned
    into the kernels' ``(keep, fresh)`` flags; `finish` undoes it on the outputs."""

    def __init__(self, xs, leaves, mask, resets, reverse, block_batch):
        steps, self.batch = xs.shape[:2]
        self.mask, self.resets, self.reverse = mask, resets, reverse
        keep = jnp.ones((steps, self.batch), bool) if mask is None else self.flip(mask)
        fresh = jnp.zeros((steps, self.batch), bool)
        if resets is not None:
            # Backwards, a reset at t zeroes the carry after step t: before the next flipped
            # step (and, for t = 0, the final carry: `finish`).
            fresh = jnp.concatenate([fresh[:1], self.flip(resets)[:-1]]) if reverse else resets
        acc = jnp.promote_types(xs.dtype, jnp.float32)
        self.pad = -self.batch % block_batch
        self.flags = tuple(self.enter(a[..., None].astype(acc), flip=False) for a in (keep, fresh))
        self.xs = self.enter(xs)
        self.leaves = tuple(a.astype(xs.dtype) for a in leaves)
        if self.pad:
            self.leaves = tuple(jnp.pad(a, ((0, self.pad), (0, 0))) for a in self.leaves)

    def flip(self, a):
        return a[::-1] if self.reverse else a

    def enter(self, a, flip=True):
        """A caller's ``(T, B, ·)`` array in the kernels' time order (``flip``) and batch."""
        a = self.flip(a) if flip else a
        return jnp.pad(a, ((0, 0), (0, self.pad), (0, 0))) if self.pad else a

    def seq(self, a):
        """A kernel's ``(T, B_padded, ·)`` array in the caller's time order and batch."""
        return self.flip(a[:, : self.batch])

    def finish(self, hs, final):
        ys, final = self.seq(hs), tuple(a[: self.batch] for a in final)
        if self.mask is not None:  # the kernels store the carry's h, held at skipped steps
            ys = jnp.where(self.mask[..., None], ys, jnp.zeros((), ys.dtype))
        if self.reverse and self.resets is not None:
            zero = self.resets[0][:, None]
            final = tuple(jnp.where(zero, jnp.zeros((), a.dtype), a) for a in final)
        return ys, final


# ----------------------------------------------------------------------------------------------
# The fast path's primal on the kernels (`fastpath._primal_scan` with the "pallas" placement).


class _Weights(NamedTuple):
    """The fast path's weights in the fields `_sequence_fwd` reads (``b_h``: the GRU's
    recurrent bias; the other cells fold theirs into ``b_x``)."""

    w_x: jax.Array
    b_x: jax.Array | None
    w_h: jax.Array
    b_h: jax.Array | None


def supports(kind: str, hidden: int, dtype) -> bool:
    """Whether the kernels take this cell kind, hidden size and dtype on a GPU (float32 or
    bfloat16; one ``H × H`` block of ``W_h`` within `HELD_WEIGHT_BYTES`)."""
    dtype = jnp.dtype(dtype)
    return (
        kind in KINDS
        and hidden in HIDDEN_SIZES
        and dtype in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
        and _block_fits(hidden, dtype)
    )


def primal_scan(kind, xs, w_x, b_x, w_h, b_in, carry, mask, resets, reverse, save, interpret):
    """`fastpath._primal_scan` on the persistent forward kernel, in its formats.

    ``xs: (T, *batch, F)`` (inputs of skipped steps already zero), ``carry``: a tuple of
    ``(*batch, H)`` leaves, ``mask``/``resets``: ``(T, *batch)`` bool or ``None``. Returns
    ``(carry_out, (ys, extra))``, ``extra`` being ``None`` or, with ``save``, the fast path's
    ``(h_in, residuals)`` per step (the state entering each step, and the cell's residuals
    made from the kernel's saved gates), so the fast path's linear JVP rule, and with it
    forward and reverse mode, runs on top of the kernel.
    """
    batch_shape, hidden = xs.shape[1:-1], w_h.shape[0]
    n = math.prod(batch_shape)
    flat = lambda a: a.reshape(a.shape[0], n, *a.shape[1 + len(batch_shape) :])  # noqa: E731
    leaves = tuple(a.reshape(n, hidden) for a in carry)
    run = _Run(
        flat(xs), leaves, None if mask is None else flat(mask),
        None if resets is None else flat(resets), reverse, BLOCK_BATCH,
    )  # fmt: skip
    config = _Config(
        kind, BLOCK_BATCH, NUM_WARPS, jnp.dtype(xs.dtype), interpret, _streamed(w_h, xs.dtype)
    )
    params = _Weights(w_x, b_x, w_h, b_in)
    (hs, final), residuals = _sequence_fwd(params, run.xs, run.leaves, run.flags, config)
    saved = residuals[-1]
    ys, final = run.finish(hs, final)
    unflat = lambda a: a.reshape(a.shape[0], *batch_shape, a.shape[-1])  # noqa: E731
    carry_out = tuple(a.reshape(*batch_shape, hidden) for a in final)
    if not save:
        return carry_out, (unflat(ys), None)
    fresh = run.flags[1]
    h_in = _entering(hs, run.leaves[0], fresh)
    if kind == "lstm":
        cs, acts = saved
        i, f, g, o = jnp.split(acts, 4, axis=-1)
        c_in = _entering(cs, run.leaves[1], fresh)
        res = fastpath.lstm_residuals(i, f, g, o, c_in, jnp.tanh(cs))
    elif kind == "gru":
        res = tuple(jnp.split(saved[0], 4, axis=-1))
    else:
        res = (hs,)
    stacked = (unflat(run.seq(h_in)), tuple(unflat(run.seq(a)) for a in res))
    return carry_out, (unflat(ys), stacked)


# ----------------------------------------------------------------------------------------------
# The transpose of the fast path's tangent loop on the backward kernels (reverse mode of the
# "pallas" placement, where `fastpath.PALLAS_BACKWARD_TABLE` gives it).


def tangent_transpose(kind, inputs, w_h, mask, resets, reverse, ct_ys, ct_carry, interpret):
    r"""`fastpath._tangent_loop`'s transpose on the persistent backward kernels: the reverse
    loop of reverse mode, from the fast path's residuals.

    The tangent loop carries :math:`\dot h` (and :math:`\dot c`) through each step's linear
    map, :math:`\dot z_t = u_t + \dot h_{t-1} W_h`, the gates' slopes, masks and resets. Its
    transpose runs the steps backwards from the output and final-carry cotangents, holding
    :math:`W_h^\top` on chip: per step :math:`\delta_t = \bar z_t`, the cotangent of the
    step's pre-activation (of ``u_t``), and :math:`\bar h_{t-1} = \delta_t W_h^\top` plus
    what passes through the carry. Elman and GRU run `_elman_backward` and `_gru_backward`
    (the `sequence` pair's kernels; the Elman residual is its output, the GRU's ``r, z, n,
    hn`` and ``h_in``); the LSTM runs `_lstm_tangent_backward` on its slopes.

    ``inputs``: the fast path's coefficient inputs, time-major ``(T, *batch, ·)``; ``mask``,
    ``resets``: ``(T, *batch)`` bool or ``None``; ``ct_ys: (T, *batch, H)``; ``ct_carry``: a
    tuple of ``(*batch, H)``. Returns ``(ct_u, ct_v, ct_carry0)``: the cotangents of the
    hoisted input terms (``ct_v``, the GRU's recurrent part, else ``None``) and of the carry
    entering the sequence.
    """
    steps, *batch_shape, hidden = ct_ys.shape
    n = math.prod(batch_shape)
    flat = lambda a: a.reshape(a.shape[0], n, a.shape[-1])  # noqa: E731
    flags = [None if f is None else f.reshape(steps, n) for f in (mask, resets)]
    ct_carry = tuple(a.reshape(n, hidden) for a in ct_carry)
    if reverse and resets is not None:  # the final carry was zeroed after a reset at t = 0
        zero = flags[1][0][:, None]
        ct_carry = tuple(jnp.where(zero, jnp.zeros((), a.dtype), a) for a in ct_carry)
    run = _Run(flat(ct_ys), ct_carry, *flags, reverse, BLOCK_BATCH)
    keep, fresh = run.flags
    gs = jnp.where(keep > 0.5, run.xs, jnp.zeros((), run.xs.dtype))  # dys is zero there
    dt = ct_ys.dtype
    config = _Config(kind, BLOCK_BATCH, NUM_WARPS, jnp.dtype(dt), interpret, _streamed(w_h, dt))
    acc = jnp.promote_types(dt, jnp.float32)
    w_ht = w_h.T.astype(dt)
    inputs = tuple(run.enter(flat(a).astype(dt)) for a in inputs)
    row = jax.ShapeDtypeStruct(run.leaves[0].shape, dt)
    ct_v = None
    if kind == "lstm":
        slopes, f, out = inputs
        dz, *ct_carry0 = _call(
            _lstm_tangent_backward, (slopes, f, out, w_ht, keep, fresh, gs, *run.leaves),
            ("seq", "seq", "seq", "full", "seq", "seq", "seq", "row", "row"),
            (_struct(slopes, dt), row, row), ("seq", "row", "row"), config, acc,
        )  # fmt: skip
    elif kind == "gru":
        r, z, new, hn, h_in = inputs
        # `_gru_backward` reads the state entering step t as the previous step's output
        # (`_before`): h_in shifted by one step, its first row the initial state.
        h_out = jnp.concatenate([h_in[1:], h_in[:1]], axis=0)
        acts = jnp.concatenate([r, z, new, hn], axis=-1)
        dz, *ct_carry0 = _call(
            _gru_backward, (acts, w_ht, h_out, h_in[0], keep, fresh, gs, *run.leaves),
            ("seq", "full", "seq", "row", "seq", "seq", "seq", "row"),
            (jax.ShapeDtypeStruct(gs.shape[:2] + (3 * hidden,), dt), row), ("seq", "row"),
            config, acc,
        )  # fmt: skip
        ct_v = _gru_recurrent_cotangent(dz, r)
    else:
        (hs,) = inputs
        dz, *ct_carry0 = _call(
            _elman_backward, (hs, w_ht, keep, fresh, gs, *run.leaves),
            ("seq", "full", "seq", "seq", "seq", "row"), (_struct(hs, dt), row),
            ("seq", "row"), config, acc, relu=kind == "elman_relu",
        )  # fmt: skip
    unflat = lambda a: run.seq(a).reshape(steps, *batch_shape, a.shape[-1])  # noqa: E731
    ct_carry0 = tuple(a[:n].reshape(*batch_shape, hidden) for a in ct_carry0)
    return unflat(dz), None if ct_v is None else unflat(ct_v), ct_carry0
