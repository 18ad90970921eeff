"""``jaxrnn._src.linear``: a linear function whose transpose is a function of our own.

A small linear recurrence stands in for the fast path's tangent loop, with a hand-written
transpose standing in for the native backward kernel. Reverse mode must call that transpose;
every derivative, of any order and in either mode, and ``vmap`` must equal those of the same
map in plain JAX.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import jaxprs_in_params

from jaxrnn._src import linear

T, B, H = 5, 2, 3


def recurrence(nonlin, lin):
    """``d_t = a_t (d_{t-1} W + u_t)``: linear in ``(u, d_0)``, not in ``(a, W)``."""
    (a, w), (u, d0) = nonlin, lin

    def body(d, inputs):
        u_t, a_t = inputs
        d = a_t * (d @ w + u_t)
        return d, d

    d_last, ds = lax.scan(body, d0, (u, a))
    return ds, d_last


CALLS = []


def recurrence_t(nonlin, cts):
    """`recurrence`'s transpose, by hand (what a kernel would compute)."""
    CALLS.append(1)
    (a, w), (ct_ds, ct_last) = nonlin, cts

    def body(lam, inputs):
        ct_t, a_t = inputs
        z = a_t * (lam + ct_t)
        return z @ w.T, z

    ct_d0, ct_u = lax.scan(body, ct_last, (ct_ds, a), reverse=True)
    return ct_u, ct_d0


def _with_rule(tangent_map):
    """A ``custom_jvp`` recurrence whose tangent rule applies ``tangent_map`` to the tangents
    of ``(u, d0)`` — the fast path's pattern — and ignores those of ``(a, W)``."""

    @jax.custom_jvp
    def f(a, w, u, d0):
        return recurrence((a, w), (u, d0))

    @f.defjvp
    def f_jvp(primals, tangents):
        a, w, u, d0 = primals
        return recurrence((a, w), (u, d0)), tangent_map((a, w), tangents[2:])

    return f


with_kernel = _with_rule(lambda nonlin, lin: linear.apply(recurrence, recurrence_t, nonlin, lin))
plain = _with_rule(recurrence)


def _loss(f):
    def loss(params, x, d0):
        a = jnp.tanh(x * params[0])  # coefficients that depend on the inputs
        ds, d_last = f(a, params[1], 2.0 * x, d0)
        return jnp.sum(jnp.sin(ds)) + jnp.sum(d_last**2)

    return loss


@pytest.fixture
def args():
    keys = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)), 4)
    with jax.enable_x64(True):
        params = (
            jax.random.normal(keys[0], (T, B, H), jnp.float64),
            0.5 * jax.random.normal(keys[1], (H, H), jnp.float64),
        )
        x = jax.random.normal(keys[2], (T, B, H), jnp.float64)
        d0 = jax.random.normal(keys[3], (B, H), jnp.float64)
        yield params, x, d0


def _close(a, b):
    for p, q in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-10)


def test_the_hand_transpose_is_the_transpose(args):
    params, x, d0 = args
    a = jnp.tanh(x * params[0])
    cts = (jnp.cos(x), jnp.sin(d0))
    structs = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(d0.shape, d0.dtype))
    expected = jax.linear_transpose(lambda u, d: recurrence((a, params[1]), (u, d)), *structs)
    _close(recurrence_t((a, params[1]), cts), expected(cts))


@pytest.mark.parametrize("jit", [False, True])
def test_reverse_mode_calls_the_transpose(args, jit):
    params, x, d0 = args
    grad = jax.grad(_loss(with_kernel), argnums=(0, 1, 2))
    CALLS.clear()
    got = (jax.jit(grad) if jit else grad)(params, x, d0)
    assert CALLS, "reverse mode did not call the transpose"
    _close(got, jax.grad(_loss(plain), argnums=(0, 1, 2))(params, x, d0))


def test_forward_mode_and_evaluation_do_not(args):
    params, x, d0 = args
    CALLS.clear()
    got = jax.jvp(_loss(with_kernel), args, args)
    assert not CALLS
    _close(got, jax.jvp(_loss(plain), args, args))


