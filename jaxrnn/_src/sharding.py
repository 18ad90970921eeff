"""Explicit sharding: arrays the runner creates take the batch sharding of the inputs.

Under a mesh with `jax.sharding.AxisType.Explicit` axes (the default of ``jax.make_mesh``),
the sharding of an array is part of its type, and ``lax.scan`` needs the carry that goes in to
have the type of the carry that comes out. A carry made with ``jnp.zeros`` is replicated, but
one step with batch-sharded inputs makes it batch-sharded. So every batch-shaped array that
the runner creates, or that the caller passes as a carry, is resharded here to the batch
sharding of ``xs``. Without explicit axes (no mesh, or ``Auto`` axes) nothing changes.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec


def axis_partition(x: jax.Array, axis: int):
    """The explicit mesh axes that ``x``'s axis ``axis`` is sharded over, or ``None``."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is None or axis >= len(spec):
        return None
    return spec[axis]


def time_major_batch(xs: jax.Array):
    """The explicit mesh axes of time-major ``xs``'s batch axes, or ``None`` where none is
    sharded.

    ``xs`` is ``(time, *batch, features)``. Returns ``(mesh, entries)``: ``entries[i]`` is the
    partition of batch axis ``i``.
    """
    sharding = getattr(jax.typeof(xs), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return None
    spec = tuple(spec) + (None,) * (xs.ndim - len(spec))
    entries = spec[1:-1]
    if all(e is None for e in entries):
        return None
    return sharding.mesh, entries


def like_batch(tree, batch):
    """Reshards each ``(*batch, ...)`` leaf of ``tree`` to the batch sharding ``batch``.

    ``batch`` comes from `time_major_batch`; ``None`` returns ``tree`` unchanged. Leaves that have
    that sharding already are returned as they are.
    """
    if batch is None:
        return tree
    mesh, entries = batch

    def one(a):
        want = PartitionSpec(*entries, *(None,) * (a.ndim - len(entries)))
        have = getattr(getattr(jax.typeof(a), "sharding", None), "spec", None)
        if have is not None and tuple(have) + (None,) * (a.ndim - len(have)) == tuple(want):
            return a
        return jax.sharding.reshard(a, NamedSharding(mesh, want))

    return jax.tree_util.tree_map(one, tree)
