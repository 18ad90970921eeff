"""``matmul_dtype=bfloat16`` on the native CPU kernel: its matmuls on AMX tiles or AVX512-BF16.

Where the CPU has AMX or AVX512-BF16 (`native.bf16_available`), ``jaxrnn.unroll(...,
matmul_dtype=jnp.bfloat16)`` runs the forward kernel with bfloat16 operands summed in float32,
and the backward kernel with ``W_h`` rounded to bfloat16 (the tangent rule's ``_dot``); with
AMX (`native.amx_available`) also the input and weight gradients' kernel where
`native.tile_gradients` says so, without it that kernel's float32 mode on rounded operands
where `native.kernel_gradients` says so (XLA's dots elsewhere). XLA's loop with
the same ``matmul_dtype`` is the reference: it is tested against a loop over ``cell.step`` with
rounded operands in ``test_fastpath.py``. The two sum the same exact products in another
order, so they agree to float32 rounding, except where that rounding moves an ``h`` across a
bfloat16 rounding boundary: that element of the next step's operand then differs by one
bfloat16 step (2^-8 relative), and so its outputs by up to about 1e-3. Hence the checks: every
element within a bfloat16-sized tolerance, and almost all of them within float32's.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    FAST_CELLS,
    INPUT_SIZE,
    assert_gradient_kernel,
    check_gradient_kernel_under_vmap,
    fast_loss,
    fresh_key,
    gradient_kernel_at_every_size,
    gradient_kernel_operands,
    gradient_kernel_reference,
    mode_inputs,
    random_carry,
)

import jaxrnn
from jaxrnn._src import fastpath, native

if jax.default_backend() != "cpu" or native._compiler() is None:
    pytest.skip(
        "the native kernel needs the CPU backend and a C++ compiler", allow_module_level=True
    )

MAIN = ("elman_tanh", "elman_relu", "lstm", "gru")
BF16 = jnp.bfloat16
needs_bf16 = pytest.mark.skipif(
    not native.bf16_available(), reason="this CPU has neither AMX tiles nor AVX512-BF16"
)
needs_amx = pytest.mark.skipif(
    not native.amx_available(), reason="this CPU has no AMX tiles (or the OS denies them)"
)


@pytest.fixture(autouse=True)
def every_gradient_on_the_kernels(monkeypatch):
    monkeypatch.setattr(fastpath, "NATIVE_GRADIENT_KINDS", tuple(native.KIND_CODES))


@pytest.fixture(params=["shipped_rule", "kernel_everywhere", "tiles_nowhere"])
def gradient_rule(request, monkeypatch):
    """The shipped `native.kernel_gradients` and `native.tile_gradients`; both saying yes at
    every size (so that without AMX the input and weight gradients take the float32 kernel
    on rounded operands); or, with AMX, the tiles' saying no (XLA's dots take them)."""
    if request.param == "kernel_everywhere":
        gradient_kernel_at_every_size(monkeypatch)
    elif request.param == "tiles_nowhere":
        if not native.amx_available():
            pytest.skip("this CPU has no AMX tiles (or the OS denies them)")
        monkeypatch.setattr(native, "GRADIENT_TILE_ELEMENTS_PER_ROW", 0)


def _on_the_gradient_kernel(xs, hidden, gates):
    """Whether ``matmul_dtype=bfloat16``'s input and weight gradients of ``xs`` run on the
    gradient kernel: on AMX where `native.tile_gradients` says so, else where
    `native.kernel_gradients` does."""
    rows, features = int(np.prod(xs.shape[:-1])), xs.shape[-1]
    if native.amx_available():
        return native.tile_gradients(rows, features, hidden, gates * hidden)
    return native.kernel_gradients(rows, features, hidden)


def _close_to_bf16_rounding(actual, expected, float32, worst=3e-3, share=0.05):
    """``actual`` (the kernel's) against ``expected`` (XLA's, both with bfloat16 operands):
    every element within ``worst`` (relative to the array's scale), and on average within
    ``share`` of the distance between ``expected`` and ``float32`` (the same function with
    float32 matmuls). An operand left unrounded, or rounded twice, moves every element by
    about as much as float32 matmuls do; a bfloat16 rounding that float32 rounding moved
    changes one element, and those downstream of it."""
    leaves = [jax.tree_util.tree_leaves(t) for t in (actual, expected, float32)]
    for a, e, f in zip(*leaves):
        a, e, f = (np.asarray(x, np.float64) for x in (a, e, f))
        assert a.shape == e.shape
        if a.size == 0:
            continue
        scale = max(1.0, float(np.max(np.abs(e))))
        error = float(np.max(np.abs(a - e))) / scale
        assert error <= worst, f"max error {error:.3g} > {worst}"
        mean, rounding = float(np.mean(np.abs(a - e))), float(np.mean(np.abs(f - e)))
        assert mean <= share * rounding + 1e-7 * scale, (
            f"mean error {mean:.3g}, against {rounding:.3g} from bfloat16 rounding"
        )


def _lowered(fn, *args):
    return jax.jit(fn).lower(*args).as_text()


def _on_both(monkeypatch, make, *args):
    """``make(matmul_dtype)`` jitted with bfloat16 on the native kernel, then (freshly
    traced) on XLA's loop, then with float32 matmuls: the three results, after checking
    where the first two ran."""
    fn = make(BF16)
    assert native.TARGET in _lowered(fn, *args)
    actual = jax.jit(fn)(*args)
    with monkeypatch.context() as m:
        m.setenv("JAXRNN_NATIVE", "0")
        fn = make(BF16)
        assert native.TARGET not in _lowered(fn, *args)
        expected = jax.jit(fn)(*args)
    return actual, expected, jax.jit(make(None))(*args)


def test_placement_follows_the_bf16_support(monkeypatch):
    expected = "native" if native.bf16_available() else "hoisted"
    for kind in MAIN:
        placement = fastpath.placements(kind, 4, 8, jnp.float32, matmul_dtype=BF16, backend="cpu")
        assert placement[0] == expected
    # float16 operands have no kernel: XLA's loop.
    placement = fastpath.placements("lstm", 4, 8, jnp.float32, matmul_dtype=jnp.float16)
    assert "native" not in placement
    monkeypatch.setattr(native, "bf16_available", lambda: False)
    placement = fastpath.placements("lstm", 4, 8, jnp.float32, matmul_dtype=BF16, backend="cpu")
    assert "native" not in placement


MODES = (
    "batch_major", "time_major", "no_batch", "two_batch_dims", "reverse", "seq_lengths",
    "mask_reverse", "resets", "everything", "everything_time_major_reverse",
)  # fmt: skip


@needs_bf16
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell_name", MAIN)
def test_bf16_kernel_equals_xla_in_every_mode(cell_name, mode, monkeypatch):
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), 33)
    xs, carry, kwargs = mode_inputs(cell, mode)
    xs = jnp.concatenate([xs] * 11, axis=-1)[..., :33]  # 33 inputs: one past a tile's 32
    kwargs.pop("unroll", None)

    def make(md):
        return lambda p, x, c: jaxrnn.unroll(cell, p, x, c, matmul_dtype=md, **kwargs)

    actual, expected, float32 = _on_both(monkeypatch, make, params, xs, carry)
    _close_to_bf16_rounding(actual, expected, float32)
    # The operands really were rounded: float32 matmuls give other outputs.
    assert float(jnp.max(jnp.abs(float32[0] - actual[0]))) > 1e-4


def _as(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def _bf16_rounding_of(actual, expected, worst=8e-3, equal=0.9):
    """``actual`` (bfloat16) is ``expected`` (float32) rounded to bfloat16: at least ``equal``
    of the elements exactly (measured: 96 % and more, mostly over 98 %), every one within
    ``worst`` of its array's scale, two bfloat16 steps (measured: within 6e-4): float32 sums
    in another order move a few values across a rounding boundary, and what follows from
    them (the module's docstring)."""
    for a, e in zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected)):
        assert a.dtype == BF16 and a.shape == e.shape
        if a.size == 0:
            continue
        a, rounded = np.asarray(a, np.float64), np.asarray(e.astype(BF16), np.float64)
        e = np.asarray(e, np.float64)
        scale = max(1.0, float(np.max(np.abs(e))))
        error = float(np.max(np.abs(a - rounded))) / scale
        assert error <= worst, f"max error {error:.3g} > {worst}"
        share = float(np.mean(a == rounded))
        assert share >= equal, f"{share:.3f} of the elements are the rounded float32 ones"


