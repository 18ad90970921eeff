"""Parallel-in-time solvers the runner dispatches to: the DEER family and associative scans.

A recurrence ``s_t = F_t(s_{t-1})`` over ``T`` steps is solved as one system of ``T`` equations
for the whole trajectory instead of ``T`` dependent steps. Newton's method on that system
(DEER, Lim et al., ICLR 2024) linearises every step around the current guess,

.. math::

    s_t^{(i+1)} = F_t(s_{t-1}^{(i)}) + J_t \\, (s_{t-1}^{(i+1)} - s_{t-1}^{(i)}),
    \\qquad J_t = \\partial F_t / \\partial s \\,(s_{t-1}^{(i)}),

a *linear* recurrence ``s_t = A_t s_{t-1} + b_t`` that ``jax.lax.associative_scan`` solves in
``O(log T)`` depth. ``"deer"`` uses the full ``J_t`` (``O(T·D²)`` memory, quadratic
convergence); ``"quasi_deer"`` (Gonzalez et al., NeurIPS 2024) only its diagonal (``O(T·D)``).
Both reach the exact sequential trajectory in at most ``T`` iterations (every iteration makes
at least one more step exact) and, for contracting cells, in far fewer.

Cells whose recurrence is already linear in the carry (`jaxrnn.mingru`, `jaxrnn.minlstm`,
`jaxrnn.lru`) register their coefficients here and run as one associative scan
(``method="associative"``), in log space where the cell allows it (Feng et al., 2024).

Gradients differentiate the *solution*, not the iterations (a ``jax.custom_vjp``): the adjoint
``λ_t = g_t + J_{t+1}^T λ_{t+1}`` is a linear recurrence backwards in time, solved in parallel
(exactly with the full Jacobians for ``"deer"``; by diagonally preconditioned iterations, each
one an exact vector-Jacobian product of all steps at once, for ``"quasi_deer"``).
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrnn._src import sharding
from jaxrnn._src.cell import Cell
from jaxrnn._src.elman import ElmanParams
from jaxrnn._src.gru import GRUParams
from jaxrnn._src.lstm import LSTMCarry, LSTMParams

METHODS = ("sequential", "quasi_deer", "deer", "associative", "auto")
ON_NONCONVERGENCE = ("warn", "raise", "nan", "sequential")

# "auto" runs a parallel method from this many steps on, on GPU and TPU (to be tuned with
# benchmarks/long_sequence_gpu.sh). On CPU it always runs the sequential scan: on 2 CPU cores
# quasi-DEER's forward pass measured 5.5-8x slower than the scan and minGRU's associative scan
# 1.8-3.4x slower than its sequential scan (README, "Long sequences"); there is no parallel
# hardware for the O(T log T) work to use.
AUTO_MIN_TIME = 2048


class UnrollInfo(NamedTuple):
    """Convergence report of a parallel solve (``unroll(..., return_info=True)``).

    Attributes:
      iterations: Newton iterations used (0 for the sequential scan, 1 for an associative scan).
      residual: the largest mixed residual ``|s_t - F_t(s_{t-1})| / (1 + |F_t(s_{t-1})|)`` of the
        returned trajectory (0 for the sequential scan).
      converged: whether ``residual <= tol``.
    """

    iterations: jax.Array  # shape=(), int32
    residual: jax.Array  # shape=(), the compute dtype
    converged: jax.Array  # shape=(), bool


def sequential_info(dtype) -> UnrollInfo:
    return UnrollInfo(jnp.zeros((), jnp.int32), jnp.zeros((), dtype), jnp.ones((), bool))


# ----------------------------------------------------------------------------------------------
# Cells that are linear in their carry register their coefficients here.


class LinearSpec(NamedTuple):
    """``h_t = a_t ⊙ h_{t-1} + b_t`` with ``(a_t, b_t)`` a function of the input alone.

    Attributes:
      coefficients: ``(params, xw) -> (a, b)``, each ``(*lead, hidden)``.
      readout: ``(params, h, xw) -> y``, the output from the new carry.
      log_coefficients: ``(params, xw) -> (log a, log b)`` when both are positive (then the
        associative scan runs in log space), else ``None``.
    """

    coefficients: Callable
    readout: Callable
    log_coefficients: Callable | None = None


_LINEAR: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_linear(recur: Callable, spec: LinearSpec) -> None:
    """Marks ``recur`` (a cell's recur function) as linear in the carry, with ``spec``."""
    _LINEAR[recur] = spec


def linear_spec(cell: Cell) -> LinearSpec | None:
    try:
        return _LINEAR.get(cell.recur)
    except TypeError:  # an unhashable recur
        return None


def resolve_method(cell: Cell, method: str, time: int, backend: str | None = None) -> str:
    """The method ``"auto"`` stands for; other methods are returned unchanged.

    Sequential on CPU (no parallel hardware: measured slower there) and below
    ``AUTO_MIN_TIME`` steps; otherwise the associative scan for cells linear in their carry and
    quasi-DEER for every other cell.
    """
    if method != "auto":
        return method
    backend = jax.default_backend() if backend is None else backend
    if backend == "cpu" or time < AUTO_MIN_TIME:
        return "sequential"
    return "associative" if linear_spec(cell) is not None else "quasi_deer"


# ----------------------------------------------------------------------------------------------
# The carry as one flat state vector.


class _Flat:
    """Ravels a carry with leaves ``(*lead, *batch, *rest)`` into ``(*lead, *batch, D)``."""

    def __init__(self, carry, batch_ndim: int):
        leaves, self.treedef = jax.tree_util.tree_flatten(carry)
        self.rest = [tuple(leaf.shape[batch_ndim:]) for leaf in leaves]
        self.sizes = [math.prod(r) for r in self.rest]
        self.size = sum(self.sizes)

    def ravel(self, carry) -> jax.Array:
        leaves = jax.tree_util.tree_leaves(carry)
        flat = [
            leaf.reshape(leaf.shape[: leaf.ndim - len(r)] + (-1,))
            for leaf, r in zip(leaves, self.rest)
        ]
        return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)

    def unravel(self, vec: jax.Array):
        parts = jnp.split(vec, list(_cumsum(self.sizes[:-1])), axis=-1)
        leaves = [p.reshape(p.shape[:-1] + r) for p, r in zip(parts, self.rest)]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)


