"""Benchmark tasks for recurrent networks, each deterministic from a key."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from importlib import resources
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


class Batch(NamedTuple):
    """One batch of a task: float inputs and the targets the task's loss compares against."""

    inputs: Array  # shape=(batch, time, input_size), float32
    targets: Array  # task-specific: (batch, 1) floats, (batch, time) or (batch,) int labels


class Task(NamedTuple):
    """A sequence task: a batch sampler, its loss, its metric and the metric's trivial baseline.

    Attributes:
      name: the task's name (``"adding"``, ``"copy"``, ``"char"``, ``"majority"``).
      input_size: features per step of ``Batch.inputs``.
      output_size: outputs the model's readout must produce per prediction.
      seq_len: the number of steps of each sequence.
      readout: ``"last"`` (one prediction from the final step) or ``"all"`` (one per step).
      sample: ``sample(key, batch_size) -> Batch``; pure and deterministic in ``key``.
      loss: ``loss(outputs, targets) -> scalar``, minimised in training.
      metric: ``metric(outputs, targets) -> scalar``, reported against ``baseline``.
      metric_name: the metric's name, e.g. ``"mse"``.
      higher_is_better: whether a larger metric is better (accuracy) or worse (losses).
      baseline: the metric of the trivial predictor described in ``baseline_note``.
      baseline_note: what the trivial predictor does.
      info: task-specific extras (e.g. the vocabulary of the character task).
    """

    name: str
    input_size: int
    output_size: int
    seq_len: int
    readout: str
    sample: Callable[[Array, int], Batch]
    loss: Callable[[Array, Array], Array]
    metric: Callable[[Array, Array], Array]
    metric_name: str
    higher_is_better: bool
    baseline: float
    baseline_note: str
    info: Any = None


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an int >= {minimum}, got {value!r}.")
    return value


def _mse(outputs: Array, targets: Array) -> Array:
    return jnp.mean((outputs.astype(jnp.float32) - targets) ** 2)


def _cross_entropy(logits: Array, labels: Array) -> Array:
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def _accuracy(logits: Array, labels: Array) -> Array:
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))


def adding(seq_len: int) -> Task:
    r"""The adding problem (Hochreiter & Schmidhuber, 1997; the form of Le et al., 2015).

    Each step carries two features: a value :math:`u_t \sim U(0, 1)` and a marker that is 1 at
    exactly two steps, one drawn uniformly in the first half of the sequence and one in the
    second half. The target is the sum of the two marked values, read from the final step:

    .. math::

        y = u_{t_1} + u_{t_2}, \qquad \mathrm{MSE}_\text{baseline} = \operatorname{Var}(y)
          = 2 \cdot \tfrac{1}{12} = 0.1\overline{6}

    The baseline always predicts :math:`\mathbb{E}[y] = 1`. Solving the task means remembering
    the first marked value for at least ``seq_len / 2`` steps.

    Args:
      seq_len: ``T >= 2``, steps per sequence.

    Returns:
      A `Task` with ``inputs: (batch, T, 2)``, ``targets: (batch, 1)``, readout ``"last"``,
      loss and metric the mean squared error.

    Example:
      >>> import jax
      >>> from jaxrnn import tasks
      >>> task = tasks.adding(50)
      >>> batch = task.sample(jax.random.PRNGKey(0), 4)
      >>> batch.inputs.shape, batch.targets.shape, round(task.baseline, 4)
      ((4, 50, 2), (4, 1), 0.1667)
    """
    _check_int("adding", "seq_len", seq_len, 2)
    half = seq_len // 2

    def sample(key: Array, batch_size: int) -> Batch:
        k_val, k_first, k_second = jax.random.split(key, 3)
        values = jax.random.uniform(k_val, (batch_size, seq_len))
        first = jax.random.randint(k_first, (batch_size,), 0, half)
        second = jax.random.randint(k_second, (batch_size,), half, seq_len)
        steps = jnp.arange(seq_len)
        markers = (steps == first[:, None]) | (steps == second[:, None])
        markers = markers.astype(jnp.float32)
        inputs = jnp.stack([values, markers], axis=-1)
        targets = jnp.sum(values * markers, axis=1, keepdims=True)
        return Batch(inputs, targets)

    return Task(
        name="adding",
        input_size=2,
        output_size=1,
        seq_len=seq_len,
        readout="last",
        sample=sample,
        loss=_mse,
        metric=_mse,
        metric_name="mse",
        higher_is_better=False,
        baseline=1.0 / 6.0,
        baseline_note="always predict 1 (the target's mean)",
    )


_COPY_SYMBOLS = 8  # data symbols 1..8; 0 is blank; 9 is the delimiter
_COPY_LENGTH = 10


