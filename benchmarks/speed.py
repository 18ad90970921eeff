"""Times jaxrnn's Elman/LSTM/GRU against PyTorch, Flax and cuDNN-from-JAX, forward and backward.

Usage::

    python benchmarks/speed.py --device cpu --grid quick
    python benchmarks/speed.py --device gpu --grid quick --out gpu.json --plot gpu.png
    python benchmarks/speed.py --device cpu --cells lstm:16:256:128 --peers torch --reps 30
    python benchmarks/speed.py --device cpu --tune          # measure the unroll table
    python benchmarks/speed.py --device cpu --host-devices 2 --peers torch,jaxrnn1
    python benchmarks/speed.py --device cpu --isa avx2     # as on a CPU without AVX-512
    python benchmarks/speed.py --device cpu --cells lstm:16:256:128 --layers 2 --bidirectional

Method: every library gets the same random inputs and weights of the same sizes (input size =
hidden size), in its own default layout (jaxrnn and Flax batch-major, PyTorch time-major). JAX
functions are jitted; compile time is measured separately (``lower().compile()``) and one
warm-up call follows, neither counted. Then the runners of a cell are timed *interleaved*,
one call each per round, for ``--reps`` rounds, so that background load hits every library
alike, each timed call right after untimed calls of the same runner (for ``--warm-ms``, 30
on CPU), as in a loop calling it, so that it does not share the cores with the previous
library's spinning worker threads (PyTorch's OpenMP pool spins for about 11 ms after each
call on the 2-core AMD machine: with 10 ms, the slowest tenth of jaxrnn's Elman B16 calls
after PyTorch's took twice as long as its median); the table reports the median per runner
and the ratio ``peer_time / jaxrnn_time`` (> 1: jaxrnn is faster). Every call ends in
``block_until_ready`` (JAX) or ``torch.cuda.synchronize`` (PyTorch on GPU). ``fwd``
computes the outputs; ``fwdbwd`` computes ``sum(outputs)`` and its gradient with respect to
the weights and the inputs. Peak memory is
the compiled program's temporary buffers (JAX, from XLA's memory analysis) and
``torch.cuda.max_memory_allocated`` (PyTorch on GPU); it is not measured for PyTorch on CPU.

The last column is jaxrnn's rate in multiply-adds of its matmuls a second (`multiply_adds`:
a forward pass makes ``T·B·G·H·(I + H)``, a gradient three times that), and that rate against
XLA's on one large square matmul timed in the same run (`xla_matmul_rate`; the same dtype and
default precision, so TF32 on a GPU): near 100 %, a cell is bound by its multiply-adds, and
no library runs it much faster on that machine; far below, by something else (the time per
step, memory). Under ``--isa avx2`` that matmul keeps AVX-512 (below), so the share
understates what an AVX2 CPU's cores give.

``--isa avx2`` (CPU) caps what each library may use at AVX2 and FMA (`AVX2_ENVIRONMENT`), as
on a CPU without AVX-512: jaxrnn's kernel is built for it (its 8-lane code: `native.available`),
PyTorch runs its AVX2 kernels, oneDNN and MKL theirs, and XLA generates AVX2 code. XLA's dots
do not take the cap (a 2048³ float32 dot ran at 135 and 139 G multiply-adds a second without and
with it), so JAX's matmuls (Flax's, and jaxrnn's projections and weight gradients) keep AVX-512.

``--host-devices N`` (CPU): JAX sees ``N`` CPU devices and jaxrnn runs with the batch sharded
over them (an explicit mesh, ``jax.set_mesh``): XLA runs each device's loop on its own
thread, where one device runs a step's small matmul on one core. PyTorch gets ``N`` threads;
the peer ``jaxrnn1`` is jaxrnn on one device in the same run; Flax runs on one device (its
``nn.RNN`` scan rejects a batch-sharded carry under an explicit mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import jaxrnn
from jaxrnn._src import fastpath
from jaxrnn._src import unroll as unroll_lib

KINDS = ("elman", "lstm", "gru")
QUICK = {
    "cpu": ["elman:16:256:128", "lstm:16:256:128", "gru:16:256:128", "lstm:64:128:512"],
    "gpu": [
        "lstm:8:1000:128",
        "gru:8:1000:128",
        "elman:8:1000:128",
        "lstm:64:500:512",
        "lstm:128:500:1024",
        "gru:128:500:1024",
    ],
}
FULL_EXTRA = [
    f"{k}:{b}:{t}:{h}"
    for k in KINDS
    for b in (1, 8, 64, 256)
    for h in (128, 512, 1024)
    for t in (100, 1000)
]
UNROLL_FACTORS = (1, 2, 4, 8)
PEERS = ("torch", "flax", "cudnn", "scan", "jaxrnn1", "xla")
PEER_LABELS = {
    "jaxrnn": "jaxrnn",
    "jaxrnn1": "jaxrnn, one device",
    "torch": "PyTorch",
    "flax": "Flax nn.RNN",
    "cudnn": "jax.experimental.rnn (cuDNN)",
    "scan": "plain scan, unroll 8",
    "xla": "jaxrnn, XLA's loop",
}


def parse_cell(spec: str):
    kind, batch, time_, hidden = spec.split(":")
    if kind not in KINDS:
        raise SystemExit(f"--cells: kind must be one of {KINDS}, got {kind!r} in {spec!r}")
    return kind, int(batch), int(time_), int(hidden)


# ----------------------------------------------------------------------------------------------
# Runners: each returns {"fwd": fn, "fwdbwd": fn} of zero-argument callables that block, plus
# compile seconds and peak bytes where known.


def _jax_runner(fwd: Callable, loss: Callable, args: tuple, mesh=None):
    """Jits ``fwd(*args)`` and ``grad(loss)(*args)``; measures compile time and temp memory.

    With ``mesh`` (one axis, ``"batch"``), ``args[-1]`` (the inputs, batch first) is sharded
    over it and the rest replicated; tracing runs under ``jax.set_mesh(mesh)``.
    """
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        *rest, xs = args
        rest = jax.device_put(rest, NamedSharding(mesh, PartitionSpec()))
        args = (*rest, jax.device_put(xs, NamedSharding(mesh, PartitionSpec("batch"))))
    out = {}
    grad = jax.grad(loss, argnums=tuple(range(len(args))))
    for name, fn in (("fwd", fwd), ("fwdbwd", grad)):
        start = time.perf_counter()
        if mesh is None:
            compiled = jax.jit(fn).lower(*args).compile()
        else:
            with jax.set_mesh(mesh):
                compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start
        try:
            peak = int(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports it
            peak = None
        out[name] = (lambda c=compiled: jax.block_until_ready(c(*args)), compile_s, peak)
    return out


def jaxrnn_runner(
    kind, xs_bm, dtype, *, reference=False, matmul_dtype=None, mesh=None, network=(1, False)
):
    """``network = (layers, bidirectional)``: past one layer or one direction, the network
    `jaxrnn.stack` builds (each layer's inputs the previous layer's outputs)."""
    hidden = xs_bm.shape[-1]
    cell = {"elman": jaxrnn.elman, "lstm": jaxrnn.lstm, "gru": jaxrnn.gru}[kind](hidden)
    is_network = network != (1, False)
    if is_network and (reference or matmul_dtype is not None):
        return None  # the plain scan and matmul_dtype are single-layer runs
    model = jaxrnn.stack(cell, network[0], bidirectional=network[1]) if is_network else cell
    params = model.init(jax.random.PRNGKey(0), hidden, dtype=dtype)

    if is_network:

        def run(params, xs):
            return model.apply(params, xs)[0]
    elif reference:  # the plain hoisted lax.scan, unroll 8, differentiated by JAX

        def run(params, xs):
            xs_tm = jnp.moveaxis(xs, 1, 0)
            carry = cell.initial_carry(xs.shape[:1], xs.dtype)
            ys, _ = unroll_lib.reference_run_time_major(
                cell, params, xs_tm, carry, mask=None, resets=None, reverse=False, unroll=8
            )
            return jnp.moveaxis(ys, 0, 1)
    else:

        def run(params, xs):
            return jaxrnn.unroll(cell, params, xs, matmul_dtype=matmul_dtype)[0]

    loss = lambda p, x: jnp.sum(run(p, x).astype(jnp.float32))  # noqa: E731
    return _jax_runner(run, loss, (params, xs_bm), mesh)


def without_kernels(build, *args, **kwargs):
    """``build(*args, **kwargs)`` with jaxrnn's kernels off while it traces: the native CPU
    kernel and the Pallas GPU kernels (`fastpath.PALLAS_TABLE`), so XLA's loop runs."""
    with (
        mock.patch.dict(os.environ, {"JAXRNN_NATIVE": "0"}),
        mock.patch.dict(fastpath.PALLAS_TABLE, clear=True),
    ):
        return build(*args, **kwargs)