@pytest.mark.parametrize("operands", ["bfloat16", "float32"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cell_name", MAIN)
def test_bfloat16_data_is_the_kernel_on_float32_values(cell_name, mode, operands, monkeypatch):
    """bfloat16 inputs, params and carry run the native kernel in float32
    (`fastpath.bf16_data_on_kernel`), with bfloat16 matmul operands where the kernel
    multiplies bfloat16, else float32 ones (as on a CPU without): the outputs and final carry
    are those of the same ``matmul_dtype`` on the float32 values in XLA's loop, rounded to
    bfloat16; the gradients those of that loop (its outputs rounded too), rounded."""
    if operands == "bfloat16" and not native.bf16_available():
        pytest.skip("this CPU has neither AMX tiles nor AVX512-BF16")
    if not native.available():
        pytest.skip("the native kernel is not used on this CPU")
    if operands == "float32":
        monkeypatch.setattr(native, "bf16_available", lambda: False)
    md = BF16 if operands == "bfloat16" else None
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = _as(cell.init(fresh_key(), 33), BF16)
    xs, carry, kwargs = mode_inputs(cell, mode)
    xs = jnp.concatenate([xs] * 11, axis=-1)[..., :33].astype(BF16)
    carry = None if carry is None else _as(carry, BF16)
    kwargs.pop("unroll", None)

    def make(md):
        def loss(p, x, c):
            ys, final = jaxrnn.unroll(cell, p, x, c, matmul_dtype=md, **kwargs)
            # Rounded as the bfloat16 path's outputs are, so are their cotangents in both.
            leaves = jax.tree_util.tree_leaves(_as((ys, final), BF16))
            return sum(jnp.sum(jnp.sin(2.0 * leaf.astype(jnp.float32))) for leaf in leaves)

        forward = jax.jit(lambda p, x, c: jaxrnn.unroll(cell, p, x, c, matmul_dtype=md, **kwargs))
        return forward, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

    forward, gradient = make(None)
    assert native.TARGET in forward.lower(params, xs, carry).as_text()
    actual = forward(params, xs, carry), gradient(params, xs, carry)
    with monkeypatch.context() as m:
        m.setenv("JAXRNN_NATIVE", "0")
        forward, gradient = make(md)
        up = [_as(a, jnp.float32) for a in (params, xs, carry)]
        assert native.TARGET not in forward.lower(*up).as_text()
        expected = forward(*up), gradient(*up)
    _bf16_rounding_of(actual[0], expected[0])
    _bf16_rounding_of(actual[1], expected[1])


@needs_bf16
@pytest.mark.parametrize("mode", ["batch_major", "everything", "everything_time_major_reverse"])
@pytest.mark.parametrize("cell_name", MAIN)
def test_bf16_derivatives_equal_xla(cell_name, mode, gradient_rule, monkeypatch):
    """The gradient pass (the kernels: forward, backward with ``W_h`` rounded, and the input,
    weight and bias gradients, on the tiles or in float32 on rounded operands, or XLA's dots)
    and forward mode, against XLA's loop with the same ``matmul_dtype``."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "2")
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), INPUT_SIZE)
    xs, carry, kwargs = mode_inputs(cell, mode)
    carry = random_carry(cell, xs.shape[:-2] if not kwargs.get("time_major") else xs.shape[1:-1])
    tangents = tuple(
        jax.tree_util.tree_map(lambda a: jnp.cos(3.0 * a), a) for a in (params, xs, carry)
    )

    def make(md):
        loss = lambda p, x, c: fast_loss(cell, p, x, c, {**kwargs, "matmul_dtype": md})  # noqa: E731

        def both(p, x, c):
            grads = jax.grad(loss, argnums=(0, 1, 2))(p, x, c)
            # The weights' alone: the gradient kernel then leaves out the inputs' (``prune``).
            return grads, jax.grad(loss)(p, x, c), jax.jvp(loss, (p, x, c), tangents)

        return both

    grad = jax.grad(lambda p, x, c: fast_loss(cell, p, x, c, {**kwargs, "matmul_dtype": BF16}))
    lowered = _lowered(grad, params, xs, carry)
    assert native.TARGET_BACKWARD in lowered
    assert (native.TARGET_GRADIENTS in lowered) == _on_the_gradient_kernel(
        xs, 40, fastpath._N_GATES[cell_name]
    )
    actual, expected, float32 = _on_both(monkeypatch, make, params, xs, carry)
    _close_to_bf16_rounding(actual, expected, float32)


@needs_bf16
@pytest.mark.parametrize(
    "hidden, threads, batch", [(5, 0, 9), (16, 1, 33), (40, 2, 9), (50, 3, 17), (130, 0, 40)]
)
@pytest.mark.parametrize("cell_name", MAIN)
def test_bf16_kernel_over_sizes_and_threads(cell_name, hidden, threads, batch, monkeypatch):
    """Sizes off the tiles' 16 rows, 16 columns and 32 inputs, uneven chunks of units, more
    threads than cores, with masked steps and resets; forward and gradient."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    cell = FAST_CELLS[cell_name](hidden)
    params = cell.init(fresh_key(), 7)
    time = 6
    xs = jax.random.normal(fresh_key(), (batch, time, 7))
    carry = random_carry(cell, (batch,))
    kwargs = {
        "seq_lengths": jax.random.randint(fresh_key(), (batch,), 0, time + 1),
        "resets": jax.random.bernoulli(fresh_key(), 0.3, (batch, time)),
    }

    def make(md):
        def both(p, x, c):
            out = jaxrnn.unroll(cell, p, x, c, matmul_dtype=md, **kwargs)
            loss = lambda *a: fast_loss(cell, *a, {**kwargs, "matmul_dtype": md})  # noqa: E731
            return out, jax.grad(loss, argnums=(0, 1, 2))(p, x, c)

        return both

    actual, expected, float32 = _on_both(monkeypatch, make, params, xs, carry)
    _close_to_bf16_rounding(actual, expected, float32)


@needs_bf16
@pytest.mark.parametrize("hidden, groups", [(40, "0"), (40, "2"), (130, "0")])
@pytest.mark.parametrize("cell_name", MAIN)
def test_bf16_weights_from_spare_copies(cell_name, hidden, groups, monkeypatch):
    """With every chunk computed by every thread and run from the spare copy of its packed
    bfloat16 weights (what a thread packs when the chunk's packer may have been preempted),
    the forward pass is the same bit for bit."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", "3")
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", groups)
    cell = FAST_CELLS[cell_name](hidden)
    params = cell.init(fresh_key(), 7)
    xs = jax.random.normal(fresh_key(), (33, 6, 7))

    def run():
        return jax.jit(lambda p, x: jaxrnn.unroll(cell, p, x, matmul_dtype=BF16))(params, xs)

    undisturbed = run()
    monkeypatch.setenv("JAXRNN_NATIVE_DUPLICATE", "1")
    for got, want in zip(jax.tree_util.tree_leaves(run()), jax.tree_util.tree_leaves(undisturbed)):
        np.testing.assert_array_equal(got, want)


@needs_bf16
@pytest.mark.parametrize("cell_name", MAIN)
def test_bf16_with_the_projection_hoisted(cell_name, monkeypatch):
    """Without AMX, the input projection runs before the kernel where `native.HOIST_TABLE`
    says so (one bfloat16 matmul over all steps), as in float32; with AMX never. Both passes,
    at B1, against XLA's loop."""
    monkeypatch.setattr(native, "HOIST_TABLE", ((0, 1 << 30),))
    cell = FAST_CELLS[cell_name](40)
    params = cell.init(fresh_key(), 33)
    xs = jax.random.normal(fresh_key(), (1, 9, 33))

    def make(md):
        def both(p, x):
            loss = lambda p, x: jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x, matmul_dtype=md)[0]))  # noqa: E731
            return jaxrnn.unroll(cell, p, x, matmul_dtype=md)[0], jax.grad(loss, (0, 1))(p, x)

        return both

    # A hoisted call passes the kernel a W_x of no rows.
    hoisted = re.search(r"tensor<0x\d+xf32>", _lowered(make(BF16), params, xs)) is not None
    assert hoisted == (not native.amx_available())
    actual, expected, float32 = _on_both(monkeypatch, make, params, xs)
    _close_to_bf16_rounding(actual, expected, float32)