def copy_memory(delay: int) -> Task:
    r"""The copy-memory task (Hochreiter & Schmidhuber, 1997; the form of Arjovsky et al., 2016).

    The input is 10 symbols drawn uniformly from ``{1..8}``, then ``delay - 1`` blanks (0), a
    delimiter (9) and 10 more blanks: ``T + 20`` steps in all, one-hot over 10 categories. The
    target is blank for the first ``T + 10`` steps and then the 10 symbols, in order. The
    baseline outputs blanks and then a uniform guess over the 8 symbols:

    .. math::

        \mathrm{CE}_\text{baseline} = \frac{10 \ln 8}{T + 20}

    Args:
      delay: ``T >= 1``, the number of steps between the end of the symbols and the delimiter
        plus one.

    Returns:
      A `Task` with ``inputs: (batch, T + 20, 10)``, ``targets: (batch, T + 20)`` int labels in
      ``0..8``, readout ``"all"``, loss and metric the cross-entropy (nats) averaged over all
      steps.

    Example:
      >>> import jax
      >>> from jaxrnn import tasks
      >>> task = tasks.copy_memory(30)
      >>> batch = task.sample(jax.random.PRNGKey(0), 2)
      >>> batch.inputs.shape, batch.targets.shape, task.output_size
      ((2, 50, 10), (2, 50), 9)
    """
    _check_int("copy_memory", "delay", delay, 1)
    total = delay + 2 * _COPY_LENGTH

    def sample(key: Array, batch_size: int) -> Batch:
        symbols = jax.random.randint(key, (batch_size, _COPY_LENGTH), 1, _COPY_SYMBOLS + 1)
        blanks = jnp.zeros((batch_size, delay - 1), jnp.int32)
        delimiter = jnp.full((batch_size, 1), _COPY_SYMBOLS + 1, jnp.int32)
        tail = jnp.zeros((batch_size, _COPY_LENGTH), jnp.int32)
        tokens = jnp.concatenate([symbols, blanks, delimiter, tail], axis=1)
        lead = jnp.zeros((batch_size, delay + _COPY_LENGTH), jnp.int32)
        targets = jnp.concatenate([lead, symbols], axis=1)
        inputs = jax.nn.one_hot(tokens, _COPY_SYMBOLS + 2, dtype=jnp.float32)
        return Batch(inputs, targets)

    return Task(
        name="copy",
        input_size=_COPY_SYMBOLS + 2,
        output_size=_COPY_SYMBOLS + 1,
        seq_len=total,
        readout="all",
        sample=sample,
        loss=_cross_entropy,
        metric=_cross_entropy,
        metric_name="cross_entropy",
        higher_is_better=False,
        baseline=_COPY_LENGTH * math.log(_COPY_SYMBOLS) / total,
        baseline_note="blanks, then a uniform guess over the 8 symbols",
    )


class Vocabulary(NamedTuple):
    """The characters of a text and their ids."""

    chars: str  # the sorted distinct characters; id i is chars[i]

    def encode(self, text: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.chars)}
        return [index[c] for c in text]

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def shipped_text() -> str:
    """The public-domain text shipped with jaxrnn: the opening of Shakespeare's *Coriolanus*.

    About 16,000 characters (Act I, scenes 1 to 3); see ``jaxrnn/tasks/data/README.md``.
    """
    return resources.files("jaxrnn.tasks").joinpath("data/coriolanus.txt").read_text("utf-8")


def char_lm(seq_len: int, text: str | None = None, *, path: str | os.PathLike | None = None):
    r"""Character-level language modelling: predict each next character of a text.

    A batch holds random windows of ``seq_len + 1`` characters; the inputs are the first
    ``seq_len`` characters one-hot, the targets the ``seq_len`` characters that follow each.
    The metric is the cross-entropy in nats per character; the baseline is the unigram model
    (each character's frequency in the text), whose cross-entropy is the text's entropy:

    .. math::

        \mathrm{CE}_\text{baseline} = -\sum_c p_c \ln p_c

    Args:
      seq_len: steps per window, ``1 <= seq_len < len(text)``.
      text: the text; default the shipped public-domain text (`shipped_text`).
      path: a UTF-8 text file to read instead of ``text``.

    Returns:
      A `Task` with ``inputs: (batch, seq_len, vocab)``, ``targets: (batch, seq_len)`` ids,
      readout ``"all"``; ``task.info`` is the `Vocabulary`.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      ValueError: both ``text`` and ``path`` given, or ``seq_len`` out of range.

    Example:
      >>> import jax
      >>> from jaxrnn import tasks
      >>> task = tasks.char_lm(32)
      >>> batch = task.sample(jax.random.PRNGKey(0), 3)
      >>> batch.inputs.shape[:2], batch.targets.shape, task.input_size == len(task.info.chars)
      ((3, 32), (3, 32), True)
    """
    if text is not None and path is not None:
        raise ValueError("char_lm: give `text` or `path`, not both.")
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"char_lm: text file {str(path)!r} does not exist.")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if text is None:
        text = shipped_text()
    if len(text) < 2:
        raise ValueError(f"char_lm: the text needs at least 2 characters, got {len(text)}.")
    _check_int("char_lm", "seq_len", seq_len, 1)
    if seq_len >= len(text):
        raise ValueError(
            f"char_lm: seq_len must be smaller than the text's length {len(text)}, got {seq_len}."
        )
    vocab = Vocabulary("".join(sorted(set(text))))
    codes = np.asarray(vocab.encode(text), np.int32)
    freqs = np.bincount(codes, minlength=len(vocab.chars)) / len(text)
    entropy = float(-np.sum(freqs * np.log(freqs)))
    ids = jnp.asarray(codes)
    size = len(vocab.chars)

    def sample(key: Array, batch_size: int) -> Batch:
        starts = jax.random.randint(key, (batch_size,), 0, ids.shape[0] - seq_len)
        offsets = jnp.arange(seq_len + 1)
        windows = ids[starts[:, None] + offsets]
        inputs = jax.nn.one_hot(windows[:, :-1], size, dtype=jnp.float32)
        return Batch(inputs, windows[:, 1:])

    return Task(
        name="char",
        input_size=size,
        output_size=size,
        seq_len=seq_len,
        readout="all",
        sample=sample,
        loss=_cross_entropy,
        metric=_cross_entropy,
        metric_name="cross_entropy",
        higher_is_better=False,
        baseline=entropy,
        baseline_note="unigram character frequencies (the text's entropy, nats/char)",
        info=vocab,
    )


