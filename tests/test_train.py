"""The train step, truncated BPTT, checkpoints, the NaN guard and data parallelism."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxrnn
from jaxrnn import tasks, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["elman", "lstm", "gru"])
def cell(request):
    return getattr(jaxrnn, request.param)(8)


@pytest.fixture
def adding_setup():
    task = tasks.adding(6)
    model = train.sequence_model(jaxrnn.elman(8), 1)
    params = model.init(jax.random.PRNGKey(0), task.input_size)
    return task, model, params


def _fit(task, model, params, **kwargs):
    defaults = dict(
        steps=6,
        key=jax.random.PRNGKey(3),
        has_carry=True,
        clip_norm=1.0,
        progress=False,
        data_parallel=False,
        log_every=1,
    )
    defaults.update(kwargs)
    return train.fit(
        train.task_loss(model, task),
        params,
        optax.adam(1e-2),
        lambda k: task.sample(k, 8),
        **defaults,
    )


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_train_step_decreases_the_loss(cell):
    task = tasks.adding(5)
    model = train.sequence_model(cell, 1)
    params = model.init(jax.random.PRNGKey(1), task.input_size)
    batch = task.sample(jax.random.PRNGKey(2), 16)
    optimizer = optax.adam(1e-2)
    step = train.make_train_step(train.task_loss(model, task), optimizer, has_carry=True)
    opt_state = optimizer.init(params)
    losses = []
    for _ in range(30):
        params, opt_state, _, metrics = step(params, opt_state, batch)
        losses.append(float(metrics["loss"]))
        assert int(metrics["skipped"]) == 0 and float(metrics["grad_norm"]) > 0
    assert losses[-1] < 0.5 * losses[0]


def test_tbptt_chunks_equal_the_full_sequence(cell):
    model = train.sequence_model(cell, 3, readout="all")
    params = model.init(jax.random.PRNGKey(0), 4)
    xs = jax.random.normal(jax.random.PRNGKey(1), (2, 11, 4))
    full, full_carry = model.apply(params, xs)
    outputs, carry = [], None
    for chunk in train.time_chunks(xs, 4):
        ys, carry = model.apply(params, chunk, carry)
        outputs.append(ys)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), full, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(carry), jax.tree_util.tree_leaves(full_carry)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tbptt_gradient_stops_between_chunks():
    task = tasks.copy_memory(4)
    model = train.sequence_model(jaxrnn.lstm(6), task.output_size, readout="all")
    params = model.init(jax.random.PRNGKey(0), task.input_size)
    batch = task.sample(jax.random.PRNGKey(1), 4)
    first, second = train.time_chunks(batch, 12)
    loss_fn = train.task_loss(model, task)
    _, carry = loss_fn(params, first)
    optimizer = optax.sgd(1.0)
    step = train.make_train_step(loss_fn, optimizer, has_carry=True)
    new_params, _, _, _ = step(params, optimizer.init(params), second, carry)
    # The update is the gradient of the second chunk's loss with the carry held constant.
    grads = jax.jit(jax.grad(lambda p: loss_fn(p, second, carry)[0]))(params)
    expected = jax.tree_util.tree_map(lambda p, g: p - g, params, grads)
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_fit_with_tbptt_makes_one_update_per_chunk():
    task = tasks.char_lm(12)
    model = train.sequence_model(jaxrnn.gru(8), task.output_size, readout="all")
    params = model.init(jax.random.PRNGKey(0), task.input_size)
    result = _fit(
        task,
        model,
        params,
        steps=3,
        tbptt=4,
        clip_norm=None,
        initial_carry=lambda b: model.initial_carry(b.inputs.shape[0]),
    )
    adam_state = result.state.opt_state[0]
    assert int(result.state.step) == 3 and int(adam_state.count) == 3 * 3
    assert all(np.isfinite(r["loss"]) for r in result.history)


def test_fit_learns_and_logs_jsonl(tmp_path, adding_setup):
    task, model, params = adding_setup
    metric = train.task_metric(model, task)
    test = task.sample(jax.random.PRNGKey(9), 64)
    path = tmp_path / "runs" / "a" / "metrics.jsonl"  # its directory is made
    result = _fit(
        task,
        model,
        params,
        steps=40,
        metrics_path=str(path),
        log_every=10,
        eval_fn=lambda p: {"mse": metric(p, test)},
        eval_every=20,
    )
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert records == result.history
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [10, 20, 30, 40]
    assert {"grad_norm", "skipped", "steps_per_sec"} <= set(train_records[0])
    evals = [r for r in records if "eval_mse" in r]
    assert [r["step"] for r in evals] == [20, 40]
    assert evals[-1]["eval_mse"] < float(metric(params, test))


def test_checkpoint_resume_is_bitwise_identical(tmp_path, adding_setup):
    task, model, params = adding_setup
    whole = _fit(task, model, params, steps=6)
    ckpt = str(tmp_path / "ckpt")
    first = _fit(task, model, params, steps=3, checkpoint_dir=ckpt)
    assert train.checkpoint_steps(ckpt) == [3] and first.resumed_from is None
    resumed = _fit(task, model, params, steps=6, checkpoint_dir=ckpt, resume=True)
    assert resumed.resumed_from == 3
    _assert_trees_equal(whole.state, resumed.state)
    assert [r["loss"] for r in resumed.history] == [r["loss"] for r in whole.history[3:]]
    assert train.checkpoint_steps(ckpt) == [3, 6]


def test_checkpoints_keep_the_newest(tmp_path, adding_setup):
    task, model, params = adding_setup
    ckpt = str(tmp_path / "ckpt")
    _fit(task, model, params, steps=5, checkpoint_dir=ckpt, checkpoint_every=1, keep_checkpoints=2)
    assert train.checkpoint_steps(ckpt) == [4, 5]
    state = train.init_state(
        params, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)), jax.random.PRNGKey(0)
    )
    assert int(train.restore_checkpoint(ckpt, state, step=4).step) == 4
    with pytest.raises(FileNotFoundError, match="no checkpoint of step 2"):
        train.restore_checkpoint(ckpt, state, step=2)
    assert train.restore_checkpoint(str(tmp_path / "empty"), state) is None


def test_nan_guard_skips_the_update_and_reports_it(capsys, tmp_path):
    def loss_fn(w, batch):
        x, poison = batch
        return jnp.sum((x * w - 1.0) ** 2) + poison

    def sample_batch(key):
        x = jax.random.normal(key, (4,))
        # Every third batch (by its first value's sign pattern) is poisoned with NaN.
        return x, jnp.where(x[0] > 0.8, jnp.nan, 0.0)

    optimizer = optax.sgd(0.01)
    step = train.make_train_step(loss_fn, optimizer)
    w = jnp.ones(4)
    bad = (jnp.ones(4), jnp.float32(jnp.nan))
    w2, state2, _, metrics = step(w, optimizer.init(w), bad)
    assert int(metrics["skipped"]) == 1 and np.array_equal(w2, w)

    path = tmp_path / "m.jsonl"
    result = train.fit(
        loss_fn,
        w,
        optax.adam(0.01),
        sample_batch,
        steps=30,
        key=jax.random.PRNGKey(0),
        progress=False,
        data_parallel=False,
        log_every=30,
        metrics_path=str(path),
    )
    keys = [jax.random.split(k)[1] for k in _keys(jax.random.PRNGKey(0), 30)]
    expected = [i + 1 for i, k in enumerate(keys) if float(sample_batch(k)[0][0]) > 0.8]
    assert expected and result.skipped_steps == expected
    assert np.all(np.isfinite(result.state.params))
    assert json.loads(path.read_text())["skipped"] == len(expected)
    assert f"step {expected[0]}: non-finite loss or gradient; update skipped" in (
        capsys.readouterr().err
    )


def _keys(key, n):
    out = []
    for _ in range(n):
        out.append(key)
        key = jax.random.split(key)[0]
    return out


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=-1), "steps must be an int >= 0, got -1"),
        (dict(tbptt=4), "tbptt needs a loss that hands on the carry"),
        (dict(resume=True), "resume=True needs checkpoint_dir"),
        (dict(clip_norm=-1.0), "clip_norm must be a positive number"),
    ],
)
def test_fit_rejects_bad_arguments(kwargs, match):
    args = dict(steps=1, key=jax.random.PRNGKey(0), progress=False, data_parallel=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train.fit(
            lambda w, b: jnp.sum(w * b),
            jnp.ones(2),
            optax.sgd(0.1),
            lambda k: jnp.ones((2, 2)),
            **args,
        )


def test_time_chunks_rejects_ragged_leaves():
    with pytest.raises(ValueError, match="same length on axis 1"):
        train.time_chunks((jnp.zeros((2, 5, 1)), jnp.zeros((2,))), 2)
    with pytest.raises(ValueError, match="chunk_len must be a positive int, got 0"):
        train.time_chunks(jnp.zeros((2, 5)), 0)


_SHARDED_SCRIPT = textwrap.dedent(
    """
    import json, jax, numpy as np, optax, jaxrnn
    from jaxrnn import tasks, train
    assert len(jax.devices()) == 4, jax.devices()
    task = tasks.adding(8)
    model = train.sequence_model(jaxrnn.gru(8), 1)
    params = model.init(jax.random.PRNGKey(0), 2)

    def run(data_parallel):
        return train.fit(train.task_loss(model, task), params, optax.adam(1e-2),
                         lambda k: task.sample(k, 16), steps=3, key=jax.random.PRNGKey(1),
                         has_carry=True, clip_norm=1.0, progress=False,
                         data_parallel=data_parallel)

    sharded, single = run(True), run(False)
    placement = train.make_data_parallel()
    batch = train.place_batch(task.sample(jax.random.PRNGKey(2), 16), placement)
    leaves = lambda s: [np.asarray(x).tolist() for x in jax.tree_util.tree_leaves(s.params)]
    try:
        train.place_batch(task.sample(jax.random.PRNGKey(2), 6), placement)
        error = ""
    except ValueError as e:
        error = str(e)
    print(json.dumps({
        "sharded": leaves(sharded.state), "single": leaves(single.state),
        "losses": [[r["loss"] for r in x.history] for x in (sharded, single)],
        "shards": len(batch.inputs.addressable_shards),
        "shard_shape": list(batch.inputs.addressable_shards[0].data.shape),
        "params_devices": len(sharded.state.params.readout.w.sharding.device_set),
        "error": error,
    }))
    """
)


def test_four_device_data_parallel_run_equals_single_device():
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT,
    )
    out = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["shards"] == 4 and result["shard_shape"] == [4, 8, 2]
    assert result["params_devices"] == 4
    for a, b in zip(result["sharded"], result["single"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(*result["losses"], rtol=1e-5)
    assert "multiple of the 4 devices" in result["error"]


@pytest.mark.parametrize("module", ["train", "tasks", "diagnostics"])
def test_every_public_name_exists(module):
    mod = getattr(jaxrnn, module)
    assert mod.__all__ == sorted(mod.__all__)
    for name in mod.__all__:
        assert getattr(mod, name) is not None
