"""A ``flax.nnx`` shell around a jaxrnn cell or network."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrnn._src import flax_common


class RNN(nnx.Module):
    """A recurrent layer for ``flax.nnx`` models: a jaxrnn `Cell` or `Network` and its params.

    Each array of ``cell.init(...)`` (or ``net.init(...)``) is an ``nnx.Param`` in
    ``self.params``, nested as ``{'w_x', 'w_h', 'b_x', 'b_h'}`` for a cell and
    ``{'layer_0': {'forward': ..., 'backward': ...}, ...}`` for a network; the call is exactly
    ``jaxrnn.unroll(cell, params, ...)`` (or ``net.apply(params, ...)``).

    Args:
      cell: a `jaxrnn.Cell` or a `jaxrnn.Network`.
      input_size: features of the inputs.
      rngs: ``nnx.Rngs``; ``rngs.params()`` initialises the params and the ``'dropout'``
        stream (or ``'default'``) drives a network's dropout.
      time_major: inputs and outputs are ``(time, *batch, features)``.
      reverse: run backwards over each sequence's valid steps (a `Cell` only).
      return_carry: return ``(carry, outputs)`` instead of ``outputs``.
      unroll: the scan's unroll factor; ``None`` (default) takes the per-backend tuned value
        of `jaxrnn.unroll`.
      method: ``'sequential'`` (default), or a parallel method of `jaxrnn.unroll`:
        ``'associative'`` for ``jaxrnn.mingru``/``minlstm``/``lru``, ``'quasi_deer'``,
        ``'deer'``, ``'auto'``.
      param_dtype: dtype of the params; computation runs in the inputs' dtype.
      deterministic: whether a network's dropout is off; ``model.eval()`` / ``model.train()``
        set it.

    Example:
      >>> import jax.numpy as jnp, jaxrnn
      >>> from flax import nnx
      >>> from jaxrnn.flax import nnx as jnnx
      >>> layer = jnnx.RNN(jaxrnn.gru(8), input_size=3, rngs=nnx.Rngs(0))
      >>> carry, ys = layer(jnp.ones((2, 5, 3)), return_carry=True)
      >>> ys.shape, carry.shape
      ((2, 5, 8), (2, 8))
    """

    def __init__(
        self,
        cell: Any,
        input_size: int,
        *,
        rngs: nnx.Rngs,
        time_major: bool = False,
        reverse: bool = False,
        return_carry: bool = False,
        unroll: int | bool | None = None,
        method: str = "sequential",
        param_dtype: Any = jnp.float32,
        deterministic: bool = False,
    ):
        fn = "jaxrnn.flax.nnx.RNN"
        flax_common.check_model(fn, cell)
        self.cell = cell
        self.input_size = input_size
        self.time_major = time_major
        self.reverse = reverse
        self.return_carry = return_carry
        self.unroll = unroll
        self.method = method
        self.param_dtype = param_dtype
        self.deterministic = deterministic
        params = cell.init(rngs.params(), input_size, dtype=param_dtype)
        self.params = nnx.data(flax_common.params_to_dict(cell, params, wrap=nnx.Param))
        if flax_common.needs_dropout_key(cell):
            self.rngs = rngs["dropout"].fork()
        else:
            self.rngs = nnx.data(None)

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
        """Runs the layer; the arguments are those of `jaxrnn.flax.linen.RNN.__call__`.

        Returns:
          ``outputs`` or ``(carry, outputs)``.
        """
        fn = "jaxrnn.flax.nnx.RNN"
        params = self.pure_params()
        deterministic = self.deterministic if deterministic is None else deterministic
        key = None
        if self.rngs is not None and not deterministic:
            key = self.rngs()
        ys, carry = flax_common.run(
            fn,
            self.cell,
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

    def pure_params(self):
        """The params as the pytree ``cell.init`` returns (for ``jaxrnn.unroll`` directly)."""
        return flax_common.params_from_dict(
            self.cell, self.params, self.input_size, self.param_dtype, unwrap=lambda p: p[...]
        )

    def load_params(self, params) -> None:
        """Overwrites the stored ``nnx.Param`` values with ``params`` (as ``cell.init`` returns).

        Args:
          params: params of this layer's cell or network, e.g. from
            `jaxrnn.interop.from_torch`.

        Raises:
          ValueError: when their structure or a shape differs from the stored params.
        """
        expected = jax.tree_util.tree_structure(self.pure_params())
        actual = jax.tree_util.tree_structure(params)
        if expected != actual:
            raise ValueError(
                f"load_params: params must have the structure of this layer's, {expected}, "
                f"got {actual}; were they built for another cell?"
            )
        new = flax_common.params_to_dict(self.cell, params)
        old_leaves = jax.tree_util.tree_leaves(self.params, is_leaf=_is_param)
        new_leaves = jax.tree_util.tree_leaves(new)
        for param, value in zip(old_leaves, new_leaves):
            if tuple(param.shape) != tuple(value.shape):
                raise ValueError(
                    f"load_params: a param of shape {tuple(param.shape)} cannot take a value "
                    f"of shape {tuple(value.shape)}; were the params built for another size?"
                )
        for param, value in zip(old_leaves, new_leaves):
            param[...] = value


def _is_param(x) -> bool:
    return isinstance(x, nnx.Param)
