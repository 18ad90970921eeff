"""Long sequences: the sequential scan against quasi-DEER, DEER and minGRU's associative scan.

For each (T, H, B) a GRU of hidden size H (input size H) runs over a random sequence with
``jaxrnn.unroll(..., method=...)``; minGRU runs with ``method="associative"`` (its own cell, so
its time is a reference point, not the same function). Forward and forward+backward are
timed (median of repeats, after compilation), and for every method the Newton iterations, the
largest deviation from the sequential result and the peak memory (XLA's compiled temporary
buffer size; on GPU also the allocator's peak) are recorded.

Usage::

    python benchmarks/long_sequence.py                 # CPU grid (a few minutes on 2 cores)
    python benchmarks/long_sequence.py --device gpu    # the issue's grid, within --budget s
    python benchmarks/long_sequence.py --T 1000 --H 16 --B 1 --methods sequential quasi_deer

Writes ``long_sequence_<device>.json``, ``.md`` and ``.png`` into ``--out`` (default
``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jaxrnn

GRIDS = {
    # The grid; "auto" ordering runs the most informative points first.
    "gpu": dict(T=[10_000, 100_000, 1_000], H=[32, 16, 64], B=[8, 1]),
    "cpu": dict(T=[1_000, 10_000], H=[16, 32], B=[8, 1]),
}
METHODS = ["sequential", "quasi_deer", "deer", "mingru"]
# DEER stores T*B*H*H Jacobian entries, several times over inside the associative scan.
DEER_MAX_ENTRIES = {"gpu": 2e8, "cpu": 2e7}


def _timeit(fn, *args, repeats: int) -> tuple[float, float]:
    """``(compile + first run, median of repeats)`` in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _peak_bytes(fn, *args) -> int | None:
    try:
        stats = fn.lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None
    return None if stats is None else int(stats.temp_size_in_bytes)


def _device_peak() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def run_point(T: int, H: int, B: int, method: str, device: str, repeats: int) -> dict:
    key = jax.random.PRNGKey(T + 7 * H + 13 * B)
    k_params, k_xs = jax.random.split(key)
    if method == "mingru":
        cell, run_method = jaxrnn.mingru(H), "associative"
    else:
        cell, run_method = jaxrnn.gru(H), method
    params = cell.init(k_params, H)
    xs = jax.random.normal(k_xs, (B, T, H), jnp.float32)
    unroll = 8 if run_method == "sequential" else 1

    def forward(params, xs):
        return jaxrnn.unroll(cell, params, xs, method=run_method, unroll=unroll, return_info=True)

    def loss(params, xs):
        ys, _ = jaxrnn.unroll(cell, params, xs, method=run_method, unroll=unroll)
        return jnp.mean(ys**2)

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss))
    row = dict(T=T, H=H, B=B, method=method, device=device)
    row["fwd_compile_s"], row["fwd_s"] = _timeit(fwd, params, xs, repeats=repeats)
    ys, _, info = fwd(params, xs)
    row["iterations"] = int(info.iterations)
    row["converged"] = bool(info.converged)
    row["residual"] = float(info.residual)
    row["fwd_temp_bytes"] = _peak_bytes(fwd, params, xs)
    row["fwd_bwd_compile_s"], row["fwd_bwd_s"] = _timeit(fwd_bwd, params, xs, repeats=repeats)
    row["fwd_bwd_temp_bytes"] = _peak_bytes(fwd_bwd, params, xs)
    row["device_peak_bytes"] = _device_peak()
    if method in ("quasi_deer", "deer"):
        ref, _ = jaxrnn.unroll(cell, params, xs)
        row["max_abs_dev"] = float(jnp.max(jnp.abs(ys - ref)))
        g_ref = jax.grad(loss)(params, xs)
        g = fwd_bwd(params, xs)[1]
        row["grad_max_rel_dev"] = float(
            max(
                jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-12)
                for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref))
            )
        )
    return row


def _fmt_ms(s):
    return "—" if s is None else f"{1e3 * s:.1f}"


