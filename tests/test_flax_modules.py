"""The Flax shells (linen and NNX) equal the pure functions with the same params."""

from __future__ import annotations

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_script
from flax import nnx

import jaxrnn
from jaxrnn.flax import linen as jnn
from jaxrnn.flax import nnx as jnnx

_SEEDS = itertools.count(900)
INPUT_SIZE, BATCH, TIME = 3, 3, 5
LENGTHS = jnp.array([5, 2, 3])


def _key():
    return jax.random.PRNGKey(next(_SEEDS))


def _user_cell(hidden=4):
    """A user's cell with dict params and a tuple carry (no project/recur split)."""

    def init(key, input_size, *, dtype=jnp.float32):
        return {
            "w": jax.random.normal(key, (input_size, hidden), dtype),
            "decay": jnp.full(hidden, 0.5, dtype),
        }

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return (jnp.zeros((*batch_shape, hidden), dtype),) * 2

    def step(params, carry, x):
        h, s = carry
        h = jnp.tanh(x @ params["w"] + params["decay"] * h + 0.1 * s)
        return (h, s + h), h

    return jaxrnn.make_cell(step, init, initial_carry, name="user", output_size=hidden)


MODELS = {
    "elman_relu": lambda: jaxrnn.elman(4, activation="relu"),
    "lstm_proj": lambda: jaxrnn.lstm(5, proj_size=2),
    "gru_nobias": lambda: jaxrnn.gru(4, use_bias=False),
    "user": _user_cell,
    "stack_bi_lstm": lambda: jaxrnn.stack(jaxrnn.lstm(4), 2, bidirectional=True),
    "stack_gru_dropout": lambda: jaxrnn.stack(jaxrnn.gru(4), 2, dropout=0.5),
}
CELL_MODELS = ("elman_relu", "lstm_proj", "gru_nobias", "user")


@pytest.fixture(params=sorted(MODELS))
def model_name(request):
    return request.param


@pytest.fixture
def model(model_name):
    return MODELS[model_name]()


