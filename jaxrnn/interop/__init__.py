"""Weight conversion from PyTorch and Flax to jaxrnn (and back to PyTorch).

Neither PyTorch nor Flax's linen is imported by ``import jaxrnn.interop``; each converter
imports its framework when called.
"""

from jaxrnn.interop.flax import carry_from_flax, carry_to_flax, from_flax
from jaxrnn.interop.torch import (
    carry_from_torch_layout,
    carry_to_torch_layout,
    from_torch,
    grads_from_torch,
    to_torch,
)

__all__ = [
    "carry_from_flax",
    "carry_from_torch_layout",
    "carry_to_flax",
    "carry_to_torch_layout",
    "from_flax",
    "from_torch",
    "grads_from_torch",
    "to_torch",
]