def host_mesh(n: int, batch: int):
    """A one-axis ``"batch"`` mesh over ``n`` CPU devices, or ``None`` (one device, or a batch
    that ``n`` does not divide)."""
    if n <= 1 or batch % n:
        return None
    return jax.make_mesh((n,), ("batch",), devices=jax.devices()[:n])


def flax_runner(kind, xs_bm, dtype, network=(1, False)):
    """Flax's ``nn.RNN``; for a network, ``layers`` of them, each direction pair in
    ``nn.Bidirectional`` (outputs concatenated, as PyTorch and `jaxrnn.stack` do)."""
    import flax.linen as nn

    hidden = xs_bm.shape[-1]
    cell_cls = {"elman": nn.SimpleCell, "lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[kind]
    layers, bidirectional = network

    class Network(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, xs):
            make = lambda: nn.RNN(cell_cls(hidden, dtype=self.dtype, param_dtype=self.dtype))  # noqa: E731
            for _ in range(layers):
                xs = nn.Bidirectional(make(), make())(xs) if bidirectional else make()(xs)
            return xs

    model = Network(dtype)
    # Flax's orthogonal initializer has no bfloat16: initialize in float32, then cast.
    params = Network().init(jax.random.PRNGKey(0), xs_bm.astype(jnp.float32))
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)

    def run(params, xs):
        return model.apply(params, xs)

    return _jax_runner(run, lambda p, x: jnp.sum(run(p, x).astype(jnp.float32)), (params, xs_bm))