def _fmt_mb(b):
    return "—" if b is None else f"{b / 2**20:.1f}"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"Device: {meta['device_kind']} ({meta['backend']}), jax {meta['jax']}, "
        f"float32, default precision. Times: median of {meta['repeats']} runs after "
        "compilation. Speed-up = sequential time / method time, same (T, H, B).",
        "",
        "| T | H | B | method | fwd ms | speed-up | fwd+bwd ms | speed-up | iters | "
        "max dev | fwd+bwd temp MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seq = {(r["T"], r["H"], r["B"]): r for r in rows if r["method"] == "sequential"}
    for r in rows:
        base = seq.get((r["T"], r["H"], r["B"]))
        if "skipped" in r:
            lines.append(
                f"| {r['T']} | {r['H']} | {r['B']} | {r['method']} | skipped: {r['skipped']} "
                "| | | | | | |"
            )
            continue
        up = lambda k, r=r, base=base: (
            f"{base[k] / r[k]:.2f}×" if base and k in base and r[k] else "—"
        )
        dev = f"{r['max_abs_dev']:.1e}" if "max_abs_dev" in r else "—"
        lines.append(
            f"| {r['T']} | {r['H']} | {r['B']} | {r['method']} | {_fmt_ms(r['fwd_s'])} | "
            f"{up('fwd_s')} | {_fmt_ms(r['fwd_bwd_s'])} | {up('fwd_bwd_s')} | "
            f"{r['iterations']} | {dev} | {_fmt_mb(r['fwd_bwd_temp_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib  # optional dependency, imported here only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in zip(axes, ["fwd_s", "fwd_bwd_s"], ["forward", "forward + backward"]):
        for method in METHODS:
            for (H, B), marker in zip(
                sorted({(r["H"], r["B"]) for r in rows}), "os^vD<>p*h"
            ):  # fmt: skip
                pts = sorted(
                    (r["T"], r[key])
                    for r in rows
                    if r["method"] == method and r["H"] == H and r["B"] == B and key in r
                )
                if pts:
                    ax.loglog(*zip(*pts), marker=marker, label=f"{method} H={H} B={B}")
        ax.set_xlabel("T (steps)")
        ax.set_ylabel("seconds")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], default=None)
    parser.add_argument("--T", type=int, nargs="*")
    parser.add_argument("--H", type=int, nargs="*")
    parser.add_argument("--B", type=int, nargs="*")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=280.0, help="seconds; stop after")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if jax.default_backend() == "cpu" else "gpu")
    grid = dict(GRIDS[device])
    for k in ("T", "H", "B"):
        if getattr(args, k):
            grid[k] = getattr(args, k)
    meta = dict(
        backend=jax.default_backend(),
        device_kind=jax.devices()[0].device_kind,
        jax=jax.__version__,
        cpu_count=os.cpu_count(),
        platform=f"{platform.system()} {platform.machine()}",
        repeats=args.repeats,
    )
    rows, start = [], time.perf_counter()
    points = [(T, H, B) for T in grid["T"] for H in grid["H"] for B in grid["B"]]
    for T, H, B in points:
        for method in args.methods:
            if time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent; stopping")
                break
            if method == "deer" and T * B * H * H > DEER_MAX_ENTRIES[device]:
                rows.append(dict(T=T, H=H, B=B, method=method, skipped="T·B·H² too large"))
                continue
            try:
                row = run_point(T, H, B, method, device, args.repeats)
            except Exception as e:  # noqa: BLE001 - record and go on (e.g. out of memory)
                row = dict(T=T, H=H, B=B, method=method, skipped=type(e).__name__)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"long_sequence_{device}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    table = markdown(rows, meta)
    with open(stem + ".md", "w") as f:
        f.write(table)
    try:
        plot([r for r in rows if "skipped" not in r], stem + ".png")
    except ImportError:
        print("matplotlib not installed: no plot")
    print(table)


if __name__ == "__main__":
    main()
