"""Flax shells around jaxrnn: `jaxrnn.flax.linen` and `jaxrnn.flax.nnx`.

Import the one you use (``from jaxrnn.flax import linen as jnn``), or reach it as an attribute
(``jaxrnn.flax.nnx.RNN``), which imports it then; importing this package imports neither.
"""

_MODULES = ("linen", "nnx")


def __getattr__(name: str):
    if name in _MODULES:
        import importlib

        return importlib.import_module(f"jaxrnn.flax.{name}")
    raise AttributeError(f"module 'jaxrnn.flax' has no attribute {name!r}")
