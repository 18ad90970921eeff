"""Shared fixtures: every cell of the library, and a plain-Python reference runner."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrnn

_SEEDS = itertools.count(1000)
ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(relpath: str):
    """A script of the repository (``benchmarks/…``, ``examples/…``) imported as a module."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # Flax modules (dataclasses) look their module up here
    spec.loader.exec_module(module)
    return module


def fresh_key():
    """A new PRNG key per call: every test draws fresh random inputs."""
    return jax.random.PRNGKey(next(_SEEDS))


def _user_cell(hidden: int = 5) -> jaxrnn.Cell:
    """A user-defined cell with a two-part carry, built with make_cell (no project/recur)."""

    def init(key, input_size, *, dtype=jnp.float32):
        k1, k2 = jax.random.split(key)
        return {
            "w": jax.random.normal(k1, (input_size, hidden), dtype) * 0.5,
            "u": jax.random.normal(k2, (hidden, hidden), dtype) * 0.5,
        }

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return (jnp.zeros((*batch_shape, hidden), dtype), jnp.zeros((*batch_shape, hidden), dtype))

    def step(params, carry, x):
        h, s = carry
        h = jnp.tanh(x @ params["w"] + h @ params["u"] + 0.5 * s)
        s = 0.9 * s + h
        return (h, s), 2.0 * h

    return jaxrnn.make_cell(step, init, initial_carry, name="user", output_size=hidden)


CELL_FACTORIES = {
    "elman_tanh": lambda: jaxrnn.elman(5),
    "elman_relu": lambda: jaxrnn.elman(5, activation="relu"),
    "elman_nobias": lambda: jaxrnn.elman(5, use_bias=False),
    "lstm": lambda: jaxrnn.lstm(5),
    "lstm_proj": lambda: jaxrnn.lstm(5, proj_size=3),
    "lstm_nobias": lambda: jaxrnn.lstm(5, use_bias=False),
    "gru": lambda: jaxrnn.gru(5),
    "gru_nobias": lambda: jaxrnn.gru(5, use_bias=False),
    "user": _user_cell,
}

INPUT_SIZE = 4


@pytest.fixture(params=sorted(CELL_FACTORIES))
def cell_name(request):
    return request.param


@pytest.fixture
def cell(cell_name):
    return CELL_FACTORIES[cell_name]()


@pytest.fixture
def params(cell):
    return cell.init(fresh_key(), INPUT_SIZE)


def random_like(template, scale=1.0):
    """A tree of fresh normal draws with the shapes and dtypes of ``template``."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    keys = jax.random.split(fresh_key(), len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [scale * jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)]
    )


# The built-in cells of the fast path (`fastpath.KINDS`), with and without biases.
FAST_CELLS = {
    "elman_tanh": lambda h: jaxrnn.elman(h),
    "elman_relu": lambda h: jaxrnn.elman(h, activation="relu"),
    "elman_nobias": lambda h: jaxrnn.elman(h, use_bias=False),
    "lstm": lambda h: jaxrnn.lstm(h),
    "lstm_nobias": lambda h: jaxrnn.lstm(h, use_bias=False),
    "gru": lambda h: jaxrnn.gru(h),
    "gru_nobias": lambda h: jaxrnn.gru(h, use_bias=False),
}


def fast_loss(cell, params, xs, carry, kwargs):
    """A scalar of ``unroll``'s outputs and final carry that weighs every element differently."""
    ys, final = jaxrnn.unroll(cell, params, xs, carry, **kwargs)
    leaves = jax.tree_util.tree_leaves(final)
    return jnp.sum(jnp.sin(ys)) + sum(jnp.sum(jnp.cos(leaf) * leaf) for leaf in leaves)


def random_carry(cell, batch_shape, dtype=jnp.float32):
    return random_like(cell.initial_carry(batch_shape, dtype))


TIME = 6

