r"""Sequence-level fast path for the built-in cells (Elman, LSTM, GRU).

The runner's reference path scans ``cell.recur`` and lets JAX differentiate the scan. Its
reverse pass accumulates the recurrent weight gradient step by step, a rank-``batch`` update of
the whole ``(state, gates)`` matrix inside the serial loop. Here the recurrence of a built-in
cell is a `jax.custom_jvp` whose tangent rule is *linear* and hoists the weight terms:

.. math::

    \dot z_t = \underbrace{\dot x_t W_x + x_t \dot W_x + h^{in}_t \dot W_h + \dot b}_{
    \text{one matmul each over all } t} + \dot h^{in}_t W_h

The first part is computed outside the loop from the primal states and inputs, as
``(time·batch, ·) × (·, gates)`` matmuls; the loop only carries ``(ḣ, ċ)`` through the gate
derivatives, which are themselves computed for all steps at once after the primal scan.
Reverse mode transposes this rule: the reverse scan carries only ``(dh, dc)``, emits ``dz_t``,
and the weight gradients become ``dW_h = H_inᵀ · dZ`` and ``dW_x = Xᵀ · dZ``, one matmul each.
Being a JVP rule (not a `jax.custom_vjp`), forward mode, ``jacfwd`` and Hessians keep working.

The input projection ``x_t W_x`` runs where it measured fastest (`projection_modes`):
*hoisted*, one large matmul before the loop cut into one array per gate, which the loop reads
whole (every forward-only pass; every pass on GPU and for the Elman cell); or *fused*,
``[x_t, h_in] · [W_x; W_h]`` as one matmul per step inside the loop (the gradient pass of the
LSTM and GRU on CPU, where a hoisted projection several gates wide costs two more
``(time, batch, gates)`` buffers next to the residuals, and fresh temporary memory costs page
faults).
Either way the loop never reads a column slice of a stacked per-step input: on XLA:CPU such
an elementwise fusion runs its sigmoid/tanh several times slower (LSTM B16 H128, measured: 44
us against 15 us per step for the gate nonlinearities). The tangent rule hoists the
projection's tangent either way.

On CPU (float32, no ``matmul_dtype`` or bfloat16 on a CPU with AMX or AVX512-BF16, an
unsharded batch) the primal loop of both passes runs instead in the native kernel (`native`:
the time loop as one FFI call on all cores), which also writes the residuals; the tangent
rule and its transpose stay in XLA (`placements`). bfloat16 inputs run there too, in float32
(with bfloat16 matmul operands where the kernel multiplies bfloat16: `bf16_data_on_kernel`).

Semantics are exactly those of the runner's reference scan (``unroll.run_time_major``): masked
steps hold the carry and output zero, resets put the carry back to zeros before a step (after
it when running in reverse).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxrnn._src import linear, sharding

KINDS = ("elman_tanh", "elman_relu", "lstm", "gru")

# Measured unroll factors (benchmarks/speed.py --tune): ((max batch*hidden, factor), ...) per
# backend, the first row whose bound is >= batch*hidden wins. Any factor gives the same numbers.
# CPU (2 cores, jax 0.10.2, process CPU time, fwd / fwd+bwd ms for unroll 1, 2, 4, 8):
#   elman B16 T256 H128  5.05 5.18 5.10 5.25 / 16.9 16.2 16.0 17.1
#   lstm  B16 T256 H128  13.8 13.4 13.7 15.6 / 57.5 70.4 70.1 65.8
#   gru   B16 T256 H128  10.1 10.8 10.3  9.9 / 39.5 39.5 38.5 44.2
#   lstm  B64 T128 H512  608  513  556  536  / 1547 1549 1595 1592
# Unrolling buys nothing measurable on CPU and costs the LSTM's backward 15-20%: 1.
# GPU: 8, the factor of the plain-scan baseline measured on an H100 (4.5 us/step at B8 H128);
# `benchmarks/gpu_check.sh` re-measures it (`speed.py --tune`).
UNROLL_TABLE = {
    "cpu": ((1 << 62, 1),),
    "gpu": ((1 << 62, 8),),
}


def supports(cell, params) -> bool:
    """Whether ``cell`` (with these params) can take the fast path."""
    return cell.kind in KINDS and getattr(params, "w_p", None) is None


def default_unroll(batch_size: int, hidden_size: int, backend: str | None = None) -> int:
    """The scan unroll factor the fast path uses when the caller leaves ``unroll`` to it."""
    backend = backend or jax.default_backend()
    table = UNROLL_TABLE.get("gpu" if backend in ("gpu", "cuda", "rocm") else backend)
    if table is None:
        table = UNROLL_TABLE["cpu"]
    size = batch_size * hidden_size
    return next(factor for bound, factor in table if size <= bound)


# ----------------------------------------------------------------------------------------------
# Per-cell recurrences. ``primal(xw_t, hw_t, carry_in) -> (carry_new, y, residuals)`` where
# ``hw_t = h_in @ W_h (+ b_h for the GRU)``; ``coefficients(inputs)`` turns the stacked
# residuals (`_coefficient_inputs`: the GRU's with ``h_in``) into the gate derivatives for all
# steps at once (the LSTM's residuals are those derivatives already; the native backward
# kernel makes the others' in its loop); ``tangent(dx_t, dhw_t, dcarry_in, coef_t) ->
# (dcarry_new, dy)`` is linear in ``dx_t, dhw_t, dcarry_in``.


def _gates(a, n):
    """``a``'s last axis cut into ``n`` equal gate blocks, as a tuple; a tuple stays as is."""
    if isinstance(a, tuple):
        return a
    return tuple(jnp.split(a, n, axis=-1)) if n > 1 else (a,)


def _gate_sums(xw, hw, n):
    """``xw + hw`` cut into gates; ``xw`` may already be a tuple of per-gate arrays, and
    ``hw=None`` means that ``xw`` already holds the sums."""
    if hw is None:
        return _gates(xw, n)
    if isinstance(xw, tuple):
        return tuple(a + b for a, b in zip(xw, _gates(hw, n)))
    return _gates(xw + hw, n)


def _elman_primal(act):
    def primal(xw, hw, carry):
        h = act(_gate_sums(xw, hw, 1)[0])
        return (h,), h, (h,)

    return primal


def _elman_coefficients(relu):
    def coefficients(inputs):
        (h,) = inputs
        return ((h > 0).astype(h.dtype),) if relu else (1 - h * h,)

    return coefficients


def _elman_tangent(dx, dhw, dcarry, coef):
    del dcarry
    (slope,) = coef
    dh = slope * (dx + dhw)
    return (dh,), dh


def _lstm_primal(xw, hw, carry):
    """The LSTM step; its residuals are already the tangent coefficients.

    Computing them inside the loop keeps 3 arrays per step instead of the gates, ``c_in`` and
    ``tanh(c)`` plus the coefficients made from them after the loop: measured on 2 CPU cores,
    fwd+bwd temporaries 26.6 against 32.0 MB at B16 T256 H128 (35.6 against 47.5 ms, the
    old size crossing glibc's 32 MiB mmap threshold, so every call page-faulted its
    temporaries in again), 54 against 64 MB and 129 against 138 ms at B32 T128 H256, the same
    time at B4 T1024 H64.
    """
    _, c = carry
    i, f, g, o = _gate_sums(xw, hw, 4)
    i, f, g, o = jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g), jax.nn.sigmoid(o)
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    h = o * tc
    return (h, c_new), h, lstm_residuals(i, f, g, o, c, tc)


