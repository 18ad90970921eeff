"""Parity with PyTorch: imported weights reproduce outputs, final states and gradients.

PyTorch is imported directly (not skipped when missing): CI installs ``torch==2.13.0`` so that
these tests always run there.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch.nn.utils import rnn as rnn_utils

import jaxrnn
from jaxrnn import interop

_SEEDS = itertools.count(1)
TOL = {  # (rtol, atol) for values, then for gradients
    "float32": ((1e-5, 1e-6), (1e-4, 1e-5)),
    "float64": ((1e-10, 1e-12), (1e-10, 1e-12)),
}
KINDS = ("rnn_tanh", "rnn_relu", "lstm", "lstm_proj", "gru")


@dataclasses.dataclass(frozen=True)
class Config:
    kind: str
    num_layers: int
    bidirectional: bool
    bias: bool
    batch_first: bool
    initial_state: bool
    packed: bool
    input_size: int = 3
    hidden_size: int = 5

    def __str__(self):
        on = "-".join(f for f in FLAGS if getattr(self, f))
        return f"{self.kind}-L{self.num_layers}-{on}"


FLAGS = ("bidirectional", "bias", "batch_first", "initial_state", "packed")


def _random_configs(seed: int, complement: bool) -> list[Config]:
    """Random configurations, one per kind; with ``complement`` a second one per kind with
    every flag flipped, so that each kind meets every option both on and off."""
    rng = random.Random(seed)
    configs = []
    for kind in KINDS:
        flags = {f: rng.random() < 0.5 for f in FLAGS}
        configs.append(Config(kind, num_layers=rng.randint(1, 3), **flags))
        if complement:
            flipped = {f: not v for f, v in flags.items()}
            configs.append(Config(kind, num_layers=rng.randint(1, 3), **flipped))
    return configs


CONFIGS = _random_configs(seed=0, complement=True)
CONFIGS_64 = _random_configs(seed=1, complement=False)


def test_random_configs_cover_every_option():
    for kind, field in itertools.product(KINDS, FLAGS):
        values = {getattr(c, field) for c in CONFIGS if c.kind == kind}
        assert values == {False, True}, (kind, field)
    assert {c.num_layers for c in CONFIGS} == {1, 2, 3}


def _torch_dtype(dtype: str):
    return {"float32": torch.float32, "float64": torch.float64}[dtype]


def _sequence_module(cfg: Config, dtype: str):
    torch.manual_seed(next(_SEEDS))
    kwargs = dict(
        num_layers=cfg.num_layers,
        bias=cfg.bias,
        batch_first=cfg.batch_first,
        bidirectional=cfg.bidirectional,
    )
    if cfg.kind.startswith("rnn"):
        kwargs["nonlinearity"] = cfg.kind.split("_")[1]
        module = torch.nn.RNN(cfg.input_size, cfg.hidden_size, **kwargs)
    elif cfg.kind.startswith("lstm"):
        proj = 3 if cfg.kind == "lstm_proj" else 0
        module = torch.nn.LSTM(cfg.input_size, cfg.hidden_size, proj_size=proj, **kwargs)
    else:
        module = torch.nn.GRU(cfg.input_size, cfg.hidden_size, **kwargs)
    return module.to(_torch_dtype(dtype)).eval()


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=_torch_dtype(dtype), requires_grad=True)


def _np(t):
    return t.detach().numpy()


def _check_close(actual, expected, tol, what):
    """Elementwise within ``rtol`` (with an ``atol`` floor for entries near zero), and the
    largest error within ``rtol`` of the largest magnitude, with no floor."""
    rtol, atol = tol
    actual, expected = np.asarray(actual), np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)
    scale = np.max(np.abs(expected), initial=0.0)
    assert np.max(np.abs(actual - expected), initial=0.0) <= rtol * scale, what


def _check_sequence_parity(cfg: Config, dtype: str):
    module = _sequence_module(cfg, dtype)
    batch, time = 3, 6
    is_lstm = isinstance(module, torch.nn.LSTM)
    num_states = cfg.num_layers * (2 if cfg.bidirectional else 1)
    h_size = module.proj_size or cfg.hidden_size
    x_shape = (batch, time, cfg.input_size) if cfg.batch_first else (time, batch, cfg.input_size)
    x = _randn(*x_shape, dtype=dtype)
    h0 = _randn(num_states, batch, h_size, dtype=dtype) if cfg.initial_state else None
    c0 = (
        _randn(num_states, batch, cfg.hidden_size, dtype=dtype)
        if cfg.initial_state and is_lstm
        else None
    )
    lengths = torch.tensor([time, 1 + time // 2, 2]) if cfg.packed else None

    # PyTorch: forward and backward of a random linear functional of every result.
    hx = None if h0 is None else ((h0, c0) if is_lstm else h0)
    inp = x
    if cfg.packed:
        inp = rnn_utils.pack_padded_sequence(
            x, lengths, batch_first=cfg.batch_first, enforce_sorted=False
        )
    out, state = module(inp, hx)
    if cfg.packed:
        out, _ = rnn_utils.pad_packed_sequence(out, batch_first=cfg.batch_first, total_length=time)
    finals = state if is_lstm else (state,)
    cotangents = [torch.randn_like(t) for t in (out, *finals)]
    loss = sum((t * g).sum() for t, g in zip((out, *finals), cotangents))
    loss.backward()

    # jaxrnn: the same functional, differentiated by jax.grad.
    net, params = interop.from_torch(module)
    seq_lengths = None if lengths is None else jnp.asarray(lengths.numpy())
    cts = [jnp.asarray(_np(g)) for g in cotangents]

    def loss_fn(params, xs, h0, c0):
        carry = None if h0 is None else interop.carry_from_torch_layout(net, h0, c0)
        ys, carries = net.apply(
            params, xs, carry, seq_lengths=seq_lengths, time_major=not cfg.batch_first
        )
        state = interop.carry_to_torch_layout(net, carries)
        results = (ys, *state) if is_lstm else (ys, state)
        return sum(jnp.sum(r * g) for r, g in zip(results, cts)), results

    args = [
        params,
        jnp.asarray(_np(x)),
        None if h0 is None else jnp.asarray(_np(h0)),
        None if c0 is None else jnp.asarray(_np(c0)),
    ]
    grads, results = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)
    value_tol, grad_tol = TOL[dtype]
    for name, actual, expected in zip(("output", "h_n", "c_n"), results, (out, *finals)):
        assert actual.dtype == jnp.dtype(dtype)
        _check_close(actual, _np(expected), value_tol, f"{cfg} {name}")
    expected_param_grads = interop.grads_from_torch(module)
    jax.tree_util.tree_map_with_path(
        lambda path, a, e: _check_close(a, e, grad_tol, f"{cfg} d/d{jax.tree_util.keystr(path)}"),
        grads[0],
        expected_param_grads,
    )
    _check_close(grads[1], _np(x.grad), grad_tol, f"{cfg} d/dx")
    if h0 is not None:
        _check_close(grads[2], _np(h0.grad), grad_tol, f"{cfg} d/dh0")
    if c0 is not None:
        _check_close(grads[3], _np(c0.grad), grad_tol, f"{cfg} d/dc0")


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_sequence_module_parity_float32(cfg):
    _check_sequence_parity(cfg, "float32")


@pytest.mark.parametrize("cfg", CONFIGS_64, ids=str)
def test_sequence_module_parity_float64(cfg):
    with jax.enable_x64(True):
        _check_sequence_parity(cfg, "float64")


CELL_MODULES = {
    "rnn_cell_tanh": lambda: torch.nn.RNNCell(3, 5),
    "rnn_cell_relu": lambda: torch.nn.RNNCell(3, 5, nonlinearity="relu"),
    "rnn_cell_nobias": lambda: torch.nn.RNNCell(3, 5, bias=False),
    "lstm_cell": lambda: torch.nn.LSTMCell(3, 5),
    "lstm_cell_nobias": lambda: torch.nn.LSTMCell(3, 5, bias=False),
    "gru_cell": lambda: torch.nn.GRUCell(3, 5),
    "gru_cell_nobias": lambda: torch.nn.GRUCell(3, 5, bias=False),
}


CELL_CASES = [(name, "float32") for name in sorted(CELL_MODULES)] + [
    (name, "float64") for name in ("gru_cell", "lstm_cell", "rnn_cell_relu")
]


@pytest.mark.parametrize("name, dtype", CELL_CASES)
def test_cell_module_parity(name, dtype):
    """A PyTorch loop over the cell module equals jaxrnn.unroll with the imported cell."""
    with jax.enable_x64(dtype == "float64"):
        torch.manual_seed(next(_SEEDS))
        module = CELL_MODULES[name]().to(_torch_dtype(dtype))
        is_lstm = isinstance(module, torch.nn.LSTMCell)
        batch, time = 2, 4
        xs = _randn(batch, time, 3, dtype=dtype)
        h0 = _randn(batch, 5, dtype=dtype)
        c0 = _randn(batch, 5, dtype=dtype) if is_lstm else None
        state = (h0, c0) if is_lstm else h0
        outs = []
        for t in range(time):
            state = module(xs[:, t], state)
            outs.append(state[0] if is_lstm else state)
        out = torch.stack(outs, dim=1)
        finals = state if is_lstm else (state,)
        cotangents = [torch.randn_like(t) for t in (out, *finals)]
        sum((t * g).sum() for t, g in zip((out, *finals), cotangents)).backward()

        cell, params = interop.from_torch(module)
        assert isinstance(cell, jaxrnn.Cell)
        cts = [jnp.asarray(_np(g)) for g in cotangents]

        def loss_fn(params, xs, h0, c0):
            carry = interop.carry_from_torch_layout(cell, h0, c0)
            ys, carry = jaxrnn.unroll(cell, params, xs, carry)
            state = interop.carry_to_torch_layout(cell, carry)
            results = (ys, *state) if is_lstm else (ys, state)
            return sum(jnp.sum(r * g) for r, g in zip(results, cts)), results

        args = [params] + [None if t is None else jnp.asarray(_np(t)) for t in (xs, h0, c0)]
        grads, results = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True))(*args)
        value_tol, grad_tol = TOL[dtype]
        for actual, expected in zip(results, (out, *finals)):
            _check_close(actual, _np(expected), value_tol, name)
        jax.tree_util.tree_map(
            lambda a, e: _check_close(a, e, grad_tol, name),
            grads[0],
            interop.grads_from_torch(module),
        )
        for actual, expected in zip(grads[1:], (xs, h0, c0)):
            if expected is not None:
                _check_close(actual, _np(expected.grad), grad_tol, name)


ROUND_TRIP_MODULES = {
    "lstm_proj_bi": lambda: torch.nn.LSTM(3, 6, num_layers=2, proj_size=2, bidirectional=True),
    "gru_nobias": lambda: torch.nn.GRU(3, 4, bias=False, batch_first=True),
    "rnn_relu": lambda: torch.nn.RNN(3, 4, num_layers=3, nonlinearity="relu"),
    "lstm_cell": lambda: torch.nn.LSTMCell(3, 4),
    "rnn_cell": lambda: torch.nn.RNNCell(3, 4, bias=False),
}


@pytest.mark.parametrize("name", sorted(ROUND_TRIP_MODULES))
def test_to_torch_round_trip_is_exact(name):
    source, target = ROUND_TRIP_MODULES[name](), ROUND_TRIP_MODULES[name]()
    model, params = interop.from_torch(source)
    assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == sum(
        p.numel() for p in source.parameters()
    )
    assert interop.to_torch(model, params, target) is target
    for (key, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), key
    _, again = interop.from_torch(target)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), again, params)


def test_trained_params_written_back_run_in_torch():
    """Params changed in JAX and written back give PyTorch the JAX outputs."""
    module = torch.nn.GRU(3, 4, num_layers=2, batch_first=True).eval()
    net, params = interop.from_torch(module)
    params = jax.tree_util.tree_map(lambda p: p * 1.5 + 0.01, params)
    interop.to_torch(net, params, module)
    xs = np.random.default_rng(next(_SEEDS)).standard_normal((2, 5, 3)).astype(np.float32)
    ys, _ = net.apply(params, jnp.asarray(xs))
    np.testing.assert_allclose(ys, _np(module(torch.from_numpy(xs))[0]), rtol=1e-5, atol=1e-6)


def test_network_keeps_module_dropout_for_training():
    module = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.25).eval()
    net, params = interop.from_torch(module)
    assert net.dropout == 0.25
    xs = jax.random.normal(jax.random.PRNGKey(next(_SEEDS)), (2, 5, 3))
    apply = jax.jit(net.apply)
    plain, _ = apply(params, xs)
    dropped, _ = apply(params, xs, key=jax.random.PRNGKey(0))
    assert not np.allclose(plain, dropped)


# --- LSTM with a projection (proj_size): the core cell against a Python loop -------------


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_proj_unroll_equals_step_loop(reverse):
    cell = jaxrnn.lstm(6, proj_size=3)
    key_p, key_x, key_h, key_c = jax.random.split(jax.random.PRNGKey(next(_SEEDS)), 4)
    params = cell.init(key_p, 4)
    xs = jax.random.normal(key_x, (2, 5, 4))
    carry = jaxrnn.LSTMCarry(jax.random.normal(key_h, (2, 3)), jax.random.normal(key_c, (2, 6)))
    lengths = [5, 3]
    step = jax.jit(cell.step)
    ys, final = jaxrnn.unroll(
        cell, params, xs, carry, reverse=reverse, seq_lengths=jnp.array(lengths)
    )
    assert ys.shape == (2, 5, 3) and final.h.shape == (2, 3) and final.c.shape == (2, 6)
    xs_np, h_np, c_np = (np.asarray(a) for a in (xs, carry.h, carry.c))
    for b, length in enumerate(lengths):
        c = jaxrnn.LSTMCarry(h_np[b], c_np[b])
        order = reversed(range(length)) if reverse else range(length)
        for t in order:
            c, y = step(params, c, xs_np[b, t])
            np.testing.assert_allclose(ys[b, t], y, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(ys[b, length:], 0.0)
        np.testing.assert_allclose(final.h[b], c.h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(final.c[b], c.c, rtol=1e-5, atol=1e-6)


def test_lstm_proj_gradients_float64():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        cell = jaxrnn.lstm(4, proj_size=2)
        key_p, key_x = jax.random.split(jax.random.PRNGKey(next(_SEEDS)))
        params = cell.init(key_p, 3, dtype=jnp.float64)
        xs = jax.random.normal(key_x, (2, 4, 3), jnp.float64)

        def f(params, xs):
            ys, carry = jaxrnn.unroll(cell, params, xs, seq_lengths=jnp.array([4, 2]))
            return jnp.sum(ys**2) + jnp.sum(carry.c)

        check_grads(jax.jit(f), (params, xs), order=1, modes=["rev"])


# --- Bad input ------------------------------------------------------------------------------


def test_unknown_module_type_is_rejected():
    with pytest.raises(TypeError, match=r"from_torch: module must be one of .*got .*Linear"):
        interop.from_torch(torch.nn.Linear(3, 4))


def test_training_module_with_dropout_is_rejected():
    module = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5)  # training mode by default
    with pytest.raises(ValueError, match=r"training mode with dropout=0.5.*module.eval\(\)"):
        interop.from_torch(module)


def test_wrong_state_dict_shape_is_rejected():
    module = torch.nn.GRU(3, 4, num_layers=2)
    with torch.no_grad():
        module.weight_hh_l1 = torch.nn.Parameter(torch.randn(12, 5))
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(12, 4\).*got \(12, 5\)"):
        interop.from_torch(module)


def test_to_torch_rejects_another_configuration():
    net, params = interop.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match=r"to_torch: the model has cells \['gru\(4\)'\]"):
        interop.to_torch(net, params, torch.nn.GRU(3, 5))
    with pytest.raises(ValueError, match=r"to_torch: the model has cells"):
        interop.to_torch(net, params, torch.nn.GRU(3, 4, bidirectional=True))


def test_to_torch_rejects_params_without_bias():
    net, params = interop.from_torch(torch.nn.RNN(3, 4, bias=False))
    with pytest.raises(ValueError, match=r"params have no b_x but the module has bias_ih_l0"):
        interop.to_torch(net, params, torch.nn.RNN(3, 4))


def test_to_torch_rejects_wrong_input_size():
    net, params = interop.from_torch(torch.nn.RNN(3, 4))
    with pytest.raises(ValueError, match=r"weight_ih_l0 has shape \(4, 5\) but the params give"):
        interop.to_torch(net, params, torch.nn.RNN(5, 4))


def test_carry_layout_errors():
    lstm_net, _ = interop.from_torch(torch.nn.LSTM(3, 4, num_layers=2))
    gru_net, _ = interop.from_torch(torch.nn.GRU(3, 4, num_layers=2, bidirectional=True))
    with pytest.raises(ValueError, match="an LSTM needs both h0 and c0"):
        interop.carry_from_torch_layout(lstm_net, jnp.zeros((2, 1, 4)))
    with pytest.raises(ValueError, match="c0 is only for an LSTM"):
        interop.carry_from_torch_layout(gru_net, jnp.zeros((4, 1, 4)), jnp.zeros((4, 1, 4)))
    with pytest.raises(ValueError, match=r"h0 must have shape \(num_layers \* num_directions = 4"):
        interop.carry_from_torch_layout(gru_net, jnp.zeros((2, 1, 4)))


def test_import_jaxrnn_imports_no_framework():
    """``import jaxrnn`` (and its interop and flax packages) leaves torch and Flax unimported."""
    code = (
        "import sys, jaxrnn, jaxrnn.interop, jaxrnn.flax; "
        "print(sorted(m for m in ('torch', 'flax.linen', 'flax.nnx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_subpackages_are_attributes_of_a_plain_import():
    """After ``import jaxrnn`` alone, ``jaxrnn.interop``, ``jaxrnn.flax.linen`` and the other
    subpackages load on first use; a misspelt name is an AttributeError naming it."""
    code = (
        "import sys, jaxrnn\n"
        "assert 'torch' not in sys.modules and 'jaxrnn.interop' not in sys.modules\n"
        "assert callable(jaxrnn.interop.from_torch) and 'torch' not in sys.modules\n"
        "assert 'flax.linen' not in sys.modules and 'flax.nnx' not in sys.modules\n"
        "assert jaxrnn.flax.linen.RNN.__name__ == 'RNN' and 'flax.nnx' not in sys.modules\n"
        "assert jaxrnn.flax.nnx.RNN.__name__ == 'RNN'\n"
        "assert callable(jaxrnn.train.fit) and jaxrnn.tasks and jaxrnn.diagnostics\n"
        "for owner, name in ((jaxrnn, 'interopp'), (jaxrnn.flax, 'linnen')):\n"
        "    try:\n"
        "        getattr(owner, name)\n"
        "    except AttributeError as err:\n"
        "        assert repr(name) in str(err), err\n"
        "    else:\n"
        "        raise AssertionError(name)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "ok"


def test_bfloat16_round_trip_is_exact():
    source = torch.nn.LSTM(3, 4, bidirectional=True).to(torch.bfloat16)
    target = torch.nn.LSTM(3, 4, bidirectional=True).to(torch.bfloat16)
    net, params = interop.from_torch(source)
    assert params[0][1].w_x.dtype == jnp.bfloat16
    interop.to_torch(net, params, target)
    for (key, a), (_, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert torch.equal(a, b), key


def test_float64_module_needs_64_bit_jax():
    module = torch.nn.GRU(3, 4).double()
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"weight_ih_l0 is float64 but JAX runs in 32 bits"):
            interop.from_torch(module)


def test_to_torch_rejects_another_dtype():
    net, params = interop.from_torch(torch.nn.GRU(3, 4))
    with pytest.raises(ValueError, match=r"is torch.float16 but params.w_x is float32"):
        interop.to_torch(net, params, torch.nn.GRU(3, 4).half())


def test_unbatched_input_matches():
    """PyTorch's unbatched ``(time, features)`` input: no batch dims in jaxrnn either."""
    module = torch.nn.GRU(3, 4, num_layers=2, bidirectional=True).eval()
    x = torch.randn(6, 3)
    out, h_n = module(x)
    net, params = interop.from_torch(module)
    ys, carries = jax.jit(lambda p, x: net.apply(p, x, time_major=True))(params, _np(x))
    np.testing.assert_allclose(ys, _np(out), rtol=1e-5, atol=1e-6)
    h = interop.carry_to_torch_layout(net, carries)
    assert h.shape == h_n.shape == (4, 4)
    np.testing.assert_allclose(h, _np(h_n), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["jaxrnn.interop", "jaxrnn.flax.linen", "jaxrnn.flax.nnx"])
def test_public_names_exist(name):
    module = importlib.import_module(name)
    assert module.__all__ and all(hasattr(module, n) for n in module.__all__)


def test_to_torch_writes_into_a_training_module_with_dropout():
    module = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5).eval()
    net, params = interop.from_torch(module)
    target = torch.nn.LSTM(3, 4, num_layers=2, dropout=0.5)  # training mode
    interop.to_torch(net, params, target)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), target.parameters()))