def _cumsum(sizes):
    total = 0
    for s in sizes:
        total += s
        yield total


def _bcast(flag, x):
    """A ``(*lead,)`` flag against ``x: (*lead, ...)``."""
    return flag.reshape(flag.shape + (1,) * (x.ndim - flag.ndim))


# ----------------------------------------------------------------------------------------------
# Diagonals of the step Jacobian, analytic for the built-in cells.


def _elman_diag(cell, params, h, xw):
    # h' = act(z), z = xw + h W_h + b_h: dh'_i/dh_i = act'(z_i) W_h[i, i]; act'(z) is the
    # derivative with respect to xw, one jvp, whatever the activation.
    (h_new, y), (dz, _) = jax.jvp(
        lambda xw_: cell.recur(params, h, xw_), (xw,), (jnp.ones_like(xw),)
    )
    return h_new, y, dz * jnp.diagonal(params.w_h).astype(xw.dtype)


def _gru_diag(cell, params, h, xw):
    del cell
    w_h = params.w_h.astype(xw.dtype)
    hw = h @ w_h
    if params.b_h is not None:
        hw = hw + params.b_h.astype(xw.dtype)
    hsize = h.shape[-1]
    xr, xz, xn = jnp.split(xw, 3, axis=-1)
    hr, hz, hn = jnp.split(hw, 3, axis=-1)
    wr, wz, wn = (jnp.diagonal(w_h[:, k * hsize : (k + 1) * hsize]) for k in range(3))
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    n = jnp.tanh(xn + r * hn)
    h_new = (1.0 - z) * n + z * h
    dr = r * (1.0 - r) * wr
    dz = z * (1.0 - z) * wz
    dn = (1.0 - n * n) * (dr * hn + r * wn)
    return h_new, h_new, (1.0 - z) * dn + (h - n) * dz + z


