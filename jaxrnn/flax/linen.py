"""``flax.linen`` modules running jaxrnn cells and networks."""

from jaxrnn._src.flax_linen import RNN, from_flax_params, to_flax_params

__all__ = ["RNN", "from_flax_params", "to_flax_params"]
