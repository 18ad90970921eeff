"""``vmap`` against one batch: does a vmapped ``jaxrnn.unroll`` run as fast as a batched one?

For each cell ``kind:n:batch:time:hidden`` the same ``n·batch`` sequences run as one batch of
``n·batch`` and as ``jax.vmap`` over ``n`` batches of ``batch``, interleaved (one call each per
round, shuffled; median of ``--reps``). Passes: the forward pass; the gradient of
``sum(sin(outputs))`` over the whole batch against ``vmap(grad)`` (per-example gradients) and
against ``grad`` of a vmapped loss. Ratios are vmapped time / batched time (1.0: no cost).
An ensemble (``ensemble_fwd``, ``ensemble_grad``: ``vmap`` over ``n`` sets of weights, each
member its own batch) is timed against the one batch with shared weights, as are the same
members run one after another by ``lax.map`` (``..._loop``: one kernel call per member).

Usage::

    python benchmarks/vmap_speed.py                      # the default cells, CPU
    python benchmarks/vmap_speed.py --cells lstm:16:1:256:128 --reps 31 --out vmap.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics

import jax
import jax.numpy as jnp
from speed import time_interleaved

import jaxrnn

CELLS = ["lstm:4:4:256:128", "lstm:16:1:256:128", "gru:4:4:256:128"]
PASSES = ("fwd", "per_example_grad", "grad_of_vmap", "ensemble_fwd", "ensemble_fwd_loop",
          "ensemble_grad", "ensemble_grad_loop")  # fmt: skip
FACTORIES = {"elman": jaxrnn.elman, "lstm": jaxrnn.lstm, "gru": jaxrnn.gru}


def runners(kind: str, n: int, batch: int, time_: int, hidden: int) -> dict:
    """Zero-argument callables that block: ``(batched, vmapped)`` per pass."""
    cell = FACTORIES[kind](hidden)
    params = cell.init(jax.random.PRNGKey(0), hidden)
    xs = jax.random.normal(jax.random.PRNGKey(1), (n, batch, time_, hidden))

    def batched(p, x):
        return jaxrnn.unroll(cell, p, x.reshape(n * batch, time_, hidden))[0]

    def one(p, x):
        return jaxrnn.unroll(cell, p, x)[0]

    def vmapped(p, x):
        return jax.vmap(one, (None, 0))(p, x)

    def loss(run):
        return lambda p, x: jnp.sum(jnp.sin(run(p, x)))

    members = jax.vmap(lambda k: cell.init(k, hidden))(jax.random.split(jax.random.PRNGKey(2), n))

    def ensemble(p, x):
        return jax.vmap(one)(p, x)

    def looped(p, x):
        return jax.lax.map(lambda a: one(*a), (p, x))

    fns = {
        "fwd": (batched, vmapped),
        "per_example_grad": (
            jax.grad(loss(batched), argnums=(0, 1)),
            jax.vmap(jax.grad(loss(one), argnums=(0, 1)), (None, 0)),
        ),
        "grad_of_vmap": (
            jax.grad(loss(batched), argnums=(0, 1)),
            jax.grad(loss(vmapped), argnums=(0, 1)),
        ),
    }
    grad_of = lambda run: jax.grad(loss(run), argnums=(0, 1))  # noqa: E731
    fns["ensemble_fwd"] = (batched, ensemble)
    fns["ensemble_fwd_loop"] = (batched, looped)
    fns["ensemble_grad"] = (grad_of(batched), grad_of(ensemble))
    fns["ensemble_grad_loop"] = (grad_of(batched), grad_of(looped))
    out = {}
    for name, pair in fns.items():
        for label, fn in zip(("batched", "vmapped"), pair):
            p = members if label == "vmapped" and name.startswith("ensemble") else params
            compiled = jax.jit(fn).lower(p, xs).compile()
            out[f"{name}/{label}"] = lambda c=compiled, p=p: jax.block_until_ready(c(p, xs))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(CELLS),
                        help="comma-separated kind:n:batch:time:hidden")  # fmt: skip
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    rows = []
    print("| cell (n × B, T, H) | pass | one batch ms | vmapped ms | ratio |")
    print("|---|---|---|---|---|")
    for spec in args.cells.split(","):
        kind, *dims = spec.split(":")
        if kind not in FACTORIES or len(dims) != 4:
            raise SystemExit(f"--cells: expected kind:n:batch:time:hidden, got {spec!r}")
        n, batch, time_, hidden = (int(d) for d in dims)
        times = time_interleaved(runners(kind, n, batch, time_, hidden), args.reps, rng)
        median = {name: statistics.median(wall) * 1e3 for name, (wall, _) in times.items()}
        for pass_ in PASSES:
            one, vm = median[f"{pass_}/batched"], median[f"{pass_}/vmapped"]
            rows.append(dict(cell=spec, pass_=pass_, batched_ms=one, vmapped_ms=vm, ratio=vm / one))
            print(f"| {kind} {n} × {batch}, {time_}, {hidden} | {pass_} | {one:.2f} | {vm:.2f} "
                  f"| {vm / one:.2f} |", flush=True)  # fmt: skip
    if args.out:
        report = dict(
            backend=jax.default_backend(), jax=jax.__version__, reps=args.reps,
            platform=f"{platform.system()} {platform.machine()}", results=rows,
        )  # fmt: skip
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
