"""Gradient diagnostics: how the gradient fades through time, and plots of it.

``grad_norms`` gives :math:`\\lVert \\partial L/\\partial h_t \\rVert` for every step in one
backward pass; ``jacobian_norms`` the per-step Jacobian norms; the ``plot_*`` functions save
PNGs (matplotlib is imported only when plotting).
"""

from jaxrnn.diagnostics._grads import (
    adding_loss_grad_norms,
    carries_through_time,
    grad_norms,
    hidden_state_grads,
    jacobian_norms,
)
from jaxrnn.diagnostics._plots import plot_grad_norms, plot_loss_curves, plot_tanh, read_jsonl

__all__ = [
    "adding_loss_grad_norms",
    "carries_through_time",
    "grad_norms",
    "hidden_state_grads",
    "jacobian_norms",
    "plot_grad_norms",
    "plot_loss_curves",
    "plot_tanh",
    "read_jsonl",
]
