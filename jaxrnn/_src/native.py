r"""The native CPU kernel: the recurrence of the built-in cells as one XLA FFI call.

XLA:CPU runs a recurrence as a loop of separate operations: each step's matmul on one core,
then a few elementwise kernels. The kernel in ``csrc/rnn_cpu.cc`` runs the whole time loop in
one call. The hidden units are cut into one chunk per thread (the calling thread and XLA's
intra-op pool); a chunk's ``W_x`` and ``W_h`` columns (all gates of its units) are packed once
per call (by the threads, as they arrive), and computing the chunk for step ``t`` needs nothing
from other chunks but ``h_{t-1}``:

.. math::

    z^x_t = x_t W_x + b_x, \quad z_t = h_{t-1} W_h + b_{in}, \quad
    h_t, c_t = \text{gates}(z^x_t,\ z_t,\ c_{t-1})

A thread publishes each chunk it computes, and a step starts once all chunks of the previous
one are published. A chunk still unpublished after twice the time a chunk takes is computed by
the other threads too (its thread may be late, or preempted); the first copy wins. So no
thread waits for another to start or to resume.

The fast path (`fastpath.placements`) runs it on CPU in float32, without ``matmul_dtype`` or
with ``matmul_dtype=bfloat16`` where the CPU has AMX tiles or AVX512-BF16 (`bf16_available`:
the forward kernel's matmuls then multiply bfloat16 operands on the tiles, or with VDPBF16PS,
and sum in float32, its input projection in the kernel on AMX, hoisted by `HOIST_TABLE`
without; the backward kernel multiplies its float32 cotangents by ``W_h`` rounded to
bfloat16, exactly, on the tiles too, or without AMX in float32; bfloat16 inputs run as
float32 ones, `fastpath.bf16_data_on_kernel`), on an unsharded batch, in both passes: the
forward-only pass takes the outputs and final carry; the gradient pass also the residuals of
the linear JVP rule (``h`` entering each step and the per-kind arrays of
`RESIDUAL_WIDTHS`). The gradient pass's backward loop is a second kernel (`backward`): the
transpose of that rule's tangent loop, with the same chunks of units, each step finishing
``λ_h = ct_v W_hᵀ`` for its units from the previous step's published ``ct_v``.
Its input cotangent takes the buffer of the residual of the same width (each element is
read at its step before it is written). A third kernel (`input_and_weight_gradients`)
computes the input, weight and bias gradients after that loop, the three matmuls over all
steps, each cotangent read once for all: in float32 where `kernel_gradients` says so (with
``matmul_dtype=bfloat16`` without AMX, of the operands rounded to it), and on the tiles with
``matmul_dtype=bfloat16`` on AMX where `tile_gradients` says so (elsewhere XLA's dots).
It enters through `linear` (a linear primitive with a transpose of its own), so forward mode
and derivatives of every order keep XLA's loops; derivatives of the kernels' own outputs
(order two and more) are those of XLA's scan. Under ``vmap`` the kernels run once over all
examples: the forward and backward kernels take their per-step arrays as ``(runs, time,
batch, ·)``, and the vmapped axis merges into the runs by a reshape (`_batched_call`).
Batched weights (an ensemble) take a leading axis of members, each member's runs computed
with its own. The gradient kernel takes the vmapped axis as members, each with its own
weight gradients.

It is C++ compiled on first use with the system compiler (``$CXX``, else ``c++``, ``g++``
or ``clang++``; ``-O3 -march=native``, or ``-march=$JAXRNN_NATIVE_ARCH``) against the FFI
headers shipped with jaxlib, cached under ``$JAXRNN_CACHE_DIR`` (default ``~/.cache/jaxrnn``)
by a hash of the source, the flags, the jaxlib version and the CPU. Where no compiler works,
jaxrnn warns once and keeps XLA's loop (the same function); where the CPU has neither AVX-512
nor AVX2 (or is not x86), it keeps XLA's loop without a warning, and without compiling
where it can tell beforehand (ARM; Linux's CPU flags: `available`).
``JAXRNN_NATIVE=0`` turns the kernel off; ``JAXRNN_NATIVE_THREADS=n`` caps its threads
(default: the cores this process may run on).

Its ``exp`` is a degree-6 polynomial (relative error about 2e-7): results agree with XLA's
loop to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

TARGET = "jaxrnn_rnn_forward_cpu"
TARGET_BACKWARD = "jaxrnn_rnn_backward_cpu"
TARGET_GRADIENTS = "jaxrnn_rnn_gradients_cpu"
SOURCE = pathlib.Path(__file__).with_name("csrc") / "rnn_cpu.cc"
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-pthread")
_LIBRARIES: dict = {}  # the loaded kernel, kept alive for the process
KIND_CODES = {"elman_tanh": 0, "elman_relu": 1, "lstm": 2, "gru": 3}


def _setting() -> str:
    """``JAXRNN_NATIVE``, trimmed and lower-cased (``1`` when unset)."""
    return os.environ.get("JAXRNN_NATIVE", "1").strip().lower()


def enabled() -> bool:
    """False when ``JAXRNN_NATIVE`` is ``0``, ``false``, ``no`` or ``off``."""
    return _setting() not in ("0", "false", "no", "off")


def _forced() -> bool:
    """``JAXRNN_NATIVE=always``: the kernel also where its vectors are not one register (a
    build without AVX2; for tests, see `available`)."""
    return _setting() == "always"


def _count(name: str) -> int:
    """A non-negative integer from the environment variable ``name`` (0 when unset)."""
    value = os.environ.get(name, "0").strip() or "0"
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return count


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        path = shutil.which(name) if name else None
        if path:
            return path
    return None


def _arch() -> str:
    """The ``-march`` the kernel is compiled for: ``JAXRNN_NATIVE_ARCH``, else ``native``
    (this CPU's every feature). A baseline such as ``x86-64-v3`` (AVX2 and FMA, no AVX-512)
    or ``x86-64`` builds the kernel's portable code, as on a CPU without those features;
    the tests and `benchmarks/speed.py` use it to run that code here."""
    arch = os.environ.get("JAXRNN_NATIVE_ARCH", "").strip() or "native"
    if not all(c.isalnum() or c in "-_." for c in arch):
        raise ValueError(
            f"JAXRNN_NATIVE_ARCH must be a -march name such as native or x86-64-v3, got {arch!r}"
        )
    return arch


def _cpu_signature() -> str:
    """What ``-march=native`` compiled for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("JAXRNN_CACHE_DIR")
    if root:
        return pathlib.Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxrnn"


def _build(compiler: str) -> pathlib.Path:
    """Compiles the kernel into the cache (once per source, flags, jaxlib and CPU)."""
    include = jax.ffi.include_dir()
    flags = (*FLAGS, f"-march={_arch()}")
    key = hashlib.sha256()
    parts = (SOURCE.read_text(), " ".join(flags), compiler, jax.__version__, include)
    for part in (*parts, _cpu_signature()):
        key.update(part.encode())
        key.update(b"\0")
    name = f"rnn_cpu-{key.hexdigest()[:16]}.so"
    for directory in (_cache_dir(), pathlib.Path(tempfile.gettempdir()) / "jaxrnn"):
        path = directory / name
        if path.exists():
            return path
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
        except OSError:
            continue
        os.close(fd)
        cmd = [compiler, *flags, "-I", include, str(SOURCE), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, path)  # atomic: concurrent builders leave one complete file
        return path
    raise RuntimeError(f"no writable cache directory for the kernel (tried {_cache_dir()})")


def on_x86_64() -> bool:
    """Whether this is an x86-64 CPU (Linux's ``x86_64``, Windows' ``AMD64``), where the kernel
    has its vector builds; jaxlib has no other x86."""
    return platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags as Linux lists them (``/proc/cpuinfo``), or None where it
    does not (another OS, or an unreadable file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def _may_have_vectors() -> bool:
    """Whether a build of the kernel here may have vectors of one register (`vector_lanes`
    above 0), asked before compiling it, so that a CPU where the kernel stays off neither
    waits for the compiler nor sees its warnings: False on a CPU other than x86 (ARM), and,
    built for this CPU (``-march=native``), on one that Linux lists without AVX2 or FMA.
    Elsewhere (a named ``JAXRNN_NATIVE_ARCH``, flags unknown) the build answers."""
    if not on_x86_64():
        return False
    if (os.environ.get("JAXRNN_NATIVE_ARCH", "").strip() or "native") != "native":
        return True  # (`_load` checks the name, and warns where it is bad)
    flags = _cpu_flags()
    return flags is None or {"avx2", "fma"} <= flags


def available() -> bool:
    """Whether the kernel is on, compiled and registered (compiles it on the first call), and
    built with AVX-512 or AVX2.

    False, with one warning saying why, where it cannot be built; False without a warning
    when ``JAXRNN_NATIVE=0`` (read at every trace, so it also turns the kernel off for
    functions traced later in the same process), and where the build has neither AVX-512 nor
    AVX2 and FMA (x86-64's SSE2 baseline, or ARM; or ``JAXRNN_NATIVE_ARCH`` naming such a
    CPU): its vectors (16 lanes for AVX-512, 8 for AVX2) are then not one register, and GCC
    splits them through the stack (`jaxrnn_vector_lanes` in the C++ has the numbers).
    ``JAXRNN_NATIVE=always`` runs such a build anyway (the tests check its results). Where
    the CPU tells beforehand that the build would have neither (`_may_have_vectors`: ARM, an
    x86 CPU without AVX2), it is not compiled unless forced.
    """
    if not enabled() or not (_forced() or _may_have_vectors()):
        return False
    return _load() and (vector_lanes() > 0 or _forced())


@functools.cache
def vector_lanes() -> int:
    """The lanes of the loaded kernel's vectors: 16 (AVX-512), 8 (AVX2 and FMA), or 0 (a build
    with neither). Call after `_load`."""
    return int(_LIBRARIES[TARGET].jaxrnn_vector_lanes())


@functools.cache
def _load() -> bool:
    try:
        if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "include_dir"):
            raise RuntimeError(f"jax {jax.__version__} has no jax.ffi")
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
        path = _build(compiler)
        if TARGET not in _LIBRARIES:  # registered once per process
            lib = ctypes.CDLL(str(path))
            for target, symbol in (
                (TARGET, "JaxrnnRnnForward"),
                (TARGET_BACKWARD, "JaxrnnRnnBackward"),
                (TARGET_GRADIENTS, "JaxrnnRnnGradients"),
            ):
                capsule = jax.ffi.pycapsule(getattr(lib, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            _LIBRARIES[TARGET] = lib
    except Exception as err:  # any failure means: keep XLA's loop
        warnings.warn(
            f"jaxrnn: the native CPU kernel is unavailable ({err}); the time loop runs in "
            "XLA (same results, slower). Set JAXRNN_NATIVE=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


def bf16_available() -> bool:
    """Whether the kernels can run ``matmul_dtype=bfloat16``'s matmuls: the kernel is
    available (`available`, so also off with ``JAXRNN_NATIVE=0``) and was compiled for a CPU
    with AMX tiles (Intel Sapphire Rapids and later) that the OS grants, or with AVX512-BF16
    (AMD Zen 4 and later; Intel Cooper Lake). Where not, ``matmul_dtype`` keeps XLA's loop.
    Without AMX (`amx_available`) only the forward kernel multiplies in bfloat16; the
    gradient pass's backward loop multiplies its float32 cotangents by ``W_h`` rounded to
    bfloat16 as float32 (the same exact products), and its input and weight gradients are
    the float32 kernel's on rounded operands where `kernel_gradients` says so, XLA's dots
    elsewhere."""
    return available() and _bf16()


def amx_available() -> bool:
    """Whether `bf16_available` runs on AMX tiles, where the backward kernel's bfloat16
    products of the three-part cotangent and `input_and_weight_gradients` run (three tile
    products each beat one float32 one there; with AVX512-BF16 they would not)."""
    return available() and _amx()


@functools.cache
def _amx() -> bool:
    return bool(_LIBRARIES[TARGET].jaxrnn_amx_available())


@functools.cache
def _bf16() -> bool:
    return bool(_LIBRARIES[TARGET].jaxrnn_bf16_available())


def supports(kind: str, hidden: int, dtype) -> bool:
    """Whether the kernel takes this cell: a built-in kind, float32, a hidden size.

    Does not compile anything; `available` says whether the kernel can run. Empty inputs are
    left to the caller (`fastpath.placements`).
    """
    return kind in KIND_CODES and jnp.dtype(dtype) == jnp.float32 and hidden > 0


# Per kind, the widths (in gates of H) of the residual arrays the gradient pass needs, as
# `fastpath`'s primal step returns them: Elman (h,); LSTM (slopes of i, f, g, o; f;
# o·tanh'(c)); GRU ([r, z, n], hn). The first is as wide as the backward loop's input
# cotangent, which `backward` writes over it.
RESIDUAL_WIDTHS = {"elman_tanh": (1,), "elman_relu": (1,), "lstm": (4, 1, 1), "gru": (3, 1)}


# Where the input projection runs before the kernel: ``(W_x elements at least, batch at
# most)``, the first row that matches decides. In each step the kernel multiplies the step's
# ``x_t`` by all of ``W_x`` again; at a small batch that reads ``W_x`` (from L2, or from L3
# when a thread's share of the weights is larger than its core's L2) for a few multiply-adds
# per element, where one matmul over all steps is bound by the FLOPs. One table per size of
# L2 (`_l2_bytes`): hoisted, the kernel streams ``W_h`` alone, whose share fits in a 2 MiB
# L2 where ``[W_x; W_h]``'s does not. Measured (forward, T=100, input size H; in-kernel time
# / hoisted time): on a 2-core AMD EPYC (Zen 4, 1 MiB of L2 a core): LSTM B1 H1024 3.07 (the
# gradient pass 1.87), B8 H1024 1.70, B16 H1024 1.14, B64 H1024 0.92; LSTM B4 H512 1.31, B8
# H512 0.95, B16 H512 0.92; LSTM B4 H256 1.97, B8 H256 0.86; LSTM B1 H128 0.92, B4 H128
# 0.99; GRU B1 H1024 2.13, B16 H1024 1.17; GRU B4 H512 1.28, B8 H512 0.94; Elman B4 H1024
# 1.40, B8 H1024 0.97. On a 2-core Intel Xeon (Sapphire Rapids, 2 MiB), forward /
# forward+backward: LSTM B8 H512 1.39 / 1.23, B16 H512 1.10 / 1.12, B32 H512 0.83 / 0.97;
# LSTM B16 H384 1.08 / 1.06; LSTM B8 H256 0.91 / 1.03, B4 H256 0.98 / 1.20; GRU B8 H512
# 1.33 / 1.21, B16 H512 1.16 / 1.11; Elman B8 H1024 1.33 / 1.16, B16 H1024 1.16 / 1.11; LSTM
# B1 H1024 1.76 / 1.46, B8 H1024 1.21 / 1.20. Since the kernels' matmuls prefetch the next
# block of large weights (`gemm_acc`), LSTM B16 H512 measured 0.99 / 0.99 there (the table
# unchanged).
# At one row, from 4096 elements of ``W_x`` (on the AMD machine; not measured on the Intel
# one): the kernel's product of one row reads each weight for one multiply-add, bound by
# what L1 and L2 deliver (alone, B1 K128 N128: 0.6 µs, about 30 bytes a cycle), where the
# matmul over all steps is bound by the FLOPs. Forward, in-kernel / hoisted, interleaved
# medians of three to five runs: T1000 Elman B1 H64 1.09-1.12, H128 1.28-1.39, H256
# 1.06-1.22; GRU B1 H64 1.21-1.31, H96 1.38-1.40, H128 1.38-1.45; LSTM B1 H64 1.12-1.38,
# H96 1.35-1.37, H128 0.95-1.22; T100 Elman B1 H128 1.13-1.26, GRU B1 H128 1.22-1.25, LSTM
# B1 H64 1.07-1.20, H128 0.97-1.01. The gradient pass of the LSTM and GRU (the Elman's
# runs in XLA's loop below B8 H256): 0.99-1.20, GRU B1 T1000 H128 1.03-1.20. At B2 it
# was mixed (T1000 H128: Elman 1.36, GRU 1.01, LSTM 0.79), so only one row.
# Those rows of the AMD table were measured against the kernel's per-step product of the
# step's few rows. Since the kernel projects a block of steps at once where a step has at
# most 4 rows (`projection_block` in the C++, which has the measurements), that block beats
# hoisting on the AMD machine up to H512 at B1 and B4, and the table there hoists at B <= 4
# only at B1 from 2^20 elements (Elman H1024, the LSTM and GRU from H1024, and the LSTM H512,
# where the two tie). The Intel table was not measured again.
HOIST_TABLES = {
    "l2_under_2mib": ((1 << 21, 16), (1 << 20, 1)),
    "l2_2mib": ((1 << 19, 16), (1 << 17, 4)),
}


def _l2_bytes() -> int | None:
    """The first CPU's L2 cache in bytes (Linux's sysfs), or None where unknown."""
    base = pathlib.Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(base.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * scale
    except (OSError, ValueError):
        return None
    return None


def _hoist_table():
    """This machine's row of `HOIST_TABLES`, by the size of its L2 (a smaller one where
    unknown)."""
    l2 = _l2_bytes()
    return HOIST_TABLES["l2_2mib" if l2 is not None and l2 >= 2 << 20 else "l2_under_2mib"]


HOIST_TABLE = _hoist_table()

# Whether the kernels may run 4-6 rows a thread as independent groups (each thread reading
# all of the weights, no hand-off of h between threads) rather than all rows together with
# the units cut between the threads (`row_groups` in the C++, which has the measurements):
# where L2 has 2 MiB or more (`_l2_bytes`; measured faster on an Intel Xeon, Sapphire Rapids,
# LSTM B8 T100 H128 fwd / fwd+bwd 1.12 / 1.15), not with less (on an AMD EPYC, Zen 4, 1 MiB a
# core: 0.77-0.82 / 0.90-0.93).
SMALL_GROUPS = (_l2_bytes() or 0) >= 2 << 20


def hoists(batch: int, features: int, hidden: int, gates: int) -> bool:
    """Whether the input projection ``xs W_x + b_x`` runs before the kernel, as one matmul
    over all steps, rather than in each step of it (`HOIST_TABLE`). ``batch`` is the batch of
    one call as traced (under ``vmap``, of one example)."""
    size = features * gates * hidden
    return any(size >= least and batch <= most for least, most in HOIST_TABLE)


# Where the float32 gradient pass's input and weight gradients (``dx = ct W_xᵀ``, ``dW_x = xᵀ
# ct``, ``dW_h = h_inᵀ ct``, the bias sums) run on the kernel (`input_and_weight_gradients`)
# rather than as XLA's dots: at least GRADIENT_MIN_ROWS rows (steps × batch), and ``features +
# hidden`` at most GRADIENT_NARROW, or at most GRADIENT_WIDEST with the rows at least
# GRADIENT_ROWS_PER_WIDTH times it.
# Measured on a 2-core AMD EPYC (Zen 4), the three products and the sums alone, interleaved
# medians, XLA's time / the kernel's, rows × I × H × G·H: narrow, where XLA's dots run at
# 30-80 G multiply-adds a second: 200 × 128 × 128 × 512 1.52, 400 1.40, 1000 1.91, 6400
# 1.55, 25600 1.29; GRU (two cotangents) 800 × 128 × 128 × 384 1.17, 25600 1.24; 256 × 64 ×
# 64 × 256 1.27; but 100 × 128 × 128 × 512 0.88-0.95. Wider, where both run at 90-100:
# 1000 × 256 × 256 × 1024 1.01, 4096 1.09, 25600 1.21; 4096 × 384 × 384 × 1536 1.00;
# 6400 × 512 × 512 × 2048 1.04-1.11, 8192 1.03; and where a block of rows is few against the
# weights (each thread sums all of them): 100 × 256 × 256 × 1024 0.71, 800 × 512 × 512 ×
# 2048 0.86, 1000 0.95, 100 × 1024 × 1024 × 4096 0.54, 800 0.88.
# The same rule places ``matmul_dtype=bfloat16``'s gradients where there is no AMX, the kernel
# rounding the operands itself (``rounded``). Against XLA's dots of bfloat16 operands and
# float32 cotangents (faster than its float32 dots at these sizes), alone: 200 × 128 × 128 ×
# 512 0.91-1.05, 1000 0.98, 4096 1.22; 800 × 128 × 128 × 128 1.34, 1600 1.47, 8000 1.42;
# 3200 × 128 × 128 × 512 1.21; 8192 × 512 × 512 × 2048 0.83-0.91 (end to end even there,
# LSTM B64 T128 H512 551-561 against 552-556 ms; XLA's dots take it, below). End to end,
# fwd+bwd, kernel / XLA's dots in one process: Elman B8 T100 H128 1.39 / 1.66 ms, LSTM B8
# 4.87 / 5.30, Elman B16 T256 6.10 / 7.39. Rounding ``x`` and ``h_in`` in XLA before the
# kernel instead cost 2.4 ms a call at GRU B64 T100 H128 and pushed its temporaries past
# 32 MiB (fresh pages every call).
# Past 512 inputs and units, measured again on 2026-12-06 (same machine): 8192 × 512 × 512 ×
# 2048 0.84-0.94 in six runs, 16384 0.90-0.94; end to end (fwd+bwd, in one process, kernel /
# XLA's dots) LSTM B64 T128 H512 667 / 611 and 632 / 618 ms, where at 512 LSTM B32 T128 H256
# measured 83.0 / 85.1 and B64 160.3 / 159.9. So the kernel stops at GRADIENT_WIDEST.
# The same rule on a 2-core Intel Xeon (Sapphire Rapids, 2 MiB of L2 a core), 2026-12-06,
# alone as above: 100 × 128 × 128 × 512 1.02, 200 1.40, 1000 1.54, 6400 1.28, 25600 1.23;
# 800 × 128 × 128 × 384 1.48, 25600 1.18; 256 × 64 × 64 × 256 1.25; 1000 × 256 × 256 × 1024
# 0.94, 2048 1.07, 4096 0.98-1.01, 8192 1.03, 25600 1.07; 4096 × 384 × 384 × 1536 0.80-0.84;
# 800 × 512 × 512 × 2048 0.85, 8192 0.83.
GRADIENT_MIN_ROWS = 200
GRADIENT_NARROW = 256
GRADIENT_WIDEST = 512
GRADIENT_ROWS_PER_WIDTH = 8


# Where ``matmul_dtype=bfloat16``'s input and weight gradients run on the AMX tiles
# (`input_and_weight_gradients` without ``f32_operands``) rather than as XLA's dots of the
# bfloat16 operands: where the weight gradients' ``(features + hidden) × columns`` elements
# are at most GRADIENT_TILE_ELEMENTS_PER_ROW times the rows. Each thread sums the weight
# gradients of its rows into a float32 copy of its own (zeroed, then added up after the
# products), so where the rows are few against the weights the copies cost more than the
# tiles save. Measured on a 2-core Intel Xeon (Sapphire Rapids), forward+backward, ms, XLA's
# dots / the tiles, in one process (T = 100): LSTM B1 H1024 104 / 148, B2 115 / 153, B4 128 /
# 157, B8 179 / 191, B16 303 / 268; Elman B1 H1024 14.6 / 21.3; LSTM B1 H512 16.2 / 19.8, B2
# 21.7 / 22.7, B4 31.7 / 26.8, B8 44.7 / 35.7; GRU B2 H512 14.8 / 12.6, B4 21.3 / 17.2;
# Elman B1 H512 2.97 / 2.98, B4 7.58 / 5.40; LSTM B1 H256 3.59 / 3.16, B2 5.23 / 4.22; GRU
# B1 H256 2.68 / 2.56; LSTM B1 H128 1.52 / 1.44; GRU B1 H128 1.17 / 1.20. (The three
# products and the sums alone, where the rows are few, favour XLA's dots more: 100 × 512 ×
# 512 × 2048 0.45, 400 0.85, 800 1.11 XLA's time / the tiles'; 100 × 128 × 128 × 512 0.89.)
GRADIENT_TILE_ELEMENTS_PER_ROW = 8192


def tile_gradients(rows: int, features: int, hidden: int, columns: int) -> bool:
    """Whether ``matmul_dtype=bfloat16``'s input and weight gradients run on the AMX tiles
    (where `amx_available`) for ``rows`` rows of ``features`` inputs and ``hidden`` units,
    ``columns`` (gates × hidden) wide (the batch as traced: under ``vmap``, of one example)."""
    return rows * GRADIENT_TILE_ELEMENTS_PER_ROW >= (features + hidden) * columns


def kernel_gradients(rows: int, features: int, hidden: int) -> bool:
    """Whether the float32 gradient pass's input and weight gradients (also those of
    ``matmul_dtype=bfloat16`` without AMX) run on the kernel (`input_and_weight_gradients`)
    for ``rows`` rows of ``features`` inputs and ``hidden`` units (the batch as traced: under
    ``vmap``, of one example)."""
    width = features + hidden
    return rows >= GRADIENT_MIN_ROWS and (
        width <= GRADIENT_NARROW
        or (width <= GRADIENT_WIDEST and rows >= GRADIENT_ROWS_PER_WIDTH * width)
    )


def _flags(mask, resets):
    """``mask`` and ``resets`` as the kernels take them: ``(time, batch)`` bool, or empty."""
    return tuple(jnp.zeros((0,), bool) if f is None else f for f in (mask, resets))


def _attributes(kind, reverse):
    return {
        "kind": np.int32(KIND_CODES[kind]),
        "reverse": bool(reverse),
        "threads": np.int32(_count("JAXRNN_NATIVE_THREADS")),
        # Tests only: run the rows as this many independent groups, one thread each (0: the
        # kernel's own choice, `row_groups` in the C++).
        "groups": np.int32(_count("JAXRNN_NATIVE_GROUPS")),
        # Whether the kernel's choice may cut the rows into groups of 4 a thread
        # (`SMALL_GROUPS`).
        "small_groups": SMALL_GROUPS,
        # Tests only: every thread also computes every chunk not yet published, so that the
        # publication race (one copy wins) runs at every step.
        "duplicate": os.environ.get("JAXRNN_NATIVE_DUPLICATE") == "1",
        # Transparent huge pages under large fresh result buffers (`advise_huge_pages` in the
        # C++); JAXRNN_NATIVE_HUGEPAGES=0 leaves them to the system's default.
        "huge_pages": os.environ.get("JAXRNN_NATIVE_HUGEPAGES") != "0",
        # Tests only: the rows of W a block of the float32 matmuls takes (0: the kernel's
        # choice by the size of L1, `panel_rows` in the C++). The sums are the same.
        "panel_rows": np.int32(_count("JAXRNN_NATIVE_PANEL_ROWS")),
    }


def _batched_call(target, out_shapes, attributes, weights, aliases=None):
    """The FFI call of ``target``, with a batching rule that runs the kernel once.

    The kernels take their per-step arrays as ``(N, time, B', ...)``, ``N`` runs of the
    sequence of ``B'`` rows each, and their carries as ``(N·B', ...)``: ``out_shapes(N, time,
    B')`` gives the results from the first operand's shape. ``weights`` gives, per operand,
    the rank of a weight (``None``: not a weight). Under ``vmap`` the vmapped axis merges into
    the leading axis of every other operand (broadcast where unbatched) by a reshape, the
    kernel runs once over all examples and the results are split again: no transposes. With
    the weights unbatched, every example shares them. A batched weight (an ensemble) gives
    every weight a leading axis of ``E`` members (broadcast where unbatched; merged with one
    it has already under nested ``vmap``), and the kernel runs each member's ``N / E`` runs
    with its own weights. (XLA's ``ffi_call`` has no batching method that merges the vmapped
    axis into an axis of our choice.) ``aliases``: ``{operand: result}``, operands whose
    buffer a result takes (``ffi_call``'s ``input_output_aliases``).
    """

    def kernel(*args):
        call = jax.ffi.ffi_call(
            target, out_shapes(*args[0].shape[:3]), input_output_aliases=aliases
        )
        return call(*args, **attributes)

    call = jax.custom_batching.custom_vmap(lambda *args: kernel(*args))

    @call.def_vmap
    def rule(size, in_batched, *args):
        if size == 0:  # no example: nothing to run
            structs = [jax.ShapeDtypeStruct(a.shape[1:] if b else a.shape, a.dtype)
                       for a, b in zip(args, in_batched)]  # fmt: skip
            outs = jax.eval_shape(kernel, *structs)
            return [jnp.zeros((0, *o.shape), o.dtype) for o in outs], [True] * len(outs)
        members = any(
            r is not None and (b or a.ndim > r) for a, b, r in zip(args, in_batched, weights)
        )
        merged = []
        for a, b, r in zip(args, in_batched, weights):
            if r is None and a.size == 0 or r is not None and not members:
                merged.append(a)  # empty operands and shared weights stay
                continue
            a = a if b else jnp.broadcast_to(a, (size, *a.shape))
            if r is None or a.ndim > r + 1:  # runs, or members already: merged
                a = a.reshape(size * a.shape[1], *a.shape[2:])
            merged.append(a)
        outs = call(*merged)
        batched = [o.size > 0 for o in outs]
        return [o.reshape(size, -1, *o.shape[1:]) if b else o
                for o, b in zip(outs, batched)], batched  # fmt: skip

    return call


def _runs(a):
    """A per-step array ``(time, batch, ...)`` as one run, ``(1, time, batch, ...)``; ``None``
    (an absent mask) stays."""
    return None if a is None else a[None]


def _layout(batch_major):
    """``(runs, rows)``: a per-step array in the kernels' layout ``(runs, time, rows per run,
    ...)`` and back. Time-major ``(time, batch, ...)`` is one run of all rows (`_runs`);
    batch-major ``(batch, time, ...)`` one run per row. ``None`` stays."""
    if batch_major:
        return (lambda a: None if a is None else a[:, :, None]), (lambda a: a[:, :, 0])
    return _runs, (lambda a: a[0])


def forward(
    kind, xs, w_x, b_x, w_h, b_in, carry, mask, resets, reverse, save=False, batch_major=False,
    residuals=True, bf16=False,
):  # fmt: skip
    """The recurrence over ``xs: (time, batch, features)``, as `fastpath`'s scan computes it.

    ``w_x: (features, gates·H)``, ``w_h: (H, gates·H)``; ``b_x`` the input-side bias (for the
    LSTM and Elman cells both biases summed), ``b_in`` the GRU's recurrent bias ``(3H,)``;
    either may be ``None``. With ``w_x`` ``None``, ``xs`` is the input projection already,
    ``xs W_x + b_x: (time, batch, gates·H)`` (`hoists`), and ``b_x`` is ignored. ``carry``:
    ``(h,)`` or ``(h, c)`` of ``(batch, H)``; ``mask``/``resets``: ``(time, batch)`` bool or
    ``None``. Returns ``(ys, carry)``, and with ``save`` ``(ys, carry, (h_in, residuals))``:
    the carry's ``h`` entering each step and the kind's residuals (`RESIDUAL_WIDTHS`), each
    ``(time, batch, ·)``; with ``residuals=False`` the residuals are ``()`` (not written: the
    Elman's caller takes its ``h`` from ``ys``).

    With ``batch_major`` every per-step array is ``(batch, time, ·)`` instead (``mask`` and
    ``resets`` ``(batch, time)``), inputs and outputs: the kernel runs each sequence as a run
    of one row, with no transposes.

    With ``bf16`` the matmuls multiply the operands rounded to bfloat16 and sum the products
    in float32, on AMX tiles or with AVX512-BF16's VDPBF16PS (`bf16_available`):
    ``matmul_dtype=bfloat16``.
    """
    hidden, width = w_h.shape
    runs, rows = _layout(batch_major)
    f32 = jnp.float32
    zeros = jnp.zeros((width,), f32)
    h0 = carry[0]
    c0 = carry[1] if len(carry) > 1 else h0
    widths = RESIDUAL_WIDTHS[kind] if save and residuals else ()

    def out_shapes(runs, time, batch):
        step = (runs, time, batch)
        out = [(*step, hidden), (runs * batch, hidden), (runs * batch, hidden)]
        out.append((*step, hidden) if save else (0,))
        out += [(*step, widths[k] * hidden) if k < len(widths) else (0,) for k in range(4)]
        return [jax.ShapeDtypeStruct(shape, f32) for shape in out]

    weights = (None, 2, 1, 2, 1, None, None, None, None)  # w_x, b_x, w_h, b_in
    attributes = {**_attributes(kind, reverse), "bf16": bool(bf16)}
    call = _batched_call(TARGET, out_shapes, attributes, weights)
    ys, h, c, h_in, *res = call(
        runs(xs),
        jnp.zeros((0, width), f32) if w_x is None else w_x,
        zeros if b_x is None or w_x is None else b_x,
        w_h,
        zeros if b_in is None else b_in,
        h0,
        c0,
        *_flags(runs(mask), runs(resets)),
    )
    carry = (h, c) if len(carry) > 1 else (h,)
    if not save:
        return rows(ys), carry
    return rows(ys), carry, (rows(h_in), tuple(rows(r) for r in res[: len(widths)]))


# Per kind, how many arrays the backward loop reads to make its coefficients from
# (`fastpath._coefficient_inputs`): Elman (h,); LSTM (slopes of i, f, g, o; f; o·tanh'(c)),
# the coefficients themselves; GRU ([r, z, n], hn, h_in). Made in the loop, the Elman's and
# GRU's coefficients cost no pass over memory of their own: measured on 2 cores, GRU B16 T256
# H128 fwd+bwd 20.3-20.8 against 19.3-20.3 ms (three alternating pairs of runs).
COEFFICIENTS = {"elman_tanh": 1, "elman_relu": 1, "lstm": 3, "gru": 3}


def backward(
    kind, ct_ys, ct_carry, coef, w_h, mask, resets, reverse, batch_major=False, bf16=False
):
    """The transpose of `fastpath`'s tangent loop: the backward loop of the gradient pass.

    ``ct_ys: (time, batch, H)`` and ``ct_carry`` (``(h,)`` or ``(h, c)`` of ``(batch, H)``)
    are the cotangents of the tangent loop's outputs; ``coef`` the per-step arrays its
    coefficients are made from (`COEFFICIENTS`), ``w_h: (H, gates·H)``. Returns ``(ct_u,
    ct_v, ct_carry0)``: the cotangents of the loop's per-step input ``(time, batch,
    gates·H)``, of the GRU's separate recurrent input (``None`` for the other kinds) and of
    the initial carry. ``ct_u`` takes the buffer of ``coef[0]`` (the Elman's, of ``ct_ys``).
    With ``batch_major`` every per-step array is ``(batch, time, ·)`` instead, inputs and
    outputs (``mask`` and ``resets`` ``(batch, time)``), as in `forward`.

    With ``bf16`` ``w_h`` holds bfloat16 values (``matmul_dtype=bfloat16``'s tangent loop
    multiplies by it so, in float32), and the kernel multiplies ``ct_v W_hᵀ`` on AMX tiles
    (or VDPBF16PS, `bf16_available`; `fastpath` uses it only on tiles, `amx_available`):
    ``ct_v`` as the sum of three bfloat16 parts (its top, middle and low 8 bits), each product
    exact, so the result is float32's.
    """
    hidden, width = w_h.shape
    f32 = jnp.float32
    empty = jnp.zeros((0,), f32)
    runs, rows = _layout(batch_major)
    coef = [runs(c) for c in coef] + [empty] * (6 - len(coef))
    gru = kind == "gru"

    def out_shapes(runs, time, batch):
        out = [(runs, time, batch, width), (runs, time, batch, width) if gru else (0,)]
        out += [(runs * batch, hidden), (runs * batch, hidden)]
        return [jax.ShapeDtypeStruct(shape, f32) for shape in out]

    ct_h = ct_carry[0]
    ct_c = ct_carry[1] if len(ct_carry) > 1 else jnp.zeros_like(ct_h)
    weights = (None,) * 9 + (2, None, None)  # w_h
    # ct_u is written over coef[0] (operand 3), as wide and read element by element before
    # the kernel writes it: the gradient pass allocates one sequence array less. Measured on
    # 2 cores, fwd+bwd, interleaved, without / with: LSTM B64 T100 H128 1.21 (the gradient's
    # temporary memory then fits in what the allocator keeps: no page faults), B256 T100 H128
    # 1.085, B16 T256 H128 1.04, B64 T128 H512 1.04; GRU B256 T100 H128 1.10, B16 T256 H128
    # 1.055, B64 T128 H512 1.03; Elman B64 T100 H128 1.03. Where XLA cannot give the buffer
    # away (the residual is read again later, or is a jitted function's argument), it copies
    # it first. The Elman's ct_u is written over ct_ys (operand 0, as wide) instead: its
    # residual may be the outputs themselves (`fastpath._native_primal`), which the caller
    # may still read.
    call = _batched_call(
        TARGET_BACKWARD, out_shapes, {**_attributes(kind, reverse), "bf16": bool(bf16)}, weights,
        aliases={0 if kind.startswith("elman") else 3: 0},
    )  # fmt: skip
    ct_u, ct_v, ct_h0, ct_c0 = call(
        runs(ct_ys), ct_h, ct_c, *coef, w_h, *_flags(runs(mask), runs(resets))
    )
    ct_u, ct_v = rows(ct_u), rows(ct_v) if gru else None
    ct_carry0 = (ct_h0, ct_c0) if len(ct_carry) > 1 else (ct_h0,)
    return ct_u, ct_v, ct_carry0


def input_and_weight_gradients(
    xs, h_in, w_x, ct_x, ct_h=None, want_dx=True, f32_operands=False, rounded=False
):
    r"""The gradient pass's three matmuls after the backward loop, over all rows at once, and
    the bias gradients: in float32 (``f32_operands``, `kernel_gradients` says where)

    .. math::

        dx = ct_x W_x^T, \quad dW_x = x^T ct_x, \quad dW_h = h_{in}^T ct_h, \quad
        db_x = \textstyle\sum_r ct_x, \quad db_h = \textstyle\sum_r ct_h

    the transpose of the tangent rule's input terms ``dx W_x + x dW_x + db_x`` and ``h_{in}
    dW_h + db_h`` (`fastpath._input_terms`), or else on AMX tiles (`amx_available`)

    .. math::

        dx = ct_x \, \mathrm{bf16}(W_x)^T, \quad dW_x = \mathrm{bf16}(x)^T ct_x, \quad
        dW_h = \mathrm{bf16}(h_{in})^T ct_h

    the transpose of ``matmul_dtype=bfloat16``'s terms (`fastpath._dot`: the float32 tangent
    times the bfloat16 operand, in float32). The same products without AMX: ``f32_operands``
    and ``rounded`` (the kernel rounds ``x`` and ``h_in`` block by block, so no rounded copy
    of them is made). ``xs: (rows, I)``, ``h_in: (rows, H)``, ``w_x:
    (I, gates·H)``, ``ct_x, ct_h: (rows, gates·H)`` (``ct_h`` ``None``: ``ct_x``, as for the
    cells whose two terms are summed). The kernel reads each block of rows of a cotangent
    from memory once for all three products and the bias gradient: in float32 it packs each
    slice of its columns for the tiles of the float32 matmuls; for AMX it splits it into three
    exact bfloat16 parts (`backward`'s ``split3``), so each product is float32's. Either way
    only the order of the float32 sums differs from XLA's dots. Returns ``(dx, dW_x, dW_h,
    db_x, db_h)``; ``dx`` is ``None`` unless ``want_dx``.

    Under ``vmap`` the kernel runs once: the vmapped axis becomes a leading axis of members,
    each with its own rows and weight gradients (and its own ``W_x`` where that is batched).
    """
    f32 = jnp.float32
    rows, width = ct_x.shape
    merged = ct_h is None

    def out_shapes(members, rows, features, hidden):
        dx = (members, rows, features) if want_dx else (0,)
        db_h = (0,) if merged else (members, width)
        shapes = (dx, (members, features, width), (members, hidden, width), (members, width), db_h)
        return [jax.ShapeDtypeStruct(s, f32) for s in shapes]

    def kernel(x, h, w, cx, ch):
        call = jax.ffi.ffi_call(
            TARGET_GRADIENTS, out_shapes(x.shape[0], x.shape[1], x.shape[2], h.shape[2])
        )
        threads = np.int32(_count("JAXRNN_NATIVE_THREADS"))
        f32 = bool(f32_operands)
        return call(x, h, w, cx, ch, threads=threads, f32=f32, rounded=f32 and bool(rounded))

    call = jax.custom_batching.custom_vmap(kernel)

    @call.def_vmap
    def rule(size, in_batched, x, h, w, cx, ch):
        members = x.shape[1] if in_batched[0] else x.shape[0]

        def merge(a, batched):
            a = a if batched else jnp.broadcast_to(a, (size, *a.shape))
            return a.reshape(size * a.shape[1], *a.shape[2:])

        x, h, cx = (
            merge(a, b) for a, b in zip((x, h, cx), (in_batched[0], in_batched[1], in_batched[3]))
        )
        ch = ch if ch.size == 0 else merge(ch, in_batched[4])
        if in_batched[2] or w.shape[0] > 1:  # each member its own W_x
            w = merge(jnp.broadcast_to(w, (size, members, *w.shape[-2:])), True)
        outs = call(x, h, w, cx, ch)
        return [o if o.size == 0 else o.reshape(size, members, *o.shape[1:]) for o in outs], [
            o.size > 0 for o in outs
        ]

    empty = jnp.zeros((0,), f32)
    dx, dw_x, dw_h, db_x, db_h = call(
        xs[None], h_in[None], w_x[None], ct_x[None], empty if merged else ct_h[None]
    )
    return (dx[0] if want_dx else None), dw_x[0], dw_h[0], db_x[0], (db_x if merged else db_h)[0]