def majority(seq_len: int, num_classes: int = 4, *, signal: float = 0.25) -> Task:
    r"""Sequence classification: name the symbol a noisy sequence is biased towards.

    A label :math:`c` is drawn uniformly from ``num_classes``; each step's symbol is :math:`c`
    with probability ``signal`` and otherwise uniform over all classes, so

    .. math::

        P(x_t = c) = s + \frac{1 - s}{K}, \qquad P(x_t = k \ne c) = \frac{1 - s}{K}

    and the label is the most frequent symbol with high probability for long sequences. The
    prediction is read from the final step; the metric is accuracy and the baseline the
    chance rate ``1 / num_classes`` (classes are balanced).

    Args:
      seq_len: steps per sequence, ``>= 1``.
      num_classes: ``K >= 2``.
      signal: ``s`` in ``(0, 1]``, how strongly the sequence leans to its label.

    Returns:
      A `Task` with ``inputs: (batch, seq_len, K)`` one-hot, ``targets: (batch,)`` labels,
      readout ``"last"``, loss the cross-entropy and metric the accuracy.

    Example:
      >>> import jax
      >>> from jaxrnn import tasks
      >>> task = tasks.majority(20, num_classes=3)
      >>> batch = task.sample(jax.random.PRNGKey(0), 5)
      >>> batch.inputs.shape, batch.targets.shape, round(task.baseline, 3)
      ((5, 20, 3), (5,), 0.333)
    """
    _check_int("majority", "seq_len", seq_len, 1)
    _check_int("majority", "num_classes", num_classes, 2)
    if not 0.0 < signal <= 1.0:
        raise ValueError(f"majority: signal must be in (0, 1], got {signal!r}.")

    def sample(key: Array, batch_size: int) -> Batch:
        k_label, k_keep, k_noise = jax.random.split(key, 3)
        labels = jax.random.randint(k_label, (batch_size,), 0, num_classes)
        keep = jax.random.bernoulli(k_keep, signal, (batch_size, seq_len))
        noise = jax.random.randint(k_noise, (batch_size, seq_len), 0, num_classes)
        tokens = jnp.where(keep, labels[:, None], noise)
        return Batch(jax.nn.one_hot(tokens, num_classes, dtype=jnp.float32), labels)

    return Task(
        name="majority",
        input_size=num_classes,
        output_size=num_classes,
        seq_len=seq_len,
        readout="last",
        sample=sample,
        loss=_cross_entropy,
        metric=_accuracy,
        metric_name="accuracy",
        higher_is_better=True,
        baseline=1.0 / num_classes,
        baseline_note="chance: classes are balanced",
    )


TASKS = {
    "adding": adding,
    "copy": copy_memory,
    "char": char_lm,
    "majority": majority,
}


def get_task(name: str, seq_len: int, **kwargs) -> Task:
    """Builds a task by name: ``"adding"``, ``"copy"``, ``"char"`` or ``"majority"``.

    Args:
      name: the task's name.
      seq_len: the sequence length (the delay ``T`` for ``"copy"``).
      **kwargs: passed on to the task's factory (e.g. ``path=`` for ``"char"``).

    Returns:
      The `Task`.

    Raises:
      ValueError: an unknown name.

    Example:
      >>> from jaxrnn import tasks
      >>> tasks.get_task("adding", 10).metric_name
      'mse'
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}.")
    return TASKS[name](seq_len, **kwargs)
