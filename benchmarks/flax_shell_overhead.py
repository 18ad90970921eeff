"""Time the Flax shells against the pure functions they call: the ratios should be ~1.

Forward and forward+backward of an LSTM layer (and a 2-layer bidirectional network), jitted,
as ``jaxrnn.unroll`` / ``Network.apply``, as ``jaxrnn.flax.linen.RNN`` and as
``jaxrnn.flax.nnx.RNN`` under ``nnx.jit``. Writes a JSON file and prints a markdown table.

Run: ``python benchmarks/flax_shell_overhead.py [--out results_flax_shells.json] [--quick]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

import jaxrnn
from jaxrnn.flax import linen as jnn
from jaxrnn.flax import nnx as jnnx


def _time_interleaved(calls: dict, repeats: int) -> dict:
    """The minimum over ``repeats`` of each call's time, the calls interleaved round by round
    so that a change in the machine's load hits all of them alike."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))  # compile
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: min(s) for name, s in samples.items()}


def _cases(model, xs):
    input_size = xs.shape[-1]
    params = model.init(jax.random.PRNGKey(0), input_size)

    if isinstance(model, jaxrnn.Cell):
        pure = lambda p, xs: jaxrnn.unroll(model, p, xs)[0]
    else:
        pure = lambda p, xs: model.apply(p, xs)[0]
    linen_layer = jnn.RNN(model, deterministic=True)
    variables = {"params": jnn.to_flax_params(model, params)}
    nnx_layer = jnnx.RNN(model, input_size, rngs=nnx.Rngs(0), deterministic=True)
    nnx_layer.load_params(params)

    def loss(f):
        return lambda *a: jnp.sum(f(*a) ** 2)

    return {
        "pure": (jax.jit(pure), jax.jit(jax.grad(loss(pure))), params),
        "linen": (
            jax.jit(linen_layer.apply),
            jax.jit(jax.grad(loss(linen_layer.apply))),
            variables,
        ),
        "nnx": (
            nnx.jit(lambda m, xs: m(xs)),
            nnx.jit(nnx.grad(loss(lambda m, xs: m(xs)))),
            nnx_layer,
        ),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="results_flax_shells.json")
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    args = parser.parse_args()
    batch, time_steps, features, hidden = (8, 32, 16, 32) if args.quick else (16, 128, 64, 128)
    repeats = 5 if args.quick else 20
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, time_steps, features))
    models = {
        f"lstm({hidden})": jaxrnn.lstm(hidden),
        f"stack(lstm({hidden}), 2, bidirectional)": jaxrnn.stack(
            jaxrnn.lstm(hidden), 2, bidirectional=True
        ),
    }
    rows = []
    for model_name, model in models.items():
        cases = _cases(model, xs)
        forward = _time_interleaved(
            {shell: (f, (state, xs)) for shell, (f, _, state) in cases.items()}, repeats
        )
        backward = _time_interleaved(
            {shell: (g, (state, xs)) for shell, (_, g, state) in cases.items()}, repeats
        )
        times = {shell: (forward[shell], backward[shell]) for shell in cases}
        for shell in ("linen", "nnx"):
            rows.append(
                {
                    "model": model_name,
                    "shell": shell,
                    "forward_ms": 1e3 * times[shell][0],
                    "pure_forward_ms": 1e3 * times["pure"][0],
                    "forward_ratio": times[shell][0] / times["pure"][0],
                    "grad_ms": 1e3 * times[shell][1],
                    "pure_grad_ms": 1e3 * times["pure"][1],
                    "grad_ratio": times[shell][1] / times["pure"][1],
                }
            )
    meta = {
        "machine": platform.processor() or platform.machine(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "shape": {"batch": batch, "time": time_steps, "features": features, "hidden": hidden},
        "repeats": repeats,
        "statistic": "minimum over interleaved repeats",
    }
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"backend {meta['backend']}, jax {meta['jax']}, shape {meta['shape']}")
    print("| model | shell | forward ms (pure) | ratio | grad ms (pure) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['shell']} | {r['forward_ms']:.2f} ({r['pure_forward_ms']:.2f}) "
            f"| {r['forward_ratio']:.2f} | {r['grad_ms']:.2f} ({r['pure_grad_ms']:.2f}) "
            f"| {r['grad_ratio']:.2f} |"
        )


if __name__ == "__main__":
    main()