def cudnn_runner(kind, xs_bm, dtype, network=(1, False)):
    """LSTM through ``jax.experimental.rnn`` (cuDNN from JAX); GPU only."""
    if kind != "lstm" or jax.default_backend() != "gpu":
        return None
    from jax.experimental import rnn

    batch, _, hidden = xs_bm.shape
    layers, bi = network
    key = jax.random.PRNGKey(0)
    weights = rnn.init_lstm_weight(key, hidden, hidden, layers, bi).astype(dtype)
    zeros = jnp.zeros((layers * (1 + bi), batch, hidden), dtype)
    lengths = jnp.full((batch,), xs_bm.shape[1], jnp.int32)

    def run(weights, xs):
        ys, _, _ = rnn.lstm(xs, zeros, zeros, weights, lengths, hidden, hidden, layers, 0.0, bi)
        return ys

    return _jax_runner(run, lambda w, x: jnp.sum(run(w, x).astype(jnp.float32)), (weights, xs_bm))


def torch_runner(kind, xs_bm, dtype, device, network=(1, False)):
    import torch

    hidden = xs_bm.shape[-1]
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[jnp.dtype(dtype).name]
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    module = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    layers, bidirectional = network
    model = module(hidden, hidden, num_layers=layers, bidirectional=bidirectional)
    model = model.to(dev, tdtype)
    # After a dtype change cuDNN's weights are no longer one contiguous block, and PyTorch
    # warns that it compacts them at every call: compact them once, here.
    model.flatten_parameters()
    x = torch.from_numpy(np.array(jnp.moveaxis(xs_bm, 1, 0).astype(jnp.float32)))
    x = x.to(dev, tdtype).requires_grad_(True)

    def sync():
        if device == "gpu":
            torch.cuda.synchronize()

    def fwd():
        with torch.no_grad():
            model(x)
        sync()

    def fwdbwd():
        model.zero_grad(set_to_none=True)
        x.grad = None
        y, _ = model(x)
        y.float().sum().backward()
        sync()

    out = {}
    for name, fn in (("fwd", fwd), ("fwdbwd", fwdbwd)):
        peak = None
        if device == "gpu":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fn()
        first_s = time.perf_counter() - start
        if device == "gpu":
            peak = int(torch.cuda.max_memory_allocated())
        out[name] = (fn, first_s, peak)
    return out


