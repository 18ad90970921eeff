"""The Elman RNN, PyTorch's ``nn.RNN``."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrnn._src import cell as cell_lib

_ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu}


class ElmanParams(NamedTuple):
    """Parameters of `elman`. ``W_x = weight_ih.T``, ``W_h = weight_hh.T`` in PyTorch's names."""

    w_x: jax.Array  # shape=(input_size, hidden)
    w_h: jax.Array  # shape=(hidden, hidden)
    b_x: jax.Array | None  # shape=(hidden,); None when use_bias=False
    b_h: jax.Array | None  # shape=(hidden,); None when use_bias=False


def elman(
    hidden_size: int,
    *,
    activation: str = "tanh",
    use_bias: bool = True,
    kernel_init=None,
    recurrent_init=None,
    bias_init=None,
    recurrent_bias_init=None,
) -> cell_lib.Cell:
    r"""The Elman RNN cell (PyTorch's ``nn.RNN``, Flax's ``SimpleCell``).

    .. math::

        h_t = \sigma(x_t W_x + b_x + h_{t-1} W_h + b_h), \qquad y_t = h_t

    with :math:`\sigma` = ``tanh`` or ``relu``. Since :math:`\tanh'(z) = 1 - \tanh^2(z) \le 1`,
    :math:`\partial h_t / \partial h_{t-1} = \operatorname{diag}(\sigma'(\cdot)) W_h^\top`,
    and a gradient through :math:`k` steps is a product of :math:`k` such factors: it vanishes
    when they are contractions and explodes when they expand.

    Args:
      hidden_size: size of ``h``.
      activation: ``"tanh"`` (default) or ``"relu"`` (PyTorch's ``nonlinearity``).
      use_bias: whether ``b_x`` and ``b_h`` exist.
      kernel_init, recurrent_init, bias_init, recurrent_bias_init: initializers for
        ``w_x, w_h, b_x, b_h``; default PyTorch's ``U(-1/sqrt(H), 1/sqrt(H))``. For an IRNN
        (Le et al., 2015) use ``activation="relu"``, ``recurrent_init=initializers.identity()``
        and zero biases.

    Returns:
      A `Cell` whose carry is ``h: (*batch, hidden)`` and output ``y = h``.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> cell = jaxrnn.elman(8)
      >>> params = cell.init(jax.random.PRNGKey(0), input_size=3)
      >>> h, y = cell.step(params, cell.initial_carry((2,)), jnp.ones((2, 3)))
      >>> h.shape
      (2, 8)
    """
    cell_lib.check_positive_int("elman", "hidden_size", hidden_size)
    if activation not in _ACTIVATIONS:
        raise ValueError(
            f"elman: activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}."
        )
    act = _ACTIVATIONS[activation]
    inits = cell_lib.resolve_inits(
        hidden_size, kernel_init, recurrent_init, bias_init, recurrent_bias_init
    )
    name = f"elman({hidden_size}, activation={activation!r})"

    def init(key, input_size: int, *, dtype=jnp.float32) -> ElmanParams:
        values, _ = cell_lib.fused_init(
            "elman.init", inits, key, input_size, hidden_size, hidden_size, use_bias, dtype
        )
        return ElmanParams(*values)

    def initial_carry(batch_shape=(), dtype=jnp.float32) -> jax.Array:
        return cell_lib.zeros_carry(hidden_size, batch_shape, dtype)

    def recur(params: ElmanParams, h: jax.Array, xw: jax.Array):
        h = act(xw + cell_lib.fused_recurrent(params, h, xw.dtype))
        return h, h

    return cell_lib.fused_cell(
        name=name,
        kind=f"elman_{activation}",
        params_type=ElmanParams,
        init=init,
        initial_carry=initial_carry,
        recur=recur,
        hidden_size=hidden_size,
        output_size=hidden_size,
        state_size=hidden_size,
        width=hidden_size,
        use_bias=use_bias,
    )