def _random_tree(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(_key(), len(leaves))
    return treedef.unflatten([jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


def _pure(model, params, xs, carry, **kwargs):
    if isinstance(model, jaxrnn.Cell):
        run = lambda p, xs, c: jaxrnn.unroll(model, p, xs, c, **kwargs)
    else:
        run = lambda p, xs, c: model.apply(p, xs, c, **kwargs)
    return jax.jit(run)(params, xs, carry)


def _to_flax_layout(model, params):
    """The documented Flax layout of the params, written out independently of the modules."""

    def cell_dict(p):
        if hasattr(p, "_fields"):
            return {f: v for f, v in zip(p._fields, p) if v is not None}
        return p

    if isinstance(model, jaxrnn.Cell):
        return {"cell": cell_dict(params)}
    return {
        "network": {
            f"layer_{i}": dict(zip(("forward", "backward"), map(cell_dict, layer)))
            for i, layer in enumerate(params)
        }
    }


def _assert_trees_close(a, b):
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b
    )


MODES = {  # between them: batch- and time-major, lengths or not, a carry or not, reverse
    "lengths_carry": dict(seq_lengths=True, initial_carry=True),
    "time_major_reverse": dict(time_major=True, reverse=True),
}


def _mode_args(model, name):
    mode = MODES[name]
    time_major = mode.get("time_major", False)
    reverse = mode.get("reverse", False) and isinstance(model, jaxrnn.Cell)
    shape = (TIME, BATCH, INPUT_SIZE) if time_major else (BATCH, TIME, INPUT_SIZE)
    xs = jax.random.normal(_key(), shape)
    carry = _random_tree(model.initial_carry((BATCH,))) if mode.get("initial_carry") else None
    call = dict(seq_lengths=LENGTHS if mode.get("seq_lengths") else None)
    pure = dict(call, time_major=time_major)
    if isinstance(model, jaxrnn.Cell):
        pure["reverse"] = reverse
    return xs, carry, call, pure, dict(time_major=time_major, reverse=reverse)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_linen_and_nnx_equal_pure_path(model, mode):
    xs, carry, call, pure, attrs = _mode_args(model, mode)
    params = model.init(_key(), INPUT_SIZE)
    expected_ys, expected_carry = _pure(model, params, xs, carry, **pure)

    # linen: given the params in the documented layout, the module computes the pure path.
    layer = jnn.RNN(model, return_carry=True, deterministic=True, **attrs)
    variables = {"params": _to_flax_layout(model, params)}
    jax.tree_util.tree_map(  # init makes exactly this layout
        lambda a, b: np.testing.assert_equal(a.shape, b.shape),
        jax.eval_shape(lambda: layer.init(_key(), xs, carry, **call)),
        variables,
    )
    carry_out, ys = jax.jit(lambda v, xs, c: layer.apply(v, xs, c, **call))(variables, xs, carry)
    _assert_trees_close(ys, expected_ys)
    _assert_trees_close(carry_out, expected_carry)

    # NNX: load the same params into nnx.Params, run under nnx.jit.
    nnx_layer = jnnx.RNN(model, INPUT_SIZE, rngs=nnx.Rngs(0), deterministic=True, **attrs)
    nnx_layer.load_params(params)
    stored = jax.tree_util.tree_map(lambda p: p[...], nnx_layer.params, is_leaf=_is_param)
    _assert_trees_close(stored, next(iter(_to_flax_layout(model, params).values())))

    @nnx.jit
    def run(layer, xs, carry):
        return layer(xs, carry, return_carry=True, **call)

    carry_out, ys = run(nnx_layer, xs, carry)
    _assert_trees_close(ys, expected_ys)
    _assert_trees_close(carry_out, expected_carry)


def _is_param(x):
    return isinstance(x, nnx.Param)


def _expected_param_count(model_name, model):
    """Counted by hand from the cells' math (PyTorch's parameter counts)."""
    counts = {
        "elman_relu": 3 * 4 + 4 * 4 + 2 * 4,
        "lstm_proj": 3 * 20 + 2 * 20 + 2 * 20 + 5 * 2,
        "gru_nobias": 3 * 12 + 4 * 12,
        "user": 3 * 4 + 4,
        # layer 0: 2 x (3*16 + 4*16 + 32); layer 1 reads 8 features: 2 x (8*16 + 4*16 + 32)
        "stack_bi_lstm": 2 * (48 + 64 + 32) + 2 * (128 + 64 + 32),
        "stack_gru_dropout": (3 * 12 + 4 * 12 + 24) + (4 * 12 + 4 * 12 + 24),
    }
    return counts[model_name]


def test_param_count(model_name, model):
    expected = _expected_param_count(model_name, model)
    xs = jnp.ones((BATCH, TIME, INPUT_SIZE))
    variables = jax.eval_shape(jnn.RNN(model, deterministic=True).init, _key(), xs)
    assert sum(a.size for a in jax.tree_util.tree_leaves(variables)) == expected
    layer = jnnx.RNN(model, INPUT_SIZE, rngs=nnx.Rngs(0))
    state = nnx.state(layer, nnx.Param)
    assert sum(a.size for a in jax.tree_util.tree_leaves(state)) == expected


def test_linen_dropout_uses_flax_rng_and_deterministic():
    model = MODELS["stack_gru_dropout"]()
    layer = jnn.RNN(model)
    xs = jax.random.normal(_key(), (BATCH, TIME, INPUT_SIZE))
    variables = {"params": jnn.to_flax_params(model, model.init(_key(), INPUT_SIZE))}
    apply = jax.jit(layer.apply, static_argnames="deterministic")
    off = apply(variables, xs, deterministic=True)
    params = jnn.from_flax_params(model, variables["params"], INPUT_SIZE)
    _assert_trees_close(off, model.apply(params, xs)[0])
    on_a = apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    on_b = apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.key(1)})
    on_c = apply(variables, xs, deterministic=False, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(on_a, on_b)
    assert not np.allclose(on_a, off) and not np.allclose(on_a, on_c)
    with pytest.raises(ValueError, match="deterministic"):
        jax.eval_shape(layer.apply, variables, xs)


def test_nnx_dropout_follows_train_and_eval():
    model = MODELS["stack_gru_dropout"]()
    layer = jnnx.RNN(model, INPUT_SIZE, rngs=nnx.Rngs(params=0, dropout=1))
    xs = jax.random.normal(_key(), (BATCH, TIME, INPUT_SIZE))
    expected, _ = jax.jit(model.apply)(layer.pure_params(), xs)
    run = nnx.jit(lambda layer, xs: layer(xs))
    train_a, train_b = run(layer, xs), run(layer, xs)
    assert not np.allclose(train_a, expected) and not np.allclose(train_a, train_b)
    layer.eval()
    _assert_trees_close(run(layer, xs), expected)
    layer.train()
    assert not np.allclose(run(layer, xs), expected)


def test_nnx_trains_with_optimizer():
    layer = jnnx.RNN(jaxrnn.gru(4), INPUT_SIZE, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    xs = jax.random.normal(_key(), (BATCH, TIME, INPUT_SIZE))
    target = jax.random.normal(_key(), (BATCH, TIME, 4)) * 0.5

    @nnx.jit
    def train_step(layer, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(xs) - target) ** 2))(layer)
        optimizer.update(layer, grads)
        return loss

    losses = [float(train_step(layer, optimizer)) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0]