def cpu_info():
    """The CPU's model name (``/proc/cpuinfo``, else ``platform.processor()``) and, for
    jaxrnn's native CPU kernel, whether it is on and how it multiplies ``matmul_dtype=
    bfloat16`` (AMX tiles, AVX512-BF16, or not at all): the numbers of one machine say little
    without them (the two 2-core machines measured here differ twofold in float32 rate)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        model = names[0] if names else model
    except OSError:
        pass
    from jaxrnn._src import native

    kernel = native.available()
    bf16 = "amx" if kernel and native.amx_available() else None
    bf16 = bf16 or ("avx512_bf16" if kernel and native.bf16_available() else None)
    return {
        "model": model,
        "native_kernel": kernel,
        "native_arch": native._arch(),
        "native_lanes": native.vector_lanes() if kernel else None,
        "native_bf16": bf16,
    }


def torch_info(device):
    try:
        import torch
    except ImportError:
        return None
    info = {"version": torch.__version__, "threads": torch.get_num_threads()}
    if device == "cpu":
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device == "gpu" and torch.cuda.is_available():
        info.update(
            cudnn=torch.backends.cudnn.version(),
            cudnn_enabled=torch.backends.cudnn.enabled,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
            gpu=torch.cuda.get_device_name(),
            # PyTorch's RNN.cpp picks CUDNN_RNN_ALGO_PERSIST_STATIC only for fp16 inputs that
            # pass its persistence heuristics; float32/TF32 and bfloat16 run ALGO_STANDARD.
            cudnn_rnn_algo="CUDNN_RNN_ALGO_STANDARD (fp32/bf16); persistent only for fp16",
        )
    return info


MATMUL_SIZE = {"cpu": 2048, "gpu": 8192}  # the side of `xla_matmul_rate`'s square matmul


def multiply_adds(
    kind: str, batch: int, time_: int, hidden: int, pass_: str, network=(1, False)
) -> int:
    """The multiply-adds of a cell's matmuls, input size = hidden size. Forward: the input
    projection ``x W_x`` and the recurrent ``h W_h``, ``T·B·G·H·(I + H)`` for ``G`` gate blocks
    (Elman 1, LSTM 4, GRU 3). A gradient adds the backward recurrence (``ct W_hᵀ``), the input
    gradient (``ct W_xᵀ``) and the weight gradients (``xᵀ ct``, ``h_inᵀ ct``): three times the
    forward's. Elementwise work (the gates) is not counted. A network of ``(layers,
    bidirectional)`` counts every layer and direction, ``I = D·H`` from the second layer on for
    ``D`` directions."""
    gates = fastpath._N_GATES[getattr(jaxrnn, kind)(hidden).kind]
    layers, bidirectional = network
    directions = 2 if bidirectional else 1
    forward = 0
    for layer in range(layers):
        inputs = hidden if layer == 0 else directions * hidden
        forward += directions * time_ * batch * gates * hidden * (inputs + hidden)
    return forward * (3 if pass_ == "fwdbwd" else 1)


def xla_matmul_rate(device: str, dtype, reps: int, rng: random.Random) -> dict:
    """XLA's rate on one square float matmul (`MATMUL_SIZE`) in ``dtype``, at the default
    precision: ``{"n", "dtype", "median_ms", "g_multiply_adds_per_s"}``. What a cell bound by its
    multiply-adds can reach on this machine, measured in the same run as the cells."""
    n = MATMUL_SIZE[device]
    a, b = (
        jax.random.normal(jax.random.PRNGKey(k), (n, n), jnp.float32).astype(dtype) for k in (7, 8)
    )
    dot = jax.jit(jnp.dot).lower(a, b).compile()
    times = time_interleaved({"dot": lambda: jax.block_until_ready(dot(a, b))}, reps, rng)
    ms = 1e3 * statistics.median(times["dot"][0])
    return {
        "n": n,
        "dtype": jnp.dtype(dtype).name,
        "median_ms": ms,
        "g_multiply_adds_per_s": n**3 / ms / 1e6,
    }


# ----------------------------------------------------------------------------------------------


def time_interleaved(runners: dict, reps: int, rng: random.Random, warm_s: float = 0.0) -> dict:
    """Calls every runner once per round, in a shuffled order, each timed call right after
    untimed calls of the same runner for ``warm_s`` seconds (at least one if ``warm_s``).

    Returns ``{name: (wall_seconds, cpu_seconds)}``, lists of per-call wall-clock times and
    process CPU times (all threads; a steadier measure when other jobs share the machine).
    The untimed calls put each library in the state of a loop calling it: its own worker
    threads awake, the previous library's gone idle (PyTorch's OpenMP threads spin for
    milliseconds after each call, taking a core from whatever runs next).
    """
    for fn in runners.values():
        fn()  # warm-up, not counted
    times = {name: ([], []) for name in runners}
    names = list(runners)
    for _ in range(reps):
        rng.shuffle(names)
        for name in names:
            if warm_s:
                until = time.perf_counter() + warm_s
                runners[name]()
                while time.perf_counter() < until:
                    runners[name]()
            wall, cpu = time.perf_counter(), time.process_time()
            runners[name]()
            times[name][0].append(time.perf_counter() - wall)
            times[name][1].append(time.process_time() - cpu)
    return times


def bench_cell(spec, args, rng):
    kind, batch, time_, hidden = parse_cell(spec)
    dtype = jnp.dtype(args.dtype)
    xs = jax.random.normal(jax.random.PRNGKey(1), (batch, time_, hidden), jnp.float32).astype(dtype)
    mesh = host_mesh(args.host_devices, batch)
    net = (args.layers, args.bidirectional)
    md = args.matmul_dtype
    builders = {
        "jaxrnn": lambda: jaxrnn_runner(kind, xs, dtype, matmul_dtype=md, mesh=mesh, network=net)
    }
    for peer in args.peers:
        if peer == "torch":
            builders[peer] = lambda: torch_runner(kind, xs, dtype, args.device, network=net)
        elif peer == "flax":
            builders[peer] = lambda: flax_runner(kind, xs, dtype, network=net)
        elif peer == "cudnn":
            builders[peer] = lambda: cudnn_runner(kind, xs, dtype, network=net)
        elif peer == "scan":
            builders[peer] = lambda: jaxrnn_runner(kind, xs, dtype, reference=True, network=net)
        elif peer == "jaxrnn1":
            builders[peer] = lambda: jaxrnn_runner(kind, xs, dtype, matmul_dtype=md, network=net)
        elif peer == "xla":  # jaxrnn with its kernels off
            builders[peer] = lambda: without_kernels(
                jaxrnn_runner, kind, xs, dtype, matmul_dtype=md, mesh=mesh, network=net
            )
    built = {}
    for name, build in builders.items():
        try:
            runner = build()
        except Exception as err:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            print(f"  {spec}: {name} unavailable: {type(err).__name__}: {err}", file=sys.stderr)
            runner = None
        if runner is not None:
            built[name] = runner
    result = {"cell": spec, "kind": kind, "batch": batch, "time": time_, "hidden": hidden}
    result["layers"], result["bidirectional"] = net
    result["jaxrnn_devices"] = 1 if mesh is None else mesh.size
    result["multiply_adds"] = {}
    for pass_ in args.passes:
        runners = {name: r[pass_][0] for name, r in built.items()}
        times = time_interleaved(runners, args.reps, rng, args.warm_ms / 1e3)
        count = multiply_adds(kind, batch, time_, hidden, pass_, net)
        result["multiply_adds"][pass_] = count
        result[pass_] = {
            name: {
                "median_ms": 1e3 * statistics.median(ts),
                "g_multiply_adds_per_s": count / statistics.median(ts) / 1e9,
                "min_ms": 1e3 * min(ts),
                "cpu_median_ms": 1e3 * statistics.median(cpu),
                "first_call_or_compile_s": built[name][pass_][1],
                "peak_bytes": built[name][pass_][2],
            }
            for name, (ts, cpu) in times.items()
        }
    return result


def tune(args, rng):
    """Measures the time of the fast path's XLA loop (the kernels off) per unroll factor, for
    the unroll table; yields each cell's rows as it is measured."""
    for spec in args.cells:
        kind, batch, time_, hidden = parse_cell(spec)
        cell = {"elman": jaxrnn.elman, "lstm": jaxrnn.lstm, "gru": jaxrnn.gru}[kind](hidden)
        params = cell.init(jax.random.PRNGKey(0), hidden)
        xs = jax.random.normal(jax.random.PRNGKey(1), (batch, time_, hidden))
        runners = {}
        for factor in UNROLL_FACTORS:

            def loss(p, x, factor=factor, cell=cell):
                return jnp.sum(jaxrnn.unroll(cell, p, x, unroll=factor)[0])

            for pass_ in args.passes:
                fn = loss if pass_ == "fwd" else jax.grad(loss, argnums=(0, 1))
                c = without_kernels(jax.jit(fn).lower, params, xs).compile()
                runners[(pass_, factor)] = lambda c=c, a=(params, xs): jax.block_until_ready(c(*a))
        times = time_interleaved(runners, args.reps, rng, args.warm_ms / 1e3)
        # On a shared CPU the process CPU time is the steadier measure; on GPU, wall time.
        which = 1 if args.device == "cpu" else 0
        med = {k: 1e3 * statistics.median(v[which]) for k, v in times.items()}
        rows = []
        for pass_ in args.passes:
            line = {f: round(med[(pass_, f)], 2) for f in UNROLL_FACTORS}
            best = min(line, key=line.get)
            print(f"{spec} {pass_}: ms by unroll {line} -> best {best}", flush=True)
            rows.append({"cell": spec, "pass": pass_, "ms_by_unroll": line, "best": best})
        yield rows