# The runner's modes: name -> (batch_shape, spec). In a spec, "lengths" draws seq_lengths that
# include 0 and the full length, a float is the probability of a True mask/reset flag, and
# "carry" draws a random initial carry.
MODES = {
    "batch_major": ((3,), {}),
    "time_major": ((3,), {"time_major": True}),
    "no_batch": ((), {}),
    "two_batch_dims": ((2, 3), {}),
    "reverse": ((3,), {"reverse": True}),
    "unroll_2": ((3,), {"unroll": 2}),
    "unroll_3": ((3,), {"unroll": 3}),
    "unroll_full": ((3,), {"unroll": True}),
    "seq_lengths": ((4,), {"seq_lengths": "lengths"}),
    "seq_lengths_reverse": ((4,), {"seq_lengths": "lengths", "reverse": True}),
    "seq_lengths_two_batch_dims": ((2, 4), {"seq_lengths": "lengths", "unroll": 3}),
    "mask": ((3,), {"mask": 0.6}),
    "mask_reverse": ((3,), {"mask": 0.6, "reverse": True}),
    "resets": ((3,), {"resets": 0.3}),
    "resets_reverse": ((3,), {"resets": 0.3, "reverse": True}),
    "given_carry": ((3,), {"carry": True}),
    "everything": (
        (4,),
        {"seq_lengths": "lengths", "mask": 0.7, "resets": 0.3, "carry": True, "unroll": 2},
    ),
    "everything_time_major_reverse": (
        (4,),
        {
            "time_major": True,
            "reverse": True,
            "seq_lengths": "lengths",
            "mask": 0.7,
            "resets": 0.3,
            "carry": True,
            "unroll": 2,
        },
    ),
}


def mode_inputs(cell, mode, dtype=jnp.float32):
    """Fresh inputs of one mode: ``(xs, carry, kwargs)`` for ``jaxrnn.unroll(cell, params, xs,
    carry, **kwargs)``; ``kwargs`` holds ``unroll`` only where the mode sets it."""
    batch_shape, spec = MODES[mode]
    time_major = spec.get("time_major", False)
    flag_shape = (TIME, *batch_shape) if time_major else (*batch_shape, TIME)
    xs = jax.random.normal(fresh_key(), (*flag_shape, INPUT_SIZE), dtype)
    kwargs = {k: v for k, v in spec.items() if k in ("time_major", "reverse", "unroll")}
    if spec.get("seq_lengths"):
        base = np.array([TIME, 0, 3, 1, 5, TIME, 2, 4])
        n = int(np.prod(batch_shape))
        kwargs["seq_lengths"] = jnp.asarray(np.resize(base, n).reshape(batch_shape), jnp.int32)
    for name in ("mask", "resets"):
        if name in spec:
            kwargs[name] = jax.random.bernoulli(fresh_key(), spec[name], flag_shape)
    carry = random_carry(cell, batch_shape, dtype) if spec.get("carry") else None
    return xs, carry, kwargs


def reference_unroll(
    cell,
    params,
    xs,
    carry=None,
    *,
    time_major=False,
    reverse=False,
    seq_lengths=None,
    mask=None,
    resets=None,
):
    """The specification: a plain Python loop over ``cell.step``, one sequence at a time."""
    xs = np.asarray(xs)
    if time_major:
        xs = np.moveaxis(xs, 0, -2)
        mask = None if mask is None else np.moveaxis(np.asarray(mask), 0, -1)
        resets = None if resets is None else np.moveaxis(np.asarray(resets), 0, -1)
    batch_shape, time = xs.shape[:-2], xs.shape[-2]
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    step = jax.jit(cell.step)
    ys_rows, finals = {}, {}
    for idx in np.ndindex(*batch_shape):
        c = jax.tree_util.tree_map(lambda a, idx=idx: jnp.asarray(a)[idx], carry)
        length = time if seq_lengths is None else int(np.asarray(seq_lengths)[idx])
        row = [None] * time
        order = reversed(range(time)) if reverse else range(time)
        for t in order:
            in_range = t < length
            reset = resets is not None and bool(np.asarray(resets)[idx + (t,)]) and in_range
            valid = in_range and (mask is None or bool(np.asarray(mask)[idx + (t,)]))
            if reset and not reverse:
                c = cell.initial_carry((), xs.dtype)
            if valid:
                c, row[t] = step(params, c, jnp.asarray(xs[idx + (t,)]))
            if reset and reverse:
                c = cell.initial_carry((), xs.dtype)
        ys_rows[idx], finals[idx] = row, c
    out_size = cell.output_size
    ys = np.zeros((*batch_shape, time, out_size), xs.dtype)
    for idx, row in ys_rows.items():
        for t, y in enumerate(row):
            if y is not None:
                ys[idx + (t,)] = np.asarray(y)
    idxs = list(np.ndindex(*batch_shape))
    final = jax.tree_util.tree_map(
        lambda *leaves: np.stack(leaves).reshape(*batch_shape, *np.shape(leaves[0])),
        *[finals[i] for i in idxs],
    )
    if time_major:
        ys = np.moveaxis(ys, -2, 0)
    return ys, final


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
    jax.tree_util.tree_map(
        lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol),
        actual,
        expected,
    )


