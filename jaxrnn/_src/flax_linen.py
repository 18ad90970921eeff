"""A ``flax.linen`` shell around a jaxrnn cell or network."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrnn._src import flax_common
from jaxrnn._src.cell import Cell


def to_flax_params(cell, params) -> dict:
    """jaxrnn params as the params of a `RNN` module holding ``cell``.

    Use it to put imported or trained params into a Flax model:
    ``variables["params"]["RNN_0"] = to_flax_params(net, params)``.

    Args:
      cell: the `jaxrnn.Cell` or `jaxrnn.Network` of the module.
      params: its params (from ``cell.init``, `jaxrnn.interop.from_torch`, ...).

    Returns:
      ``{"cell": {...}}`` for a cell, ``{"network": {...}}`` for a network.
    """
    flax_common.check_model("to_flax_params", cell)
    return {_param_name(cell): flax_common.params_to_dict(cell, params)}


def from_flax_params(cell, flax_params, input_size: int) -> Any:
    """The inverse of `to_flax_params`: a `RNN` module's params as jaxrnn params.

    Args:
      cell: the `jaxrnn.Cell` or `jaxrnn.Network` of the module.
      flax_params: the module's params (``variables["params"]["RNN_0"]``).
      input_size: features of the module's inputs.

    Returns:
      The params pytree that ``cell.init`` returns, ready for ``jaxrnn.unroll`` or
      `jaxrnn.interop.to_torch`.
    """
    flax_common.check_model("from_flax_params", cell)
    stored = flax_params[_param_name(cell)]
    dtype = jax.tree_util.tree_leaves(stored)[0].dtype
    return flax_common.params_from_dict(cell, stored, input_size, dtype)


def _param_name(cell) -> str:
    return "cell" if isinstance(cell, Cell) else "network"


class RNN(nn.Module):
    """A recurrent layer for ``flax.linen`` models: a jaxrnn `Cell` or `Network` and its params.

    The module stores the params of ``cell.init`` (or ``net.init``) as Flax params, as nested
    dicts (``{'w_x', 'w_h', 'b_x', 'b_h'}`` for a cell; ``{'layer_0': {'forward': ...,
    'backward': ...}, ...}`` for a network), and its call is exactly
    ``jaxrnn.unroll(cell, params, ...)`` (or ``net.apply(params, ...)``): no math lives here.
    `to_flax_params` and `from_flax_params` convert between the two layouts.

    Attributes:
      cell: a `jaxrnn.Cell` (``jaxrnn.lstm(64)``) or a `jaxrnn.Network` (``jaxrnn.stack(...)``).
      time_major: inputs and outputs are ``(time, *batch, features)``.
      reverse: run backwards over each sequence's valid steps (a `Cell` only; a network's
        directions come from ``bidirectional``).
      return_carry: return ``(carry, outputs)``, as ``flax.linen.RNN``, instead of ``outputs``.
      unroll: the scan's unroll factor; ``None`` (default) takes the per-backend tuned value
        of `jaxrnn.unroll`.
      method: ``'sequential'`` (default), or a parallel method of `jaxrnn.unroll`:
        ``'associative'`` for ``jaxrnn.mingru``/``minlstm``/``lru``, ``'quasi_deer'``,
        ``'deer'``, ``'auto'``.
      param_dtype: dtype of the params; computation runs in the inputs' dtype.
      deterministic: default for the call's ``deterministic``; only a network with
        ``dropout > 0`` needs one. Dropout draws from the ``'dropout'`` rng stream.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrnn
      >>> from jaxrnn.flax import linen as jnn
      >>> class Model(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, xs, seq_lengths):
      ...         ys = jnn.RNN(jaxrnn.lstm(16))(xs, seq_lengths=seq_lengths)
      ...         return nn.Dense(2)(ys)
      >>> xs = jnp.ones((4, 7, 3))
      >>> variables = Model().init(jax.random.PRNGKey(0), xs, jnp.array([7, 5, 3, 1]))
      >>> Model().apply(variables, xs, jnp.array([7, 5, 3, 1])).shape
      (4, 7, 2)
    """

    cell: Any
    time_major: bool = False
    reverse: bool = False
    return_carry: bool = False
    unroll: int | bool | None = None
    method: str = "sequential"
    param_dtype: Any = jnp.float32
    deterministic: bool | None = None

    @nn.compact
    def __call__(
        self,
        inputs,
        initial_carry=None,
        *,
        seq_lengths=None,
        mask=None,
        resets=None,
        deterministic: bool | None = None,
        return_carry: bool | None = None,
    ):
        """Runs the layer.

        Args:
          inputs: ``(*batch, time, input_size)`` (``(time, *batch, input_size)`` with
            ``time_major``).
          initial_carry: the initial carry, as ``cell.initial_carry(batch_shape)`` (or
            ``net.initial_carry``); default zeros.
          seq_lengths: ``(*batch,)`` ints, see `jaxrnn.unroll`.
          mask: ``(*batch, time)`` bool, see `jaxrnn.unroll`.
          resets: ``(*batch, time)`` bool, see `jaxrnn.unroll`.
          deterministic: ``False`` applies the network's dropout (needs a ``'dropout'`` rng).
          return_carry: overrides the attribute.

        Returns:
          ``outputs`` or ``(carry, outputs)``.

        Raises:
          TypeError, ValueError: as `jaxrnn.unroll`; ``ValueError`` for ``reverse=True`` with a
          network, or for a network with dropout and no ``deterministic`` given.
        """
        fn = "jaxrnn.flax.linen.RNN"
        model = self.cell
        flax_common.check_model(fn, model)
        input_size = inputs.shape[-1]
        stored = self.param(
            _param_name(model),
            lambda key: flax_common.params_to_dict(
                model, model.init(key, input_size, dtype=self.param_dtype)
            ),
        )
        params = flax_common.params_from_dict(model, stored, input_size, self.param_dtype)
        key = None
        if flax_common.needs_dropout_key(model):
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            if not deterministic:
                key = self.make_rng("dropout")
        ys, carry = flax_common.run(
            fn,
            model,
            params,
            inputs,
            initial_carry,
            time_major=self.time_major,
            reverse=self.reverse,
            unroll=self.unroll,
            method=self.method,
            seq_lengths=seq_lengths,
            mask=mask,
            resets=resets,
            key=key,
        )
        return_carry = self.return_carry if return_carry is None else return_carry
        return (carry, ys) if return_carry else ys
