"""``flax.linen`` modules running jaxrnn cells and networks."""

from jaxrnn._src.flax_linen import RNN

__all__ = ["RNN"]