def test_linen_inside_compact_model():
    class Tagger(nn.Module):
        @nn.compact
        def __call__(self, tokens, lengths):
            x = nn.Embed(10, 6)(tokens)
            x = jnn.RNN(jaxrnn.lstm(8))(x, seq_lengths=lengths)
            return nn.Dense(3)(x)

    tokens = jax.random.randint(_key(), (BATCH, TIME), 0, 10)
    variables = jax.jit(Tagger().init)(_key(), tokens, LENGTHS)
    assert set(variables["params"]) == {"Embed_0", "RNN_0", "Dense_0"}
    assert set(variables["params"]["RNN_0"]["cell"]) == {"w_x", "w_h", "b_x", "b_h"}
    out = jax.jit(Tagger().apply)(variables, tokens, LENGTHS)
    assert out.shape == (BATCH, TIME, 3)


PARALLEL_MODELS = {  # cells linear in their carry, run by the shells with a parallel method
    "mingru": (lambda: jaxrnn.mingru(4), "associative"),
    "lru": (lambda: jaxrnn.lru(4, 3), "associative"),
    "stack_bi_minlstm": (
        lambda: jaxrnn.stack(jaxrnn.minlstm(4), 2, bidirectional=True),
        "associative",
    ),
    "gru_quasi_deer": (lambda: jaxrnn.gru(4), "quasi_deer"),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(PARALLEL_MODELS))
def test_shells_pass_the_method(name, mode):
    make, method = PARALLEL_MODELS[name]
    model = make()
    xs, carry, call, pure, attrs = _mode_args(model, mode)
    params = model.init(_key(), INPUT_SIZE)
    expected_ys, expected_carry = _pure(model, params, xs, carry, method=method, **pure)
    sequential_ys, _ = _pure(model, params, xs, carry, **pure)
    _assert_trees_close(sequential_ys, expected_ys)  # the same function, another algorithm

    layer = jnn.RNN(model, return_carry=True, method=method, **attrs)
    variables = {"params": _to_flax_layout(model, params)}
    carry_out, ys = jax.jit(lambda v, xs, c: layer.apply(v, xs, c, **call))(variables, xs, carry)
    _assert_trees_close(ys, expected_ys)
    _assert_trees_close(carry_out, expected_carry)

    nnx_layer = jnnx.RNN(model, INPUT_SIZE, rngs=nnx.Rngs(0), method=method, **attrs)
    nnx_layer.load_params(params)
    carry_out, ys = nnx.jit(lambda m, xs, c: m(xs, c, return_carry=True, **call))(
        nnx_layer, xs, carry
    )
    _assert_trees_close(ys, expected_ys)
    _assert_trees_close(carry_out, expected_carry)


def test_shells_refuse_a_method_the_cell_cannot_use():
    xs = jnp.ones((BATCH, TIME, INPUT_SIZE))
    msg = r"method='associative' needs a cell whose recurrence is linear in its carry"
    with pytest.raises(ValueError, match=msg):
        jnn.RNN(jaxrnn.lstm(4), method="associative").init(_key(), xs)
    layer = jnnx.RNN(jaxrnn.stack(jaxrnn.gru(4), 2), INPUT_SIZE, rngs=nnx.Rngs(0), method="bogus")
    with pytest.raises(ValueError, match=r"method must be one of .* got 'bogus'"):
        layer(xs)


# --- Bad input ------------------------------------------------------------------------------


def test_reverse_with_network_is_refused():
    model = MODELS["stack_bi_lstm"]()
    xs = jnp.ones((BATCH, TIME, INPUT_SIZE))
    with pytest.raises(ValueError, match=r"linen.RNN: reverse=True runs a single cell"):
        jnn.RNN(model, reverse=True).init(_key(), xs)
    layer = jnnx.RNN(model, INPUT_SIZE, rngs=nnx.Rngs(0), reverse=True)
    with pytest.raises(ValueError, match=r"nnx.RNN: reverse=True runs a single cell"):
        layer(xs)


def test_not_a_cell_is_refused():
    xs = jnp.ones((BATCH, TIME, INPUT_SIZE))
    with pytest.raises(TypeError, match=r"linen.RNN: cell must be a jaxrnn.Cell .* got GRUCell"):
        jnn.RNN(nn.GRUCell(4)).init(_key(), xs)
    with pytest.raises(TypeError, match=r"nnx.RNN: cell must be a jaxrnn.Cell .* got str"):
        jnnx.RNN("lstm", INPUT_SIZE, rngs=nnx.Rngs(0))


def test_wrong_input_size_names_the_argument():
    layer = jnnx.RNN(jaxrnn.lstm(4), INPUT_SIZE, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"xs has 7 features but params were built for input_si"):
        layer(jnp.ones((BATCH, TIME, 7)))


# --- The examples run (tests/test_docs.py runs the README's code) ------------------------


def _load_example(name: str):
    return load_script(f"examples/{name}.py")


def test_flax_train_example_loss_falls_tenfold():
    first, last = _load_example("flax_train").main(steps=150, verbose=False)
    assert last < first / 10, (first, last)


def test_from_pytorch_example_matches():
    assert _load_example("from_pytorch").main() < 1e-5