@needs_bf16
def test_bf16_kernel_under_vmap_and_an_ensemble(monkeypatch):
    """vmapped over examples (the runs merge into one call) and over weights (members)."""
    cell = jaxrnn.lstm(24)
    members = jax.vmap(lambda k: cell.init(k, 5))(jax.random.split(fresh_key(), 3))
    xs = jax.random.normal(fresh_key(), (3, 4, 6, 5))

    def make(md):
        return jax.vmap(lambda p, x: jaxrnn.unroll(cell, p, x, matmul_dtype=md)[0])

    actual, expected, float32 = _on_both(monkeypatch, make, members, xs)
    _close_to_bf16_rounding(actual, expected, float32)


@needs_bf16
@pytest.mark.parametrize("cell_name", ["lstm", "gru"])
def test_bf16_gradients_under_vmap(cell_name, gradient_rule, monkeypatch):
    """Per-example gradients (``vmap`` of ``grad``), the gradient of a vmapped loss and an
    ensemble's gradients: the gradient kernel then runs once over members (the vmapped axis),
    each with its own weight and bias gradients."""
    cell = FAST_CELLS[cell_name](24)
    params = cell.init(fresh_key(), 5)
    members = jax.vmap(lambda k: cell.init(k, 5))(jax.random.split(fresh_key(), 3))
    xs = jax.random.normal(fresh_key(), (3, 4, 6, 5))

    def make(md):
        def loss(p, x):
            return jnp.sum(jnp.sin(jaxrnn.unroll(cell, p, x, matmul_dtype=md)[0]))

        per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)), (None, 0))
        of_vmap = jax.grad(lambda p, x: jnp.sum(jax.vmap(loss, (None, 0))(p, x)), (0, 1))
        ensemble = jax.vmap(jax.grad(loss, argnums=(0, 1)))

        def all_three(p, m, x):
            return per_example(p, x), of_vmap(p, x), ensemble(m, x)

        return all_three

    lowered = _lowered(make(BF16), params, members, xs)
    assert (native.TARGET_GRADIENTS in lowered) == _on_the_gradient_kernel(
        xs, 24, fastpath._N_GATES[cell_name]
    )
    actual, expected, float32 = _on_both(monkeypatch, make, params, members, xs)
    _close_to_bf16_rounding(actual, expected, float32)


