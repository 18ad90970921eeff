"""Parameter initializers: pure ``(key, shape, dtype) -> Array`` functions.

Recurrent weights of the built-in cells are stored fused, ``w_h: (hidden, gates * hidden)``;
the recurrent initializers here act on each ``hidden x hidden`` gate block separately, so an
orthogonal or identity init makes every gate's block orthogonal or the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def zeros(key, shape, dtype=jnp.float32) -> jax.Array:
    """All zeros."""
    del key
    return jnp.zeros(shape, dtype)


def constant(value: float) -> Initializer:
    """Every entry equal to ``value``."""

    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.full(shape, value, dtype)

    return init


def uniform(scale: float) -> Initializer:
    """Uniform on ``[-scale, scale)``."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)

    return init


def pytorch_uniform(hidden_size: int) -> Initializer:
    """PyTorch's default for ``nn.RNN/LSTM/GRU``: every weight and bias drawn from

    .. math:: \\mathcal{U}(-k, k), \\qquad k = 1 / \\sqrt{\\text{hidden\\_size}}

    This is the default of every built-in cell.
    """
    return uniform(1.0 / math.sqrt(hidden_size))


def _blockwise(block_init: Callable[[jax.Array, int, object], jax.Array]) -> Initializer:
    """Applies ``block_init(key, n, dtype) -> (n, n)`` to each square block of ``(n, k*n)``."""

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 2 or shape[1] % shape[0] != 0:
            raise ValueError(
                "recurrent initializer: expected a shape (hidden, gates * hidden), "
                f"got {tuple(shape)}."
            )
        n, num_blocks = shape[0], shape[1] // shape[0]
        keys = jax.random.split(key, num_blocks)
        return jnp.concatenate([block_init(k, n, dtype) for k in keys], axis=1)

    return init


def orthogonal(scale: float = 1.0) -> Initializer:
    """Each ``hidden x hidden`` gate block an independent random orthogonal matrix times ``scale``

    (Saxe et al., 2014): all singular values of ``W_h`` equal ``scale``, so at initialization the
    linear part of backpropagation through time neither shrinks nor grows the gradient.
    """
    base = jax.nn.initializers.orthogonal(scale)
    return _blockwise(lambda key, n, dtype: base(key, (n, n), dtype))


def identity(scale: float = 1.0) -> Initializer:
    """Each gate block ``scale * I``: the IRNN of Le et al. (2015) for a ReLU Elman cell

    (with zero biases), for which ``h_t = relu(h_{t-1} + x_t W_x)`` starts as an integrator.
    """
    return _blockwise(lambda key, n, dtype: scale * jnp.eye(n, dtype=dtype))


def forget_gate_bias(value: float = 1.0, base: Initializer = zeros) -> Initializer:
    """An LSTM bias ``(4 * hidden,)`` with the forget-gate slice ``[hidden:2*hidden]`` set to

    ``value`` and the rest drawn from ``base`` (Gers et al., 2000; Jozefowicz et al., 2015). The
    LSTM adds two biases, ``b_x + b_h``; give this to one of them (``recurrent_bias_init``) and
    the effective forget bias is ``value`` plus the other's slice.
    """

    def init(key, shape, dtype=jnp.float32):
        if len(shape) != 1 or shape[0] % 4 != 0:
            raise ValueError(
                f"forget_gate_bias: expected a shape (4 * hidden,), got {tuple(shape)}."
            )
        hidden = shape[0] // 4
        b = base(key, shape, dtype)
        return b.at[hidden : 2 * hidden].set(value)

    return init


__all__ = [
    "Initializer",
    "constant",
    "forget_gate_bias",
    "identity",
    "orthogonal",
    "pytorch_uniform",
    "uniform",
    "zeros",
]