def _lstm_diag(cell, params, carry, xw):
    del cell
    h, c = carry
    w_h = params.w_h.astype(xw.dtype)
    zs = xw + h @ w_h
    if params.b_h is not None:
        zs = zs + params.b_h.astype(xw.dtype)
    hsize = c.shape[-1]
    gi, gf, gg, go = jnp.split(zs, 4, axis=-1)
    wi, wf, wg, wo = (jnp.diagonal(w_h[:, k * hsize : (k + 1) * hsize]) for k in range(4))
    i, f, o, g = jax.nn.sigmoid(gi), jax.nn.sigmoid(gf), jax.nn.sigmoid(go), jnp.tanh(gg)
    c_new = f * c + i * g
    tc = jnp.tanh(c_new)
    h_new = o * tc
    dc_dh = f * (1.0 - f) * wf * c + i * (1.0 - i) * wi * g + i * (1.0 - g * g) * wg
    dh = o * (1.0 - o) * wo * tc + o * (1.0 - tc * tc) * dc_dh
    return LSTMCarry(h_new, c_new), h_new, LSTMCarry(dh, f)


def _diag_rule(cell: Cell, params):
    """``(params, carry, xw) -> (carry, y, diag as a carry)`` for a known cell, else ``None``."""
    spec = linear_spec(cell)
    if spec is not None:

        def linear_rule(params, h, xw):
            a, b = spec.coefficients(params, xw)
            h_new = a * h + b
            return h_new, spec.readout(params, h_new, xw), a

        return linear_rule
    rules = {ElmanParams: _elman_diag, GRUParams: _gru_diag, LSTMParams: _lstm_diag}
    rule = rules.get(cell.params_type)
    if rule is None or (cell.params_type is LSTMParams and params.w_p is not None):
        return None
    return lambda params, carry, xw: rule(cell, params, carry, xw)


# ----------------------------------------------------------------------------------------------
# The masked step on flat states, its Jacobian, and linear recurrences.


class _Problem(NamedTuple):
    """Everything static about one solve; arrays are passed separately."""

    cell: Cell
    flat: _Flat
    reset_after: bool  # True when run backwards in time (resets apply after the step)
    method: str  # "quasi_deer" or "deer"
    tol: float
    max_iters: int
    damping: float
    on_nonconvergence: str


def _step(prob: _Problem, params, prev, xw, m, r, init):
    """The masked step ``F_t`` on flat states, for any leading dims: ``(new, y)``."""
    pre = prev if (r is None or prob.reset_after) else jnp.where(_bcast(r, prev), init, prev)
    carry, y = prob.cell.recur(params, prob.flat.unravel(pre), xw)
    new = prob.flat.ravel(carry)
    if m is not None:
        new = jnp.where(_bcast(m, new), new, pre)
    if r is not None and prob.reset_after:
        new = jnp.where(_bcast(r, new), init, new)
    return new, y


def _mask_jacobian(prob: _Problem, jac, m, r, full: bool):
    """Masked step: identity; reset: zero (the new state does not depend on the old one)."""
    ndim = 2 if full else 1
    eye = jnp.eye(prob.flat.size, dtype=jac.dtype) if full else jnp.ones((), jac.dtype)
    if m is not None:
        jac = jnp.where(m.reshape(m.shape + (1,) * ndim), jac, eye)
    if r is not None:
        jac = jnp.where(r.reshape(r.shape + (1,) * ndim), jnp.zeros((), jac.dtype), jac)
    return jac


