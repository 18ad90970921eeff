"""Random step flags shared by the parallel-method tests."""

from __future__ import annotations

import jax


def random_flags(key, batch_shape, time):
    """Random ``seq_lengths``, ``mask`` and ``resets`` (each drawn fresh)."""
    k1, k2, k3 = jax.random.split(key, 3)
    lengths = jax.random.randint(k1, batch_shape, 0, time + 2)
    mask = jax.random.bernoulli(k2, 0.8, (*batch_shape, time))
    resets = jax.random.bernoulli(k3, 0.15, (*batch_shape, time))
    return lengths, mask, resets
