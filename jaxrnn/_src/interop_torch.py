"""Weight conversion between PyTorch's recurrent modules and jaxrnn.

PyTorch is imported lazily, inside the functions that need it, so ``import jaxrnn`` and
``import jaxrnn.interop`` never import it.

The mapping is exact (a copy, no arithmetic): ``w_x = weight_ih.T``, ``w_h = weight_hh.T``,
``b_x = bias_ih``, ``b_h = bias_hh``, ``w_p = weight_hr.T``; gate order is PyTorch's for every
cell (LSTM ``i, f, g, o``; GRU ``r, z, n``), and jaxrnn's GRU computes PyTorch's form.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrnn._src import elman as elman_lib
from jaxrnn._src import gru as gru_lib
from jaxrnn._src import layers
from jaxrnn._src import lstm as lstm_lib
from jaxrnn._src.cell import Cell

_SEQUENCE_MODULES = "torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU"
_CELL_MODULES = "torch.nn.RNNCell, torch.nn.LSTMCell, torch.nn.GRUCell"


def _kind(fn: str, module) -> tuple[str, bool]:
    """Returns ``(kind, is_cell)`` with kind in ``elman``, ``lstm``, ``gru``."""
    import torch.nn as tnn

    for kind, seq_type, cell_type in (
        ("elman", tnn.RNN, tnn.RNNCell),
        ("lstm", tnn.LSTM, tnn.LSTMCell),
        ("gru", tnn.GRU, tnn.GRUCell),
    ):
        if isinstance(module, seq_type):
            return kind, False
        if isinstance(module, cell_type):
            return kind, True
    raise TypeError(
        f"{fn}: module must be one of {_SEQUENCE_MODULES}, {_CELL_MODULES}; got "
        f"{type(module).__module__}.{type(module).__name__}. Convert other modules by hand "
        f"(see the README's 'Import from PyTorch')."
    )


def _activation(module) -> str:
    mode = getattr(module, "mode", None)
    if mode is not None:  # nn.RNN
        return {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[mode]
    return module.nonlinearity  # nn.RNNCell


def _make_cell(kind: str, module, is_cell: bool) -> Cell:
    hidden, bias = module.hidden_size, bool(module.bias)
    if kind == "elman":
        return elman_lib.elman(hidden, activation=_activation(module), use_bias=bias)
    if kind == "lstm":
        proj = 0 if is_cell else int(module.proj_size)
        return lstm_lib.lstm(hidden, proj_size=proj, use_bias=bias)
    return gru_lib.gru(hidden, use_bias=bias)


def _structure(fn: str, module, *, reproduce: bool = True):
    """The jaxrnn model of ``module`` and the PyTorch parameter names of each of its cells.

    Returns ``(model, names)``: ``model`` a `Cell` (for ``*Cell`` modules) or a `Network`;
    ``names[layer][direction]`` a dict from jaxrnn field to PyTorch parameter name (one layer,
    one direction for a ``*Cell`` module). With ``reproduce``, a module whose output is random
    (training mode with active dropout) is refused.
    """
    kind, is_cell = _kind(fn, module)
    cell = _make_cell(kind, module, is_cell)
    fields = {"w_x": "weight_ih", "w_h": "weight_hh"}
    if module.bias:
        fields.update(b_x="bias_ih", b_h="bias_hh")
    if is_cell:
        return cell, ((dict(fields),),)
    if reproduce and module.training and module.dropout > 0 and module.num_layers > 1:
        raise ValueError(
            f"{fn}: the module is in training mode with dropout={module.dropout}, so its output "
            f"is random and cannot be reproduced; call module.eval() first (the returned network "
            f"keeps dropout={module.dropout}; pass key= to net.apply to use it in training)."
        )
    if kind == "lstm" and module.proj_size:
        fields["w_p"] = "weight_hr"
    num_dirs = 2 if module.bidirectional else 1
    names = tuple(
        tuple(
            {f: f"{n}_l{layer}{'_reverse' if d else ''}" for f, n in fields.items()}
            for d in range(num_dirs)
        )
        for layer in range(module.num_layers)
    )
    net = layers.stack(
        cell,
        module.num_layers,
        bidirectional=bool(module.bidirectional),
        dropout=float(module.dropout),
    )
    return net, names


def _expected_shapes(model, input_size: int, dtype):
    """The params of ``model`` as shape structs (nothing is computed)."""
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: model.init(key, input_size, dtype=dtype))


def _as_layers(model, params):
    return ((params,),) if isinstance(model, Cell) else params


def _build_params(fn: str, model, names, get: Callable[[str], np.ndarray], input_size: int):
    """Builds jaxrnn params from PyTorch arrays ``get(name)``, checking every shape."""
    first = get(names[0][0]["w_x"])
    dtype = jnp.dtype(first.dtype)
    expected = _as_layers(model, _expected_shapes(model, input_size, dtype))
    out = []
    for layer_names, layer_expected in zip(names, expected):
        dirs = []
        for field_names, struct in zip(layer_names, layer_expected):
            values = {}
            for field, torch_name in field_names.items():
                value = np.asarray(get(torch_name))
                value = value.T if field.startswith("w_") else value
                want = tuple(getattr(struct, field).shape)
                if value.shape != want:
                    got = value.T.shape if field.startswith("w_") else value.shape
                    need = want[::-1] if field.startswith("w_") else want
                    raise ValueError(
                        f"{fn}: {torch_name} must have shape {need} for this module's "
                        f"configuration, got {tuple(got)}; the state dict does not fit the "
                        f"module (was it loaded from a module of another size?)."
                    )
                values[field] = jnp.asarray(value)
            dirs.append(type(struct)(**{f: values.get(f) for f in struct._fields}))
        out.append(tuple(dirs))
    if isinstance(model, Cell):
        return out[0][0]
    return tuple(out)


def _to_numpy(fn: str, name: str, tensor) -> np.ndarray:
    """A tensor's values as a numpy array of the same dtype (bfloat16 included), exactly."""
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.float64 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{fn}: {name} is float64 but JAX runs in 32 bits, which would round it; enable "
            f"64-bit JAX (jax.config.update('jax_enable_x64', True) or "
            f"`with jax.enable_x64(True):`), or convert the module with module.float()."
        )
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: go through float32, exactly
        return tensor.float().numpy().astype(jnp.bfloat16)
    return tensor.numpy()