@needs_bf16
@pytest.mark.parametrize(
    "hidden, threads, groups, duplicate",
    [(40, 2, 0, False), (40, 2, 1, False), (130, 0, 0, False), (5, 1, 0, False),
     (40, 2, 4, False), (40, 3, 0, True)],
)  # fmt: skip
@pytest.mark.parametrize("kind", sorted(native.KIND_CODES))
def test_the_backward_kernel_on_tiles_is_float32s(
    kind, hidden, threads, groups, duplicate, monkeypatch
):
    """The backward kernel's bf16 mode against its float32 one, on the same cotangents and
    bfloat16-valued ``W_h``: the tiles multiply the float32 ``ct_v`` as three exact bfloat16
    parts, so the two agree to float32 rounding (at most 1.5e-6 of scale over 12 seeds; with
    the third part dropped, these tests fail). 33 rows: groups of 16 and 17 rows, or all of
    them in chunks of units (16 and 24 at H = 40), take the tiles; 4 groups of 8 rows do not
    (the float32 matmul on the same values). Also with every chunk computed by every thread
    (the publication race at every step)."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    monkeypatch.setenv("JAXRNN_NATIVE_GROUPS", str(groups))
    if duplicate:  # every thread computes every chunk: the publication race at every step
        monkeypatch.setenv("JAXRNN_NATIVE_DUPLICATE", "1")
    time, batch = 7, 33
    gates = native.RESIDUAL_WIDTHS[kind][0]
    width = {"lstm": 4, "gru": 3}.get(kind, 1) * hidden
    w_h = jax.random.normal(fresh_key(), (hidden, width)) / hidden**0.5
    w_h = w_h.astype(BF16).astype(jnp.float32)
    ct_ys = jax.random.normal(fresh_key(), (time, batch, hidden))
    ct_carry = tuple(jax.random.normal(fresh_key(), (batch, hidden)) for _ in range(2))
    ct_carry = ct_carry if kind == "lstm" else ct_carry[:1]
    widths = [gates, 1, 1][: native.COEFFICIENTS[kind]]
    coef = tuple(
        jax.random.uniform(fresh_key(), (time, batch, w * hidden), minval=-1, maxval=1)
        for w in widths
    )
    resets = jax.random.bernoulli(fresh_key(), 0.3, (time, batch))

    def run(bf16):
        fn = lambda *a: native.backward(kind, *a, None, resets, False, bf16=bf16)  # noqa: E731
        return jax.jit(fn)(ct_ys, ct_carry, coef, w_h)

    tiles, floats = run(True), run(False)
    for a, e in zip(jax.tree_util.tree_leaves(tiles), jax.tree_util.tree_leaves(floats)):
        scale = max(1.0, float(jnp.max(jnp.abs(e))))
        assert float(jnp.max(jnp.abs(a - e))) <= 3e-6 * scale


def _bf16_64(a):
    return np.asarray(jnp.asarray(a).astype(BF16).astype(jnp.float32), np.float64)


@needs_amx
@pytest.mark.parametrize(
    "rows, features, hidden, gates, merged, want_dx, threads",
    [
        (7, 5, 3, 4, True, True, 0),  # one partial block, every size off the tiles
        (300, 33, 40, 3, False, True, 2),  # two blocks, the GRU's separate ct_h
        (513, 64, 48, 4, True, False, 3),  # three blocks, more threads than cores, no dx
        (1000, 17, 130, 1, True, True, 1),
        (260, 20, 70, 4, False, True, 2),  # 280 columns: a slice of 256, then 24 of 32
    ],
)
def test_the_gradient_kernel_is_float32s(
    rows, features, hidden, gates, merged, want_dx, threads, monkeypatch
):
    """`native.input_and_weight_gradients` against float64 products of the same rounded
    operands: ``ct_x bf16(W_x)ᵀ``, ``bf16(x)ᵀ ct_x``, ``bf16(h)ᵀ ct_h``, and the sums of
    ``ct_x`` and ``ct_h`` over the rows (the bias gradients). The float32
    cotangents go in as three exact bfloat16 parts, so only float32 sums round (within 1e-6
    of scale; with the third part dropped, the weight gradients are 9e-6 to 1e-5 off). The
    bias gradients add a run's rows one after another in float32: at 1000 rows the worst of
    130 such sums was 0.8e-6 of scale off in the median of 300 draws, 1.9e-6 at most, so
    they get 4e-6 (a missing or repeated row would be off by about 1e-2 of scale or more)."""
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    operands = gradient_kernel_operands(rows, features, hidden, gates, merged)

    def fn(*a):
        return native.input_and_weight_gradients(*a, want_dx=want_dx)

    got = jax.jit(fn)(*operands)
    assert (got[0] is None) == (not want_dx)
    assert_gradient_kernel(
        got, gradient_kernel_reference(*operands, cast=_bf16_64), 1e-6, sum_tol=4e-6
    )


@needs_amx
def test_the_gradient_kernel_under_vmap():
    """Under ``vmap`` the examples become the kernel's members (`conftest`'s check)."""
    check_gradient_kernel_under_vmap(native.input_and_weight_gradients, cast=_bf16_64)


def test_the_shipped_tile_rule():
    """``matmul_dtype=bfloat16``'s input and weight gradients take the AMX tiles where the
    weight gradients have at most 8192 elements a row: LSTM H1024 from 1024 rows, LSTM H512
    from 256, Elman H1024 from 256; XLA's dots below (on AMX; elsewhere the float32 rule)."""
    assert native.GRADIENT_TILE_ELEMENTS_PER_ROW == 8192
    assert native.tile_gradients(1024, 1024, 1024, 4096)
    assert not native.tile_gradients(1023, 1024, 1024, 4096)
    assert native.tile_gradients(256, 512, 512, 2048) and not native.tile_gradients(
        200, 512, 512, 2048
    )
    assert native.tile_gradients(200, 512, 512, 1536)  # the GRU's three gates
    assert not native.tile_gradients(100, 1024, 1024, 1024)  # Elman
    assert native.tile_gradients(64, 128, 128, 512) and native.tile_gradients(1, 8, 16, 64)
    if not native.amx_available():
        return
    cell = jaxrnn.lstm(256)
    params = cell.init(fresh_key(), 256)
    grad = jax.grad(lambda p, x: jnp.sum(jaxrnn.unroll(cell, p, x, matmul_dtype=BF16)[0]))
    for batch, on_tiles in ((3, False), (4, True)):  # 48 and 64 rows, 512 × 1024 weights
        xs = jax.random.normal(fresh_key(), (batch, 16, 256))
        text = jax.jit(grad).lower(params, xs).as_text()
        assert (native.TARGET_GRADIENTS in text) == on_tiles
        assert native.TARGET_BACKWARD in text


