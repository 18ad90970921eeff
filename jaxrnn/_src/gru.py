"""The gated recurrent unit in PyTorch/cuDNN form, PyTorch's ``nn.GRU``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib


class GRUParams(NamedTuple):
    """Parameters of `gru`, gates fused in the order ``r, z, n`` (PyTorch's).

    ``W_x = weight_ih.T``, ``W_h = weight_hh.T``, ``b_x = bias_ih``, ``b_h = bias_hh``.
    """

    w_x: jax.Array  # shape=(input_size, 3 * hidden)
    w_h: jax.Array  # shape=(hidden, 3 * hidden)
    b_x: jax.Array | None  # shape=(3 * hidden,); None when use_bias=False
    b_h: jax.Array | None  # shape=(3 * hidden,); None when use_bias=False


def gru(
    hidden_size: int,
    *,
    use_bias: bool = True,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
    recurrent_bias_init=None,
) -> cell_lib.Cell:
    r"""The GRU cell as PyTorch and cuDNN compute it (reset gate after the recurrent matmul).

    .. math::

        r_t &= \operatorname{sigmoid}(x_t W_{xr} + b_{xr} + h_{t-1} W_{hr} + b_{hr}) \\
        z_t &= \operatorname{sigmoid}(x_t W_{xz} + b_{xz} + h_{t-1} W_{hz} + b_{hz}) \\
        n_t &= \tanh(x_t W_{xn} + b_{xn} + r_t \odot (h_{t-1} W_{hn} + b_{hn})) \\
        h_t &= (1 - z_t) \odot n_t + z_t \odot h_{t-1}, \qquad y_t = h_t

    The update :math:`h_t = z_t \odot h_{t-1} + \dots` gives the gradient an additive path
    through time that does not pass through ``tanh``: with :math:`z_t \to 1` it is carried
    unchanged. Flax's ``GRUCell`` computes the same form, without recurrent biases on ``r`` and
    ``z``, so its params convert exactly (`jaxrnn.interop.from_flax`).

    Args:
      hidden_size: size of ``h``.
      use_bias: whether ``b_x`` and ``b_h`` exist.
      kernel_init, recurrent_init, bias_init, recurrent_bias_init: initializers for
        ``w_x, w_h, b_x, b_h``; default PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``.

    Returns:
      A `Cell` whose carry is ``h: (*batch, hidden)`` and output ``y = h``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.gru(8)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> params.w_h.shape
      (8, 24)
    """
    cell_lib.check_positive_int("gru", "hidden_size", hidden_size)
    inits = cell_lib.resolve_inits(
        hidden_size, kernel_init, recurrent_init, bias_init, recurrent_bias_init
    )
    width = 3 * hidden_size
    name = f"gru({hidden_size})"

    def init(key, input_size: int, *, dtype=jnp.float32) -> GRUParams:
        cell_lib.check_positive_int("gru.init", "input_size", input_size)
        k = jax.random.split(key, 4)
        shapes = [(input_size, width), (hidden_size, width), (width,), (width,)]
        values = [f(ki, s, dtype) for f, ki, s in zip(inits, k, shapes)]
        if not use_bias:
            values[2:] = [None, None]
        return GRUParams(*values)

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> jax.Array:
        return cell_lib.zeros_carry(hidden_size, batch_shape, dtype)

    def project(params: GRUParams, xs: jax.Array) -> jax.Array:
        xw = xs @ params.w_x.astype(xs.dtype)
        return xw if params.b_x is None else xw + params.b_x.astype(xs.dtype)

    def recur(params: GRUParams, h: jax.Array, xw: jax.Array):
        hw = h @ params.w_h.astype(xw.dtype)
        if params.b_h is not None:
            hw = hw + params.b_h.astype(xw.dtype)
        xr, xz, xn = jnp.split(xw, 3, axis=-1)
        hr, hz, hn = jnp.split(hw, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    def step(params: GRUParams, h: jax.Array, x: jax.Array):
        return recur(params, h, project(params, x))

    def check_params(params) -> None:
        cell_lib.check_fused_params(name, params, GRUParams, hidden_size, width, use_bias)

    return cell_lib.Cell(
        init=init,
        initial_carry=initial_carry,
        step=step,
        project=project,
        recur=recur,
        name=name,
        hidden_size=hidden_size,
        output_size=hidden_size,
        params_type=GRUParams,
        input_size_of=lambda p: p.w_x.shape[0],
        check_params=check_params,
        kind="gru",
    )
