"""A linear function with a transpose of its own, as a JAX primitive.

``apply(fn, fn_t, nonlin, lin)`` returns ``fn(nonlin, lin)``, which must be linear in the
arrays ``lin``; reverse mode transposes it by calling ``fn_t(nonlin, cts)`` (the cotangents
of ``fn``'s outputs -> those of ``lin``) instead of transposing ``fn``'s operations one by
one. The fast path uses it for its tangent loop, so that the backward loop runs in the native
CPU kernel while forward mode keeps working.

Neither of JAX's own tools does this: a ``jax.custom_vjp`` blocks forward mode, and
``jax.custom_derivatives.linear_call`` has no batching rule and treats ``nonlin`` as constants
when differentiated (which makes second derivatives wrong whenever ``nonlin`` depends on the
inputs, as the fast path's residuals do). Here:

- evaluation and forward mode run ``fn`` (plain JAX);
- the transpose runs ``fn_t``, and the transpose of that runs ``fn`` again;
- every derivative of either direction (with respect to ``nonlin`` too, so to any order) is
  that of ``fn`` or of ``jax.linear_transpose(fn)``, in plain JAX;
- under ``vmap`` it is the same primitive again, on ``fn`` and ``fn_t`` vmapped: a batched
  transpose still runs ``fn_t`` (whose own batching rule may run it once for all examples,
  as the native kernel's does), and a batched primitive differentiates as above;
- with ``leading=True`` (``fn`` maps over the leading axes of ``nonlin``, and ``fn_t`` sums
  over them, as ``a @ W`` over the rows of ``a`` does), ``vmap`` with every ``lin`` operand
  unbatched folds the vmapped axis into those leading axes instead: the transpose then
  computes one cotangent for the shared ``lin`` (one matmul over all examples' rows) rather
  than one per example, summed afterwards.

So ``fn_t`` only has to be the transpose of ``fn`` at the given ``nonlin``, and needs no
derivatives of its own; the tests check it against ``jax.linear_transpose(fn)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_linear_p = Primitive("jaxrnn_linear")
_linear_p.multiple_results = True


def apply(fn, fn_t, nonlin, lin, *, leading=False, prune=False) -> tuple:
    """``fn(nonlin, lin)`` (a tuple of arrays), transposed by ``fn_t(nonlin, cts)``.

    ``fn`` and ``fn_t`` take and return tuples of arrays and must be hashable (functions or
    ``functools.partial`` objects); ``fn`` is linear in ``lin``. ``leading``: ``fn`` maps
    over any leading axes that all ``nonlin`` operands share (its outputs gain them too) and
    ``fn_t`` sums ``lin``'s cotangents over them (see the module's docstring). ``prune``:
    the transpose calls ``fn_t(nonlin, cts, needed=...)``, ``needed`` a bool per ``lin``
    operand, false where its cotangent is not used (a constant operand, e.g. the tangent of
    an input that is not differentiated); ``fn_t`` may return anything of the right shape
    there (zeros, which XLA then drops unread).
    """
    nonlin, lin = tuple(nonlin), tuple(lin)
    lin_avals = tuple((tuple(a.shape), jnp.dtype(a.dtype)) for a in lin)
    out = _linear_p.bind(
        *nonlin, *lin, fn=fn, fn_t=fn_t, n_nonlin=len(nonlin), lin_avals=lin_avals,
        transposed=False, leading=bool(leading), prune=bool(prune),
    )  # fmt: skip
    return tuple(out)


def _plain_transpose(fn, lin_avals):
    """``fn``'s transpose in plain JAX: ``(nonlin, cts) -> cts of lin``."""

    def fn_t(nonlin, cts):
        structs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in lin_avals]
        return tuple(jax.linear_transpose(lambda *lin: fn(nonlin, lin), *structs)(tuple(cts)))

    return fn_t


def _plain(fn, lin_avals, transposed, **_):
    """The plain-JAX function of a bound primitive (for derivatives and ``vmap``)."""
    return _plain_transpose(fn, lin_avals) if transposed else fn


def _impl(*args, fn, fn_t, n_nonlin, lin_avals, transposed, leading, prune):
    del lin_avals, leading, prune
    run = fn_t if transposed else fn
    return tuple(run(tuple(args[:n_nonlin]), tuple(args[n_nonlin:])))


def _abstract_eval(*avals, fn, fn_t, n_nonlin, lin_avals, transposed, leading, prune):
    del fn_t, leading, prune
    if transposed:
        return [ShapedArray(shape, dtype) for shape, dtype in lin_avals]
    nonlin, lin = avals[:n_nonlin], avals[n_nonlin:]
    out = jax.eval_shape(fn, nonlin, lin)
    return [ShapedArray(o.shape, o.dtype) for o in out]