def lstm_residuals(i, f, g, o, c_in, tc):
    """The LSTM tangent's coefficients from the activated gates, ``c_in`` and ``tanh(c)``:
    ``(slopes of i, f, g, o concatenated; f; o·tanh′(c))``."""
    slopes = jnp.concatenate(
        [g * i * (1 - i), c_in * f * (1 - f), i * (1 - g * g), o * (1 - o) * tc], axis=-1
    )
    return slopes, f, o * (1 - tc * tc)


def _lstm_coefficients(inputs):
    """``(slopes of i, f, g, o; f; o·tanh′(c))``, computed by `_lstm_primal` in the loop."""
    return inputs


def _lstm_tangent(dx, dhw, dcarry, coef):
    _, dc = dcarry
    slopes, f, out_slope = coef
    di, df, dg, do = jnp.split(slopes * (dx + dhw), 4, axis=-1)
    dc_new = f * dc + di + df + dg
    dh = do + out_slope * dc_new
    return (dh, dc_new), dh


def _gru_primal(xw, hw, carry):
    (h,) = carry
    xr, xz, xn = _gates(xw, 3)
    hr, hz, hn = _gates(hw, 3)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h_new = (1.0 - z) * n + z * h
    return (h_new,), h_new, (r, z, n, hn)


def _gru_coefficients(inputs):
    """The GRU tangent's coefficients (`_gru_tangent`) from ``(r, z, n, hn, h_in)`` (XLA's
    loop) or ``([r, z, n], hn, h_in)`` (the native kernel's layout, `_native_residuals`).

    With ``a = (1-z)(1-n²)``, the slope through ``n``: ``(r(1-r), hn, r, z(1-z)(h_in-n), a,
    z)``. In float64 instead ``(c_x, c_h, z)`` with ``c_x = [a·hn·r(1-r), z(1-z)(h_in-n),
    a]`` and ``c_h`` the same but ``a·r`` in the n gate (the reset gate scales the recurrent
    part alone): XLA:CPU (jax 0.10.2) miscompiled the transposed loop of the first form in
    float64 (batch 4, H 5: weight gradients off by up to 40%; no mismatch in float32 over 160
    sizes), and the second form, correct there, is slower (B16 T256 H128 fwd+bwd on XLA's
    loops: 37 against 24 ms)."""
    *rzn, hn, h_in = inputs
    r, z, n = rzn if len(rzn) == 3 else _gates(rzn[0], 3)
    a = (1 - z) * (1 - n * n)
    z_slope = z * (1 - z) * (h_in - n)
    if z.dtype != jnp.float64:
        return r * (1 - r), hn, r, z_slope, a, z
    through_r = a * hn * r * (1 - r)
    c_x = jnp.concatenate([through_r, z_slope, a], axis=-1)
    c_h = jnp.concatenate([through_r, z_slope, a * r], axis=-1)
    return c_x, c_h, z


def _gru_tangent(dx, dhw, dcarry, coef):
    """``dh_new = a(dx_n + dr·hn + r·dh_n) + z(1-z)(h_in-n)(dx_z + dh_z) + z·dh``, ``dr =
    r(1-r)(dx_r + dh_r)``; or, from float64's coefficients, ``Σ_gates (c_x·dx + c_h·dhw) +
    z·dh`` (`_gru_coefficients`)."""
    (dh,) = dcarry
    if len(coef) == 3:
        c_x, c_h, z = coef
        terms = jnp.split(c_x * dx + c_h * dhw, 3, axis=-1)
        dh_new = terms[0] + terms[1] + terms[2] + z * dh
        return (dh_new,), dh_new
    r_slope, hn, r, z_slope, n_slope, z = coef
    dxr, dxz, dxn = jnp.split(dx, 3, axis=-1)
    dhr, dhz, dhn = jnp.split(dhw, 3, axis=-1)
    dr = r_slope * (dxr + dhr)
    dh_new = n_slope * (dxn + dr * hn + r * dhn) + z_slope * (dxz + dhz) + z * dh
    return (dh_new,), dh_new


def _coefficient_inputs(kind, res, h_in):
    """What a kind's coefficients are made from: its residuals, the GRU's with ``h_in``."""
    return (*res, h_in) if kind == "gru" else tuple(res)


_N_GATES = {"elman_tanh": 1, "elman_relu": 1, "lstm": 4, "gru": 3}
_RECURRENCES = {
    "elman_tanh": (_elman_primal(jnp.tanh), _elman_coefficients(False), _elman_tangent),
    "elman_relu": (_elman_primal(jax.nn.relu), _elman_coefficients(True), _elman_tangent),
    "lstm": (_lstm_primal, _lstm_coefficients, _lstm_tangent),
    "gru": (_gru_primal, _gru_coefficients, _gru_tangent),
}


# ----------------------------------------------------------------------------------------------
# The shared scan skeleton: resets, the recurrent matmul, masks; for the primal and the tangent.


def _flag(flag, leaf):
    return flag[..., None] if flag.ndim < leaf.ndim else flag


def _zeros_where(flag, carry):
    return tuple(jnp.where(_flag(flag, a), jnp.zeros((), a.dtype), a) for a in carry)


def _scan(update, recur, carry, xs, mask, resets, reverse, unroll):
    """Scans ``update(carry_in, recur(h_in), x_t) -> (carry_new, y, extra)`` with the masks."""

    def body(carry, inputs):
        x_t, m_t, r_t = inputs
        c_in = carry
        if r_t is not None and not reverse:
            c_in = _zeros_where(r_t, c_in)
        c_new, y, extra = update(c_in, None if recur is None else recur(c_in[0]), x_t)
        if m_t is not None:
            c_new = tuple(jnp.where(_flag(m_t, a), a, b) for a, b in zip(c_new, c_in))
            y = jnp.where(_flag(m_t, y), y, jnp.zeros((), y.dtype))
        if r_t is not None and reverse:
            c_new = _zeros_where(r_t, c_new)
        return c_new, (y, extra)

    return lax.scan(body, carry, (xs, mask, resets), reverse=reverse, unroll=unroll)


def _dot(a, w, matmul_dtype, transpose_w=False, tangent=None):
    """``a @ w`` (``a @ wᵀ`` with ``transpose_w``) over ``a``'s last axis.

    With ``matmul_dtype``, the operands are cast to it and the products accumulate in ``a``'s
    dtype (``preferred_element_type``): bf16 matmuls with f32 accumulation. In the tangent
    rule, ``tangent`` (``"a"`` or ``"w"``) names the tangent operand, which keeps its dtype:
    JAX transposes a cast operand into a cast result, so casting it would round the
    gradients (``dW``, ``dxs``, each backward step's ``dZ_t W_hᵀ``) to bf16; kept, they
    accumulate and stay in f32.
    """
    dims = (((a.ndim - 1,), (1 if transpose_w else 0,)), ((), ()))
    if matmul_dtype is None:
        return lax.dot_general(a, w, dims)
    out_dtype = a.dtype
    a = a if tangent == "a" else a.astype(matmul_dtype)
    w = w if tangent == "w" else w.astype(matmul_dtype)
    return lax.dot_general(a, w, dims, preferred_element_type=out_dtype)


