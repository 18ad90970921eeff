"""The minimal GRU of Feng et al. (2024), "Were RNNs All We Needed?"."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib
from jaxrnn._src import initializers, parallel


class MinGRUParams(NamedTuple):
    """Parameters of `mingru`: one input projection for the gate ``z`` and the candidate."""

    w_x: jax.Array  # shape=(input_size, 2 * hidden), columns [z, candidate]
    b_x: jax.Array | None  # shape=(2 * hidden,); None when use_bias=False


def positive_activation(x: jax.Array) -> jax.Array:
    """The paper's ``g``: ``x + 0.5`` for ``x >= 0``, ``sigmoid(x)`` below; positive, continuous."""
    return jnp.where(x >= 0, x + 0.5, jax.nn.sigmoid(x))


def log_positive_activation(x: jax.Array) -> jax.Array:
    """``log g(x)``, computed without forming ``g`` (``-softplus(-x)`` for ``x < 0``)."""
    return jnp.where(x >= 0, jnp.log(jnp.maximum(x, 0.0) + 0.5), -jax.nn.softplus(-x))


def linear_init(input_size: int, shapes, key, dtype, use_bias: bool):
    """``nn.Linear``'s default, ``U(-1/sqrt(in), 1/sqrt(in))``, for ``(w, b)``."""
    init = initializers.uniform(1.0 / math.sqrt(input_size))
    k_w, k_b = jax.random.split(key)
    w = init(k_w, shapes[0], dtype)
    return w, (init(k_b, shapes[1], dtype) if use_bias else None)


def check_linear_params(name: str, params, params_type: type, width: int, use_bias: bool):
    if not isinstance(params, params_type):
        raise TypeError(
            f"{name}: params must be {params_type.__name__}, got {type(params).__name__}. "
            f"Build them with this cell's init."
        )
    if params.w_x.ndim != 2 or params.w_x.shape[1] != width:
        raise ValueError(
            f"{name}: params.w_x must have shape (input_size, {width}), got "
            f"{tuple(params.w_x.shape)}; were the params built for another hidden_size?"
        )
    if (params.b_x is not None) != use_bias:
        raise ValueError(f"{name}: the cell was built with use_bias={use_bias}.")


def input_projection(params, xs: jax.Array) -> jax.Array:
    xw = xs @ params.w_x.astype(xs.dtype)
    return xw if params.b_x is None else xw + params.b_x.astype(xs.dtype)


def input_gated_cell(
    family: str,
    hidden_size: int,
    blocks: int,
    params_type: type,
    coefficients,
    log_coefficients,
    *,
    log_space: bool,
    use_bias: bool,
) -> cell_lib.Cell:
    """A cell ``h_t = a_t * h_{t-1} + b_t``, ``y_t = h_t``, whose ``(a_t, b_t)`` come from one
    input projection of ``blocks * hidden_size`` columns (`mingru`, `minlstm`), registered for
    the associative scan (in log space with ``log_space=True``)."""
    cell_lib.check_positive_int(family, "hidden_size", hidden_size)
    name = f"{family}({hidden_size}{'' if log_space else ', log_space=False'})"
    width = blocks * hidden_size

    def init(key, input_size: int, *, dtype=jnp.float32):
        cell_lib.check_positive_int(f"{family}.init", "input_size", input_size)
        shapes = [(input_size, width), (width,)]
        return params_type(*linear_init(input_size, shapes, key, dtype, use_bias))

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> jax.Array:
        return cell_lib.zeros_carry(hidden_size, batch_shape, dtype)

    def recur(params, h: jax.Array, xw: jax.Array):
        a, b = coefficients(params, xw)
        h = a * h + b
        return h, h

    def step(params, h: jax.Array, x: jax.Array):
        return recur(params, h, input_projection(params, x))

    parallel.register_linear(
        recur,
        parallel.LinearSpec(
            coefficients=coefficients,
            readout=lambda params, h, xw: h,
            log_coefficients=log_coefficients if log_space else None,
        ),
    )
    return cell_lib.Cell(
        init=init,
        initial_carry=initial_carry,
        step=step,
        project=input_projection,
        recur=recur,
        name=name,
        hidden_size=hidden_size,
        output_size=hidden_size,
        params_type=params_type,
        input_size_of=lambda p: p.w_x.shape[0],
        check_params=lambda p: check_linear_params(name, p, params_type, width, use_bias),
    )


def mingru(hidden_size: int, *, log_space: bool = True, use_bias: bool = True) -> cell_lib.Cell:
    r"""The minimal GRU (Feng et al., 2024): gates that read only the input, so the recurrence is
    linear in ``h`` and runs as one associative scan (``unroll(..., method="associative")``).

    .. math::

        z_t = \operatorname{sigmoid}(x_t W_z + b_z), \qquad
        \tilde h_t = g(x_t W_h + b_h), \qquad
        h_t = (1 - z_t) \odot h_{t-1} + z_t \odot \tilde h_t, \qquad y_t = h_t

    With ``log_space=True`` (the paper's stable form) :math:`g(v) = v + 1/2` for
    :math:`v \ge 0` and :math:`\operatorname{sigmoid}(v)` below, so both coefficients are
    positive and the parallel scan runs on their logarithms
    (:math:`\log(1 - z) = -\operatorname{softplus}(k_z)`); with ``log_space=False``
    :math:`g` is the identity and the scan runs on the coefficients themselves.

    Args:
      hidden_size: size of ``h``.
      log_space: the paper's positive candidate and log-space scan (default), or a linear
        candidate and a plain scan.
      use_bias: whether ``b_x`` exists.

    Returns:
      A `Cell` with carry ``h: (*batch, hidden)`` and output ``y = h``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.mingru(8)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 3))
      >>> ys, h = jaxrnn.unroll(cell, params, xs)
      >>> parallel = jax.jit(lambda p, x: jaxrnn.unroll(cell, p, x, method="associative"))
      >>> ys_par, h_par = parallel(params, xs)
      >>> bool(jnp.allclose(ys, ys_par, atol=1e-5))
      True
    """
    candidate = positive_activation if log_space else (lambda v: v)

    def coefficients(params, xw):
        del params
        k_z, k_h = jnp.split(xw, 2, axis=-1)
        z = jax.nn.sigmoid(k_z)
        return 1.0 - z, z * candidate(k_h)

    def log_coefficients(params, xw):
        del params
        k_z, k_h = jnp.split(xw, 2, axis=-1)
        return -jax.nn.softplus(k_z), -jax.nn.softplus(-k_z) + log_positive_activation(k_h)

    return input_gated_cell(
        "mingru", hidden_size, 2, MinGRUParams, coefficients, log_coefficients,
        log_space=log_space, use_bias=use_bias,
    )  # fmt: skip
