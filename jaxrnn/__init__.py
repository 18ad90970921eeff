"""jaxrnn: recurrent neural networks for JAX as pure functions.

A cell is a `Cell` of pure functions (``init``, ``initial_carry``, ``step``, ``project``,
``recur``); `unroll` runs it over a sequence with ``jax.lax.scan``; `stack` builds multi-layer,
bidirectional networks.
"""

from jaxrnn import initializers
from jaxrnn._src.cell import Cell, make_cell
from jaxrnn._src.elman import ElmanParams, elman
from jaxrnn._src.gru import GRUParams, gru
from jaxrnn._src.layers import Network, stack
from jaxrnn._src.lru import LRUParams, lru
from jaxrnn._src.lstm import LSTMCarry, LSTMParams, lstm
from jaxrnn._src.mingru import MinGRUParams, mingru
from jaxrnn._src.minlstm import MinLSTMParams, minlstm
from jaxrnn._src.parallel import UnrollInfo
from jaxrnn._src.unroll import unroll

__version__ = "0.1.0"

__all__ = [
    "Cell",
    "ElmanParams",
    "GRUParams",
    "LRUParams",
    "LSTMCarry",
    "LSTMParams",
    "MinGRUParams",
    "MinLSTMParams",
    "Network",
    "UnrollInfo",
    "elman",
    "gru",
    "initializers",
    "lru",
    "lstm",
    "make_cell",
    "mingru",
    "minlstm",
    "stack",
    "unroll",
]

_SUBPACKAGES = ("diagnostics", "flax", "interop", "tasks", "train")


def __getattr__(name: str):
    # Subpackages load on first use (``jaxrnn.train``, ``jaxrnn.interop.from_torch``), keeping
    # ``import jaxrnn`` light: none of them imports PyTorch or Flax's module system until used.
    if name in _SUBPACKAGES:
        import importlib

        return importlib.import_module(f"jaxrnn.{name}")
    raise AttributeError(f"module 'jaxrnn' has no attribute {name!r}")
