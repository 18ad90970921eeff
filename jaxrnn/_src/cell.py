"""The `Cell` type: a recurrent cell as a bundle of pure functions.

A cell is built by a factory (``jaxrnn.elman``, ``jaxrnn.lstm``, ``jaxrnn.gru`` or
``jaxrnn.make_cell`` for a user's own step function). It holds no state: configuration lives
in the factory's closure, parameters are a pytree the caller passes in, and the carry is
threaded through explicitly in ``jax.lax.scan``'s argument order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Params = Any
Carry = Any
Array = jax.Array


class Cell(NamedTuple):
    """A recurrent cell: pure functions plus a little static metadata.

    Attributes:
      init: ``init(key, input_size, *, dtype=jnp.float32) -> params``, a pytree (a NamedTuple for
        the built-in cells).
      initial_carry: ``initial_carry(batch_shape=(), dtype=jnp.float32) -> carry``, zeros; each
        leaf has shape ``(*batch_shape, ...)``.
      step: ``step(params, carry, x) -> (carry, y)`` with ``x: (*batch, input_size)``; the argument
        order of ``jax.lax.scan``, so ``functools.partial(cell.step, params)`` is a scan body.
      project: ``project(params, xs) -> xw``, the part of the step that depends only on the input;
        it accepts any leading dims, so the runner applies it to a whole sequence at once.
      recur: ``recur(params, carry, xw) -> (carry, y)``, the rest of the step, so that
        ``step(p, c, x) == recur(p, c, project(p, x))``.
      name: a short name used in error messages (``"lstm"``, ``"gru"``, ...).
      hidden_size: the size of the hidden state ``h`` (``None`` if unknown).
      output_size: the size of ``y`` (``None`` if unknown).
      params_type: the type of the params pytree, used to reject params of another cell.
      input_size_of: ``params -> int`` giving the input size the params were built for, used to
        check ``xs`` (``None``: not checked).
      check_params: ``params -> None``; raises ``ValueError`` when params do not belong to this cell
        (e.g. another hidden size). ``None``: not checked.
      kind: which built-in recurrence this is (``"elman_tanh"``, ``"elman_relu"``, ``"lstm"``,
        ``"gru"``), so the runner can take its sequence-level fast path; ``None`` for user cells
        (and cells the fast path does not cover), which run the generic scan.
    """

    init: Callable[..., Params]
    initial_carry: Callable[..., Carry]
    step: Callable[[Params, Carry, Array], tuple[Carry, Array]]
    project: Callable[[Params, Array], Array]
    recur: Callable[[Params, Carry, Array], tuple[Carry, Array]]
    name: str = "custom"
    hidden_size: int | None = None
    output_size: int | None = None
    params_type: type | None = None
    input_size_of: Callable[[Params], int] | None = None
    check_params: Callable[[Params], None] | None = None
    kind: str | None = None


def _identity_project(params: Params, xs: Array) -> Array:
    del params
    return xs


def make_cell(
    step: Callable[[Params, Carry, Array], tuple[Carry, Array]],
    init: Callable[..., Params],
    initial_carry: Callable[..., Carry],
    *,
    project: Callable[[Params, Array], Array] | None = None,
    recur: Callable[[Params, Carry, Array], tuple[Carry, Array]] | None = None,
    name: str = "custom",
    hidden_size: int | None = None,
    output_size: int | None = None,
) -> Cell:
    """Makes a `Cell` from a user's own step function, so it runs in `jaxrnn.unroll`.

    Give either ``step`` alone (then ``project`` is the identity and ``recur`` is ``step``) or
    ``project`` and ``recur`` as well (then ``step`` must equal ``recur(p, c, project(p, x))``;
    pass ``step=None`` to have it composed for you).

    Args:
      step: ``step(params, carry, x) -> (carry, y)``, or ``None`` when ``project`` and ``recur``
        are given.
      init: ``init(key, input_size, *, dtype=jnp.float32) -> params``.
      initial_carry: ``initial_carry(batch_shape=(), dtype=jnp.float32) -> carry``. Every carry
        leaf must have the batch dims first: ``(*batch_shape, ...)``.
      project: optional input projection, applied by the runner to the whole sequence at once.
      recur: optional recurrent part; required when ``project`` is given.
      name: used in error messages.
      hidden_size: optional, for documentation and checks.
      output_size: optional, for documentation and checks.

    Returns:
      A `Cell`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> def step(params, h, x):
      ...     h = jnp.tanh(x @ params["w"] + h * params["decay"])
      ...     return h, h
      >>> def init(key, input_size, *, dtype=jnp.float32):
      ...     w = jax.random.normal(key, (input_size, 4), dtype)
      ...     return {"w": w, "decay": jnp.full(4, 0.9, dtype)}
      >>> cell = jaxrnn.make_cell(step, init, lambda batch_shape=(), dtype=jnp.float32:
      ...                         jnp.zeros((*batch_shape, 4), dtype))
      >>> params = cell.init(jax.random.PRNGKey(0), 3)
      >>> ys, h = jaxrnn.unroll(cell, params, jnp.ones((2, 5, 3)))
      >>> ys.shape, h.shape
      ((2, 5, 4), (2, 4))
    """
    if project is None and recur is None:
        if step is None:
            raise ValueError("make_cell: give `step`, or both `project` and `recur`; got neither.")
        project, recur = _identity_project, step
    elif project is None or recur is None:
        raise ValueError(
            "make_cell: `project` and `recur` go together; got "
            f"project={'set' if project is not None else None}, "
            f"recur={'set' if recur is not None else None}. Pass both, or only `step`."
        )
    if step is None:
        _project, _recur = project, recur

        def step(params, carry, x):
            return _recur(params, carry, _project(params, x))

    return Cell(
        init=init,
        initial_carry=initial_carry,
        step=step,
        project=project,
        recur=recur,
        name=name,
        hidden_size=hidden_size,
        output_size=output_size,
    )


def as_compute(w: Array | None, dtype) -> Array | None:
    """Casts a parameter to the compute dtype (the input's), leaving ``None`` alone."""
    return None if w is None else w.astype(dtype)


def zeros_carry(hidden_size: int, batch_shape=(), dtype=jnp.float32) -> Array:
    return jnp.zeros((*tuple(batch_shape), hidden_size), dtype)


def resolve_inits(hidden_size, kernel_init, recurrent_init, bias_init, recurrent_bias_init):
    """Fills ``None`` initializers with PyTorch's default, ``U(-1/sqrt(H), 1/sqrt(H))``."""
    from jaxrnn._src import initializers

    default = initializers.pytorch_uniform(hidden_size)
    return tuple(
        default if init is None else init
        for init in (kernel_init, recurrent_init, bias_init, recurrent_bias_init)
    )


def check_positive_int(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{fn}: {name} must be a positive int, got {value!r}.")
    return value


def check_fused_params(
    cell_name: str, params, params_type: type, state_size: int, width: int, use_bias: bool
) -> None:
    """Checks params of a fused-gate cell: type, ``w_h`` shape, bias presence."""
    if not isinstance(params, params_type):
        raise TypeError(
            f"{cell_name}: params must be {params_type.__name__}, got "
            f"{type(params).__name__}; params from another cell type do not fit this cell. "
            f"Build them with this cell's init."
        )
    if params.w_h.shape != (state_size, width):
        raise ValueError(
            f"{cell_name}: params.w_h must have shape {(state_size, width)}, got "
            f"{tuple(params.w_h.shape)}; were the params built for another hidden_size?"
        )
    if params.w_x.ndim != 2 or params.w_x.shape[1] != width:
        raise ValueError(
            f"{cell_name}: params.w_x must have shape (input_size, {width}), got "
            f"{tuple(params.w_x.shape)}."
        )
    has_bias = params.b_x is not None
    if has_bias != use_bias:
        raise ValueError(
            f"{cell_name}: the cell was built with use_bias={use_bias} but the params "
            f"{'have' if has_bias else 'have no'} biases."
        )


def fused_init(
    fn: str, inits, key, input_size, state_size: int, width: int, use_bias: bool, dtype, num_keys=4
):
    """Draws ``[w_x, w_h, b_x, b_h]`` of a fused-gate cell (biases ``None`` without bias) and
    returns them with the keys, so a cell can draw extra params from ``keys[4:]``."""
    check_positive_int(fn, "input_size", input_size)
    keys = jax.random.split(key, num_keys)
    shapes = [(input_size, width), (state_size, width), (width,), (width,)]
    values = [f(k, s, dtype) for f, k, s in zip(inits, keys, shapes)]
    if not use_bias:
        values[2:] = [None, None]
    return values, keys


def fused_project(params, xs: Array) -> Array:
    """``xs · W_x + b_x`` in the input's dtype: every gate's input term in one matmul."""
    xw = xs @ params.w_x.astype(xs.dtype)
    return xw if params.b_x is None else xw + params.b_x.astype(xs.dtype)


def fused_recurrent(params, h: Array, dtype) -> Array:
    """``h · W_h + b_h`` in ``dtype``: every gate's recurrent term in one matmul."""
    hw = h @ params.w_h.astype(dtype)
    return hw if params.b_h is None else hw + params.b_h.astype(dtype)


def fused_cell(
    *,
    name: str,
    kind: str | None,
    params_type: type,
    init,
    initial_carry,
    recur,
    hidden_size: int,
    output_size: int,
    state_size: int,
    width: int,
    use_bias: bool,
    extra_check: Callable[[Params], None] | None = None,
) -> Cell:
    """Assembles the `Cell` of a fused-gate cell (``project`` = `fused_project`)."""

    def step(params, carry, x):
        return recur(params, carry, fused_project(params, x))

    def check_params(params) -> None:
        check_fused_params(name, params, params_type, state_size, width, use_bias)
        if extra_check is not None:
            extra_check(params)

    return Cell(
        init=init,
        initial_carry=initial_carry,
        step=step,
        project=fused_project,
        recur=recur,
        name=name,
        hidden_size=hidden_size,
        output_size=output_size,
        params_type=params_type,
        input_size_of=lambda p: p.w_x.shape[0],
        check_params=check_params,
        kind=kind,
    )