def _matmul(a, w, matmul_dtype=None, tangent=None):
    """``a @ w`` over all leading dims as one 2-D matmul.

    The reshape to 2-D is measured faster on CPU (fwd+bwd LSTM B16 T256 H128: 47 ms against
    55 ms for a 3-D ``dot_general``: its transpose contracts two axes). A batch axis sharded
    over explicit mesh axes cannot be merged with time without moving data, so there the
    matmul stays 3-D.
    """
    if sharding.time_major_batch(a) is not None:
        return _dot(a, w, matmul_dtype, tangent=tangent)
    flat = _dot(a.reshape(-1, a.shape[-1]), w, matmul_dtype, tangent=tangent)
    return flat.reshape(*a.shape[:-1], w.shape[-1])


def _weight_product(nonlin, lin):
    """``a @ dW`` over ``a``'s leading dims: a weight term of the tangent rule, linear in
    ``dW`` (`_weight_matmul`)."""
    (a,), (dw,) = nonlin, lin
    return (_matmul(a, dw),)


def _weight_product_t(nonlin, cts):
    """`_weight_product`'s transpose, the weight gradient ``dW = aᵀ · ct`` over all rows, with
    ``aᵀ`` materialized first (an `optimization_barrier` keeps XLA from folding it back into
    the dot): XLA:CPU runs a dot contracting its left operand's leading axis on a slower
    path than a plain ``(m, k) · (k, n)`` one."""
    (a,), (ct,) = nonlin, cts
    a_t = lax.optimization_barrier(a.reshape(-1, a.shape[-1]).T)
    return (lax.dot(a_t, ct.reshape(-1, ct.shape[-1])),)


# `_weight_matmul` copies ``aᵀ`` for the weight gradient only below this many elements of
# ``a``: a larger copy costs more in fresh memory (page faults) than the faster matmul saves.
# Fwd+bwd on 2 cores, interleaved medians, plain / with the copy, ms (elements of ``a``):
# LSTM B16 T256 H128 25.6 / 23.1 (2^19), GRU 19.9 / 18.8; LSTM B64 T100 H128 58.5 / 56.9 and
# GRU 52.8 / 52.2 (2^19.6); LSTM B64 T128 H512 684 / 692, within the noise (2^22); Elman B256
# T100 H128 76.5 / 78.9 and GRU 193 / 207 (2^21.6).
WEIGHT_TRANSPOSE_LIMIT = 1 << 21


def _weight_matmul(a, dw, matmul_dtype):
    """The tangent rule's weight term ``a @ dW`` (``a`` the inputs or the states entering each
    step, over all steps at once); its transpose computes the weight gradient.

    On CPU (no ``matmul_dtype``, an unsharded batch, ``a`` under `WEIGHT_TRANSPOSE_LIMIT`
    elements) it is a `linear` primitive whose transpose is `_weight_product_t`: the
    weight-gradient matmuls measured 4-9% faster (2 cores; B16 T256 H128 LSTM, the three
    matmuls of the input and weight gradients: 10.6 against 9.7 ms). Elsewhere plain JAX
    transposes it.
    """
    if (
        matmul_dtype is not None
        or jax.default_backend() != "cpu"
        or sharding.time_major_batch(a) is not None
        or a.size >= WEIGHT_TRANSPOSE_LIMIT
    ):
        return _matmul(a, dw, matmul_dtype, tangent="w")
    (out,) = linear.apply(_weight_product, _weight_product_t, (a,), (dw,), leading=True)
    return out


def _project(xs, w_x, b_x, matmul_dtype=None):
    xw = _matmul(xs, w_x, matmul_dtype)
    return xw if b_x is None else xw + b_x


def _fused_weights(kind, w_x, b_x, w_h, b_in):
    """``[x_t, h_in] @ W + b`` in one matmul per step: ``W`` stacks ``W_x`` over ``W_h``.

    Additive gates: ``(in + H, G·H)`` and the folded bias. The GRU keeps its recurrent
    n-gate term apart (the reset gate multiplies it): ``(in + H, 4H)`` with columns
    ``[x_r + h_r, x_z + h_z, x_n, h_n]``.
    """
    if kind != "gru":
        return jnp.concatenate([w_x, w_h], axis=0), b_x
    xr, xz, xn = _gates(w_x, 3)
    hr, hz, hn = _gates(w_h, 3)
    top = jnp.concatenate([xr, xz, xn, jnp.zeros_like(xn)], axis=1)
    bottom = jnp.concatenate([hr, hz, jnp.zeros_like(hn), hn], axis=1)
    w = jnp.concatenate([top, bottom], axis=0)
    if b_x is None and b_in is None:
        return w, None
    bx = _gates(jnp.zeros_like(b_in) if b_x is None else b_x, 3)
    bh = _gates(jnp.zeros_like(b_x) if b_in is None else b_in, 3)
    return w, jnp.concatenate([bx[0] + bh[0], bx[1] + bh[1], bx[2], bh[2]])


def _placement(static, save):
    """Where a pass's primal runs: ``static``'s placement for the gradient pass (``save``) or
    the forward-only pass (`placements`)."""
    return static[3][1] if save else static[3][0]


def _primal_scan(static, xs, w_x, b_x, w_h, b_in, carry, mask, resets, save):
    kind, reverse, unroll, proj, md, _ = static
    primal = _RECURRENCES[kind][0]
    n_gates = _N_GATES[kind]
    placement = _placement(static, save)

    if placement in ("pallas", "native"):  # a kernel: the same outputs and residuals
        return _kernel_primal(static, save, xs, w_x, b_x, w_h, b_in, carry, mask, resets)
    if placement == "hoisted":
        # One large matmul before the loop, cut into one array per gate; the loop reads them.
        xs = _gates(_project(xs, w_x, b_x, md), n_gates)

        def recur(h):
            return _dot(h, w_h, md)

        def project(x_t, hw, h_in):
            del h_in
            return x_t, (hw if b_in is None else hw + b_in)
    else:  # "fused": [x_t, h_in] @ [W_x; W_h] inside the loop, one matmul per step
        w_cat, b_cat = _fused_weights(kind, w_x, b_x, w_h, b_in)
        recur = None

        def project(x_t, hw, h_in):
            del hw
            z = _dot(jnp.concatenate([x_t, h_in], axis=-1), w_cat, md)
            z = z if b_cat is None else z + b_cat
            if kind != "gru":
                return z, None
            r, u, xn, hn = _gates(z, 4)
            return (r, u, xn), (0.0, 0.0, hn)

    def update(c_in, hw, x_t):
        xw_t, hw = project(x_t, hw, c_in[0])
        c_new, y, res = primal(xw_t, hw, c_in)
        return c_new, y, (c_in[0], res) if save else None

    return _scan(update, recur, carry, xs, mask, resets, reverse, unroll)