def test_every_order_in_both_modes_equals_plain_jax(args):
    """Second derivatives differentiate the transpose with respect to the coefficients, which
    depend on the inputs: ``linear_call`` would treat them as constants and get these wrong."""
    params, x, d0 = args
    mine, ref = _loss(with_kernel), _loss(plain)
    _close(jax.hessian(mine, argnums=1)(*args), jax.hessian(ref, argnums=1)(*args))
    fwd_rev = lambda f: jax.jvp(jax.grad(f, argnums=1), args, args)[1]  # noqa: E731
    _close(fwd_rev(mine), fwd_rev(ref))
    rev_rev = lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f, argnums=1)(params, x, d0) ** 2))  # noqa: E731
    _close(rev_rev(mine)(x), rev_rev(ref)(x))


def test_vmap_and_a_zero_tangent(args):
    """Per-example gradients (the batching rule: the primitive again, on the vmapped
    functions, so the transpose still runs the hand one), and a gradient with respect to ``x``
    alone: the tangent of ``d0`` is then a zero made concrete, a known operand in the
    transpose."""
    params, x, d0 = args
    per_example = lambda f: jax.vmap(jax.grad(_loss(f), argnums=1), (None, 0, None))  # noqa: E731
    xs = jnp.stack([x, 2.0 * x, -x])
    CALLS.clear()
    got = per_example(with_kernel)(params, xs, d0)
    assert CALLS, "under vmap, reverse mode did not call the transpose"
    _close(got, per_example(plain)(params, xs, d0))
    CALLS.clear()
    got = jax.grad(_loss(with_kernel), argnums=1)(params, x, d0)
    assert CALLS
    _close(got, jax.grad(_loss(plain), argnums=1)(params, x, d0))


def test_constant_coefficients_keep_the_transpose(args):
    """Applied outside a ``custom_jvp`` rule with constant ``(a, W)``, its derivative is the
    same linear map, so reverse mode still runs the transpose."""
    params, x, d0 = args
    a = jnp.tanh(x * params[0])

    def loss(fn):
        def f(x, d0):
            ds, d_last = fn((x, d0))
            return jnp.sum(jnp.sin(ds)) + jnp.sum(d_last**2)

        return f

    mine = functools.partial(linear.apply, recurrence, recurrence_t, (a, params[1]))
    CALLS.clear()
    got = jax.grad(loss(mine), argnums=(0, 1))(x, d0)
    assert CALLS
    ref = functools.partial(recurrence, (a, params[1]))
    _close(got, jax.grad(loss(ref), argnums=(0, 1))(x, d0))


def test_vmapped_derivatives_of_every_order_equal_plain_jax(args):
    """The batched primitive differentiates as plain JAX too: per-example Hessians, and the
    gradient of a vmapped loss (batched coefficients, shared weights), with ``d0`` batched
    or shared."""
    params, x, d0 = args
    xs = jnp.stack([x, -0.5 * x])
    d0s = jnp.stack([d0, 2.0 * d0])
    for axes in ((None, 0, None), (None, 0, 0)):
        d = d0s if axes[2] == 0 else d0

        def hess(f, axes=axes):
            return jax.vmap(jax.hessian(_loss(f), argnums=1), axes)

        def total(f, axes=axes):
            batched = jax.vmap(_loss(f), axes)
            return jax.grad(lambda *a: jnp.sum(batched(*a)), argnums=(0, 1, 2))

        _close(hess(with_kernel)(params, xs, d), hess(plain)(params, xs, d))
        CALLS.clear()
        got = total(with_kernel)(params, xs, d)
        assert CALLS
        _close(got, total(plain)(params, xs, d))


# ``leading``: a weight term ``a @ dW`` over the rows of ``a``, as the fast path's tangent rule
# has one, whose transpose ``aᵀ · ct`` sums over all of them.
def rows_times(nonlin, lin):
    ((a,), (w,)) = nonlin, lin
    return (a @ w,)


def rows_times_t(nonlin, cts):
    CALLS.append(1)
    ((a,), (ct,)) = nonlin, cts
    return (jnp.tensordot(a, ct, axes=(tuple(range(a.ndim - 1)),) * 2),)


def _weight_term(leading):
    """``sum(sin(tanh(x) @ W))`` through a ``custom_jvp`` whose tangent rule applies the
    weight term ``tanh(x) @ dW`` with `linear.apply` (or as plain JAX: ``None``)."""

    @jax.custom_jvp
    def f(x, w):
        return jnp.tanh(x) @ w

    @f.defjvp
    def f_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        a = jnp.tanh(x)
        if leading is None:
            term = a @ dw
        else:
            (term,) = linear.apply(rows_times, rows_times_t, (a,), (dw,), leading=leading)
        return a @ w, term + ((1.0 - a**2) * dx) @ w

    return lambda w, x: jnp.sum(jnp.sin(f(x, w)))


