"""Flax shells around jaxrnn: `jaxrnn.flax.linen` and `jaxrnn.flax.nnx`.

Import the one you use (``from jaxrnn.flax import linen as jnn``); this package imports
neither.
"""