def _native_primal(
    kind, reverse, save, xs, w_x, b_x, w_h, b_in, carry, mask, resets, batch_major=False,
    md=None,
):  # fmt: skip
    """`_primal_scan` on the native CPU kernel (`native.forward`), the batch dims flattened
    into one.

    With ``batch_major`` the kernel takes its sequences batch-major, ``(batch, time, ·)``,
    and gives its outputs (and residuals) so: the caller's own layout, whose moves to
    time-major and back then cancel. Measured on 2 cores, B16 T256 H128 forward: the two
    transposes cost 0.17-0.37 ms against a kernel of 2.1 (Elman) to 6.8 ms (LSTM).
    """
    from jaxrnn._src import native

    time, *batch, features = xs.shape
    hidden = w_h.shape[0]
    flat = tuple(a.reshape(-1, hidden) for a in carry)
    to_kernel, flag_to_kernel, from_kernel = _kernel_layout(batch_major, time, batch)
    flags = [None if f is None else flag_to_kernel(f) for f in (mask, resets)]
    xs = to_kernel(xs)
    rows = xs.shape[0 if batch_major else 1]
    # With ``md`` on AMX tiles the kernel's own per-step projection is cheap: never hoisted.
    # With AVX512-BF16 the float32 table holds (2 cores, AMD Zen 4, interleaved, forward ms,
    # in the kernel / hoisted: LSTM B1 T100 H1024 23.4 / 14.6, B4 H512 6.6 / 6.4, GRU B8
    # H1024 32.5 / 31.1, LSTM B16 H1024 (not hoisted by the table) 90.5 / 91.5).
    if (md is None or not native.amx_available()) and native.hoists(
        rows, features, hidden, w_h.shape[1] // hidden
    ):
        # The input projection as one matmul over all steps: the kernel then reads its rows.
        xs = _project(xs, w_x, b_x, md)
        w_x = b_x = None
    # Without a mask, the Elman's one residual, h, is its output: taken from ys, not written
    # again (and the backward kernel then writes its result over the cotangent of ys instead,
    # `native.backward`).
    outputs = save and mask is None and kind.startswith("elman")
    ys, flat, *saved = native.forward(
        kind, xs, w_x, b_x, w_h, b_in, flat, *flags, reverse, save, batch_major=batch_major,
        residuals=not outputs, bf16=md is not None,
    )  # fmt: skip
    carry = tuple(a.reshape(*batch, hidden) for a in flat)
    if outputs:
        saved = [(saved[0][0], (ys,))]
    extra = jax.tree_util.tree_map(from_kernel, saved[0]) if save else None
    return carry, (from_kernel(ys), extra)