def _transposed_outputs(fn, *args):
    """The output shapes of every transposed linear primitive in ``fn``'s jaxpr."""
    shapes = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "jaxrnn_linear" and eqn.params["transposed"]:
                shapes.extend(v.aval.shape for v in eqn.outvars)
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize("leading", [False, True])
def test_leading_folds_a_vmapped_axis_into_the_rows(leading):
    """Under ``vmap`` with a shared ``dW``, ``leading=True`` takes the examples as more rows
    of ``a``: the gradient of a vmapped loss transposes once into one ``dW``-shaped array
    (without it, one per example, summed afterwards). Values, per-example gradients, nested
    ``vmap`` and second derivatives equal plain JAX either way."""
    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.PRNGKey(np.random.randint(1 << 30)), 2)
        w = jax.random.normal(keys[0], (H, 4), jnp.float64)
        xs = jax.random.normal(keys[1], (2, 3, T, B, H), jnp.float64)
        mine, ref = _weight_term(leading), _weight_term(None)

        def total(loss):
            return jax.grad(lambda w, x: jnp.sum(jax.vmap(loss, (None, 0))(w, x)))

        CALLS.clear()
        _close(total(mine)(w, xs[0]), total(ref)(w, xs[0]))
        assert CALLS
        expected = [w.shape] if leading else [(3, *w.shape)]
        assert _transposed_outputs(total(mine), w, xs[0]) == expected
        nested = lambda loss: total(lambda w, x: jnp.sum(jax.vmap(loss, (None, 0))(w, x)))  # noqa: E731
        _close(nested(mine)(w, xs), nested(ref)(w, xs))
        per_example = lambda loss: jax.vmap(jax.grad(loss), (None, 0))  # noqa: E731
        _close(per_example(mine)(w, xs[0]), per_example(ref)(w, xs[0]))
        hess = lambda loss: jax.hessian(lambda w: jnp.sum(jax.vmap(loss, (None, 0))(w, xs[0])))  # noqa: E731
        _close(hess(mine)(w), hess(ref)(w))
        fwd = lambda loss: jax.jvp(lambda x: jax.vmap(loss, (None, 0))(w, x), (xs[0],), (xs[1],))  # noqa: E731
        _close(fwd(mine), fwd(ref))


NEEDED = []


def recurrence_t_pruned(nonlin, cts, needed):
    """`recurrence_t` told which cotangents are used (``prune``): the unused are zeros."""
    NEEDED.append(needed)
    ct_u, ct_d0 = recurrence_t(nonlin, cts)
    return (
        ct_u if needed[0] else jnp.zeros_like(ct_u),
        ct_d0 if needed[1] else jnp.zeros_like(ct_d0),
    )


def test_prune_tells_the_transpose_which_cotangents_are_used(args):
    """With ``prune``, the transpose learns which linear operands are constants (here the
    tangent of ``d0`` when only ``x`` is differentiated, a zero made concrete), also under
    ``vmap`` and under ``grad`` of a ``vmap``; gradients and second derivatives equal plain
    JAX's."""
    params, x, d0 = args
    pruned = _with_rule(
        lambda nonlin, lin: linear.apply(recurrence, recurrence_t_pruned, nonlin, lin, prune=True)
    )
    for argnums, needed in (((0, 1, 2), (True, True)), (1, (True, False)), (2, (False, True))):
        NEEDED.clear()
        _close(
            jax.jit(jax.grad(_loss(pruned), argnums))(*args),
            jax.grad(_loss(plain), argnums)(*args),
        )
        assert NEEDED == [needed]
    per_example = lambda f: jax.vmap(jax.grad(_loss(f), argnums=1), (None, 0, None))  # noqa: E731
    xs = jnp.stack([x, 2.0 * x, -x])
    NEEDED.clear()
    _close(per_example(pruned)(params, xs, d0), per_example(plain)(params, xs, d0))
    assert NEEDED == [(True, False)]
    of_vmap = lambda f: jax.grad(  # noqa: E731
        lambda x: jnp.sum(jax.vmap(_loss(f), (None, 0, None))(params, x, d0)), argnums=0
    )
    NEEDED.clear()
    _close(of_vmap(pruned)(xs), of_vmap(plain)(xs))
    assert NEEDED and set(NEEDED) == {(True, False)}
    _close(
        jax.hessian(_loss(pruned), argnums=1)(*args), jax.hessian(_loss(plain), argnums=1)(*args)
    )
