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
        values, _ = cell_lib.fused_init(
            "gru.init", inits, key, input_size, hidden_size, width, use_bias, dtype
        )
        return GRUParams(*values)

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> jax.Array:
        return cell_lib.zeros_carry(hidden_size, batch_shape, dtype)

    def recur(params: GRUParams, h: jax.Array, xw: jax.Array):
        hw = cell_lib.fused_recurrent(params, h, xw.dtype)
        xr, xz, xn = jnp.split(xw, 3, axis=-1)
        hr, hz, hn = jnp.split(hw, 3, axis=-1)
        r = jax.nn.sigmoid(xr + hr)
        z = jax.nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    return cell_lib.fused_cell(
        name=name,
        kind="gru",
        params_type=GRUParams,
        init=init,
        initial_carry=initial_carry,
        recur=recur,
        hidden_size=hidden_size,
        output_size=hidden_size,
        state_size=hidden_size,
        width=width,
        use_bias=use_bias,
    )