def _kernel_layout(batch_major, time, batch):
    """``(to_kernel, flag_to_kernel, from_kernel)`` between the fast path's time-major
    per-step arrays ``(time, *batch, ·)`` (flags ``(time, *batch)``) and the native kernels'
    layout with the batch dims flattened: ``(time, rows, ·)``, or with ``batch_major``
    ``(rows, time, ·)`` (flags ``(rows, time)``), the caller's own layout, so that the moves
    to time-major and back cancel."""
    if batch_major:
        return (
            lambda a: jnp.moveaxis(a, 0, -2).reshape(-1, time, a.shape[-1]),
            lambda f: jnp.moveaxis(f, 0, -1).reshape(-1, time),
            lambda a: jnp.moveaxis(a.reshape(*batch, time, a.shape[-1]), -2, 0),
        )
    return (
        lambda a: a.reshape(time, -1, a.shape[-1]),
        lambda f: f.reshape(time, -1),
        lambda a: a.reshape(time, *batch, a.shape[-1]),
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kernel_primal(static, save, xs, w_x, b_x, w_h, b_in, carry, mask, resets):
    """`_primal_scan` on a kernel: the native CPU kernel (`native`) or the persistent Pallas
    kernel (`pallas_rnn.primal_scan`, GPU), as `placements` chose for the pass."""
    kind, reverse, _, _, md, batch_major = static
    if _placement(static, save) == "native":
        return _native_primal(
            kind, reverse, save, xs, w_x, b_x, w_h, b_in, carry, mask, resets, batch_major, md
        )
    from jaxrnn._src import pallas_rnn

    return pallas_rnn.primal_scan(
        kind, xs, w_x, b_x, w_h, b_in, carry, mask, resets, reverse, save, _pallas_interpret()
    )


def _pallas_interpret() -> bool:
    """Whether the Pallas kernels run in Pallas's interpreter: off the GPU (tests)."""
    return jax.default_backend() != "gpu"


@_kernel_primal.defjvp
def _kernel_primal_jvp(static, save, primals, tangents):
    """A kernel's derivatives are those of the same scan in XLA. Only derivatives of order
    two and more reach here (the first order is `_recurrence`'s linear rule), which keeps the
    kernel's outputs and residuals differentiable to any order."""
    xla = (*static[:3], projection_modes(static[0]), *static[4:])
    native = _placement(static, save) == "native"

    def xla_scan(*args):
        carry, (ys, extra) = _primal_scan(xla, *args, save=save)
        if save and native:  # the residuals in the kernel's layout
            extra = (extra[0], _native_residuals(static[0], extra[1]))
        return carry, (ys, extra)

    return jax.jvp(xla_scan, primals, tangents)


def _native_residuals(kind, res):
    """XLA's loop's residuals in the native kernel's layout (`native.RESIDUAL_WIDTHS`): the
    GRU's ``(r, z, n, hn)`` as ``([r, z, n], hn)``, the others' unchanged."""
    if kind != "gru":
        return res
    r, z, n, hn = res
    return jnp.concatenate([r, z, n], axis=-1), hn


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _recurrence(static, xs, w_x, b_x, w_h, b_in, carry, mask, resets):
    """The masked recurrence of one built-in cell.

    ``static = (kind, reverse, unroll, placements, matmul_dtype, batch_major)``,
    ``placements`` being `projection_modes` (where the input projection runs in the
    forward-only pass and in the gradient pass; the tangent rule hoists it either way) and
    ``batch_major`` whether the caller's arrays are batch-major (`run`).
    """
    carry, (ys, _) = _primal_scan(static, xs, w_x, b_x, w_h, b_in, carry, mask, resets, save=False)
    return ys, carry


@_recurrence.defjvp
def _recurrence_jvp(static, primals, tangents):
    xs, w_x, b_x, w_h, b_in, carry, mask, resets = primals
    dxs, dw_x, db_x, dw_h, db_in, dcarry, _, _ = tangents
    kind, reverse, unroll, _, md, _ = static
    carry_out, (ys, (h_in, res)) = _primal_scan(
        static, xs, w_x, b_x, w_h, b_in, carry, mask, resets, save=True
    )
    inputs = _coefficient_inputs(kind, res, h_in)
    native = static[3][1] == "native"
    batch_major = static[5] and native
    # Every weight and input term for all steps at once, outside the loop: one matmul each,
    # row by row. For a batch-major caller on the native kernels, in its layout: the matmuls
    # of reverse mode (the input and weight gradients) then read the caller's inputs and the
    # backward kernel's batch-major result as they are, and the input gradient comes out in
    # the caller's layout (every move between the layouts cancels).
    to_rows = (lambda a: jnp.moveaxis(a, 0, -2)) if batch_major else (lambda a: a)  # noqa: E731
    to_time = (lambda a: jnp.moveaxis(a, -2, 0)) if batch_major else (lambda a: a)  # noqa: E731
    merged = kind != "gru"  # the GRU's reset gate scales the recurrent part: kept apart
    # The biases' shapes (None: no bias), and their tangents among the linear operands.
    biases = tuple(None if b is None else tuple(b.shape) for b in (b_x, b_in))
    d_biases = tuple(d for d, b in zip((db_x, db_in), biases) if b is not None)
    nonlin, lin = (to_rows(xs), to_rows(h_in), w_x), (to_rows(dxs), dw_x, dw_h, *d_biases)
    terms = functools.partial(_input_terms, md=md, merged=merged, biases=biases)
    # With ``matmul_dtype`` on AMX: bfloat16 products on the tiles where
    # `native.tile_gradients` says so. Otherwise the float32 kernel where
    # `native.kernel_gradients` says so, a ``matmul_dtype``'s operands rounded to it by the
    # kernel (the products XLA's dots of the rounded operands sum).
    tiles = md is not None and _amx() and _kernel_gradients(xs, w_h, tiles=True)
    if native and (tiles or _kernel_gradients(xs, w_h)):
        # Transposed by one kernel call for the three matmuls and the bias gradients.
        transpose = functools.partial(
            _input_terms_t, merged=merged, biases=biases, f32_operands=not tiles,
            rounded=md is not None and not tiles,
        )  # fmt: skip
        terms = linear.apply(terms, transpose, nonlin, lin, prune=True)
    else:
        terms = terms(nonlin, lin)
    us = tuple(to_time(t) for t in terms)  # additive gates: one sum, saving an add per step
    flags = tuple(f for f in (mask, resets) if f is not None)
    loop = functools.partial(
        _tangent_loop, kind=kind, reverse=reverse, unroll=unroll, md=md,
        n_coef=len(inputs), n_u=len(us), flags=(mask is not None, resets is not None),
    )  # fmt: skip
    nonlin, lin = (*inputs, w_h, *flags), (*us, *dcarry)
    if native:
        # The native kernel transposes the loop (the backward loop of reverse mode, also under
        # vmap); the loop itself and its derivatives stay XLA's (`linear`).
        transpose = functools.partial(_native_tangent_transpose, loop, batch_major=batch_major)
        dys, *dcarry_out = linear.apply(loop, transpose, nonlin, lin)
    elif static[3][1] == "pallas" and pallas_backward(kind, math.prod(xs.shape[1:-1]), xs.dtype):
        # The persistent backward kernel transposes it (`PALLAS_BACKWARD_TABLE`).
        transpose = functools.partial(_pallas_tangent_transpose, loop)
        dys, *dcarry_out = linear.apply(loop, transpose, nonlin, lin)
    else:
        dys, *dcarry_out = loop(nonlin, lin)
    return (ys, carry_out), (dys, tuple(dcarry_out))


def _amx() -> bool:
    """Whether the native kernels' bfloat16 products run on AMX tiles (`native.amx_available`):
    there the input and weight gradients of ``matmul_dtype=bfloat16`` are one kernel call."""
    from jaxrnn._src import native

    return native.amx_available()


def _kernel_gradients(xs, w_h, tiles=False) -> bool:
    """Whether the float32 input and weight gradients of ``xs: (time, *batch, I)`` run on the
    native kernel (`native.kernel_gradients`), or with ``tiles`` those of ``matmul_dtype`` on
    the AMX tiles (`native.tile_gradients`)."""
    from jaxrnn._src import native

    rows, features, hidden = math.prod(xs.shape[:-1]), xs.shape[-1], w_h.shape[0]
    if tiles:
        return native.tile_gradients(rows, features, hidden, w_h.shape[1])
    return native.kernel_gradients(rows, features, hidden)


def _plus(a, *biases):
    """``a`` plus each bias that is not ``None``."""
    for b in biases:
        a = a if b is None else a + b
    return a


def _input_terms(nonlin, lin, *, md, merged, biases=(None, None)):
    """The tangent rule's input terms for all steps at once: ``dxs W_x + xs dW_x + db_x`` and
    ``h_in dW_h + db_in`` (one matmul each, over all rows), summed where ``merged``.
    ``nonlin = (xs, h_in, w_x)``, ``lin = (dxs, dw_x, dw_h, *bias tangents)``, one for each
    bias whose shape ``biases`` gives (``None``: no bias)."""
    (xs, h_in, w_x), (dxs, dw_x, dw_h, *rest) = nonlin, lin
    present = iter(rest)
    db_x, db_in = (None if b is None else next(present) for b in biases)
    dxw = _plus(_matmul(dxs, w_x, md, tangent="a") + _weight_matmul(xs, dw_x, md), db_x)
    dhw = _plus(_weight_matmul(h_in, dw_h, md), db_in)
    return (dxw + dhw,) if merged else (dxw, dhw)


def _input_terms_t(
    nonlin, cts, *, merged, biases=(None, None), needed=(True,), f32_operands=False, rounded=False
):
    """`_input_terms`' transpose on the native kernel (`native.input_and_weight_gradients`):
    ``dxs = ct_x W_xᵀ``, ``dW_x = xsᵀ ct_x``, ``dW_h = h_inᵀ ct_h`` and the bias gradients
    (the cotangents summed over the rows), each cotangent read from memory once for all three
    matmuls. In float32 (``f32_operands``) where `native.kernel_gradients` says so, which has
    the measurements; there ``matmul_dtype=bfloat16`` without AMX multiplies ``W_x``, ``xs``
    and ``h_in`` rounded to it (``rounded``: the same products as XLA's dots). With
    ``matmul_dtype=bfloat16`` on AMX, ``W_x``, ``xs`` and ``h_in`` are rounded to bfloat16 and
    each float32 cotangent split into exact bfloat16 parts. Measured on 2 cores (Sapphire
    Rapids, AMX), against XLA's three float32 dots (medians of 5, ms; without ``dxs`` in
    brackets): LSTM B64 T128 H512 (8192 rows, 512 inputs) 96 against 209 (66 against 145);
    LSTM B16 T256 H128 4.0 against 8.9 (2.5 against 8.9); GRU 3.2 against 7.3 (3.3 against
    5.1); Elman 1.5 against 3.0 (1.0 against 2.0); 600 rows, 16 inputs, H32 0.3 against 0.4.
    Every 256 rows of the cotangent go in slices of 256 columns, whose parts stay in L2
    between the split and the matmuls (the whole width at once at LSTM B64 H512: 102 ms)."""
    from jaxrnn._src import native

    xs, h_in, w_x = nonlin
    features, hidden = xs.shape[-1], h_in.shape[-1]
    ct_x = cts[0].reshape(-1, cts[0].shape[-1])
    ct_h = None if merged else cts[1].reshape(-1, cts[1].shape[-1])
    dxs, dw_x, dw_h, db_x, db_h = native.input_and_weight_gradients(
        xs.reshape(-1, features), h_in.reshape(-1, hidden), w_x, ct_x, ct_h,
        want_dx=needed[0], f32_operands=f32_operands, rounded=rounded,
    )  # fmt: skip
    dxs = jnp.zeros(xs.shape, xs.dtype) if dxs is None else dxs.reshape(xs.shape)
    sums = tuple(s.reshape(b) for s, b in zip((db_x, db_h), biases) if b is not None)
    return (dxs, dw_x, dw_h, *sums)


def _split_nonlin(nonlin, n_coef, flags):
    """``(*inputs, w_h, *present flags)`` -> ``(inputs, w_h, mask, resets)``."""
    present = iter(nonlin[n_coef + 1 :])
    mask, resets = (next(present) if f else None for f in flags)
    return nonlin[:n_coef], nonlin[n_coef], mask, resets


def _tangent_loop(nonlin, lin, *, kind, reverse, unroll, md, n_coef, n_u, flags):
    """The tangent rule's loop, linear in ``lin = (*us, *dcarry)``: per step, the carry's
    tangent times ``W_h`` plus the hoisted input terms ``us``, through the linear step.
    ``nonlin = (*coefficient inputs, w_h, *present flags)`` (`_coefficient_inputs`).
    Returns ``(dys, *dcarry_out)``."""
    coef_inputs, w_h, mask, resets = _split_nonlin(nonlin, n_coef, flags)
    coef = _RECURRENCES[kind][1](coef_inputs)
    us, dcarry = lin[:n_u], tuple(lin[n_u:])
    tangent = _RECURRENCES[kind][2]
    inputs = (us[0], us[1] if n_u == 2 else None, coef)

    def update(dc_in, dhw_t, inputs_t):
        dx_t, dhw_hoisted_t, coef_t = inputs_t
        if dhw_hoisted_t is not None:
            dhw_t = dhw_t + dhw_hoisted_t
        dc_new, dy = tangent(dx_t, dhw_t, dc_in, coef_t)
        return dc_new, dy, None

    # The tangent loop multiplies by W_h stored transposed, so that its transpose (the reverse
    # loop's ``dZ_t @ W_hᵀ``) reads a row-major matrix: 20 us against 35 us per step measured
    # on XLA:CPU (LSTM B16 H128).
    w_ht = w_h.T

    def recur(dh):
        return _dot(dh, w_ht, md, transpose_w=True, tangent="a")

    dcarry_out, (dys, _) = _scan(update, recur, dcarry, inputs, mask, resets, reverse, unroll)
    return (dys, *dcarry_out)


def _native_tangent_transpose(loop, nonlin, cts, batch_major=False):
    """`_tangent_loop`'s transpose on the native kernel (`native.backward`), the batch dims
    flattened into one: ``cts = (ct_dys, *ct_dcarry_out)`` -> the cotangents of ``lin``.
    With ``batch_major`` the kernel reads and writes the per-step arrays batch-major, as
    `_native_primal` gave them (the moves between the layouts cancel)."""
    from jaxrnn._src import native

    kind, n_coef, n_u = loop.keywords["kind"], loop.keywords["n_coef"], loop.keywords["n_u"]
    inputs, w_h, mask, resets = _split_nonlin(nonlin, n_coef, loop.keywords["flags"])
    ct_dys, *ct_carry = cts
    time, *batch, hidden = ct_dys.shape
    md = loop.keywords["md"]
    if md is not None:  # the loop multiplies by W_h cast to md (bfloat16), in float32 (`_dot`)
        w_h = w_h.astype(md).astype(w_h.dtype)
    flat, flags, unflat = _kernel_layout(batch_major, time, batch)
    ct_u, ct_v, ct_carry0 = native.backward(
        kind,
        flat(ct_dys),
        tuple(a.reshape(-1, hidden) for a in ct_carry),
        tuple(flat(c) for c in inputs),
        w_h,
        None if mask is None else flags(mask),
        None if resets is None else flags(resets),
        loop.keywords["reverse"],
        batch_major=batch_major,
        # Without AMX, the same exact products in float32 (`native.amx_available`).
        bf16=md is not None and native.amx_available(),
    )
    us = (unflat(ct_u),) if n_u == 1 else (unflat(ct_u), unflat(ct_v))
    return (*us, *(a.reshape(*batch, hidden) for a in ct_carry0))


def _pallas_tangent_transpose(loop, nonlin, cts):
    """`_tangent_loop`'s transpose on the persistent backward kernel
    (`pallas_rnn.tangent_transpose`): ``cts = (ct_dys, *ct_dcarry_out)`` -> the cotangents
    of ``lin``."""
    from jaxrnn._src import pallas_rnn

    kind, n_coef, n_u = loop.keywords["kind"], loop.keywords["n_coef"], loop.keywords["n_u"]
    inputs, w_h, mask, resets = _split_nonlin(nonlin, n_coef, loop.keywords["flags"])
    ct_dys, *ct_carry = cts
    ct_u, ct_v, ct_carry0 = pallas_rnn.tangent_transpose(
        kind, inputs, w_h, mask, resets, loop.keywords["reverse"], ct_dys, tuple(ct_carry),
        _pallas_interpret(),
    )  # fmt: skip
    us = (ct_u,) if n_u == 1 else (ct_u, ct_v)
    return (*us, *ct_carry0)


def projection_modes(kind: str, backend: str | None = None) -> tuple[str, str]:
    """Where the input projection runs: ``(forward-only pass, gradient pass)``.

    ``"hoisted"``: one ``(time·batch, in) × (in, gates)`` matmul before the loop, cut into one
    array per gate; ``"fused"``: ``[x_t, h_in] · [W_x; W_h]``, one matmul per step inside the
    loop. Either gives the same function.

    Measured on CPU (2 cores, B16 T256 H128, ms, interleaved medians). Gradient pass (fwd+bwd):
    LSTM fused 33.1, hoisted 41.7; GRU fused 31.1, hoisted 38.7; Elman fused 10.1, hoisted
    9.2 — a hoisted projection several gates wide costs two ``(time, batch, gates)`` buffers
    (the product and its per-gate cuts) on top of the residuals, and on CPU fresh temporary
    memory costs page faults. Forward-only pass, as plain loops: LSTM fused 12.9, hoisted
    12.6; GRU fused 11.8 (its fused matmul is a third wider: the n gate keeps ``x`` and ``h``
    apart), hoisted 9.2. On GPU, hoisted (the loop's per-step latency rules).
    """
    if (backend or jax.default_backend()) != "cpu":
        return ("hoisted", "hoisted")
    return ("hoisted", "hoisted") if kind.startswith("elman") else ("hoisted", "fused")


# Where the persistent Pallas kernels (`pallas_rnn`) run the primal of the fast path on GPU:
# ``{(kind, dtype name): (largest batch, forward-only pass; largest batch, gradient pass;
# largest hidden size measured)}``, from ``benchmarks/pallas_gpu.sh`` (which times
# ``jaxrnn.unroll`` with them against without; ``benchmarks/gpu_tables.py`` turns its report
# into this table). Measured on an H100 (jax 0.11.2, 2026-11-27), T=1000 H=128, ms fwd /
# fwd+bwd, kernels vs plain ``jaxrnn``:
#   elman B8   float32 1.98 / 5.34 vs 4.27 / 7.69    bfloat16 1.54 / 4.39 vs 3.86 / 6.98
#   lstm  B8   float32 8.67 / 13.4 vs 4.29 / 10.3    bfloat16 3.52 / 8.19 vs 3.82 / 9.48
#   lstm  B64  float32 8.98 / 14.7 vs 5.15 / 11.9    bfloat16 4.25 / 9.49 vs 4.51 / 11.1
#   gru   B8   float32 4.18 / 8.75 vs 3.65 / 9.08    bfloat16 2.71 / 6.76 vs 3.49 / 8.27
#   gru   B64  float32 4.49 / 9.83 vs 5.05 / 12.9    bfloat16 3.21 / 8.82 vs 4.85 / 12.9
# A pass enters where the kernels took at most 0.95 of the time at every measured batch up to
# its bound. The float32 LSTM and GRU kernels lose at B8, so those keep XLA's loop.
# Only on the GPU family it was measured on (compute capability 9.x: H100, H200): other GPUs
# may have less shared memory than the kernels' weight blocks take (the bfloat16 LSTM's 136
# KiB), or other step times.
PALLAS_CAPABILITY_MAJOR = 9
PALLAS_TABLE: dict[tuple[str, str], tuple[int, int, int]] = {
    ("elman_tanh", "bfloat16"): (8, 8, 128),
    ("elman_tanh", "float32"): (8, 8, 128),
    ("gru", "bfloat16"): (64, 64, 128),
    ("lstm", "bfloat16"): (64, 64, 128),
}


# Where the gradient pass on the persistent kernels (a "pallas" placement, `PALLAS_TABLE`) also
# runs its backward loop on them (`pallas_rnn.tangent_transpose`) instead of XLA's transposed
# scan: ``{(kind, dtype name): largest batch}``. From the H100 run above, the kernel pair of
# `pallas_rnn.sequence` (the same backward kernels for the Elman RNN and the GRU, the weight
# gradients one XLA matmul each as here) against `jaxrnn.unroll` on the kernels, fwd+bwd ms:
# elman B8 float32 3.71 vs 5.34, bfloat16 2.68 vs 4.39; gru bfloat16 B8 6.28 vs 6.76, B64
# 7.52 vs 8.82; lstm bfloat16 B8 7.80 vs 8.19, B64 9.67 vs 9.49. As for `PALLAS_TABLE`, a
# batch enters where the pair took at most 0.95 of the time at every measured batch up to
# it: not the LSTM, whose transpose is a kernel of its own (`_lstm_tangent_backward`, on the
# fast path's slopes) that no GPU has timed yet. ``benchmarks/pallas_gpu.sh`` times
# ``unroll`` with and without the backward kernel and prints this table as measured.
PALLAS_BACKWARD_TABLE: dict[tuple[str, str], int] = {
    ("elman_tanh", "bfloat16"): 8,
    ("elman_tanh", "float32"): 8,
    ("gru", "bfloat16"): 64,
}


def pallas_backward(kind: str, batch: int, dtype) -> bool:
    """Whether a gradient pass on the persistent kernels runs its backward loop on them too
    (`PALLAS_BACKWARD_TABLE`)."""
    return batch <= PALLAS_BACKWARD_TABLE.get((kind, jnp.dtype(dtype).name), -1)


# The kinds whose gradient pass runs on the native kernels (primal and backward loop) on CPU
# at any batch. Interleaved medians (min), B16 T256 H128, ms, fwd+bwd, XLA's loops / native
# primal only / native primal and backward loop: LSTM 43.1 (34.6) / 32.7 (28.8) / 29.7
# (24.8); GRU 32.5 (27.2) / 26.4 (23.6) / 23.0 (20.5).
NATIVE_GRADIENT_KINDS = ("lstm", "gru")
# The kinds whose gradient pass runs on the native kernels from this batch, or from this
# hidden size, up; XLA's loops below both. The Elman step is one small matmul: at a small
# batch and hidden size the kernels' per-step costs match what they save; from 16 rows on 2
# cores the kernels run the rows as independent groups, with no hand-off. Interleaved,
# fwd+bwd T100, XLA's loops against the kernels. On a 2-core AMD EPYC (Zen 4): B1 H128 0.89,
# B2 0.85, B4 0.86, B8 1.06-1.08, B16 (T256) 1.15, B64 1.21, B256 1.20; B4 H512 1.01, B8
# 0.98, B16 1.04; B64 H1024 0.995. On a 2-core Intel Xeon (Sapphire Rapids), after the
# kernel's 4-row tiles and one-row sums across four panels: B1 H128 1.02, B2 0.98, B4 0.91,
# B8 0.95-0.97, B16 1.27; B1 H256 0.96, B2 1.04, B4 1.08; B1 H512 1.21, B4 1.48; B1 H1024
# 1.78.
NATIVE_GRADIENT_MIN_BATCH = {"elman_tanh": 8, "elman_relu": 8}
NATIVE_GRADIENT_MIN_HIDDEN = {"elman_tanh": 256, "elman_relu": 256}


def _measured_gpu() -> bool:
    """Whether JAX's first device is of the GPU family `PALLAS_TABLE` was measured on."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return int(str(capability).split(".")[0]) == PALLAS_CAPABILITY_MAJOR
    except ValueError:
        return False


def placements(
    kind, batch, hidden, dtype, matmul_dtype=None, backend=None, sharded=False, empty=False
):
    """`projection_modes`, with a kernel where one runs a pass (it computes the primal, and in
    the gradient pass its residuals; the native one also the backward loop):

    - ``"native"`` (CPU): the native CPU kernels (`native`): float32, no ``matmul_dtype`` or
      bfloat16 where the kernel has AMX tiles or AVX512-BF16 (`native.bf16_available`), an
      unsharded batch, non-``empty`` inputs, the kernel built; the forward-only pass of every
      kind, the gradient pass (primal and backward loop) of `NATIVE_GRADIENT_KINDS`, and of
      `NATIVE_GRADIENT_MIN_BATCH`'s kinds from their batch or `NATIVE_GRADIENT_MIN_HIDDEN`'s
      hidden size up.
    - ``"pallas"`` (GPU of the measured family): a pass that `PALLAS_TABLE` gives to the
      persistent kernels for this kind and dtype (no ``matmul_dtype``, an unsharded batch up
      to the table's bound, a hidden size the kernels take and no larger than measured).

    The linear JVP rule on top is the same either way, so forward and reverse mode keep
    working."""
    backend = backend or jax.default_backend()
    modes = projection_modes(kind, backend)
    if sharded:
        return modes
    if backend == "cpu":
        from jaxrnn._src import native

        usable = not empty and native.supports(kind, hidden, dtype) and native.available()
        if matmul_dtype is not None:
            bf16 = jnp.dtype(matmul_dtype) == jnp.bfloat16
            usable = usable and bf16 and native.bf16_available()
        if not usable:
            return modes
        gradient = (
            kind in NATIVE_GRADIENT_KINDS
            or batch >= NATIVE_GRADIENT_MIN_BATCH.get(kind, math.inf)
            or hidden >= NATIVE_GRADIENT_MIN_HIDDEN.get(kind, math.inf)
        )
        return ("native", "native" if gradient else modes[1])
    if matmul_dtype is not None:
        return modes
    gpu = backend in ("gpu", "cuda") and _measured_gpu()
    limits = PALLAS_TABLE.get((kind, jnp.dtype(dtype).name)) if gpu else None
    if limits is None:
        return modes
    from jaxrnn._src import pallas_rnn

    *bounds, measured_hidden = limits
    if hidden > measured_hidden or not pallas_rnn.supports(kind, hidden, dtype):
        return modes
    return tuple("pallas" if batch <= bound else m for m, bound in zip(modes, bounds))


def _float32(tree):
    """Every floating leaf of ``tree`` in float32 (exact from bfloat16)."""
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def bf16_data_on_kernel(kind, xs, hidden, backend=None):
    r"""Whether, and how, bfloat16 inputs run on the native CPU kernels: ``"bfloat16"``
    where ``matmul_dtype=bfloat16`` on float32 inputs of this size would run there (a CPU
    whose kernel multiplies bfloat16, `native.bf16_available`), else ``"float32"`` where
    float32 inputs would (`placements`: the kernel built and used on this CPU, an unsharded
    batch, non-empty inputs), else ``None`` (XLA's loop, in bfloat16).

    There `run` computes on the inputs, params and carry cast to float32 (exactly), with
    ``matmul_dtype`` the answer's (``"float32"``: none), and rounds the outputs and final
    carry to bfloat16. With bfloat16 operands

    .. math::

        z_t = \mathrm{bf16}(x_t) \mathrm{bf16}(W_x) + \mathrm{bf16}(h_{t-1})
        \mathrm{bf16}(W_h) + b \quad \text{(exact products, float32 sums)}

    and in float32 ``h_{t-1}`` enters unrounded; either way the gates, the carry between
    steps and the gradients stay in float32: what the same cells compute in bfloat16
    throughout (XLA's loop), less the rounding of every intermediate to bfloat16 (PyTorch's
    oneDNN bfloat16 LSTM keeps its gates in float32 too). On the quick grid (2 Intel cores,
    AMX) XLA's bfloat16 loop ran 4.9–14.6× slower than the kernels with bfloat16 operands."""
    backend = backend or jax.default_backend()
    if backend != "cpu" or xs.dtype != jnp.bfloat16 or kind not in KINDS:
        return None
    sharded = sharding.time_major_batch(xs) is not None
    batch = math.prod(xs.shape[1:-1])
    for name, md in (("bfloat16", jnp.dtype(jnp.bfloat16)), ("float32", None)):
        modes = placements(
            kind, batch, hidden, jnp.float32, md, backend=backend, sharded=sharded,
            empty=xs.size == 0,
        )  # fmt: skip
        if modes[0] == "native":
            return name
    return None


def run(
    cell, params, xs, carry, *, mask, resets, reverse, unroll, matmul_dtype=None,
    batch_major=False,
):  # fmt: skip
    """The fast path of ``unroll.run_time_major`` for a built-in cell (`supports` is true).

    Args and returns as ``run_time_major``: ``xs: (time, *batch, features)`` validated,
    ``mask``/``resets``: ``(time, *batch)`` bool or ``None``; returns ``(ys, carry)``.
    ``matmul_dtype``: ``None`` or a floating dtype the matmul operands are cast to (products
    accumulate in ``xs.dtype``). ``batch_major``: the caller moved its batch-major arrays to
    time-major for this call and moves the outputs back, so that the native kernel, which
    reads and writes either layout, takes them as they were (XLA cancels the two moves).
    """
    kind = cell.kind
    dtype = xs.dtype
    md = None if matmul_dtype is None else jnp.dtype(matmul_dtype)
    md = None if md == dtype else md  # the input dtype: the default computation
    on_kernel = None if md is not None else bf16_data_on_kernel(kind, xs, params[1].shape[0])
    if on_kernel is not None:
        ys, final = run(
            cell, _float32(params), xs.astype(jnp.float32), _float32(carry), mask=mask,
            resets=resets, reverse=reverse, unroll=unroll,
            matmul_dtype=jnp.bfloat16 if on_kernel == "bfloat16" else None,
            batch_major=batch_major,
        )  # fmt: skip
        final = jax.tree_util.tree_map(lambda a, c: a.astype(c.dtype), final, carry)
        return ys.astype(dtype), final
    w_x, w_h, b_x, b_h = (None if w is None else w.astype(dtype) for w in params[:4])
    if kind == "gru":
        b_in = b_h  # b_hn sits inside the reset gate: the recurrent bias stays in the loop
    else:
        b_in = None  # additive gates: both biases fold into the input projection
        b_x = None if b_x is None else b_x + b_h
    if mask is not None:
        # Skipped steps see a zero input, so NaN in the padding cannot leak into gradients.
        # (Batch-major callers: selected in their layout, so that no move of xs stays.)
        zero = jnp.zeros((), dtype)
        if batch_major:
            keep = jnp.moveaxis(mask, 0, -1)[..., None]
            xs = jnp.moveaxis(jnp.where(keep, jnp.moveaxis(xs, 0, -2), zero), -2, 0)
        else:
            xs = jnp.where(mask[..., None], xs, zero)
    batch = math.prod(xs.shape[1:-1])
    if unroll is None:
        unroll = default_unroll(batch, w_h.shape[0])
    sharded = sharding.time_major_batch(xs) is not None
    modes = placements(kind, batch, w_h.shape[0], dtype, md, sharded=sharded, empty=xs.size == 0)
    static = (kind, reverse, unroll, modes, md, batch_major)
    leaves, treedef = jax.tree_util.tree_flatten(carry)
    ys, leaves = _recurrence(static, xs, w_x, b_x, w_h, b_in, tuple(leaves), mask, resets)
    return ys, jax.tree_util.tree_unflatten(treedef, list(leaves))


# ----------------------------------------------------------------------------------------------
# cuDNN through JAX (GPU only, opt-in: not dispatched to by `unroll`, see `cudnn_lstm`).


def pack_cudnn_lstm_weights(params) -> jax.Array:
    """``LSTMParams`` (no projection) as the flat weight vector of ``jax.experimental.rnn``.

    cuDNN's layout for one layer and direction: ``W_ih (4H, in)``, ``W_hh (4H, H)``, ``b_ih``,
    ``b_hh``, each flattened, gates ``i, f, g, o`` as jaxrnn's; missing biases are zeros.
    """
    width = params.w_h.shape[1]
    zeros = jnp.zeros((width,), params.w_h.dtype)
    b_x = zeros if params.b_x is None else params.b_x
    b_h = zeros if params.b_h is None else params.b_h
    return jnp.concatenate([params.w_x.T.ravel(), params.w_h.T.ravel(), b_x, b_h])


def cudnn_lstm(params, xs, carry, seq_lengths=None):
    """Runs an LSTM through cuDNN (``jax.experimental.rnn.lstm``); GPU only, opt-in.

    Same function as ``jaxrnn.unroll(jaxrnn.lstm(H), params, xs, carry,
    seq_lengths=seq_lengths)`` for batch-major ``xs: (batch, time, in)``. It is not the default
    on GPU: measured peers put it behind PyTorch at small batch and level with the fast path
    at large batch, and its kernel has not yet been run against the reference on a GPU here
    (the weight packing and semantics are tested on CPU through ``jax.experimental.rnn``'s
    reference implementation).
    """
    from jax.experimental import rnn

    batch, time, input_size = xs.shape
    hidden = params.w_h.shape[0]
    if seq_lengths is None:
        seq_lengths = jnp.full((batch,), time, jnp.int32)
    weights = pack_cudnn_lstm_weights(params).astype(xs.dtype)
    ys, h, c = rnn.lstm(
        xs,
        carry.h[None],
        carry.c[None],
        weights,
        seq_lengths.astype(jnp.int32),
        input_size,
        hidden,
        1,
        0.0,
        False,
    )
    return ys, type(carry)(h[0], c[0])
