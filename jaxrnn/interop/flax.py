"""Flax ``linen`` recurrent cells' params to jaxrnn (flax.linen imported lazily)."""

from jaxrnn._src.interop_flax import carry_from_flax, carry_to_flax, from_flax

__all__ = ["carry_from_flax", "carry_to_flax", "from_flax"]