def _step_and_jacobian(prob: _Problem, params, prev, xw, m, r, init, full: bool):
    """``F_t(prev)`` and its Jacobian in ``prev``: the diagonal ``(..., D)`` or full
    ``(..., D, D)``. The diagonal of a known cell is analytic (one step's cost); any other cell
    pays ``D`` forward-mode products (``jvp``) for either form."""
    step = lambda p: _step(prob, params, p, xw, m, r, init)[0]
    rule = None if full else _diag_rule(prob.cell, params)
    if rule is not None:
        new = step(prev)
        _, _, diag = rule(params, prob.flat.unravel(prev), xw)
        return new, _mask_jacobian(prob, prob.flat.ravel(diag), m, r, full=False)
    dim = prob.flat.size
    basis = jnp.eye(dim, dtype=prev.dtype)
    new = step(prev)
    tangent = lambda e: jax.jvp(step, (prev,), (jnp.broadcast_to(e, prev.shape),))[1]
    if full:
        cols = jax.vmap(tangent, out_axes=-1)(basis)  # (..., D_out, D_in)
        return new, _mask_jacobian(prob, cols, m, r, full=True)
    diag = lax.map(lambda i: tangent(basis[i])[..., i], jnp.arange(dim))  # (D, ...)
    return new, _mask_jacobian(prob, jnp.moveaxis(diag, 0, -1), m, r, full=False)


def _linear_solve(a, b, s0, full: bool):
    """``s_t = a_t s_{t-1} + b_t`` for ``t = 1..T`` (time on axis 0) by an associative scan."""
    if full:
        b = b.at[0].add(jnp.einsum("...ij,...j->...i", a[0], s0))

        def combine(e1, e2):
            a1, b1 = e1
            a2, b2 = e2
            return a2 @ a1, jnp.einsum("...ij,...j->...i", a2, b1) + b2

    else:
        b = b.at[0].add(a[0] * s0)

        def combine(e1, e2):
            a1, b1 = e1
            a2, b2 = e2
            return a2 * a1, a2 * b1 + b2

    a = a.at[0].set(jnp.zeros_like(a[0]))
    return lax.associative_scan(combine, (a, b))[1]


def _apply(jac, v, full: bool):
    return jnp.einsum("...ij,...j->...i", jac, v) if full else jac * v


def _transpose(jac, full: bool):
    return jnp.swapaxes(jac, -1, -2) if full else jac


def _relative(err, ref):
    """``max |err| / (1 + |ref|)``: relative where ``ref`` is large, absolute where small."""
    return jnp.max(jnp.abs(err) / (1.0 + jnp.abs(ref)), initial=0.0)


def _residual(s, f):
    return _relative(s - f, f)


def _shift_in(s0, s):
    """``(s_0, s_1, ..., s_{T-1})``: the state before each step."""
    return jnp.concatenate([s0[None], s[:-1]], axis=0)


def _newton(prob: _Problem, params, xw, s0, m, r, init):
    """DEER/quasi-DEER iterations from the guess ``s_t = s_0``: ``(trajectory, iters, res)``."""
    full = prob.method == "deer"
    shrink = 1.0 / (1.0 + prob.damping)

    def evaluate(s):
        f, jac = _step_and_jacobian(prob, params, _shift_in(s0, s), xw, m, r, init, full)
        return f, jac, _residual(s, f)

    def body(state):
        it, s, f, jac, _ = state
        prev = _shift_in(s0, s)
        a = jac * shrink
        s = _linear_solve(a, f - _apply(a, prev, full), s0, full)
        return (it + 1, s, *evaluate(s))

    def cond(state):
        it, _, _, _, res = state
        return (it < prob.max_iters) & ~(res <= prob.tol)

    guess = jnp.broadcast_to(s0, (_time_of(xw),) + s0.shape)
    state = (jnp.zeros((), jnp.int32), guess, *evaluate(guess))
    it, s, _, _, res = lax.while_loop(cond, body, state)
    return s, it, res


def _time_of(xw) -> int:
    return jax.tree_util.tree_leaves(xw)[0].shape[0]


def _sequential_states(prob: _Problem, params, xw, s0, m, r, init):
    def body(s, inputs):
        xw_t, m_t, r_t = inputs
        s = _step(prob, params, s, xw_t, m_t, r_t, init)[0]
        return s, s

    return lax.scan(body, s0, (xw, m, r))[1]