def assert_sums_close(actual, expected, rtol=2e-5, atol=2e-5, scale=2e-6):
    """`assert_trees_close` for arrays of float32 sums over many terms added in another order
    (a weight gradient summed over steps and rows): each element may also be off by ``scale``
    times the largest magnitude in its expected array, the rounding of sums of that size, which
    an element that nearly cancels shows against its own small value."""

    def check(a, e):
        e = np.asarray(e)
        bound = atol + scale * float(np.max(np.abs(e), initial=0.0))
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=bound)

    jax.tree_util.tree_map(check, actual, expected)


# ---- `native.input_and_weight_gradients` (float32 here, bfloat16 parts on AMX) --------------


def gradient_kernel_operands(rows, features, hidden, gates, merged):
    """Fresh operands of the gradient kernel: ``(x, h, W_x, ct_x, ct_h)``, ``ct_h`` ``None``
    where ``merged`` (the cells whose two input terms are summed)."""
    width = gates * hidden
    x, h, w, ct_x, ct_h = (
        jax.random.normal(fresh_key(), shape)
        for shape in ((rows, features), (rows, hidden), (features, width), (rows, width),
                      (rows, width))
    )  # fmt: skip
    return x, h, w, ct_x, None if merged else ct_h


def gradient_kernel_reference(x, h, w, ct_x, ct_h=None, cast=None):
    """In float64, ``(ct_x W_xᵀ, xᵀ ct_x, hᵀ ct_h, Σ_rows ct_x, Σ_rows ct_h)``, with ``x``,
    ``h`` and ``W_x`` through ``cast`` first where given (their bfloat16 rounding)."""
    cast = cast or (lambda a: np.asarray(a, np.float64))
    c_x = np.asarray(ct_x, np.float64)
    c_h = c_x if ct_h is None else np.asarray(ct_h, np.float64)
    return c_x @ cast(w).T, cast(x).T @ c_x, cast(h).T @ c_h, c_x.sum(0), c_h.sum(0)


def assert_gradient_kernel(got, expected, tol, sum_tol=None):
    """Each of ``got`` (``dx`` may be ``None``) within ``tol`` of its expected array's scale,
    the bias gradients (the last two) within ``sum_tol`` (default ``tol``)."""
    for i, (g, e) in enumerate(zip(got, expected)):
        if g is None:
            continue
        assert g.shape == e.shape
        scale = max(1.0, float(np.max(np.abs(e))))
        bound = (tol if sum_tol is None or i < 3 else sum_tol) * scale
        assert float(np.max(np.abs(np.asarray(g, np.float64) - e))) <= bound


def gradient_kernel_at_every_size(monkeypatch):
    """`native.kernel_gradients` and `native.tile_gradients` made to say yes at every size:
    the input and weight gradients on the float32 gradient kernel (without AMX,
    ``matmul_dtype=bfloat16``'s too, on rounded operands; with AMX, those on the tiles)."""
    from jaxrnn._src import native

    monkeypatch.setattr(native, "GRADIENT_MIN_ROWS", 0)
    monkeypatch.setattr(native, "GRADIENT_NARROW", 1 << 30)
    monkeypatch.setattr(native, "GRADIENT_TILE_ELEMENTS_PER_ROW", 1 << 40)


def check_gradient_kernel_under_vmap(fn, cast=None):
    """Under ``vmap`` the examples become the kernel's members, each with its own rows and
    weight gradients: ``W_x`` shared, or batched (an ensemble), and nested."""
    rows, features, hidden, width = 40, 9, 16, 48
    x, h, ct = (jax.random.normal(fresh_key(), (2, 3, rows, n)) for n in (features, hidden, width))
    ws = jax.random.normal(fresh_key(), (2, 3, features, width))

    def check(got, index, w):
        want = gradient_kernel_reference(x[index], h[index], w, ct[index], cast=cast)
        for g, e in zip(got, want):
            np.testing.assert_allclose(np.asarray(g, np.float64)[index], e, atol=1e-5)

    shared = jax.jit(jax.vmap(jax.vmap(fn, (0, 0, None, 0)), (0, 0, None, 0)))(x, h, ws[0, 0], ct)
    batched = jax.jit(jax.vmap(jax.vmap(fn)))(x, h, ws, ct)
    inner = jax.jit(jax.vmap(fn, (0, 0, 0, 0)))(x[0], h[0], ws[0], ct[0])
    for i in range(2):
        for j in range(3):
            check(shared, (i, j), ws[0, 0])
            check(batched, (i, j), ws[i, j])
    for j in range(3):
        want = gradient_kernel_reference(x[0, j], h[0, j], ws[0, j], ct[0, j], cast=cast)
        for g, e in zip(inner, want):
            np.testing.assert_allclose(np.asarray(g, np.float64)[j], e, atol=1e-5)
