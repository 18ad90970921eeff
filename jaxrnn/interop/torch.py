"""PyTorch ``nn.RNN/LSTM/GRU`` and ``nn.*Cell`` weights to and from jaxrnn (torch imported
lazily)."""

from jaxrnn._src.interop_torch import (
    carry_from_torch_layout,
    carry_to_torch_layout,
    from_torch,
    grads_from_torch,
    to_torch,
)

__all__ = [
    "carry_from_torch_layout",
    "carry_to_torch_layout",
    "from_torch",
    "grads_from_torch",
    "to_torch",
]
