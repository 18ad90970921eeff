"""Gradients through time: ``dL/dh_t`` for every step in one backward pass, and the per-step
Jacobians ``dh_t/dh_{t-1}``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxrnn._src.cell import Cell

Array = jax.Array


def _tree_add(a, b):
    return jax.tree_util.tree_map(jnp.add, a, b)


def _time_major(xs: Array) -> Array:
    if xs.ndim < 2:
        raise ValueError(
            f"diagnostics: xs must be (*batch, time, features), got shape {tuple(xs.shape)}."
        )
    return jnp.moveaxis(xs, -2, 0)


def hidden_state_grads(
    cell: Cell, params, xs: Array, loss_fn: Callable[[Array, object], Array], carry=None
):
    r"""The gradient of a loss with respect to every carry :math:`h_t`, in one backward pass.

    A zero perturbation :math:`\epsilon_t` is added to the carry after each step,
    :math:`h_t \leftarrow h_t + \epsilon_t`, and a single reverse-mode pass gives

    .. math::

        \frac{\partial L}{\partial \epsilon_t}\Big|_{\epsilon = 0}
          = \frac{\partial L}{\partial h_t}, \qquad t = 1, \dots, T,

    the total derivative through every later step — the quantity that vanishes (or explodes)
    as it is carried back through :math:`\partial h_{t}/\partial h_{t-1}`. The output
    :math:`y_t` is taken to be the first carry leaf :math:`h_t` when their shapes agree (true
    for `elman`, `lstm` and `gru`), so a loss on the outputs sees the perturbation too.

    Args:
      cell: a `Cell`.
      params: the cell's params.
      xs: ``(*batch, time, input_size)``.
      loss_fn: ``loss_fn(ys, final_carry) -> scalar`` with ``ys: (*batch, time, output)``.
      carry: the initial carry; default zeros.

    Returns:
      ``(loss, grads)``: ``grads`` has the carry's structure, every leaf with a leading time
      axis, ``(time, *batch, ...)``; ``grads[t]`` is :math:`\partial L/\partial h_{t+1}`.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> from jaxrnn import diagnostics
      >>> cell = jaxrnn.lstm(8)
      >>> params = cell.init(jax.random.PRNGKey(0), 3)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (2, 20, 3))
      >>> loss, grads = diagnostics.hidden_state_grads(
      ...     cell, params, xs, lambda ys, carry: jnp.sum(ys[:, -1]))
      >>> grads.h.shape, grads.c.shape
      ((20, 2, 8), (20, 2, 8))
    """
    xs_tm = _time_major(xs)
    batch_shape = tuple(xs.shape[:-2])
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    steps = xs_tm.shape[0]
    zeros = jax.tree_util.tree_map(lambda c: jnp.zeros((steps, *c.shape), c.dtype), carry)

    def total_loss(eps, params, xs_tm, carry):
        xw = cell.project(params, xs_tm)

        def body(c, inputs):
            xw_t, eps_t = inputs
            c, y = cell.recur(params, c, xw_t)
            c = _tree_add(c, eps_t)
            h_eps = jax.tree_util.tree_leaves(eps_t)[0]
            if y.shape == h_eps.shape:
                y = y + h_eps
            return c, y

        final, ys = lax.scan(body, carry, (xw, eps))
        return loss_fn(jnp.moveaxis(ys, 0, -2), final)

    # One compiled program rather than op-by-op dispatch.
    return jax.jit(jax.value_and_grad(total_loss))(zeros, params, xs_tm, carry)


def grad_norms(
    cell: Cell, params, xs: Array, loss_fn: Callable[[Array, object], Array], carry=None
) -> Array:
    r""":math:`\lVert \partial L / \partial h_t \rVert` for every step ``t``, one backward pass.

    The norm is the Frobenius norm over the batch and the hidden units of the hidden state
    :math:`h_t` (the first carry leaf; the LSTM's cell state is left out). See
    `hidden_state_grads`.

    Args:
      cell: a `Cell`.
      params: the cell's params.
      xs: ``(*batch, time, input_size)``.
      loss_fn: ``loss_fn(ys, final_carry) -> scalar``.
      carry: the initial carry; default zeros.

    Returns:
      ``(time,)`` norms; ``norms[0] / norms[-1]`` measures how much the gradient shrinks (or
      grows) from the last step back to the first.

    Example:
      >>> import jax, jax.numpy as jnp, jaxrnn
      >>> from jaxrnn import diagnostics
      >>> cell = jaxrnn.elman(16)
      >>> params = cell.init(jax.random.PRNGKey(0), 2)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (4, 50, 2))
      >>> norms = diagnostics.grad_norms(cell, params, xs, lambda ys, h: jnp.sum(ys[:, -1]))
      >>> norms.shape, bool(norms[0] < 1e-3 * norms[-1])
      ((50,), True)
    """
    _, grads = hidden_state_grads(cell, params, xs, loss_fn, carry)
    h = jax.tree_util.tree_leaves(grads)[0]
    return jnp.sqrt(jnp.sum(jnp.reshape(h, (h.shape[0], -1)) ** 2, axis=1))


def carries_through_time(cell: Cell, params, xs: Array, carry=None):
    """Every carry of a run: ``carries[t]`` is the carry after step ``t``, time axis first.

    Args:
      cell: a `Cell`.
      params: the cell's params.
      xs: ``(*batch, time, input_size)``.
      carry: the initial carry; default zeros.

    Returns:
      The carry pytree with each leaf ``(time, *batch, ...)``.
    """
    xs_tm = _time_major(xs)
    if carry is None:
        carry = cell.initial_carry(tuple(xs.shape[:-2]), xs.dtype)

    @jax.jit
    def run(params, xs_tm, carry):
        def body(c, xw_t):
            c, _ = cell.recur(params, c, xw_t)
            return c, c

        return lax.scan(body, carry, cell.project(params, xs_tm))[1]

    return run(params, xs_tm, carry)


def jacobian_norms(cell: Cell, params, xs: Array, carry=None, *, ord=2) -> Array:
    r"""The norm of each step's Jacobian :math:`\partial h_t / \partial h_{t-1}`.

    The Jacobian is taken with respect to the whole carry, flattened (``h`` for `elman` and
    `gru`, ``(h, c)`` for `lstm`), for each sequence of the batch. For the Elman RNN

    .. math::

        \frac{\partial h_t}{\partial h_{t-1}} = W_h^\top \operatorname{diag}(\tanh'(z_t)),
        \qquad \Big\lVert \frac{\partial L}{\partial h_1} \Big\rVert \le
        \Big\lVert \frac{\partial L}{\partial h_T} \Big\rVert
        \prod_{t=2}^{T} \Big\lVert \frac{\partial h_t}{\partial h_{t-1}} \Big\rVert,

    so norms below 1 make the gradient vanish geometrically.

    Args:
      cell: a `Cell`.
      params: the cell's params.
      xs: ``(*batch, time, input_size)``.
      carry: the initial carry; default zeros.
      ord: the matrix norm, as ``jnp.linalg.norm``'s (``2``: the largest singular value;
        ``"fro"``: Frobenius).

    Returns:
      ``(*batch, time)`` norms; entry ``t`` is the Jacobian of step ``t`` (from the carry
      before it to the carry after it).

    Example:
      >>> import jax, jaxrnn
      >>> from jaxrnn import diagnostics
      >>> cell = jaxrnn.gru(4)
      >>> params = cell.init(jax.random.PRNGKey(0), 2)
      >>> xs = jax.random.normal(jax.random.PRNGKey(1), (3, 6, 2))
      >>> diagnostics.jacobian_norms(cell, params, xs).shape
      (3, 6)
    """
    batch_shape = tuple(xs.shape[:-2])
    if carry is None:
        carry = cell.initial_carry(batch_shape, xs.dtype)
    after = carries_through_time(cell, params, xs, carry)
    before = jax.tree_util.tree_map(
        lambda c0, cs: jnp.concatenate([c0[None], cs[:-1]], axis=0), carry, after
    )
    nb = len(batch_shape)

    def one(params, c_prev, xw_t):
        flat, unravel = ravel_pytree(c_prev)

        def f(v):
            return ravel_pytree(cell.recur(params, unravel(v), xw_t)[0])[0]

        return jnp.linalg.norm(jax.jacrev(f)(flat), ord=ord)

    fn = one
    for _ in range(nb + 1):  # time, then every batch dim
        fn = jax.vmap(fn, in_axes=(None, 0, 0))

    @jax.jit
    def all_norms(params, before, xs):
        return fn(params, before, cell.project(params, _time_major(xs)))  # (time, *batch)

    return jnp.moveaxis(all_norms(params, before, xs), 0, -1)


def adding_loss_grad_norms(cell: Cell, *, seq_len: int, key, batch_size: int = 16):
    """`grad_norms` of the adding problem's loss for ``cell`` at initialisation.

    The model is ``cell`` plus a linear readout (``jaxrnn.train.sequence_model``), its params
    drawn from ``key``; the loss is the mean squared error of the prediction at the last step.

    Args:
      cell: a `Cell`.
      seq_len: the sequence length ``T``.
      key: PRNG key for the params and the batch.
      batch_size: sequences in the batch.

    Returns:
      ``(norms, jac_norms)``: ``(T,)`` gradient norms and ``(T,)`` Jacobian norms (mean over
      the batch).
    """
    from jaxrnn import tasks
    from jaxrnn.train import sequence_model

    task = tasks.adding(seq_len)
    model = sequence_model(cell, 1)
    k_params, k_data = jax.random.split(key)
    params = model.init(k_params, task.input_size)
    batch = task.sample(k_data, batch_size)

    def loss_fn(ys, carry):
        del carry
        return task.loss(ys[:, -1] @ params.readout.w + params.readout.b, batch.targets)

    norms = grad_norms(cell, params.cell, batch.inputs, loss_fn)
    jac = jnp.mean(jacobian_norms(cell, params.cell, batch.inputs), axis=0)
    return norms, jac
