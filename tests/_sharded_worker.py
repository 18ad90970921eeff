"""Runs jaxrnn under an explicit-sharding mesh of two CPU devices; prints one JSON report.

Started by ``test_sharding.py`` in a fresh process, because the number of CPU devices is
fixed when JAX starts. Each case runs the same function on replicated inputs and on inputs
sharded over the batch, under ``jit``, and reports the largest difference of outputs, carries
and gradients, and the sharding of the outputs.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # before JAX starts; importing this module changes nothing
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxrnn  # noqa: E402
import jaxrnn.flax.nnx  # noqa: E402

B, T, F, H = 4, 7, 3, 5


def _rel_diff(got, want):
    """Largest ``|got - want| / (1 + max |want|)`` over the leaves."""
    la, lb = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(la) == len(lb), (len(la), len(lb))
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / (1 + np.max(np.abs(np.asarray(y)))))
        for x, y in zip(la, lb)
    )


def _spec(a):
    return str(tuple(jax.typeof(a).sharding.spec))


def _unroll_case(make, *, time_major=False, batch=(B,), carry=False, **kw):
    def build(key):
        cell = make()
        k = jax.random.split(key, 6)
        params = cell.init(k[0], input_size=F)
        shape = (T, *batch, F) if time_major else (*batch, T, F)
        xs = jax.random.normal(k[1], shape)
        flag_shape = (T, *batch) if time_major else (*batch, T)
        extra = {}
        if kw.pop("lengths", False):
            extra["seq_lengths"] = jax.random.randint(k[2], batch, 1, T + 1)
        if kw.pop("flags", False):
            extra["mask"] = jax.random.bernoulli(k[3], 0.8, flag_shape)
            extra["resets"] = jax.random.bernoulli(k[4], 0.2, flag_shape)
        c0 = None
        if carry:  # a random carry, passed replicated
            c0 = jax.tree_util.tree_map(
                lambda a: jax.random.normal(k[5], a.shape, a.dtype),
                cell.initial_carry(batch, xs.dtype),
            )
        opts = dict(kw, time_major=time_major)

        def run(params, xs, extra):
            ys, c = jaxrnn.unroll(cell, params, xs, c0, **extra, **opts)
            return ys, c

        return run, params, xs, extra, 0 if not time_major else 1

    return build


def _network_case(key):
    net = jaxrnn.stack(jaxrnn.gru(H), num_layers=2, bidirectional=True, dropout=0.25)
    k = jax.random.split(key, 4)
    params = net.init(k[0], input_size=F)
    xs = jax.random.normal(k[1], (B, T, F))
    extra = {"seq_lengths": jax.random.randint(k[2], (B,), 1, T + 1)}
    drop_key = k[3]

    def run(params, xs, extra):
        return net.apply(params, xs, **extra, key=drop_key)

    return run, params, xs, extra, 0


def _nnx_case(key):
    k = jax.random.split(key, 2)
    model = jaxrnn.flax.nnx.RNN(jaxrnn.lstm(H), F, rngs=nnx.Rngs(int(k[0][-1])), return_carry=True)
    graphdef, state = nnx.split(model)
    xs = jax.random.normal(k[1], (B, T, F))

    def run(state, xs, extra):
        carry, ys = nnx.merge(graphdef, state)(xs)
        return ys, carry

    return run, state, xs, {}, 0


CASES = {
    "elman": _unroll_case(lambda: jaxrnn.elman(H)),
    "lstm": _unroll_case(lambda: jaxrnn.lstm(H)),
    "gru": _unroll_case(lambda: jaxrnn.gru(H)),
    "lstm-lengths-reverse": _unroll_case(lambda: jaxrnn.lstm(H), lengths=True, reverse=True),
    "gru-mask-resets": _unroll_case(lambda: jaxrnn.gru(H), flags=True),
    "elman-time-major-carry": _unroll_case(lambda: jaxrnn.elman(H), time_major=True, carry=True),
    "lstm-2d-batch": _unroll_case(lambda: jaxrnn.lstm(H), batch=(B, 2)),
    "lstm-bf16-matmul": _unroll_case(lambda: jaxrnn.lstm(H), matmul_dtype=jnp.bfloat16),
    "lstm-proj": _unroll_case(lambda: jaxrnn.lstm(H, proj_size=2), lengths=True),
    "gru-remat-resets": _unroll_case(lambda: jaxrnn.gru(H), remat=3, flags=True),
    "gru-quasi-deer": _unroll_case(lambda: jaxrnn.gru(H), method="quasi_deer", flags=True),
    "elman-deer-reverse": _unroll_case(lambda: jaxrnn.elman(H), method="deer", reverse=True),
    "mingru-associative": _unroll_case(lambda: jaxrnn.mingru(H), method="associative", flags=True),
    "minlstm-sequential": _unroll_case(lambda: jaxrnn.minlstm(H), lengths=True),
    "lru-associative": _unroll_case(
        lambda: jaxrnn.lru(H, H), method="associative", lengths=True, reverse=True
    ),
    "network-bidirectional-dropout": _network_case,
    "flax-nnx-lstm": _nnx_case,
}


def run_case(name, key):
    run, params, xs, extra, batch_axis = CASES[name](key)

    def loss(params, xs, extra):
        ys, carry = run(params, xs, extra)
        leaves = jax.tree_util.tree_leaves((ys, carry))
        return sum(jnp.sum(jnp.real(a * jnp.conj(a))) for a in leaves)

    f = jax.jit(run)
    g = jax.jit(jax.grad(loss, argnums=(0, 1)))
    want_out, want_grad = f(params, xs, extra), g(params, xs, extra)

    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices("cpu")[:2])
    with jax.set_mesh(mesh):
        spec = [None] * xs.ndim
        spec[batch_axis] = "data"
        xs_s = jax.device_put(xs, NamedSharding(mesh, P(*spec)))
        extra_s = jax.tree_util.tree_map(
            lambda a: jax.device_put(a, NamedSharding(mesh, P(*([None] * a.ndim)))), extra
        )
        if "seq_lengths" in extra:  # batch-shaped: shard it like xs
            extra_s["seq_lengths"] = jax.device_put(
                extra["seq_lengths"], NamedSharding(mesh, P("data"))
            )
        got_out, got_grad = f(params, xs_s, extra_s), g(params, xs_s, extra_s)
    ys = jax.tree_util.tree_leaves(got_out[0])[0]
    return {
        "out": _rel_diff(got_out, want_out),
        "grad": _rel_diff(got_grad, want_grad),
        "ys_spec": _spec(ys),
        "xs_spec": _spec(xs_s),
    }


def time_sharded_error(key):
    """The message for ``xs`` sharded over time (the scan cannot split time)."""
    cell = jaxrnn.gru(H)
    params = cell.init(key, input_size=F)
    xs = jax.random.normal(key, (B, T + 1, F))  # an even time length, so it can be split
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices("cpu")[:2])
    with jax.set_mesh(mesh):
        xs_s = jax.device_put(xs, NamedSharding(mesh, P(None, "data", None)))
        try:
            jax.jit(lambda p, x: jaxrnn.unroll(cell, p, x))(params, xs_s)
        except ValueError as e:
            return str(e)
    return None


def main(seed: int):
    report = {"devices": jax.device_count("cpu"), "cases": {}}
    report["time_sharded_error"] = time_sharded_error(jax.random.PRNGKey(seed - 1))
    for i, name in enumerate(CASES):
        try:
            report["cases"][name] = run_case(name, jax.random.PRNGKey(seed + i))
        except Exception as e:  # reported per case, the test shows it
            report["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(json.dumps(report))


if __name__ == "__main__":
    main(int(sys.argv[1]))
