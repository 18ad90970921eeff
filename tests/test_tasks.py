"""The tasks' generators have the documented statistics, and their baselines are right."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrnn import tasks

KEY = jax.random.PRNGKey(7)


@pytest.mark.parametrize(
    "make",
    [
        lambda: tasks.adding(12),
        lambda: tasks.copy_memory(5),
        lambda: tasks.char_lm(16),
        lambda: tasks.majority(9),
    ],
    ids=["adding", "copy", "char", "majority"],
)
def test_sampling_is_deterministic_in_the_key(make):
    task = make()
    a, b = task.sample(KEY, 4), task.sample(KEY, 4)
    c = task.sample(jax.random.PRNGKey(8), 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a.inputs, c.inputs)
    assert a.inputs.shape == (4, task.seq_len, task.input_size)
    assert a.inputs.dtype == jnp.float32


def test_adding_statistics():
    T = 30
    task = tasks.adding(T)
    batch = task.sample(KEY, 20000)
    values, markers = np.asarray(batch.inputs[..., 0]), np.asarray(batch.inputs[..., 1])
    assert np.all((values >= 0) & (values < 1))
    assert np.all(markers.sum(axis=1) == 2)
    assert np.all(markers[:, : T // 2].sum(axis=1) == 1)
    assert np.all(markers[:, T // 2 :].sum(axis=1) == 1)
    np.testing.assert_allclose(batch.targets[:, 0], (values * markers).sum(axis=1), rtol=1e-6)
    targets = np.asarray(batch.targets)
    assert abs(targets.mean() - 1.0) < 0.01
    # The baseline (always predict 1) has MSE Var(u1 + u2) = 1/6.
    assert task.baseline == pytest.approx(1 / 6)
    mse = float(task.metric(jnp.ones_like(batch.targets), batch.targets))
    assert mse == pytest.approx(1 / 6, abs=0.005)


def test_copy_memory_layout_and_baseline():
    T = 7
    task = tasks.copy_memory(T)
    batch = task.sample(KEY, 64)
    tokens = np.asarray(jnp.argmax(batch.inputs, axis=-1))
    targets = np.asarray(batch.targets)
    assert tokens.shape == (64, T + 20) and np.all(batch.inputs.sum(-1) == 1)
    symbols = tokens[:, :10]
    assert np.all((symbols >= 1) & (symbols <= 8))
    assert np.all(tokens[:, 10 : 10 + T - 1] == 0)
    assert np.all(tokens[:, 10 + T - 1] == 9)
    assert np.all(tokens[:, 10 + T :] == 0)
    assert np.all(targets[:, : T + 10] == 0)
    assert np.array_equal(targets[:, T + 10 :], symbols)
    # The baseline: certain blanks, then uniform over the 8 symbols.
    logits = np.full((64, T + 20, 9), -1e9, np.float32)
    logits[:, : T + 10, 0] = 0.0
    logits[:, T + 10 :, 1:] = 0.0
    ce = float(task.metric(jnp.asarray(logits), batch.targets))
    assert ce == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-5)
    assert task.baseline == pytest.approx(10 * math.log(8) / (T + 20))


def test_char_lm_windows_targets_and_unigram_baseline(tmp_path):
    text = tasks.shipped_text()
    assert len(text) > 10000 and "MENENIUS" in text
    task = tasks.char_lm(20)
    vocab = task.info
    batch = task.sample(KEY, 8)
    ids = np.asarray(jnp.argmax(batch.inputs, axis=-1))
    targets = np.asarray(batch.targets)
    assert np.array_equal(ids[:, 1:], targets[:, :-1])
    for row_in, row_t in zip(ids, targets):
        window = vocab.decode(row_in) + vocab.decode(row_t[-1:])
        assert window in text
    freqs = np.bincount(vocab.encode(text), minlength=len(vocab.chars)) / len(text)
    assert task.baseline == pytest.approx(-np.sum(freqs * np.log(freqs)))
    big = task.sample(KEY, 2000)
    logits = jnp.broadcast_to(jnp.log(jnp.asarray(freqs, jnp.float32)), big.inputs.shape)
    assert float(task.metric(logits, big.targets)) == pytest.approx(task.baseline, abs=0.05)

    path = tmp_path / "t.txt"
    path.write_text("abcabcabd" * 10, encoding="utf-8")
    small = tasks.char_lm(5, path=path)
    assert small.info.chars == "abcd" and small.input_size == 4


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: tasks.char_lm(5, path="/nonexistent/x.txt"), FileNotFoundError, "does not exist"),
        (lambda: tasks.char_lm(5, text="abc"), ValueError, "seq_len must be smaller"),
        (lambda: tasks.adding(1), ValueError, "seq_len must be an int >= 2, got 1"),
        (lambda: tasks.copy_memory(0), ValueError, "delay must be an int >= 1, got 0"),
        (lambda: tasks.majority(5, signal=0.0), ValueError, r"signal must be in \(0, 1\]"),
        (lambda: tasks.get_task("sorting", 5), ValueError, "unknown task 'sorting'"),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_majority_statistics():
    K, s = 4, 0.25
    task = tasks.majority(50, num_classes=K, signal=s)
    batch = task.sample(KEY, 8000)
    labels = np.asarray(batch.targets)
    tokens = np.asarray(jnp.argmax(batch.inputs, axis=-1))
    np.testing.assert_allclose(np.bincount(labels, minlength=K) / len(labels), 1 / K, atol=0.02)
    p_label = np.mean(tokens == labels[:, None])
    assert p_label == pytest.approx(s + (1 - s) / K, abs=0.01)
    # Chance is the baseline: a constant guess is right a 1/K of the time.
    constant = jnp.zeros((len(labels), K)).at[:, 0].set(1.0)
    assert float(task.metric(constant, batch.targets)) == pytest.approx(task.baseline, abs=0.02)
    # The most frequent symbol names the label for most sequences of this length.
    mode = np.argmax(np.asarray(batch.inputs.sum(axis=1)), axis=-1)
    assert np.mean(mode == labels) > 0.9
