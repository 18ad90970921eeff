"""The runner: the one place in jaxrnn that loops over time."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrnn._src import checks, fastpath, parallel, sharding
from jaxrnn._src import remat as remat_lib
from jaxrnn._src.cell import Cell


def _expand_to(flag: jax.Array, leaf: jax.Array) -> jax.Array:
    """Broadcasts a ``(*batch,)`` flag against a ``(*batch, ...)`` leaf."""
    return jnp.reshape(flag, flag.shape + (1,) * (leaf.ndim - flag.ndim))


def select_tree(flag: jax.Array, on_true, on_false):
    """``where(flag, a, b)`` leaf by leaf, ``flag`` of shape ``(*batch,)``."""
    return jax.tree_util.tree_map(
        lambda a, b: jnp.where(_expand_to(flag, a), a, b), on_true, on_false
    )


def _zero_where_not(flag: jax.Array, tree):
    return jax.tree_util.tree_map(
        lambda a: jnp.where(_expand_to(flag, a), a, jnp.zeros((), a.dtype)), tree
    )


def _cast_carry(carry, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, carry
    )


def step_flags(
    time: int,
    batch_shape: tuple,
    seq_lengths: jax.Array | None,
    mask: jax.Array | None,
    resets: jax.Array | None,
):
    """Folds ``seq_lengths`` into a time-major step mask; drops resets in the padding.

    Returns ``(mask, resets)``, each ``(time, *batch)`` bool or ``None``.
    """
    if seq_lengths is not None:
        t = jnp.arange(time).reshape((time,) + (1,) * len(batch_shape))
        valid = t < seq_lengths[None]
        mask = valid if mask is None else mask & valid
        if resets is not None:
            resets = resets & valid
    return mask, resets


def run_time_major(
    cell: Cell,
    params,
    xs: jax.Array,
    carry,
    *,
    mask: jax.Array | None,
    resets: jax.Array | None,
    reverse: bool,
    unroll: int | bool | None,
    remat: bool | int | None = None,
    matmul_dtype=None,
    batch_major: bool = False,
):
    """Runs validated, time-major inputs: ``xs: (time, *batch, features)``.

    ``batch_major``: the caller moved batch-major arrays to time-major and moves the outputs
    back (`fastpath.run` then lets the native kernel take them as they were).

    Built-in cells take the sequence-level fast path (`fastpath.run`: fused gates, hoisted
    weight gradients); other cells, and any call with ``remat``, run the reference scan
    (`reference_run_time_major`). Both compute the same function.
    """
    if fastpath.supports(cell, params) and not remat:
        return fastpath.run(
            cell, params, xs, carry, mask=mask, resets=resets, reverse=reverse, unroll=unroll,
            matmul_dtype=matmul_dtype, batch_major=batch_major,
        )  # fmt: skip
    return reference_run_time_major(
        cell, params, xs, carry, mask=mask, resets=resets, reverse=reverse, unroll=unroll,
        remat=remat,
    )  # fmt: skip


def reference_run_time_major(
    cell: Cell,
    params,
    xs: jax.Array,
    carry,
    *,
    mask: jax.Array | None,
    resets: jax.Array | None,
    reverse: bool,
    unroll: int | bool | None,
    remat: bool | int | None = None,
):
    """The reference runner: ``lax.scan`` over ``cell.recur``, differentiated by JAX.

    The input projection is hoisted out of the loop: ``project`` runs once on the whole
    sequence (one large matmul), and the scan body only does ``recur``. ``remat`` checkpoints
    the scan every ``k`` steps (see `unroll`).
    """
    if unroll is None:
        unroll = 1
    batch_shape = tuple(xs.shape[1:-1])
    if mask is not None:
        # Zero the input of skipped steps: their (ignored) computation then cannot make NaN
        # gradients leak out of the padding (0 * NaN is NaN in the weight gradients).
        xs = _zero_where_not(mask, xs)
    xw = cell.project(params, xs)
    initial = None
    if resets is not None:
        initial = _cast_carry(cell.initial_carry(batch_shape, xs.dtype), xs.dtype)
        initial = sharding.like_batch(initial, sharding.time_major_batch(xs))

    def body(c, inputs):
        xw_t, m_t, r_t = inputs
        if r_t is not None and not reverse:
            c = select_tree(r_t, initial, c)
        c_new, y = cell.recur(params, c, xw_t)
        if m_t is not None:
            c_new = select_tree(m_t, c_new, c)
            y = _zero_where_not(m_t, y)
        if r_t is not None and reverse:
            c_new = select_tree(r_t, initial, c_new)
        return c_new, y

    carry, ys = remat_lib.scan(
        body, carry, (xw, mask, resets), reverse=reverse, unroll=unroll, remat=remat
    )
    return ys, carry


def unroll(
    cell: Cell,
    params,
    xs: jax.Array,
    carry=None,
    *,
    time_major: bool = False,
    reverse: bool = False,
    unroll: int | bool | None = None,
    seq_lengths: jax.Array | None = None,
    mask: jax.Array | None = None,
    resets: jax.Array | None = None,
    method: str = "sequential",
    tol: float | None = None,
    max_iters: int = 100,
    damping: float = 0.0,
    on_nonconvergence: str = "warn",
    remat: bool | int | None = None,
    matmul_dtype=None,
    return_info: bool = False,
):
    r"""Runs ``cell`` over a sequence: ``jax.lax.scan`` with masks, lengths and resets.

    Signature, with ``B = *batch`` (any number of batch dims, including none)::

        unroll(cell, params, xs: (*B, T, F), carry=None) -> (ys: (*B, T, O), carry)

    Semantically equal to this Python loop (``time_major=False``; ``mask``, ``resets`` and
    ``seq_lengths`` indexed per sequence)::

        carry = cell.initial_carry(B) if carry is None else carry
        order = reversed(range(T)) if reverse else range(T)
        for t in order:                       # one sequence shown; every row likewise
            valid = mask[t] and t < seq_lengths
            if resets[t] and t < seq_lengths and not reverse:
                carry = cell.initial_carry()  # a boundary just before step t
            if valid:
                carry, ys[t] = cell.step(params, carry, xs[t])
            else:
                ys[t] = 0                     # carry held
            if resets[t] and t < seq_lengths and reverse:
                carry = cell.initial_carry()  # the same boundary, crossed the other way

    so right-padded sequences (``seq_lengths``) get zero outputs in the padding, their final
    carry is the carry after their last valid step (held, not stored per step: memory for it is
    O(batch · hidden)), and ``reverse=True`` runs each sequence backwards over its valid part
    only, writing ``ys`` in the input's order (as PyTorch's packed bidirectional RNNs).

    The input projection ``cell.project`` runs once over the whole sequence before the loop;
    the loop runs ``cell.recur``. The built-in cells (Elman, LSTM without ``proj_size``, GRU)
    take a sequence-level fast path that computes the same function with the recurrent weight
    gradients hoisted out of the reverse loop (one matmul over all steps), while forward-mode
    differentiation (``jax.jvp``, ``jax.jacfwd``, Hessians) keeps working.

    Args:
      cell: a `Cell`.
      params: the cell's params (from ``cell.init``).
      xs: ``(*batch, time, input_size)``, or ``(time, *batch, input_size)`` with
        ``time_major=True``. Floating point; computation runs in its dtype, except bfloat16
        for the built-in cells on a CPU where the native kernel runs: there they run in
        float32, with bfloat16 matmul operands where the kernel multiplies bfloat16 (AMX
        tiles or AVX512-BF16; as ``matmul_dtype=jnp.bfloat16`` on the float32 values), and
        round the outputs and final carry to bfloat16, rather than rounding every
        intermediate (1.4-16x faster than bfloat16 throughout in XLA's loop;
        `fastpath.bf16_data_on_kernel`).
      carry: the initial carry, as ``cell.initial_carry(batch_shape)``; default zeros.
      time_major: layout of ``xs``, ``ys``, ``mask`` and ``resets``.
      reverse: run from the last (valid) step to the first.
      unroll: the scan's unroll factor (``lax.scan``'s ``unroll``); ``None`` (default) picks a
        measured factor for the built-in cells on this backend (and 1 for other cells). It
        changes speed only, never the result.
      seq_lengths: ``(*batch,)`` ints; sequence ``b`` occupies steps ``[0, seq_lengths[b])``.
        Lengths beyond ``time`` act as ``time``; lengths ``<= 0`` leave the carry untouched.
      mask: ``(*batch, time)`` bool; where ``False`` the step is skipped: carry held, output
        zero (as Keras masks).
      resets: ``(*batch, time)`` bool; where ``True`` a new sequence starts at that step: the
        carry returns to ``cell.initial_carry()`` (zeros, not the ``carry`` argument) before
        it, as Haiku's ``ResetCore`` — so several sequences can be packed in one row. With
        ``reverse=True`` each packed sequence runs backwards on its own.
      method: how time is traversed, all with the semantics above (README, "Long sequences"):
        ``"sequential"`` (``lax.scan``, ``T`` dependent steps); ``"quasi_deer"`` (Newton
        iterations on the whole trajectory with the diagonal of each step's Jacobian, linear
        recurrences solved by ``lax.associative_scan`` in ``O(log T)`` depth; ``O(T·D)``
        memory for a carry of ``D`` numbers); ``"deer"`` (the full Jacobian: fewer iterations,
        ``O(T·D²)`` memory); ``"associative"`` (one associative scan, for cells linear in their
        carry: `mingru`, `minlstm`, `lru`); ``"auto"`` (sequential on CPU and below 2048 steps,
        else associative or quasi-DEER). Gradients of the parallel methods differentiate the
        solution (an adjoint solved in parallel), not the iterations.
      tol: convergence tolerance of ``"quasi_deer"``/``"deer"`` on the mixed residual
        ``max |s_t - F_t(s_{t-1})| / (1 + |F_t(s_{t-1})|)``; default ``1e-5`` in float32,
        ``1e-10`` in float64.
      max_iters: most Newton iterations (and adjoint iterations in the backward pass). At most
        ``T`` are ever needed: every iteration makes one more step exact.
      damping: ``>= 0``; scales the Jacobians by ``1 / (1 + damping)``, moving Newton towards
        the always-stable fixed-point (Picard) iteration: slower, but no overflow for cells
        whose linearisation is unstable. The solution is unchanged.
      on_nonconvergence: when ``tol`` is not reached in ``max_iters``: ``"warn"`` (a
        ``RuntimeWarning``, the last iterate is returned), ``"raise"`` (a runtime error),
        ``"nan"`` (outputs and carry are NaN), or ``"sequential"`` (recompute with the exact
        scan; the adjoint likewise).
      remat: sequential method only: ``True`` checkpoints every ``ceil(sqrt(T))`` steps, an int
        ``k`` every ``k`` steps; the backward pass then stores ``O(T/k + k)`` step residuals
        instead of ``O(T)`` and recomputes each chunk once.
      matmul_dtype: ``None`` (default: matmuls in ``xs.dtype``) or a floating dtype no wider
        than ``xs.dtype``, e.g. ``jnp.bfloat16``: the input projection and the recurrent
        product cast both operands to it and accumulate in ``xs.dtype``; gate nonlinearities,
        carries and outputs stay in ``xs.dtype``. The derivatives' matmuls cast the same
        weights and activations; the incoming tangent or cotangent keeps ``xs.dtype``, so
        gradients accumulate and stay in ``xs.dtype`` (not rounded to bf16). Built-in
        Elman/LSTM/GRU cells (no ``proj_size``) with the sequential method and no ``remat``.
        On a CPU with AMX tiles or AVX512-BF16, ``jnp.bfloat16`` with float32 inputs runs in
        the native kernel (the recurrence's matmuls on the tiles or with VDPBF16PS);
        elsewhere in XLA's loop.
      return_info: also return an `UnrollInfo` (iterations, residual, converged).

    Returns:
      ``(ys, carry)``: ``ys`` in the layout of ``xs`` with features replaced by the cell's
      output size; ``carry`` the final carry. ``(ys, carry, info)`` with ``return_info=True``.

    Raises:
      TypeError, ValueError: at trace time, for a non-Cell, integer ``xs``, params of another
      cell or input size, a carry, ``seq_lengths``, ``mask`` or ``resets`` of the wrong
      structure, shape or dtype. NaN in ``xs`` is never replaced: it propagates.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.lstm(16)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=4)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (2, 10, 4))   # (batch, time, features)
      >>> ys, carry = jaxrnn.unroll(cell, params, xs, seq_lengths=jnp.array([10, 7]))
      >>> ys.shape, carry.h.shape
      ((2, 10, 16), (2, 16))
      >>> bool(jnp.all(ys[1, 7:] == 0))
      True
    """
    fn = "unroll"
    checks.check_cell(fn, cell)
    xs = checks.check_xs(fn, xs)
    time_major = checks.check_static_flag(fn, "time_major", time_major)
    reverse = checks.check_static_flag(fn, "reverse", reverse)
    if unroll is not None:
        checks.check_unroll_factor(fn, unroll)
    parallel.check_options(fn, method, tol, max_iters, damping, on_nonconvergence, remat)
    checks.check_params(fn, cell, params, xs.shape[-1])
    if matmul_dtype is not None:
        matmul_dtype = checks.check_matmul_dtype(fn, matmul_dtype, xs.dtype)
        why = None
        if not fastpath.supports(cell, params):
            why = f"cell {cell.name!r} has none (built-in elman/lstm/gru without proj_size)"
        elif method != "sequential":
            why = f"method={method!r} does not use it (only 'sequential' does)"
        elif remat:
            why = f"remat={remat!r} does not use it (only remat=None does)"
        if why is not None:
            raise ValueError(
                f"{fn}: matmul_dtype={jnp.dtype(matmul_dtype).name} needs the fused fast path, "
                f"but {why}."
            )
    if time_major:
        time, batch_shape = xs.shape[0], tuple(xs.shape[1:-1])
        flag_shape, layout = (time, *batch_shape), "(time, *batch) with time_major=True"
        layout_xs = "(time, *batch, features) with time_major=True"
    else:
        time, batch_shape = xs.shape[-2], tuple(xs.shape[:-2])
        flag_shape, layout = (*batch_shape, time), "(*batch, time)"
        layout_xs = "(*batch, time, features)"
    checks.check_time_unsharded(fn, xs, 0 if time_major else xs.ndim - 2, layout_xs)
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    else:
        checks.check_carry(fn, cell, carry, batch_shape, xs.dtype)
    carry = _cast_carry(carry, xs.dtype)
    if seq_lengths is not None:
        seq_lengths = checks.check_seq_lengths(fn, seq_lengths, batch_shape)
    if mask is not None:
        mask = checks.check_step_flags(fn, "mask", mask, flag_shape, layout)
    if resets is not None:
        resets = checks.check_step_flags(fn, "resets", resets, flag_shape, layout)

    if not time_major:
        xs = jnp.moveaxis(xs, -2, 0)
        mask = None if mask is None else jnp.moveaxis(mask, -1, 0)
        resets = None if resets is None else jnp.moveaxis(resets, -1, 0)
    carry = sharding.like_batch(carry, sharding.time_major_batch(xs))
    mask, resets = step_flags(time, batch_shape, seq_lengths, mask, resets)
    method = parallel.resolve_method(cell, method, time)
    if method == "sequential":
        ys, carry = run_time_major(
            cell, params, xs, carry, mask=mask, resets=resets, reverse=reverse, unroll=unroll,
            remat=remat, matmul_dtype=matmul_dtype, batch_major=not time_major,
        )  # fmt: skip
        info = parallel.sequential_info(xs.dtype)
    else:
        ys, carry, info = parallel.run_parallel(
            cell, params, xs, carry, mask=mask, resets=resets, reverse=reverse, method=method,
            tol=tol, max_iters=max_iters, damping=damping, on_nonconvergence=on_nonconvergence,
        )  # fmt: skip
    if not time_major:
        ys = jax.tree_util.tree_map(lambda y: jnp.moveaxis(y, 0, -2), ys)
    return (ys, carry, info) if return_info else (ys, carry)
