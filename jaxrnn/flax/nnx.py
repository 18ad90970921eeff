"""``flax.nnx`` modules running jaxrnn cells and networks."""

from jaxrnn._src.flax_nnx import RNN

__all__ = ["RNN"]