def _to_tensor(value):
    """A jax array as a new CPU tensor; bfloat16 goes through float32 (exact)."""
    import torch

    value = np.array(value, copy=True)
    if value.dtype == jnp.bfloat16:
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(value)


def _input_size(module) -> int:
    return int(module.input_size)


def from_torch(module):
    """Imports a PyTorch recurrent module into jaxrnn: its network (or cell) and its params.

    Supported: ``torch.nn.RNN`` (``nonlinearity`` tanh or relu), ``torch.nn.LSTM`` (including
    ``proj_size``), ``torch.nn.GRU`` with any ``num_layers``, ``bidirectional``, ``bias``,
    ``batch_first`` and ``dropout``; and ``torch.nn.RNNCell``, ``LSTMCell``, ``GRUCell``. The
    weights are copied exactly, in their dtype.

    For a sequence module the result reproduces ``module(x, hx)`` as follows::

        net, params = from_torch(module)
        carries = carry_from_torch_layout(net, h0)          # or (net, h0, c0) for an LSTM
        ys, carries = net.apply(params, x, carries, time_major=not module.batch_first)
        h_n = carry_to_torch_layout(net, carries)           # (h_n, c_n) for an LSTM

    ``ys`` equals PyTorch's output, ``h_n`` PyTorch's ``(num_layers * num_directions, batch,
    hidden)`` final state. PyTorch's packed sequences correspond to ``seq_lengths=``.
    For a ``*Cell`` module, ``cell.step(params, carry, x)`` reproduces ``module(x, hx)``
    (``carry = LSTMCarry(h, c)`` for the ``LSTMCell``).

    Args:
      module: one of the modules above. A sequence module with ``dropout > 0`` and
        ``num_layers > 1`` must be in eval mode (``module.eval()``).

    Returns:
      ``(net, params)``: a `jaxrnn.Network` (from `jaxrnn.stack`, keeping the module's
      ``dropout``) or, for a ``*Cell`` module, a `jaxrnn.Cell`; and its params.

    Raises:
      TypeError: for another module type.
      ValueError: for a module in training mode with active dropout, or parameters whose shapes
        do not fit the module's configuration.

    Example:
      >>> import torch, jaxrnn.interop
      >>> module = torch.nn.GRU(3, 5, num_layers=2, batch_first=True)
      >>> net, params = jaxrnn.interop.from_torch(module)
      >>> params[1][0].w_h.shape
      (5, 15)
    """
    fn = "from_torch"
    model, names = _structure(fn, module)
    tensors = dict(module.named_parameters())

    def get(name):
        if name not in tensors:
            raise ValueError(f"{fn}: the module has no parameter {name!r}; is it a {type(module)}?")
        return _to_numpy(fn, name, tensors[name])

    return model, _build_params(fn, model, names, get, _input_size(module))