@pytest.mark.parametrize(
    "rows, features, hidden, gates, merged, want_dx, threads",
    [
        (7, 5, 3, 4, True, True, 0),  # one block: 35 elements of x to round, 16 at a time
        (300, 33, 40, 3, False, True, 2),  # two blocks, the GRU's separate ct_h
        (513, 64, 48, 4, True, False, 3),  # three threads on two cores, no dx
        (260, 20, 70, 4, False, True, 2),  # 280 columns: a slice of 256, then 24
    ],
)
def test_the_float32_gradient_kernel_on_rounded_operands(
    rows, features, hidden, gates, merged, want_dx, threads, monkeypatch
):
    """Without AMX, ``matmul_dtype=bfloat16``'s input and weight gradients: the float32
    kernel rounding ``x``, ``h_in`` and ``W_x`` to bfloat16 itself (``rounded``), against
    float64 products of the operands XLA rounds (to nearest, ties to even: the first rows of
    ``x`` hold ties and values that round up to the next power of two), within float32
    rounding of the sums; bit for bit the same in a second call."""
    assert native.available()
    monkeypatch.setenv("JAXRNN_NATIVE_THREADS", str(threads))
    x, h, w, ct_x, ct_h = gradient_kernel_operands(rows, features, hidden, gates, merged)
    one = 1.0 + 2.0**-8  # halfway between 1 and the next bfloat16: rounds to 1 (even)
    ties = np.array([one, 1.0 + 3 * 2.0**-8, -one, 2.0 - 2.0**-9, 3.0 + 2.0**-7], np.float32)
    x = x.at[:2].set(np.resize(ties, (2, features)))

    def fn(*a):
        return native.input_and_weight_gradients(
            *a, want_dx=want_dx, f32_operands=True, rounded=True
        )

    operands = (x, h, w, ct_x, ct_h)
    got = jax.jit(fn)(*operands)
    jax.tree.map(np.testing.assert_array_equal, got, jax.jit(fn)(*operands))
    assert (got[0] is None) == (not want_dx)
    assert_gradient_kernel(got, gradient_kernel_reference(*operands, cast=_bf16_64), 2e-6)
    # The operands really were rounded: unrounded ones give other weight gradients.
    unrounded = gradient_kernel_reference(*operands)
    assert float(np.max(np.abs(np.asarray(got[1], np.float64) - unrounded[1]))) > 1e-3


def test_the_float32_gradient_kernel_on_rounded_operands_under_vmap():
    """Under ``vmap`` the examples become the kernel's members (`conftest`'s check)."""
    assert native.available()
    check_gradient_kernel_under_vmap(
        lambda *a: native.input_and_weight_gradients(*a, f32_operands=True, rounded=True),
        cast=_bf16_64,
    )
