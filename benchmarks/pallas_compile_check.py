"""Compiles the persistent Pallas kernels for an H100 (sm_90a) without a GPU.

Lowers each kernel of `jaxrnn._src.pallas_rnn` (forward and backward) to Triton IR with JAX,
then compiles the IR with a separately installed ``triton`` package (its own ``ptxas``), and
reports shared memory, registers and spills per kernel. A kernel needing more than 227 KiB of
shared memory cannot launch on an H100. The Triton that JAX's GPU plugin uses may differ from
the pip one, so this is an estimate; the GPU run (``pallas_gpu.sh``) is the measurement.

    python -m venv /tmp/triton-venv && /tmp/triton-venv/bin/pip install triton
    python benchmarks/pallas_compile_check.py --triton-python /tmp/triton-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import jaxrnn
from jaxrnn._src import pallas_rnn

FACTORIES = {"elman": jaxrnn.elman, "lstm": jaxrnn.lstm, "gru": jaxrnn.gru}

# Runs under --triton-python: compiles each .ttir file named on stdin, prints JSON lines.
COMPILER = r"""
import json, os, re, subprocess, sys, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
import triton
from triton.backends.compiler import GPUTarget
bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ptxas = next(os.path.join(bin_dir, n) for n in ("ptxas-blackwell", "ptxas")
             if os.path.exists(os.path.join(bin_dir, n)))
for line in sys.stdin:
    path, warps = line.split()
    row = {"file": os.path.basename(path), "num_warps": int(warps)}
    try:
        k = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": int(warps), "num_stages": 1})
        row["shared_bytes"] = k.metadata.shared
        ptx = path + f".{warps}.ptx"
        open(ptx, "w").write(k.asm["ptx"])
        out = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.devnull],
                             capture_output=True, text=True)
        text = out.stdout + out.stderr
        regs = re.search(r"Used (\d+) registers", text)
        spill = re.search(r"(\d+) bytes spill stores", text)
        row["registers"] = int(regs.group(1)) if regs else None
        row["spill_store_bytes"] = int(spill.group(1)) if spill else None
    except Exception as e:
        row["error"] = str(e).splitlines()[-1][:300]
    print(json.dumps(row), flush=True)
"""


def dump_ttir(kind, hidden, dtype, out_dir, stream_weights=None):
    """Lowers forward and backward for CUDA; writes one ``.ttir`` file per kernel."""
    from jax._src.pallas.triton import lowering

    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = original(*args, **kwargs)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    cell = FACTORIES[kind](hidden)
    params = jax.tree_util.tree_map(
        lambda a: a.astype(dtype), cell.init(jax.random.PRNGKey(0), hidden)
    )
    xs = jnp.ones((1000, 8, hidden), dtype)

    def loss(p, x):
        ys, _ = pallas_rnn.sequence(cell, p, x, stream_weights=stream_weights)
        return jnp.sum(ys.astype(jnp.float32) ** 2)

    default_backend = jax.default_backend
    lowering.lower_jaxpr_to_triton_module = capture
    jax.default_backend = lambda: "gpu"  # lowered for CUDA below; nothing runs
    try:
        jax.jit(jax.grad(loss)).trace(params, xs).lower(lowering_platforms=("cuda",))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
        jax.default_backend = default_backend
    paths = []
    for name, asm in zip(("fwd", "bwd"), captured):
        path = os.path.join(out_dir, f"{kind}{hidden}_{jnp.dtype(dtype).name}_{name}.ttir")
        with open(path, "w") as f:
            f.write(asm)
        paths.append(path)
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton-python", required=True, help="a python with `triton` installed")
    ap.add_argument("--kinds", default="elman,lstm,gru")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--warps", default="4,8")
    ap.add_argument("--out", default=None, help="JSON lines of results")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for kind in args.kinds.split(","):
            for dtype in args.dtypes.split(","):
                for path in dump_ttir(kind, args.hidden, jnp.dtype(dtype), tmp):
                    jobs += [f"{path} {w}" for w in args.warps.split(",")]
        proc = subprocess.run(
            [args.triton_python, "-c", COMPILER], input="\n".join(jobs) + "\n",
            capture_output=True, text=True,
        )  # fmt: skip
        for line in proc.stdout.splitlines():
            rows.append(json.loads(line))
            r = rows[-1]
            print(
                f"{r['file']:26s} warps={r['num_warps']}  "
                + (
                    f"error: {r['error']}"
                    if "error" in r
                    else f"shared {r['shared_bytes'] / 1024:6.1f} KiB  registers "
                    f"{r['registers']}  spill stores {r['spill_store_bytes']} B"
                )
            )
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


if __name__ == "__main__":
    main()
