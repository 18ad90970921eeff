"""Evaluates the persistent Pallas kernels (`jaxrnn._src.pallas_rnn`) on a GPU.

1. Correctness on the device: the kernels' outputs and gradients against ``jaxrnn.unroll``
   on XLA's loop (the fast path with `fastpath.PALLAS_TABLE` cleared), dense and with random
   lengths and resets in reverse, as relative errors (both sides run their float32 matmuls at
   the default precision, TF32 on an H100).
2. Speed: forward and forward+backward against the same ``jaxrnn.unroll`` and PyTorch's
   ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` (cuDNN), interleaved rounds, medians; for each
   ``num_warps``; and ``unroll_pallas``, `jaxrnn.unroll` on the fast path's ``"pallas"``
   placement (the forward kernel computes the primal and its residuals; the backward stays
   XLA's transposed linear scan): where it beats plain ``jaxrnn``, per pass, goes into
   ``fastpath.PALLAS_TABLE``; and ``unroll_pallas_bwd``, the same with the backward loop of
   reverse mode on the backward kernel (`pallas_rnn.tangent_transpose`): where its gradient
   beats ``unroll_pallas``'s, into ``fastpath.PALLAS_BACKWARD_TABLE``.

    python benchmarks/pallas_gpu.py --out pallas.json            # on the GPU machine
    python benchmarks/pallas_gpu.py --interpret --cells lstm:4:6:16 --reps 1   # a CPU smoke run

Not a unit test: the numbers go into the README's Performance section once measured.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import speed  # noqa: E402  (the timing helpers and the PyTorch peer)

import jaxrnn  # noqa: E402
from jaxrnn._src import fastpath, pallas_rnn  # noqa: E402

# The small-batch H100 cells (cuDNN fp32: LSTM 2.42 / 4.50, GRU 0.95 / 2.13, Elman
# 0.72 / 1.54 ms) and a wider batch.
CELLS = "elman:8:1000:128,lstm:8:1000:128,gru:8:1000:128,lstm:64:1000:128,gru:64:1000:128"
FACTORIES = {"elman": jaxrnn.elman, "lstm": jaxrnn.lstm, "gru": jaxrnn.gru}


def _parse(spec):
    kind, b, t, h = spec.split(":")
    if kind not in FACTORIES:
        raise SystemExit(f"pallas_gpu.py: cells are elman, lstm or gru, got {spec!r}")
    return kind, int(b), int(t), int(h)


def _problem(kind, batch, time_, hidden, dtype):
    cell = FACTORIES[kind](hidden)
    keys = jax.random.split(jax.random.PRNGKey(0), 2)
    params = cell.init(keys[0], hidden, dtype=dtype)
    xs = jax.random.normal(keys[1], (batch, time_, hidden), dtype)  # batch-major, as speed.py
    return cell, params, xs


def _runs(cell, warps, interpret, **flags):
    """``{name: fn(params, xs_bm) -> ys_bm}``: the scan and one kernel per ``num_warps``.

    ``flags``: `jaxrnn.unroll`'s ``seq_lengths``, ``resets`` (batch-major) and ``reverse``.
    """

    def on_xla(p, xs):
        """``jaxrnn.unroll`` on XLA's loop: the baseline, whatever `PALLAS_TABLE` holds (the
        kernels are off while this traces)."""
        return speed.without_kernels(jaxrnn.unroll, cell, p, xs, **flags)[0]

    runs = {"jaxrnn": on_xla}
    kernel_flags = dict(flags)
    if "resets" in flags:
        kernel_flags["resets"] = flags["resets"].T

    def on_the_kernels(p, xs, backward=False):
        """``jaxrnn.unroll`` with the kernels as its primal in every pass (`PALLAS_TABLE`), and
        with ``backward`` as the backward loop of reverse mode (`PALLAS_BACKWARD_TABLE`)."""
        original = fastpath.placements, fastpath.pallas_backward
        fastpath.placements = lambda *a, **k: ("pallas", "pallas")
        fastpath.pallas_backward = lambda *a: backward
        try:  # the placement is read while tracing
            return jaxrnn.unroll(cell, p, xs, **flags)[0]
        finally:
            fastpath.placements, fastpath.pallas_backward = original

    runs["unroll_pallas"] = on_the_kernels
    runs["unroll_pallas_bwd"] = lambda p, xs: on_the_kernels(p, xs, backward=True)
    for w in warps:

        def kernel(p, xs, w=w):
            hs, _ = pallas_rnn.sequence(
                cell, p, jnp.moveaxis(xs, 1, 0), num_warps=w, interpret=interpret, **kernel_flags
            )
            return jnp.moveaxis(hs, 0, 1)

        runs[f"pallas_w{w}"] = kernel
    return runs


def _loss(run):
    return lambda p, xs: jnp.sum(run(p, xs).astype(jnp.float32) ** 2)


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (1e-6 + np.max(np.abs(b))))


def check(kind, dtype, warps, interpret, batch=8, time_=64, hidden=128, flags=False):
    """Relative errors of each kernel against ``jaxrnn.unroll``: outputs and gradients.

    ``flags``: with random ``seq_lengths`` and ``resets``, run in reverse.
    """
    cell, params, xs = _problem(kind, batch, time_, hidden, dtype)
    kw = {}
    if flags:
        keys = jax.random.split(jax.random.PRNGKey(1), 2)
        kw = {
            "seq_lengths": jax.random.randint(keys[0], (batch,), 0, time_ + 1),
            "resets": jax.random.bernoulli(keys[1], 0.05, (batch, time_)),
            "reverse": True,
        }
    runs = _runs(cell, warps, interpret, **kw)
    want = jax.jit(runs["jaxrnn"])(params, xs)
    want_g = jax.jit(jax.grad(_loss(runs["jaxrnn"]), argnums=(0, 1)))(params, xs)
    out = {}
    for name, run in runs.items():
        if name == "jaxrnn":
            continue
        try:
            got = jax.jit(run)(params, xs)
            got_g = jax.jit(jax.grad(_loss(run), argnums=(0, 1)))(params, xs)
            grad_err = max(
                _rel(a, b)
                for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g))
            )
            out[name] = {"out_rel_err": _rel(got, want), "grad_rel_err": grad_err}
        except Exception as e:  # noqa: BLE001 - a kernel that does not compile is a result
            out[name] = {"error": f"{type(e).__name__}: {e}"[:1500]}
    return out


def bench(spec, dtype, warps, reps, interpret, torch_peer, rng):
    kind, batch, time_, hidden = _parse(spec)
    cell, params, xs = _problem(kind, batch, time_, hidden, dtype)
    runners, compile_s = {}, {}
    for name, run in _runs(cell, warps, interpret).items():
        try:
            for pass_, (fn, comp, _) in speed._jax_runner(run, _loss(run), (params, xs)).items():
                runners[(name, pass_)] = fn
                compile_s[f"{name}/{pass_}"] = round(comp, 3)
        except Exception as e:  # noqa: BLE001
            print(f"  {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    if torch_peer:
        device = "gpu" if jax.default_backend() == "gpu" else "cpu"
        for pass_, (fn, _, _) in speed.torch_runner(kind, xs, dtype, device).items():
            runners[("torch", pass_)] = fn
    flat = {f"{n}/{p}": fn for (n, p), fn in runners.items()}
    times = speed.time_interleaved(flat, reps, rng)
    medians = {k: 1e3 * statistics.median(v[0]) for k, v in times.items()}
    return {"cell": spec, "dtype": jnp.dtype(dtype).name, "ms": medians, "compile_s": compile_s}


def markdown(rows):
    names = sorted({k.split("/")[0] for r in rows for k in r["ms"]})
    head = "| cell | dtype | " + " | ".join(f"{n} fwd / fwd+bwd ms" for n in names) + " |"
    lines = [head, "|" + "---|" * (2 + len(names))]
    for r in rows:
        cells = []
        for n in names:
            f, b = r["ms"].get(f"{n}/fwd"), r["ms"].get(f"{n}/fwdbwd")
            cells.append("—" if f is None else f"{f:.3f} / {b:.3f}")
        lines.append(f"| {r['cell']} | {r['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write(out, report, rows, start):
    if not out:
        return
    report["seconds"] = round(time.perf_counter() - start, 1)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(markdown(rows) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default=CELLS)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--warps", default="8", help="comma-separated num_warps values")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--interpret", action="store_true", help="Pallas interpreter (CPU smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    warps = [int(w) for w in args.warps.split(",")]
    dtypes = [jnp.dtype(d) for d in args.dtypes.split(",")]
    rng = random.Random(0)
    start = time.perf_counter()
    report = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "check": {}}
    report["torch"] = (
        None
        if args.no_torch
        else speed.torch_info("gpu" if jax.default_backend() == "gpu" else "cpu")
    )
    kinds = sorted({_parse(spec)[0] for spec in args.cells.split(",")})
    for kind in kinds:
        for dtype in dtypes:
            if args.interpret:  # the smoke run: the first cell's size
                batch, time_, hidden = _parse(args.cells.split(",")[0])[1:]
            else:
                batch, time_, hidden = 8, 64, 128
            for flags in (False, True):
                key = f"{kind}/{dtype.name}" + ("/lengths_resets_reverse" if flags else "")
                report["check"][key] = check(
                    kind, dtype, warps, args.interpret, batch, time_, hidden, flags
                )
                print(f"check {key}: {json.dumps(report['check'][key])}", flush=True)
    rows = []
    report["rows"] = rows
    for spec in args.cells.split(","):
        for dtype in dtypes:
            rows.append(
                bench(spec, dtype, warps, args.reps, args.interpret, not args.no_torch, rng)
            )
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
            _write(args.out, report, rows, start)  # partial results survive a time limit
    print(markdown(rows))
    _write(args.out, report, rows, start)
    return report


if __name__ == "__main__":
    main()
