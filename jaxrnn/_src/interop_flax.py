"""Weight conversion from Flax's recurrent cells to jaxrnn.

Flax keeps one ``Dense`` per gate; jaxrnn fuses the gates in the same order (LSTM ``i, f, g,
o``; GRU ``r, z, n``), so a conversion is a concatenation, exact in every bit. Where Flax has no
bias jaxrnn gets a zero bias, which adds exactly zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrnn._src import elman as elman_lib
from jaxrnn._src import gru as gru_lib
from jaxrnn._src import layers
from jaxrnn._src import lstm as lstm_lib

_SUPPORTED = "flax.linen.SimpleCell, LSTMCell, OptimizedLSTMCell, GRUCell (or an nn.RNN of one)"


def _function_name(fn_value) -> str:
    return getattr(fn_value, "__name__", repr(fn_value))


def _check_fn(fn: str, module, attr: str, allowed: dict) -> str:
    value = getattr(module, attr)
    for name, candidates in allowed.items():
        if any(value is c for c in candidates):
            return name
    raise ValueError(
        f"{fn}: {type(module).__name__}.{attr} must be one of {sorted(allowed)} to convert, got "
        f"{_function_name(value)}; jaxrnn's cells only compute these."
    )


def _tanh_relu_sigmoid():
    import flax.linen as nn

    return (
        {"tanh": (jnp.tanh, nn.tanh, jax.nn.tanh), "relu": (nn.relu, jax.nn.relu)},
        {"sigmoid": (nn.sigmoid, jax.nn.sigmoid)},
    )


def _dense(fn: str, params, name: str, features: int, bias: bool):
    if name not in params:
        raise ValueError(
            f"{fn}: params have no {name!r} (got keys {sorted(params)}); pass the cell's "
            f"variables['params'] (or the whole variables dict)."
        )
    sub = params[name]
    kernel = jnp.asarray(sub["kernel"])
    recurrent = name.startswith("h")
    rows = features if recurrent else "in"
    wrong_rows = recurrent and kernel.ndim == 2 and kernel.shape[0] != features
    if kernel.ndim != 2 or kernel.shape[1] != features or wrong_rows:
        raise ValueError(
            f"{fn}: params[{name!r}]['kernel'] must have shape ({rows}, {features}) for "
            f"features={features}, got {tuple(kernel.shape)}."
        )
    if bias and "bias" not in sub:
        raise ValueError(f"{fn}: params[{name!r}] must have a 'bias', got keys {sorted(sub)}.")
    return kernel, (jnp.asarray(sub["bias"]) if bias else None)


def _unwrap(fn: str, module, variables):
    import flax.linen as nn

    params = variables.get("params", variables)
    if isinstance(module, nn.RNN):
        if "cell" not in params:
            raise ValueError(
                f"{fn}: variables of a flax.linen.RNN must hold params['cell'], got keys "
                f"{sorted(params)}."
            )
        return module.cell, params["cell"]
    return module, params


def _from_bidirectional(fn: str, module, variables):
    """``flax.linen.Bidirectional`` of two ``flax.linen.RNN``: a one-layer bidirectional
    `Network`."""
    from flax.linen import recurrent

    if module.merge_fn is not recurrent._concatenate:
        raise ValueError(
            f"{fn}: Bidirectional.merge_fn must be the default (concatenation, as a jaxrnn "
            f"bidirectional layer), got {_function_name(module.merge_fn)}."
        )
    params = variables.get("params", variables)
    converted = []
    for name in ("forward_rnn", "backward_rnn"):
        rnn = getattr(module, name)
        if not isinstance(rnn, recurrent.RNN):
            raise TypeError(
                f"{fn}: Bidirectional.{name} must be a flax.linen.RNN, got {type(rnn).__name__}."
            )
        if name not in params:
            raise ValueError(f"{fn}: params have no {name!r}, got keys {sorted(params)}.")
        converted.append(from_flax(rnn.cell, params[name]["cell"]))
    (forward, forward_params), (backward, backward_params) = converted
    if forward.name != backward.name:
        raise ValueError(
            f"{fn}: a jaxrnn bidirectional layer runs one cell type in both directions; got "
            f"{forward.name} forward and {backward.name} backward."
        )
    net = layers.stack(forward, 1, bidirectional=True)
    return net, ((forward_params, backward_params),)


def _nnx_linear(layer):
    """``(kernel, bias or None)`` of an ``nnx.Linear``."""
    bias = None if layer.bias is None else jnp.asarray(layer.bias[...])
    return jnp.asarray(layer.kernel[...]), bias


def _from_nnx(fn: str, module):
    """Converts a ``flax.nnx`` cell; its params live in the module."""
    from flax import nnx

    activations, gates = _tanh_relu_sigmoid()
    hidden = int(module.hidden_features)
    if isinstance(module, nnx.SimpleCell):
        if module.residual:
            raise ValueError(
                f"{fn}: SimpleCell(residual=True) adds h to the pre-activation, which jaxrnn's "
                f"elman does not compute; convert a cell with residual=False."
            )
        activation = _check_fn(fn, module, "activation_fn", activations)
        w_x, b_x = _nnx_linear(module.dense_i)
        w_h, _ = _nnx_linear(module.dense_h)
        params = elman_lib.ElmanParams(w_x, w_h, b_x, jnp.zeros_like(b_x))
        return elman_lib.elman(hidden, activation=activation), params
    _check_fn(fn, module, "activation_fn", {"tanh": activations["tanh"]})
    _check_fn(fn, module, "gate_fn", gates)
    if isinstance(module, nnx.LSTMCell):
        xs = [_nnx_linear(getattr(module, f"i{g}"))[0] for g in ("i", "f_", "g", "o")]
        hs = [_nnx_linear(getattr(module, f"h{g}")) for g in "ifgo"]
        w_x, w_h = jnp.concatenate(xs, axis=1), jnp.concatenate([w for w, _ in hs], axis=1)
        b_h = jnp.concatenate([b for _, b in hs])
        return lstm_lib.lstm(hidden), lstm_lib.LSTMParams(w_x, w_h, jnp.zeros_like(b_h), b_h)
    if isinstance(module, nnx.OptimizedLSTMCell):
        (w_x, _), (w_h, b_h) = _nnx_linear(module.dense_i), _nnx_linear(module.dense_h)
        return lstm_lib.lstm(hidden), lstm_lib.LSTMParams(w_x, w_h, jnp.zeros_like(b_h), b_h)
    if isinstance(module, nnx.GRUCell):
        (w_x, b_x), (w_h, _) = _nnx_linear(module.dense_i), _nnx_linear(module.dense_h)
        return gru_lib.gru(hidden), gru_lib.GRUParams(w_x, w_h, b_x, jnp.zeros_like(b_x))
    raise TypeError(
        f"{fn}: module must be one of {_SUPPORTED} or flax.nnx.SimpleCell, LSTMCell, "
        f"OptimizedLSTMCell, GRUCell; got {type(module).__name__}."
    )


def from_flax(module, variables=None):
    r"""Imports a Flax recurrent cell's params into jaxrnn: the matching cell and its params.

    ============================  ======================================================
    Flax                          jaxrnn
    ============================  ======================================================
    ``SimpleCell``                ``elman(H, activation=...)``; ``b_x = i.bias``, ``b_h = 0``
    ``LSTMCell``,                 ``lstm(H)``; ``w_x = [ii, if, ig, io]``,
    ``OptimizedLSTMCell``         ``w_h = [hi, hf, hg, ho]``, ``b_x = 0``, ``b_h = h*.bias``
    ``GRUCell``                   ``gru(H)``; ``w_x = [ir, iz, in]``, ``b_x = i*.bias``,
                                  ``w_h = [hr, hz, hn]``, ``b_h = [0, 0, hn.bias]``
    ============================  ======================================================

    The ``flax.nnx`` cells of the same names convert too (pass the module alone: it holds its
    params); their ``GRUCell`` has no recurrent bias at all and their ``OptimizedLSTMCell``
    and ``GRUCell`` fuse the gates already.

    Flax's GRU computes :math:`n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn}))`,
    PyTorch's form, which jaxrnn's `gru` computes too; Flax has no recurrent bias on ``r`` and
    ``z``, which become zeros. So every supported cell converts exactly. The carries differ
    in order: Flax's LSTM carry is ``(c, h)``, jaxrnn's ``LSTMCarry(h, c)``; use
    `carry_from_flax` / `carry_to_flax`.

    Args:
      module: the Flax cell (its configuration is read: ``features``, ``activation_fn``,
        ``gate_fn``, ``residual``), a ``flax.linen.RNN`` wrapping one, or a
        ``flax.linen.Bidirectional`` of two such ``RNN`` with the same cell type.
      variables: its variables (``{'params': ...}``) or just the params dict; ``None`` for a
        ``flax.nnx`` cell.

    Returns:
      ``(cell, params)``: a `jaxrnn.Cell` and its params, so that
      ``jaxrnn.unroll(cell, params, xs, seq_lengths=..., reverse=...)`` equals
      ``flax.linen.RNN(module, ...)`` (with ``keep_order=True`` when reversed). For a
      ``Bidirectional``, ``(net, params)`` with ``net = jaxrnn.stack(cell, 1,
      bidirectional=True)``, so that ``net.apply(params, xs, seq_lengths=...)`` equals it.

    Raises:
      TypeError: for another module type.
      ValueError: for a configuration jaxrnn does not compute (``SimpleCell(residual=True)``,
        an activation other than tanh/relu, a gate other than sigmoid, a ``flax.linen.RNN``
        with ``reverse=True, keep_order=False``, a ``Bidirectional`` with another
        ``merge_fn`` or two cell types) or params of the wrong structure or shape.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, jaxrnn, jaxrnn.interop
      >>> flax_cell = nn.GRUCell(features=4)
      >>> variables = flax_cell.init(jax.random.PRNGKey(0), jnp.zeros(4), jnp.zeros(3))
      >>> cell, params = jaxrnn.interop.from_flax(flax_cell, variables)
      >>> params.w_x.shape, params.b_h.shape
      ((3, 12), (12,))
    """
    import flax.linen as nn
    from flax import nnx

    fn = "from_flax"
    if isinstance(module, nnx.Module):
        return _from_nnx(fn, module)
    if variables is None:
        raise ValueError(
            f"{fn}: a flax.linen module keeps no params; pass its variables as well, "
            f"from_flax(module, variables)."
        )
    if isinstance(module, nn.Bidirectional):
        return _from_bidirectional(fn, module, variables)
    if isinstance(module, nn.RNN) and module.reverse and not module.keep_order:
        raise ValueError(
            f"{fn}: flax.linen.RNN(reverse=True, keep_order=False) returns outputs in reversed "
            f"order, which jaxrnn does not; use keep_order=True, or flip the outputs yourself."
        )
    cell_module, params = _unwrap(fn, module, variables)
    activations, gates = _tanh_relu_sigmoid()
    hidden = int(cell_module.features)
    if isinstance(cell_module, nn.SimpleCell):
        if cell_module.residual:
            raise ValueError(
                f"{fn}: SimpleCell(residual=True) adds h to the pre-activation, which jaxrnn's "
                f"elman does not compute; convert a cell with residual=False."
            )
        activation = _check_fn(fn, cell_module, "activation_fn", activations)
        w_x, b_x = _dense(fn, params, "i", hidden, bias=True)
        w_h, _ = _dense(fn, params, "h", hidden, bias=False)
        cell = elman_lib.elman(hidden, activation=activation)
        return cell, elman_lib.ElmanParams(w_x, w_h, b_x, jnp.zeros_like(b_x))
    if isinstance(cell_module, (nn.LSTMCell, nn.OptimizedLSTMCell)):
        _check_fn(fn, cell_module, "activation_fn", {"tanh": activations["tanh"]})
        _check_fn(fn, cell_module, "gate_fn", gates)
        xs = [_dense(fn, params, f"i{g}", hidden, bias=False)[0] for g in "ifgo"]
        hs = [_dense(fn, params, f"h{g}", hidden, bias=True) for g in "ifgo"]
        b_h = jnp.concatenate([b for _, b in hs])
        params_out = lstm_lib.LSTMParams(
            jnp.concatenate(xs, axis=1),
            jnp.concatenate([w for w, _ in hs], axis=1),
            jnp.zeros_like(b_h),
            b_h,
        )
        return lstm_lib.lstm(hidden), params_out
    if isinstance(cell_module, nn.GRUCell):
        _check_fn(fn, cell_module, "activation_fn", {"tanh": activations["tanh"]})
        _check_fn(fn, cell_module, "gate_fn", gates)
        xs = [_dense(fn, params, f"i{g}", hidden, bias=True) for g in "rzn"]
        hs = [_dense(fn, params, f"h{g}", hidden, bias=g == "n") for g in "rzn"]
        b_hn = hs[2][1]
        zeros = jnp.zeros_like(b_hn)
        params_out = gru_lib.GRUParams(
            jnp.concatenate([w for w, _ in xs], axis=1),
            jnp.concatenate([w for w, _ in hs], axis=1),
            jnp.concatenate([b for _, b in xs]),
            jnp.concatenate([zeros, zeros, b_hn]),
        )
        return gru_lib.gru(hidden), params_out
    raise TypeError(
        f"{fn}: module must be one of {_SUPPORTED}; got {type(cell_module).__name__}. "
        f"(flax.linen.MGUCell and ConvLSTMCell have no jaxrnn counterpart yet.)"
    )


def carry_from_flax(cell, carry):
    """A Flax cell's carry as the jaxrnn carry of ``cell``: Flax's LSTM ``(c, h)`` becomes
    ``LSTMCarry(h, c)``; other carries pass through.

    Args:
      cell: the jaxrnn cell (or bidirectional network) from `from_flax`.
      carry: the Flax carry (for a ``Bidirectional``: ``(forward, backward)``).

    Returns:
      The jaxrnn carry (for a network: ``((forward, backward),)``).
    """
    if isinstance(cell, layers.Network):
        return (tuple(carry_from_flax(cell.cells[0], c) for c in carry),)
    if cell.params_type is lstm_lib.LSTMParams:
        c, h = carry
        return lstm_lib.LSTMCarry(h=h, c=c)
    return carry


def carry_to_flax(cell, carry):
    """The inverse of `carry_from_flax`: ``LSTMCarry(h, c)`` becomes Flax's ``(c, h)``.

    Args:
      cell: the jaxrnn cell (or bidirectional network from `from_flax`).
      carry: the jaxrnn carry.

    Returns:
      The Flax carry.
    """
    if isinstance(cell, layers.Network):
        return tuple(carry_to_flax(cell.cells[0], c) for c in carry[0])
    if cell.params_type is lstm_lib.LSTMParams:
        return (carry.c, carry.h)
    return carry