def _jvp(primals, tangents, **params):
    n = params["n_nonlin"]
    if all(type(t) is ad.Zero for t in tangents[:n]):
        # Constant ``nonlin``: the derivative is the same linear map, transposable as before.
        lin_t = [ad.instantiate_zeros(t) for t in tangents[n:]]
        return _linear_p.bind(*primals, **params), _linear_p.bind(*primals[:n], *lin_t, **params)
    plain = _plain(**params)
    # Only the floating operands have tangents (the others, e.g. boolean masks, are constants).
    floating = [jnp.issubdtype(p.dtype, jnp.inexact) for p in primals]

    def f(*diff):
        it = iter(diff)
        args = [next(it) if d else p for p, d in zip(primals, floating)]
        return plain(tuple(args[:n]), tuple(args[n:]))

    diff_p = [p for p, d in zip(primals, floating) if d]
    diff_t = [ad.instantiate_zeros(t) for t, d in zip(tangents, floating) if d]
    out, out_t = jax.jvp(f, diff_p, diff_t)
    return list(out), list(out_t)


def _transpose(cts, *args, fn, fn_t, n_nonlin, lin_avals, transposed, leading, prune):
    nonlin, lin = args[:n_nonlin], args[n_nonlin:]
    if any(ad.is_undefined_primal(a) for a in nonlin):
        raise NotImplementedError("jaxrnn linear primitive: transposed in a non-linear operand")
    cts = [ad.instantiate_zeros(ct) for ct in cts]
    if prune and not transposed:
        fn_t = functools.partial(fn_t, needed=tuple(ad.is_undefined_primal(a) for a in lin))
    out = _linear_p.bind(
        *nonlin, *cts, fn=fn, fn_t=fn_t, n_nonlin=n_nonlin, lin_avals=lin_avals,
        transposed=not transposed, leading=leading, prune=prune,
    )  # fmt: skip
    # A known linear operand (a zero tangent made concrete) adds a constant: no cotangent.
    return [None] * n_nonlin + [o if ad.is_undefined_primal(a) else None for o, a in zip(out, lin)]


class _Vmapped:
    """``f`` vmapped over the leading axis of its arguments (``None``: an unbatched
    ``nonlin`` operand; every linear operand is batched). A hashable value, as the primitive's
    parameters must be."""

    def __init__(self, f, nonlin_axes):
        self.f, self.nonlin_axes = f, tuple(nonlin_axes)

    def __call__(self, nonlin, lin, **kwargs):
        n = len(self.nonlin_axes)
        axes = (*self.nonlin_axes, *(0,) * len(lin))
        return jax.vmap(lambda *a: tuple(self.f(a[:n], a[n:], **kwargs)), in_axes=axes)(
            *nonlin, *lin
        )

    def __eq__(self, other):
        return isinstance(other, _Vmapped) and (self.f, self.nonlin_axes) == (
            other.f, other.nonlin_axes,
        )  # fmt: skip

    def __hash__(self):
        return hash((self.f, self.nonlin_axes))


def _batch(args, dims, *, fn, fn_t, n_nonlin, lin_avals, transposed, leading, prune):
    """The same primitive on the vmapped functions, so that a batched transpose still runs
    ``fn_t`` (once, vmapped) and a batched primitive is still differentiable in plain JAX.
    Unbatched linear operands are broadcast: the transpose then gives every example its own
    cotangent, which the caller's ``vmap`` sums where the operand was shared. With
    ``leading`` and every linear operand unbatched, the same ``fn`` takes the vmapped axis as
    one more leading axis of ``nonlin`` (the unbatched ones broadcast), and the shared
    operand's cotangent stays one array."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    if leading and not transposed and all(d is None for d in dims[n_nonlin:]):
        nonlin = [
            jnp.moveaxis(a, d, 0) if d is not None else jnp.broadcast_to(a, (size, *a.shape))
            for a, d in zip(args[:n_nonlin], dims[:n_nonlin])
        ]
        out = _linear_p.bind(
            *nonlin, *args[n_nonlin:], fn=fn, fn_t=fn_t, n_nonlin=n_nonlin,
            lin_avals=lin_avals, transposed=False, leading=True, prune=prune,
        )  # fmt: skip
        return list(out), [0] * len(out)
    nonlin, axes = [], []
    for a, d in zip(args[:n_nonlin], dims[:n_nonlin]):
        batched = d is not None
        nonlin.append(jnp.moveaxis(a, d, 0) if batched else a)
        axes.append(0 if batched else None)
    lin = [
        jnp.moveaxis(a, d, 0) if d is not None
        else jnp.broadcast_to(a, (size, *a.shape))
        for a, d in zip(args[n_nonlin:], dims[n_nonlin:])
    ]  # fmt: skip
    out = _linear_p.bind(
        *nonlin, *lin, fn=_Vmapped(fn, axes), fn_t=_Vmapped(fn_t, axes), n_nonlin=n_nonlin,
        lin_avals=tuple(((size, *shape), dtype) for shape, dtype in lin_avals),
        transposed=transposed, leading=False, prune=prune,
    )  # fmt: skip
    return list(out), [0] * len(out)


_linear_p.def_impl(_impl)
_linear_p.def_abstract_eval(_abstract_eval)
ad.primitive_jvps[_linear_p] = _jvp
ad.primitive_transposes[_linear_p] = _transpose
batching.primitive_batchers[_linear_p] = _batch
mlir.register_lowering(_linear_p, mlir.lower_fun(_impl, multiple_results=True))