def network_label(layers: int, bidirectional: bool) -> str:
    """`` ×2 layers, bidirectional`` and the like for a network; empty for one cell."""
    if layers == 1 and not bidirectional:
        return ""
    return f" ×{layers} layers" + (", bidirectional" if bidirectional else "")


def markdown(results, passes, peers, matmul=None) -> str:
    """The table: per cell and pass, each runner's median, the ratios, and (given ``matmul``,
    `xla_matmul_rate`'s result) jaxrnn's multiply-adds a second, G, and that against XLA's
    large matmul."""
    peers = [p for p in peers if any(p in r.get(passes[0], {}) for r in results)]
    head = ["cell (B T H)", "pass", "jaxrnn ms"]
    head += [f"{PEER_LABELS[p]} ms" for p in peers] + [f"ratio {p}" for p in peers]
    if matmul:
        head.append("jaxrnn G multiply-adds/s (of XLA's matmul)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        for pass_ in passes:
            row = r[pass_]
            ours = row["jaxrnn"]["median_ms"]
            label = f"{r['kind']} {r['batch']} {r['time']} {r['hidden']}"
            label += network_label(r.get("layers", 1), r.get("bidirectional", False))
            if r.get("jaxrnn_devices", 1) > 1:
                label += f" [{r['jaxrnn_devices']} devices]"
            cells = [label, pass_, f"{ours:.2f}"]
            for p in peers:
                cells.append(f"{row[p]['median_ms']:.2f}" if p in row else "–")
            for p in peers:
                cells.append(f"{row[p]['median_ms'] / ours:.2f}" if p in row else "–")
            if matmul:
                rate = row["jaxrnn"]["g_multiply_adds_per_s"]
                share = 100 * rate / matmul["g_multiply_adds_per_s"]
                cells.append(f"{rate:.1f} ({share:.0f} %)")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results, passes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(passes), figsize=(6 * len(passes), 4), squeeze=False)
    for ax, pass_ in zip(axes[0], passes):
        labels = [r["cell"] for r in results]
        peers = sorted({p for r in results for p in r[pass_] if p != "jaxrnn"})
        width = 0.8 / max(len(peers), 1)
        for i, p in enumerate(peers):
            ratios = [
                r[pass_][p]["median_ms"] / r[pass_]["jaxrnn"]["median_ms"] if p in r[pass_] else 0
                for r in results
            ]
            ax.bar(np.arange(len(labels)) + i * width, ratios, width, label=PEER_LABELS[p])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels, rotation=30, ha="right")
        ax.set_ylabel("peer time / jaxrnn time")
        ax.set_title(pass_)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# `--isa avx2`: what each library reads to cap its instruction set at AVX2 (and FMA).