def _report(prob: _Problem, what: str, converged, iters, res):
    """Acts on a failed solve as ``on_nonconvergence`` says (``warn`` or ``raise``)."""
    if prob.on_nonconvergence not in ("warn", "raise"):
        return

    def callback(converged, iters, res):
        if bool(converged):
            return
        msg = (
            f"unroll(method={prob.method!r}): the {what} did not converge in {int(iters)} "
            f"iterations (residual {float(res):.3g} > tol={prob.tol:g}). Raise max_iters, add "
            f"damping, or use on_nonconvergence='sequential' to fall back to the exact scan."
        )
        if prob.on_nonconvergence == "raise":
            raise RuntimeError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)

    jax.debug.callback(callback, converged, iters, res)


def _finish(prob: _Problem, what: str, s, iters, res, exact: Callable):
    """Applies the non-convergence policy to a solution ``s``."""
    converged = res <= prob.tol
    _report(prob, what, converged, iters, res)
    if prob.on_nonconvergence == "nan":
        s = jnp.where(converged, s, jnp.full_like(s, jnp.nan))
    elif prob.on_nonconvergence == "sequential":
        s = lax.cond(converged, lambda: s, exact)
    return s, converged


def _adjoint_scan(prob: _Problem, params, xw, prev, m, r, init, g):
    """The exact adjoint by a reverse scan of per-step VJPs (the fallback)."""

    def body(u, inputs):
        g_t, prev_t, xw_t, m_t, r_t = inputs
        lam = g_t + u
        _, vjp = jax.vjp(lambda p: _step(prob, params, p, xw_t, m_t, r_t, init)[0], prev_t)
        return vjp(lam)[0], lam

    return lax.scan(body, jnp.zeros_like(g[0]), (g, prev, xw, m, r), reverse=True)[1]


def _make_solver(prob: _Problem):
    """The trajectory ``s_{1..T}`` as a differentiable function with a parallel adjoint."""

    @jax.custom_vjp
    def solve(params, xw, s0, m, r, init):
        return _solve_fwd(params, xw, s0, m, r, init)[0]

    def _solve_fwd(params, xw, s0, m, r, init):
        s, iters, res = _newton(prob, params, xw, s0, m, r, init)
        exact = lambda: _sequential_states(prob, params, xw, s0, m, r, init)
        s, converged = _finish(prob, "solve", s, iters, res, exact)
        return (s, UnrollInfo(iters, res, converged)), (params, xw, s0, m, r, init, s)

    def _solve_bwd(saved, cotangents):
        params, xw, s0, m, r, init, s = saved
        g = cotangents[0]
        full = prob.method == "deer"
        prev = _shift_in(s0, s)
        step = lambda p, pv, x, i: _step(prob, p, pv, x, m, r, i)[0]
        _, vjp = jax.vjp(step, params, prev, xw, init)
        _, jac = _step_and_jacobian(prob, params, prev, xw, m, r, init, full)
        # lam_t = g_t + J_{t+1}^T lam_{t+1}: a linear recurrence backwards in time; in
        # reversed time it is forward with a_t = J_{t+1}^T (and nothing after the last step).
        a_rev = jnp.concatenate([_transpose(jac[1:], full), jnp.zeros_like(jac[:1])])[::-1]

        def precondition(rhs):
            return _linear_solve(a_rev, rhs[::-1], jnp.zeros_like(s0), full)[::-1]

        def residual_of(lam):
            u = vjp(lam)[1]  # J_t^T lam_t, all t at once
            return g + jnp.concatenate([u[1:], jnp.zeros_like(u[:1])]) - lam

        def body(state):
            it, lam, rho, _ = state
            lam = lam + precondition(rho)
            rho = residual_of(lam)
            return it + 1, lam, rho, _relative(rho, g)

        def cond(state):
            it, _, _, res = state
            return (it < prob.max_iters) & ~(res <= prob.tol)

        lam = precondition(g)
        rho = residual_of(lam)
        state = (jnp.ones((), jnp.int32), lam, rho, _relative(rho, g))
        it, lam, _, res = lax.while_loop(cond, body, state)
        exact = lambda: _adjoint_scan(prob, params, xw, prev, m, r, init, g)
        lam, _ = _finish(prob, "adjoint (backward pass)", lam, it, res, exact)
        d_params, d_prev, d_xw, d_init = vjp(lam)
        return d_params, d_xw, d_prev[0], None, None, d_init

    solve.defvjp(_solve_fwd, _solve_bwd)
    return solve