def grads_from_torch(module):
    """The ``.grad`` of every parameter of ``module`` as a jaxrnn params pytree.

    After ``loss.backward()`` in PyTorch this gives the gradient in the layout of
    ``from_torch(module)[1]``, to compare with ``jax.grad`` of the same loss.

    Args:
      module: a module accepted by `from_torch`, after a backward pass.

    Returns:
      A params pytree of gradients.

    Raises:
      ValueError: if a parameter has no gradient.
    """
    fn = "grads_from_torch"
    model, names = _structure(fn, module, reproduce=False)
    tensors = dict(module.named_parameters())

    def get(name):
        grad = tensors[name].grad
        if grad is None:
            raise ValueError(f"{fn}: {name} has no gradient; run loss.backward() first.")
        return _to_numpy(fn, name, grad)

    return _build_params(fn, model, names, get, _input_size(module))


def to_torch(model, params, module):
    """Writes jaxrnn params into a PyTorch module, in place (the inverse of `from_torch`).

    The copy is exact: ``from_torch(to_torch(net, params, module))`` gives back ``params``
    bit for bit.

    Args:
      model: the `Network` or `Cell` the params belong to (as returned by `from_torch`).
      params: its params.
      module: a PyTorch module of the same configuration (type, sizes, layers, directions,
        bias, nonlinearity, proj_size).

    Returns:
      ``module``, with its parameters overwritten.

    Raises:
      TypeError: for an unsupported module type.
      ValueError: when ``model`` does not match the module's configuration, or a param's
        shape does not fit.
    """
    import torch

    fn = "to_torch"
    expected, names = _structure(fn, module, reproduce=False)
    got_cells = (model,) if isinstance(model, Cell) else tuple(model.cells)
    want_cells = (expected,) if isinstance(expected, Cell) else tuple(expected.cells)
    got_dirs = 1 if isinstance(model, Cell) else (2 if model.bidirectional else 1)
    want_dirs = 1 if isinstance(expected, Cell) else (2 if expected.bidirectional else 1)
    if [c.name for c in got_cells] != [c.name for c in want_cells] or got_dirs != want_dirs:
        raise ValueError(
            f"{fn}: the model has cells {[c.name for c in got_cells]} with {got_dirs} "
            f"direction(s) but the module needs {[c.name for c in want_cells]} with {want_dirs}; "
            f"write into a module of the configuration the params were imported from."
        )
    tensors = dict(module.named_parameters())
    param_layers = _as_layers(model, params)
    with torch.no_grad():
        for layer_names, layer_params in zip(names, param_layers):
            for field_names, cell_params in zip(layer_names, layer_params):
                for field, torch_name in field_names.items():
                    value = getattr(cell_params, field)
                    target = tensors[torch_name]
                    if value is None:
                        raise ValueError(
                            f"{fn}: params have no {field} but the module has {torch_name}; "
                            f"the module was built with bias=True, the params without bias."
                        )
                    value = np.asarray(value)
                    value = value.T if field.startswith("w_") else value
                    if value.dtype != jnp.dtype(str(target.dtype).removeprefix("torch.")):
                        raise ValueError(
                            f"{fn}: {torch_name} is {target.dtype} but params.{field} is "
                            f"{value.dtype}; convert one of them (module.to(...) or "
                            f"params.astype) so that the copy is exact."
                        )
                    if tuple(value.shape) != tuple(target.shape):
                        raise ValueError(
                            f"{fn}: {torch_name} has shape {tuple(target.shape)} but the params "
                            f"give shape {tuple(value.shape)} (transposed {field})."
                        )
                    target.copy_(_to_tensor(value))
    return module


