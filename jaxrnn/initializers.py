"""Initializers for jaxrnn cells: pure ``(key, shape, dtype) -> Array`` functions."""

from jaxrnn._src.initializers import (
    Initializer,
    constant,
    forget_gate_bias,
    identity,
    orthogonal,
    pytorch_uniform,
    uniform,
    zeros,
)

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
