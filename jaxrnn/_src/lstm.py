"""The long short-term memory cell, PyTorch's ``nn.LSTM`` (with optional ``proj_size``)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib


class LSTMParams(NamedTuple):
    """Parameters of `lstm`, gates fused in the order ``i, f, g, o`` (PyTorch's and Flax's).

    ``W_x = weight_ih.T``, ``W_h = weight_hh.T``, ``b_x = bias_ih``, ``b_h = bias_hh``,
    ``W_p = weight_hr.T`` in PyTorch's names. ``state`` below is ``proj_size`` when the cell
    has a projection and ``hidden`` otherwise.
    """

    w_x: jax.Array  # shape=(input_size, 4 * hidden)
    w_h: jax.Array  # shape=(state, 4 * hidden)
    b_x: jax.Array | None  # shape=(4 * hidden,); None when use_bias=False
    b_h: jax.Array | None  # shape=(4 * hidden,); None when use_bias=False
    w_p: jax.Array | None = None  # shape=(hidden, proj_size); None without projection


class LSTMCarry(NamedTuple):
    """The LSTM's carry, ``h`` first (PyTorch's ``(h_n, c_n)`` order)."""

    h: jax.Array  # shape=(*batch, state)
    c: jax.Array  # shape=(*batch, hidden)


def lstm(
    hidden_size: int,
    *,
    proj_size: int = 0,
    use_bias: bool = True,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
    recurrent_bias_init=None,
    projection_init=None,
) -> cell_lib.Cell:
    r"""The LSTM cell (Hochreiter & Schmidhuber, 1997, with the forget gate of Gers et al., 2000).

    .. math::

        [i_t, f_t, g_t, o_t] &= x_t W_x + b_x + h_{t-1} W_h + b_h \\
        c_t &= \operatorname{sigmoid}(f_t) \odot c_{t-1}
              + \operatorname{sigmoid}(i_t) \odot \tanh(g_t) \\
        h_t &= \operatorname{sigmoid}(o_t) \odot \tanh(c_t) \quad
              (\text{times } W_p \text{ when } \texttt{proj\_size} > 0), \qquad y_t = h_t

    The cell state's update is additive, :math:`\partial c_t / \partial c_{t-1} =
    \operatorname{diag}(\operatorname{sigmoid}(f_t))`, so a gradient flows through many steps
    when the forget gate stays open — the cure for the Elman RNN's vanishing gradient.

    Args:
      hidden_size: size of ``c`` (and of ``h`` without projection).
      proj_size: if ``> 0``, ``h`` is projected to this size (PyTorch's ``proj_size``); then
        ``h: (*batch, proj_size)`` and ``W_h: (proj_size, 4 * hidden)``.
      use_bias: whether ``b_x`` and ``b_h`` exist.
      kernel_init, recurrent_init, bias_init, recurrent_bias_init, projection_init: initializers
        for ``w_x, w_h, b_x, b_h, w_p``; default PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``. For a
        forget-gate bias of 1 use ``recurrent_bias_init=initializers.forget_gate_bias(1.0)``.

    Returns:
      A `Cell` whose carry is ``LSTMCarry(h, c)`` and output ``y = h``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.lstm(8)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> carry, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
      >>> carry.h.shape, carry.c.shape
      ((2, 8), (2, 8))
    """
    cell_lib.check_positive_int("lstm", "hidden_size", hidden_size)
    if isinstance(proj_size, bool) or not isinstance(proj_size, int) or proj_size < 0:
        raise ValueError(f"lstm: proj_size must be an int >= 0, got {proj_size!r}.")
    if proj_size >= hidden_size:
        raise ValueError(
            f"lstm: proj_size must be smaller than hidden_size={hidden_size} (as in PyTorch), "
            f"got proj_size={proj_size}."
        )
    inits = cell_lib.resolve_inits(
        hidden_size, kernel_init, recurrent_init, bias_init, recurrent_bias_init
    )
    proj_init = inits[0] if projection_init is None else projection_init
    state = proj_size or hidden_size
    width = 4 * hidden_size
    name = f"lstm({hidden_size}{f', proj_size={proj_size}' if proj_size else ''})"

    def init(key, input_size: int, *, dtype=jnp.float32) -> LSTMParams:
        values, keys = cell_lib.fused_init(
            "lstm.init", inits, key, input_size, state, width, use_bias, dtype, num_keys=5
        )
        w_p = proj_init(keys[4], (hidden_size, proj_size), dtype) if proj_size else None
        return LSTMParams(*values, w_p=w_p)

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> LSTMCarry:
        return LSTMCarry(
            h=cell_lib.zeros_carry(state, batch_shape, dtype),
            c=cell_lib.zeros_carry(hidden_size, batch_shape, dtype),
        )

    def recur(params: LSTMParams, carry: LSTMCarry, xw: jax.Array):
        h, c = carry
        z = xw + cell_lib.fused_recurrent(params, h, xw.dtype)
        i, f, g, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        if params.w_p is not None:
            h = h @ params.w_p.astype(xw.dtype)
        return LSTMCarry(h, c), h

    def check_projection(params) -> None:
        expected = (hidden_size, proj_size) if proj_size else None
        actual = None if params.w_p is None else tuple(params.w_p.shape)
        if actual != expected:
            raise ValueError(
                f"{name}: params.w_p must be {'of shape ' + str(expected) if expected else None}"
                f", got {'shape ' + str(actual) if actual else None}; were the params built "
                "for another proj_size?"
            )

    return cell_lib.fused_cell(
        name=name,
        kind=None if proj_size else "lstm",
        params_type=LSTMParams,
        init=init,
        initial_carry=initial_carry,
        recur=recur,
        hidden_size=hidden_size,
        output_size=state,
        state_size=state,
        width=width,
        use_bias=use_bias,
        extra_check=check_projection,
    )