def _is_lstm(model) -> bool:
    cell = model if isinstance(model, Cell) else model.cells[0]
    return cell.params_type is lstm_lib.LSTMParams


def carry_to_torch_layout(model, carries):
    """Final carries of `Network.apply` in PyTorch's layout.

    Args:
      model: the `Network` (or `Cell`) that produced ``carries``.
      carries: ``carries[layer][direction]`` from ``net.apply`` (or one carry of a cell).

    Returns:
      ``h_n: (num_layers * num_directions, *batch, hidden)`` (layer-major, forward before
      backward, as PyTorch), or ``(h_n, c_n)`` for an LSTM. For a `Cell`, ``h`` or ``(h, c)``.
    """
    if isinstance(model, Cell):
        return (carries.h, carries.c) if _is_lstm(model) else carries
    flat = [c for layer in carries for c in layer]
    if _is_lstm(model):
        return jnp.stack([c.h for c in flat]), jnp.stack([c.c for c in flat])
    return jnp.stack(flat)


def carry_from_torch_layout(model, h0, c0=None):
    """PyTorch's initial state ``h0`` (and ``c0``) as the ``carry`` argument of a jaxrnn model.

    Args:
      model: a `Network` (or `Cell`) from `from_torch`.
      h0: ``(num_layers * num_directions, *batch, h_size)`` (``(*batch, hidden)`` for a cell).
      c0: the LSTM's cell state, same layout with ``hidden``; required for an LSTM, else
        ``None``.

    Returns:
      ``carries[layer][direction]`` for ``net.apply`` (one carry for a `Cell`).

    Raises:
      ValueError: when ``c0`` is missing or extra, or ``h0``'s first axis is not
        ``num_layers * num_directions``.
    """
    fn = "carry_from_torch_layout"
    lstm = _is_lstm(model)
    if lstm and c0 is None:
        raise ValueError(f"{fn}: an LSTM needs both h0 and c0, got c0=None.")
    if not lstm and c0 is not None:
        raise ValueError(f"{fn}: c0 is only for an LSTM; this model's cells have no cell state.")
    h0 = jnp.asarray(h0)
    c0 = None if c0 is None else jnp.asarray(c0)
    if isinstance(model, Cell):
        return lstm_lib.LSTMCarry(h0, c0) if lstm else h0
    num_dirs = 2 if model.bidirectional else 1
    n = model.num_layers * num_dirs
    for name, value in (("h0", h0), ("c0", c0)):
        if value is not None and (value.ndim < 2 or value.shape[0] != n):
            raise ValueError(
                f"{fn}: {name} must have shape (num_layers * num_directions = {n}, *batch, "
                f"size), got shape {tuple(value.shape)}."
            )

    def carry(i):
        return lstm_lib.LSTMCarry(h0[i], c0[i]) if lstm else h0[i]

    return tuple(
        tuple(carry(layer * num_dirs + d) for d in range(num_dirs))
        for layer in range(model.num_layers)
    )
