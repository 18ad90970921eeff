"""The minimal LSTM of Feng et al. (2024), "Were RNNs All We Needed?"."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib
from jaxrnn._src.mingru import input_gated_cell, log_positive_activation, positive_activation


class MinLSTMParams(NamedTuple):
    """Parameters of `minlstm`: one input projection for both gates and the candidate."""

    w_x: jax.Array  # shape=(input_size, 3 * hidden), columns [forget, input, candidate]
    b_x: jax.Array | None  # shape=(3 * hidden,); None when use_bias=False


def minlstm(hidden_size: int, *, log_space: bool = True, use_bias: bool = True) -> cell_lib.Cell:
    r"""The minimal LSTM (Feng et al., 2024): input-only gates, normalised to sum to one, so
    the recurrence is linear in ``h`` and runs as one associative scan
    (``unroll(..., method="associative")``).

    .. math::

        f_t = \operatorname{sigmoid}(x_t W_f + b_f), \quad
        i_t = \operatorname{sigmoid}(x_t W_i + b_i), \quad
        \tilde h_t = g(x_t W_h + b_h), \\
        h_t = \frac{f_t}{f_t + i_t} \odot h_{t-1} + \frac{i_t}{f_t + i_t} \odot \tilde h_t,
        \qquad y_t = h_t

    In log space, :math:`\log \frac{f}{f+i} = -\operatorname{softplus}(d)` and
    :math:`\log \frac{i}{f+i} = -\operatorname{softplus}(-d)` with
    :math:`d = \operatorname{softplus}(-k_f) - \operatorname{softplus}(-k_i)`. ``g`` is the
    positive activation of `mingru` with ``log_space=True`` and the identity otherwise.

    Args:
      hidden_size: size of ``h``.
      log_space: the paper's positive candidate and log-space scan (default), or a linear
        candidate and a plain scan.
      use_bias: whether ``b_x`` exists.

    Returns:
      A `Cell` with carry ``h: (*batch, hidden)`` and output ``y = h``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.minlstm(8)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> h, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
      >>> h.shape
      (2, 8)
    """
    candidate = positive_activation if log_space else (lambda v: v)

    def log_gates(xw):
        k_f, k_i, k_h = jnp.split(xw, 3, axis=-1)
        d = jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i)
        return -jax.nn.softplus(d), -jax.nn.softplus(-d), k_h

    def coefficients(params, xw):
        del params
        log_f, log_i, k_h = log_gates(xw)
        return jnp.exp(log_f), jnp.exp(log_i) * candidate(k_h)

    def log_coefficients(params, xw):
        del params
        log_f, log_i, k_h = log_gates(xw)
        return log_f, log_i + log_positive_activation(k_h)

    return input_gated_cell(
        "minlstm", hidden_size, 3, MinLSTMParams, coefficients, log_coefficients,
        log_space=log_space, use_bias=use_bias,
    )  # fmt: skip