AVX2_ENVIRONMENT = {
    "JAXRNN_NATIVE_ARCH": "x86-64-v3",  # jaxrnn's kernel (`native._arch`)
    "XLA_FLAGS": "--xla_cpu_max_isa=AVX2",  # XLA:CPU's generated code (not its dots: above)
    "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own vectorised kernels
    "DNNL_MAX_CPU_ISA": "AVX2",  # oneDNN (PyTorch's LSTM, GRU and RNN on CPU)
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # MKL (PyTorch's matmuls)
}


def cap_isa():
    """Sets `AVX2_ENVIRONMENT` (XLA_FLAGS appended to) before JAX's backend and PyTorch
    start, and checks that PyTorch took it."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized() or "torch" in sys.modules:
        raise SystemExit("--isa: JAX's backend or PyTorch started before the cap was set")
    for name, value in AVX2_ENVIRONMENT.items():
        if name == "XLA_FLAGS":
            value = f"{os.environ.get(name, '')} {value}".strip()
        os.environ[name] = value
    try:
        import torch
    except ImportError:
        return
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        raise SystemExit(f"--isa avx2: PyTorch runs its {capability} kernels, expected AVX2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--grid", choices=("quick", "full"), default="quick")
    parser.add_argument(
        "--cells", help="comma-separated kind:batch:time:hidden, e.g. lstm:16:256:128"
    )
    parser.add_argument("--peers", default=None, help=f"comma-separated subset of {PEERS}")
    parser.add_argument("--passes", default="fwd,fwdbwd")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--matmul-dtype",
        choices=("bfloat16", "float16"),
        default=None,
        help="jaxrnn's matmul operands in this dtype, accumulating in --dtype (unroll's "
        "matmul_dtype); peers unchanged",
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=1,
        help="time networks of this many layers (jaxrnn.stack, PyTorch's num_layers, Flax's "
        "nn.RNN stacked) instead of single cells; input size = hidden size",
    )
    parser.add_argument(
        "--bidirectional",
        action="store_true",
        help="every layer both ways, outputs concatenated (with --layers)",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per cell and pass")
    parser.add_argument(
        "--warm-ms",
        type=float,
        default=None,
        help="untimed calls of the same runner for this long right before each timed one, so "
        "that the previous library's spinning worker threads (PyTorch's OpenMP pool) have gone "
        "idle (default: 30 on CPU, 0 on GPU)",
    )
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG of the ratios here")
    parser.add_argument("--tune", action="store_true", help="time the fast path per unroll")
    parser.add_argument(
        "--host-devices",
        type=int,
        default=1,
        help="CPU: run jaxrnn with the batch sharded over this many CPU devices (must come "
        "before any JAX computation in the process)",
    )
    parser.add_argument(
        "--isa",
        choices=("native", "avx2"),
        default="native",
        help="CPU: avx2 caps every library at AVX2 and FMA, as on a CPU without AVX-512: "
        "jaxrnn's kernel built for x86-64-v3, XLA's code and PyTorch's kernels (oneDNN, MKL) "
        "limited to AVX2 (must come before any JAX computation in the process)",
    )
    args = parser.parse_args(argv)
    if args.isa != "native":
        if args.device != "cpu":
            raise SystemExit("--isa: CPU only (--device cpu)")
        cap_isa()
    if args.layers < 1:
        raise SystemExit(f"--layers must be at least 1, got {args.layers}")
    network = args.layers > 1 or args.bidirectional
    if network and (args.tune or args.matmul_dtype):
        raise SystemExit("--layers/--bidirectional: not with --tune or --matmul-dtype")
    if args.host_devices > 1:
        if args.device != "cpu":
            raise SystemExit("--host-devices: CPU only (--device cpu)")
        jax.config.update("jax_num_cpu_devices", args.host_devices)

    backend = jax.default_backend()
    if (args.device == "gpu") != (backend == "gpu"):
        raise SystemExit(f"--device {args.device} but JAX's default backend is {backend!r}")
    args.passes = args.passes.split(",")
    default_peers = "torch,flax,cudnn" if args.device == "gpu" else "torch,flax"
    args.peers = (args.peers or default_peers).split(",")
    for p in args.peers:
        if p not in PEERS:
            raise SystemExit(f"--peers: {p!r} is not one of {PEERS}")
    if args.cells:
        args.cells = args.cells.split(",")
    else:
        args.cells = list(QUICK[args.device])
        if args.grid == "full":
            args.cells += [c for c in FULL_EXTRA if c not in args.cells]
    if args.reps is None:
        args.reps = 20 if args.device == "gpu" else 7
    if args.warm_ms is None:
        args.warm_ms = 0.0 if args.device == "gpu" else 30.0
    if args.device == "cpu":
        try:
            import torch

            torch.set_num_threads(os.cpu_count())
        except ImportError:
            pass

    rng = random.Random(0)
    meta = {
        "device": args.device,
        "jax": jax.__version__,
        "jax_devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        "cpu": cpu_info() if args.device == "cpu" else None,
        "dtype": args.dtype,
        "jaxrnn_matmul_dtype": args.matmul_dtype or args.dtype,
        "matmul_precision": str(jax.config.jax_default_matmul_precision or "default")
        + (" (TF32 on GPU for both JAX and PyTorch)" if args.device == "gpu" else ""),
        "reps": args.reps,
        "warm_ms": args.warm_ms,
        "host_devices": args.host_devices,
        "layers": args.layers,
        "bidirectional": args.bidirectional,
        "isa": args.isa,
        "isa_environment": {k: os.environ[k] for k in AVX2_ENVIRONMENT if args.isa != "native"},
        "torch": torch_info(args.device) if "torch" in args.peers else None,
        "unroll_table": {k: list(v) for k, v in fastpath.UNROLL_TABLE.items()},
        "pallas_table": {"/".join(k): list(v) for k, v in fastpath.PALLAS_TABLE.items()},
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    if meta["torch"] and args.device == "gpu":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        meta["torch"].update(matmul_allow_tf32=True, cudnn_allow_tf32=True)
    print(json.dumps(meta), flush=True)
    if args.tune:
        rows = []
        for cell_rows in tune(args, rng):
            rows += cell_rows
            if args.out:  # after every cell: a time limit keeps what was measured
                with open(args.out, "w") as f:
                    json.dump({"meta": meta, "tune": rows}, f, indent=1)
        return
    results = []
    matmul_dtype = args.matmul_dtype or args.dtype
    meta["xla_matmul"] = xla_matmul_rate(args.device, matmul_dtype, args.reps, rng)
    print(f"xla_matmul: {json.dumps(meta['xla_matmul'])}", flush=True)

    def write(**extra):
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "results": results, **extra}, f, indent=1)

    for spec in args.cells:
        start = time.perf_counter()
        results.append(bench_cell(spec, args, rng))
        r = results[-1]
        brief = {p: {n: round(v["median_ms"], 2) for n, v in r[p].items()} for p in args.passes}
        print(f"{spec} ({time.perf_counter() - start:.0f}s): {brief}", flush=True)
        write(complete=False)  # partial results survive a time limit
    table = markdown(results, args.passes, args.peers, meta["xla_matmul"])
    print()
    print(f"ratio = peer time / jaxrnn time (> 1: jaxrnn faster); median of {args.reps}, ")
    md = f", jaxrnn matmuls in {args.matmul_dtype}" if args.matmul_dtype else ""
    hd = f", jaxrnn batch over {args.host_devices} CPU devices" if args.host_devices > 1 else ""
    if network:
        hd += ", networks" + network_label(args.layers, args.bidirectional)
    isa = ", every library capped at AVX2" if args.isa == "avx2" else ""
    print(f"{args.device}, {args.dtype}{md}{hd}{isa}, jax {jax.__version__}")
    xm = meta["xla_matmul"]
    print(
        f"XLA's {xm['n']}×{xm['n']} {xm['dtype']} matmul in the same run: "
        f"{xm['g_multiply_adds_per_s']:.1f} G multiply-adds/s"
    )
    print(table)
    write(table=table, complete=True)
    if args.plot:
        try:
            plot(results, args.passes, args.plot)
        except ImportError as err:
            print(f"--plot skipped: {err} (pip install 'jaxrnn[plot]')", file=sys.stderr)


if __name__ == "__main__":
    main()
