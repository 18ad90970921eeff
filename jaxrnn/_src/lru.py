"""The linear recurrent unit of Orvieto et al. (2023), "Resurrecting Recurrent Neural Networks
for Long Sequences"."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib
from jaxrnn._src import parallel


class LRUParams(NamedTuple):
    """Parameters of `lru`: a diagonal complex recurrence in exponential parametrisation."""

    nu_log: jax.Array  # shape=(state,); |lambda| = exp(-exp(nu_log))
    theta_log: jax.Array  # shape=(state,); arg(lambda) = exp(theta_log)
    gamma_log: jax.Array  # shape=(state,); input normalisation gamma = exp(gamma_log)
    b_re: jax.Array  # shape=(input_size, state)
    b_im: jax.Array  # shape=(input_size, state)
    c_re: jax.Array  # shape=(state, output_size)
    c_im: jax.Array  # shape=(state, output_size)
    d: jax.Array  # shape=(input_size, output_size)


def eigenvalues(params: LRUParams) -> jax.Array:
    """``lambda = exp(-exp(nu_log) + i exp(theta_log))``, complex ``(state,)``."""
    return jnp.exp(-jnp.exp(params.nu_log) + 1j * jnp.exp(params.theta_log))


def lru(
    state_size: int,
    output_size: int,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
) -> cell_lib.Cell:
    r"""The linear recurrent unit (Orvieto et al., 2023): a diagonal complex linear recurrence,
    run as one associative scan with ``unroll(..., method="associative")``.

    .. math::

        h_t = \lambda \odot h_{t-1} + \gamma \odot (x_t B), \qquad
        y_t = \operatorname{Re}(h_t C) + x_t D, \qquad
        \lambda = e^{-e^{\nu} + i e^{\theta}}, \quad \gamma = \sqrt{1 - |\lambda|^2}

    ``lambda`` is drawn uniformly on the ring :math:`r_{\min} \le |\lambda| \le r_{\max}`,
    :math:`0 \le \arg \lambda \le` ``max_phase`` (the paper's "ring initialisation"), so the
    recurrence is stable by construction (:math:`|\lambda| < 1` for every ``nu_log``); ``gamma``
    starts at the normalisation that keeps the state's variance at the input's.
    ``B, C`` are complex, ``D`` a real skip connection (dense, so that the output size may
    differ from the input size; the paper's diagonal ``D`` is the square, diagonal case). The
    carry ``h`` is complex (``complex64`` for float32 inputs); ``y`` is real.

    Args:
      state_size: number of complex state dims ``N``.
      output_size: size of ``y``.
      r_min, r_max: radii of the initialisation ring, ``0 <= r_min < r_max <= 1``.
      max_phase: largest initial phase of ``lambda``.

    Returns:
      A `Cell` with complex carry ``h: (*batch, state)`` and output ``y: (*batch, output)``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.lru(16, 4, r_min=0.9, r_max=0.999)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 3))
      >>> run = jax.jit(lambda p, x: jaxrnn.unroll(cell, p, x, method="associative"))
      >>> ys, h = run(params, xs)
      >>> ys.shape, h.dtype
      ((2, 20, 4), dtype('complex64'))
    """
    cell_lib.check_positive_int("lru", "state_size", state_size)
    cell_lib.check_positive_int("lru", "output_size", output_size)
    if not 0.0 <= r_min < r_max <= 1.0:
        raise ValueError(
            f"lru: the ring needs 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}."
        )
    n = state_size
    name = f"lru({state_size}, {output_size})"

    def init(key, input_size: int, *, dtype=jnp.float32) -> LRUParams:
        cell_lib.check_positive_int("lru.init", "input_size", input_size)
        k = jax.random.split(key, 7)
        u1 = jax.random.uniform(k[0], (n,), dtype)
        u2 = jax.random.uniform(k[1], (n,), dtype)
        nu_log = jnp.log(-0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = jnp.log(max_phase * u2)
        gamma_log = jnp.log(jnp.sqrt(1.0 - jnp.exp(-2.0 * jnp.exp(nu_log))))
        normal = lambda key, shape, scale: jax.random.normal(key, shape, dtype) * scale
        return LRUParams(
            nu_log=nu_log,
            theta_log=theta_log,
            gamma_log=gamma_log,
            b_re=normal(k[2], (input_size, n), 1.0 / math.sqrt(2 * input_size)),
            b_im=normal(k[3], (input_size, n), 1.0 / math.sqrt(2 * input_size)),
            c_re=normal(k[4], (n, output_size), 1.0 / math.sqrt(n)),
            c_im=normal(k[5], (n, output_size), 1.0 / math.sqrt(n)),
            d=normal(k[6], (input_size, output_size), 1.0 / math.sqrt(input_size)),
        )

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> jax.Array:
        complex_dtype = jnp.result_type(dtype, jnp.complex64)
        return jnp.zeros((*tuple(batch_shape), n), complex_dtype)

    def project(params: LRUParams, xs: jax.Array) -> jax.Array:
        # Real layout [Re(gamma x B), Im(gamma x B), x D]: one real array for the runner.
        gamma = jnp.exp(params.gamma_log).astype(xs.dtype)
        w = jnp.concatenate([params.b_re * gamma, params.b_im * gamma, params.d], axis=-1).astype(
            xs.dtype
        )
        return xs @ w

    def coefficients(params: LRUParams, xw: jax.Array):
        bu = xw[..., :n] + 1j * xw[..., n : 2 * n]
        return jnp.broadcast_to(eigenvalues(params).astype(bu.dtype), bu.shape), bu

    def readout(params: LRUParams, h: jax.Array, xw: jax.Array) -> jax.Array:
        dtype = xw.dtype
        return (
            h.real @ params.c_re.astype(dtype)
            - h.imag @ params.c_im.astype(dtype)
            + xw[..., 2 * n :]
        )

    def recur(params: LRUParams, h: jax.Array, xw: jax.Array):
        a, b = coefficients(params, xw)
        h = a * h + b
        return h, readout(params, h, xw)

    def step(params: LRUParams, h: jax.Array, x: jax.Array):
        return recur(params, h, project(params, x))

    def check_params(params) -> None:
        if not isinstance(params, LRUParams):
            raise TypeError(
                f"{name}: params must be LRUParams, got {type(params).__name__}. Build them "
                f"with this cell's init."
            )
        if params.nu_log.shape != (n,) or params.c_re.shape != (n, output_size):
            raise ValueError(
                f"{name}: params.nu_log must have shape {(n,)} and params.c_re "
                f"{(n, output_size)}, got {tuple(params.nu_log.shape)} and "
                f"{tuple(params.c_re.shape)}; were the params built for another size?"
            )

    parallel.register_linear(recur, parallel.LinearSpec(coefficients, readout))
    return cell_lib.Cell(
        init=init,
        initial_carry=initial_carry,
        step=step,
        project=project,
        recur=recur,
        name=name,
        hidden_size=state_size,
        output_size=output_size,
        params_type=LRUParams,
        input_size_of=lambda p: p.b_re.shape[0],
        check_params=check_params,
    )