def _check_real_carry(fn: str, method: str, cell: Cell, s0) -> None:
    if not jnp.issubdtype(s0.dtype, jnp.floating):
        raise TypeError(
            f"{fn}: method={method!r} needs a real floating-point carry, but {cell.name}'s carry "
            f"has dtype {s0.dtype}. Use method='associative' for cells linear in their carry, "
            f"or method='sequential'."
        )


# ----------------------------------------------------------------------------------------------
# Associative scans of carry-linear cells.

_LOG_FLOOR = -1e30  # log(0) as a finite number: exp() gives 0, gradients stay finite


def _masked_coefficients(a, b, m, r, reset_after: bool, log: bool):
    """Folds masks and resets into ``(a, b)`` (or their logs). The initial carry is zero."""
    one, zero = (0.0, _LOG_FLOOR) if log else (1.0, 0.0)
    if m is not None:
        a = jnp.where(_bcast(m, a), a, one)
        b = jnp.where(_bcast(m, b), b, zero)
    if r is not None:
        a = jnp.where(_bcast(r, a), zero, a)
        if reset_after:
            b = jnp.where(_bcast(r, b), zero, b)
    return a, b


def _associative(spec: LinearSpec, params, xw, s0, m, r, reset_after: bool):
    """The carries ``h_{1..T}`` of a carry-linear cell by one associative scan."""
    log = spec.log_coefficients is not None
    a, b = (spec.log_coefficients if log else spec.coefficients)(params, xw)
    a, b = _masked_coefficients(a, b, m, r, reset_after, log)
    if log:

        def combine(e1, e2):
            return e1[0] + e2[0], jnp.logaddexp(e1[1] + e2[0], e2[1])

        log_a, log_b = lax.associative_scan(combine, (a, b))
        return jnp.exp(log_a) * s0 + jnp.exp(log_b)

    def combine(e1, e2):
        return e2[0] * e1[0], e2[0] * e1[1] + e2[1]

    big_a, big_b = lax.associative_scan(combine, (a, b))
    return big_a * s0 + big_b


# ----------------------------------------------------------------------------------------------
# The entry point used by `unroll`.


def check_options(fn: str, method, tol, max_iters, damping, on_nonconvergence, remat) -> None:
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}.")
    if on_nonconvergence not in ON_NONCONVERGENCE:
        raise ValueError(
            f"{fn}: on_nonconvergence must be one of {ON_NONCONVERGENCE}, got "
            f"{on_nonconvergence!r}."
        )
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"{fn}: tol must be a positive float or None, got {tol!r}.")
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"{fn}: max_iters must be an int >= 1, got {max_iters!r}.")
    if not isinstance(damping, (int, float)) or damping < 0:
        raise ValueError(f"{fn}: damping must be a float >= 0, got {damping!r}.")
    valid_remat = remat is None or isinstance(remat, bool) or (isinstance(remat, int) and remat > 0)
    if not valid_remat:
        raise ValueError(f"{fn}: remat must be None, True or an int >= 1, got {remat!r}.")
    if remat not in (None, False) and method in ("quasi_deer", "deer", "associative"):
        raise ValueError(
            f"{fn}: remat applies to method='sequential' (or 'auto' when it runs the scan), got "
            f"remat={remat!r} with method={method!r}; the parallel methods store O(T) states "
            f"and no per-step residuals, so there is nothing to checkpoint."
        )


def default_tol(dtype) -> float:
    """``1e-5`` in float32, ``1e-10`` in float64, ``1e-2`` for 16-bit floats."""
    bits = jnp.finfo(dtype).bits
    return {64: 1e-10, 32: 1e-5}.get(bits, 1e-2)


def run_parallel(
    cell: Cell,
    params,
    xs: jax.Array,
    carry,
    *,
    mask,
    resets,
    reverse: bool,
    method: str,
    tol: float | None,
    max_iters: int,
    damping: float,
    on_nonconvergence: str,
) -> tuple[Any, Any, UnrollInfo]:
    """Runs validated time-major inputs with a parallel method: ``(ys, carry, info)``.

    Same semantics as the sequential runner (masked steps hold the carry and output zero;
    resets restart from ``cell.initial_carry``; ``reverse`` runs backwards over the valid part
    and writes outputs in input order).
    """
    fn = "unroll"
    batch_shape = tuple(xs.shape[1:-1])
    xw = cell.project(params, xs)
    if mask is not None:
        xw = jax.tree_util.tree_map(
            lambda a: jnp.where(_bcast(mask, a), a, jnp.zeros((), a.dtype)), xw
        )
    if reverse:
        xw, mask, resets = jax.tree_util.tree_map(lambda a: a[::-1], (xw, mask, resets))
    init_carry = cell.initial_carry(batch_shape, xs.dtype)
    init_carry = sharding.like_batch(init_carry, sharding.time_major_batch(xs))

    if method == "associative":
        spec = linear_spec(cell)
        if spec is None:
            raise ValueError(
                f"{fn}: method='associative' needs a cell whose recurrence is linear in its "
                f"carry (jaxrnn.mingru, jaxrnn.minlstm, jaxrnn.lru), got {cell.name}. Use "
                f"method='quasi_deer' or 'deer' for a nonlinear cell."
            )
        (h0,) = jax.tree_util.tree_leaves(carry)
        hs = _associative(spec, params, xw, h0, mask, resets, reset_after=reverse)
        h_out = hs
        if reverse and resets is not None:  # outputs come from the state before the reset
            a, b = spec.coefficients(params, xw)
            h_out = jnp.where(_bcast(resets, hs), a * _shift_in(h0, hs) + b, hs)
        ys = spec.readout(params, h_out, xw)
        if mask is not None:
            ys = jnp.where(_bcast(mask, ys), ys, jnp.zeros((), ys.dtype))
        carry = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(carry), [hs[-1]])
        info = UnrollInfo(jnp.ones((), jnp.int32), jnp.zeros((), xs.dtype), jnp.ones((), bool))
    else:
        flat = _Flat(carry, len(batch_shape))
        s0 = flat.ravel(carry)
        _check_real_carry(fn, method, cell, s0)
        prob = _Problem(
            cell=cell,
            flat=flat,
            reset_after=reverse,
            method=method,
            tol=default_tol(s0.dtype) if tol is None else float(tol),
            max_iters=max_iters,
            damping=float(damping),
            on_nonconvergence=on_nonconvergence,
        )
        init = flat.ravel(init_carry).astype(s0.dtype)
        solve = _make_solver(prob)
        s, info = solve(params, xw, s0, mask, resets, init)
        # Outputs from the solved trajectory: one parallel evaluation of every step.
        _, ys = _step(prob, params, _shift_in(s0, s), xw, mask, resets, init)
        if mask is not None:
            ys = jax.tree_util.tree_map(
                lambda y: jnp.where(_bcast(mask, y), y, jnp.zeros((), y.dtype)), ys
            )
        if on_nonconvergence == "nan":  # s is NaN already; the first output is not
            ys = jax.tree_util.tree_map(
                lambda y: jnp.where(info.converged, y, jnp.full_like(y, jnp.nan)), ys
            )
        carry = flat.unravel(s[-1])
        info = jax.tree_util.tree_map(lax.stop_gradient, info)
    if reverse:
        ys = jax.tree_util.tree_map(lambda y: y[::-1], ys)
    return ys, carry, info
