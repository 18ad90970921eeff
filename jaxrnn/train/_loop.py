"""An optax-native training step and a `fit` driver: clipping, TBPTT, data parallelism,
evaluation, progress, JSONL metrics, checkpoints and a NaN/Inf guard."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxrnn.train import _checkpoint

Array = jax.Array


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly where it stopped.

    Attributes:
      params: the model's parameters.
      opt_state: the optax optimizer's state.
      step: ``()`` int32, the number of batches consumed.
      rng: ``(2,)`` uint32 raw PRNG key; split once per step to draw the next batch.
    """

    params: Any
    opt_state: Any
    step: Array
    rng: Array


class FitResult(NamedTuple):
    """What `fit` returns.

    Attributes:
      state: the final `TrainState`.
      history: the logged records (dicts), as written to the JSONL file.
      skipped_steps: the steps whose update the NaN/Inf guard skipped.
      resumed_from: the step a checkpoint resumed from, or ``None``.
    """

    state: TrainState
    history: list
    skipped_steps: list
    resumed_from: int | None


def _raw_key(key) -> Array:
    key = jnp.asarray(key)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return key


def init_state(params, optimizer: optax.GradientTransformation, key) -> TrainState:
    """A fresh `TrainState`: the optimizer's initial state, step 0 and ``key`` for the data.

    Args:
      params: the initial parameters.
      optimizer: an ``optax.GradientTransformation``.
      key: a PRNG key (raw ``uint32`` or typed).

    Returns:
      A `TrainState`.
    """
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32), _raw_key(key))


def _tree_where(flag: Array, on_true, on_false):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(flag, a, b), on_true, on_false)


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def make_train_step(
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    has_carry: bool = False,
    jit: bool = True,
) -> Callable:
    r"""Builds a train step from a loss function and any ``optax.GradientTransformation``.

    The step computes the loss and its gradient, applies the optimizer's update, and guards
    against non-finite numbers: when the loss or any gradient is NaN or Inf, the params, the
    optimizer state and the carry are left as they were and ``metrics["skipped"]`` is 1.

    .. math::

        g = \nabla_\theta L(\theta; \text{batch}), \qquad
        (u, s') = \text{optimizer.update}(g, s, \theta), \qquad \theta' = \theta + u

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``; with ``has_carry=True``
        ``loss_fn(params, batch, carry) -> (loss, carry)`` (the carry a recurrent model hands
        on to the next chunk of a long sequence; no gradient flows through it).
      optimizer: any ``optax.GradientTransformation`` (chain ``optax.clip_by_global_norm`` in
        front of it to clip gradients).
      has_carry: the form of ``loss_fn``.
      jit: wrap the step in ``jax.jit``.

    Returns:
      ``train_step(params, opt_state, batch, carry=None) -> (params, opt_state, carry,
      metrics)`` with ``metrics`` a dict of scalars: ``loss``, ``grad_norm`` (global norm,
      before the optimizer) and ``skipped`` (0 or 1).

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxrnn import train
      >>> loss_fn = lambda w, batch: jnp.sum((batch * w - 1.0) ** 2)
      >>> optimizer = optax.sgd(0.1)
      >>> step = train.make_train_step(loss_fn, optimizer)
      >>> w = jnp.zeros(3)
      >>> w, opt_state, _, metrics = step(w, optimizer.init(w), jnp.ones(3))
      >>> w, float(metrics["loss"]), int(metrics["skipped"])
      (Array([0.2, 0.2, 0.2], dtype=float32), 3.0, 0)
    """
    if has_carry:
        carry_loss = loss_fn
    else:

        def carry_loss(params, batch, carry):
            return loss_fn(params, batch), carry

    def train_step(params, opt_state, batch, carry=None):
        carry = jax.lax.stop_gradient(carry)
        (loss, new_carry), grads = jax.value_and_grad(carry_loss, has_aux=True)(
            params, batch, carry
        )
        updates, new_opt_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        finite = jnp.isfinite(loss) & _all_finite(grads)
        params = _tree_where(finite, new_params, params)
        opt_state = _tree_where(finite, new_opt_state, opt_state)
        if carry is not None:
            new_carry = _tree_where(finite, new_carry, carry)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "skipped": (~finite).astype(jnp.int32),
        }
        return params, opt_state, new_carry, metrics

    return jax.jit(train_step) if jit else train_step


def time_chunks(tree, chunk_len: int, *, axis: int = 1) -> list:
    """Splits every leaf of ``tree`` along its time axis into chunks of ``chunk_len`` steps.

    Used for truncated backpropagation through time: a long sequence is processed chunk by
    chunk, the carry handed from one chunk to the next and no gradient flowing between them.
    The last chunk is shorter when ``chunk_len`` does not divide the length.

    Args:
      tree: a pytree of arrays, each ``(batch, time, ...)`` (time on ``axis``).
      chunk_len: steps per chunk, ``>= 1``.
      axis: the time axis.

    Returns:
      A list of pytrees, the chunks in order.

    Raises:
      ValueError: ``chunk_len`` is not a positive int, or leaves differ in length.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxrnn import train
      >>> chunks = train.time_chunks({"x": jnp.zeros((2, 10, 3))}, 4)
      >>> [c["x"].shape for c in chunks]
      [(2, 4, 3), (2, 4, 3), (2, 2, 3)]
    """
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, int) or chunk_len < 1:
        raise ValueError(f"time_chunks: chunk_len must be a positive int, got {chunk_len!r}.")
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    lengths = {leaf.shape[axis] if leaf.ndim > axis else None for leaf in leaves}
    if len(lengths) != 1 or None in lengths:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(
            f"time_chunks: every leaf needs the same length on axis {axis} for truncated "
            f"BPTT, got shapes {shapes}."
        )
    (length,) = lengths
    chunks = []
    for start in range(0, length, chunk_len):
        index = (slice(None),) * axis + (slice(start, start + chunk_len),)
        chunks.append(treedef.unflatten([leaf[index] for leaf in leaves]))
    return chunks


class DataParallel(NamedTuple):
    """Placement of a data-parallel run: the batch split over ``mesh``'s ``"data"`` axis."""

    mesh: Mesh
    batch: NamedSharding  # PartitionSpec("data"): leading (batch) axis split
    replicated: NamedSharding  # PartitionSpec(): a full copy on every device


def make_data_parallel(devices: Sequence[jax.Device] | None = None) -> DataParallel:
    """A one-axis ``Mesh`` named ``"data"`` over ``devices`` (default: ``jax.devices()``).

    After ``jax.distributed.initialize()`` on every host, ``jax.devices()`` lists the devices
    of all hosts, so the same mesh spans them; see `fit`.

    Args:
      devices: the devices; default all of them.

    Returns:
      A `DataParallel` with the batch sharding and the replicated sharding.
    """
    devices = jax.devices() if devices is None else list(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    return DataParallel(
        mesh, NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    )


def place_batch(batch, placement: DataParallel | None):
    """Puts a batch on the devices, its leading axis split over ``placement``'s mesh.

    With several processes (multi-host), every process computes the same global batch (the
    data key is replicated) and keeps only the shards its devices hold.
    """
    if placement is None:
        return batch
    size = placement.mesh.size
    for leaf in jax.tree_util.tree_leaves(batch):
        if leaf.ndim == 0 or leaf.shape[0] % size:
            raise ValueError(
                f"fit: the batch size must be a multiple of the {size} devices of the "
                f"data-parallel mesh, got a leaf of shape {tuple(leaf.shape)}; change the "
                "batch size or pass data_parallel=False."
            )
    if jax.process_count() == 1:
        return jax.device_put(batch, placement.batch)

    def to_global(leaf):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, placement.batch, lambda i: host[i])

    return jax.tree_util.tree_map(to_global, batch)


def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"fit: {name} must be an int >= {minimum}, got {value!r}.")
    return int(value)


class _Log:
    """Buffers per-step metrics on the device and writes window means as JSONL records."""

    def __init__(self, path, bar):
        self.path, self.bar = path, bar
        if path is not None:  # as checkpoint directories are: made where missing
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.pending: list = []
        self.history: list = []
        self.skipped: list = []
        self.window_start = time.perf_counter()

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))

    def write(self, record: dict) -> None:
        self.history.append(record)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if not self.pending:
            return
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        self.pending = []
        now = time.perf_counter()
        for step, m in zip(steps, values):
            if int(m["skipped"]):
                self.skipped.append(step)
                message = f"step {step}: non-finite loss or gradient; update skipped"
                self.bar.write(message, file=sys.stderr)
        finite = [float(m["loss"]) for m in values if not int(m["skipped"])]
        record = {
            "step": steps[-1],
            "loss": float(np.mean(finite)) if finite else math.nan,
            "grad_norm": float(np.mean([float(m["grad_norm"]) for m in values])),
            "skipped": int(sum(int(m["skipped"]) for m in values)),
            "steps_per_sec": len(steps) / max(now - self.window_start, 1e-9),
        }
        self.window_start = now
        self.write(record)
        self.bar.set_postfix(loss=f"{record['loss']:.4g}", refresh=False)


def fit(
    loss_fn: Callable,
    params,
    optimizer: optax.GradientTransformation,
    sample_batch: Callable[[Array], Any],
    *,
    steps: int,
    key,
    has_carry: bool = False,
    initial_carry: Callable[[Any], Any] | None = None,
    tbptt: int | None = None,
    clip_norm: float | None = None,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    log_every: int = 10,
    metrics_path: str | None = None,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    resume: bool = False,
    progress: bool = True,
    data_parallel_devices: Sequence[jax.Device] | None = None,
    data_parallel: bool = True,
) -> FitResult:
    """Trains ``params`` for ``steps`` batches with ``optimizer``; resumable and data-parallel.

    Each step draws a batch with ``sample_batch`` from a key split off the run's state, so a run
    is fully determined by ``key``, and resuming from a checkpoint continues exactly as the
    uninterrupted run would (bitwise on CPU).

    - **Clipping**: ``clip_norm`` chains ``optax.clip_by_global_norm(clip_norm)`` in front of
      ``optimizer``.
    - **Truncated BPTT**: with ``tbptt=k`` (needs ``has_carry=True``) every batch of long
      sequences ``(batch, time, ...)`` is cut into chunks of ``k`` steps (`time_chunks`); each
      chunk is one optimizer update, and its final carry, gradient stopped, starts the next
      chunk. The first chunk starts from ``initial_carry(batch)`` (or ``None``).
    - **Data parallel**: with several devices (``data_parallel_devices``, default
      ``jax.devices()``) the batch's leading axis is split over a ``Mesh`` axis ``"data"``
      (``NamedSharding``) and params and optimizer state are replicated; XLA all-reduces the
      gradient. Results equal a one-device run up to float rounding. On several hosts, call
      ``jax.distributed.initialize()`` first in every process and run the same script: the
      mesh then spans every host's devices, each process draws the same global batch (the
      key is replicated) and keeps its own shards.
    - **Evaluation**: ``eval_fn(params) -> {name: value}`` every ``eval_every`` steps and at
      the end, logged as ``eval_<name>``.
    - **Progress and metrics**: a tqdm bar (loss, steps/s) and, every ``log_every`` steps, a
      record ``{step, loss, grad_norm, skipped, steps_per_sec}`` (window means) appended to the
      JSONL file ``metrics_path``.
    - **Checkpoints**: every ``checkpoint_every`` steps and at the end, the `TrainState`
      (params, optimizer state, step, rng) is written to ``checkpoint_dir`` with
      ``flax.serialization`` (msgpack), keeping the newest ``keep_checkpoints``; ``resume=True``
      continues from the newest one. On several hosts only process 0 writes (give every
      process the same shared ``checkpoint_dir``).
    - **NaN/Inf guard**: a step whose loss or gradient is not finite leaves params and
      optimizer state unchanged; it is reported on stderr, counted in the record's
      ``skipped`` and listed in `FitResult.skipped_steps`.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss``, or with ``has_carry=True``
        ``loss_fn(params, batch, carry) -> (loss, carry)``.
      params: the initial params (ignored when resuming from a checkpoint).
      optimizer: any ``optax.GradientTransformation``.
      sample_batch: ``sample_batch(key) -> batch``, pure (it is jitted); every leaf of the
        batch has the batch axis first.
      steps: the total number of batches to train on, counting those before a resume.
      key: PRNG key for the data.
      has_carry: the form of ``loss_fn``.
      initial_carry: ``initial_carry(batch) -> carry`` for the first chunk (``has_carry``).
      tbptt: chunk length of truncated BPTT, or ``None`` for whole sequences.
      clip_norm: clip gradients to this global norm, or ``None``.
      eval_fn: evaluation, ``eval_fn(params) -> dict`` of scalars (or a scalar).
      eval_every: evaluate every this many steps (``0``: only at the end).
      log_every: log every this many steps.
      metrics_path: a JSONL file the records are appended to (its directory is created
        where missing), or ``None``.
      checkpoint_dir: a directory for checkpoints, or ``None``.
      checkpoint_every: checkpoint every this many steps (``0``: only at the end).
      keep_checkpoints: how many checkpoints to keep.
      resume: continue from the newest checkpoint in ``checkpoint_dir`` if there is one.
      progress: show the progress bar.
      data_parallel_devices: the devices to split the batch over; default ``jax.devices()``.
      data_parallel: set ``False`` to run on the default device only.

    Returns:
      A `FitResult`.

    Raises:
      ValueError: bad counts, ``tbptt`` without ``has_carry``, ``resume`` without
        ``checkpoint_dir``, or a batch size that does not split over the devices.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from jaxrnn import train
      >>> def sample_batch(key):
      ...     x = jax.random.normal(key, (8, 3))
      ...     return x, x @ jnp.array([1.0, -2.0, 0.5])
      >>> def loss_fn(w, batch):
      ...     x, y = batch
      ...     return jnp.mean((x @ w - y) ** 2)
      >>> result = train.fit(loss_fn, jnp.zeros(3), optax.adam(0.1), sample_batch,
      ...                    steps=200, key=jax.random.PRNGKey(0), progress=False,
      ...                    data_parallel=False)
      >>> bool(result.history[-1]["loss"] < 1e-3), int(result.state.step)
      (True, 200)
    """
    steps = _check_count("steps", steps, 0)
    log_every = _check_count("log_every", log_every, 1)
    eval_every = _check_count("eval_every", eval_every, 0)
    checkpoint_every = _check_count("checkpoint_every", checkpoint_every, 0)
    keep_checkpoints = _check_count("keep_checkpoints", keep_checkpoints, 1)
    if tbptt is not None:
        _check_count("tbptt", tbptt, 1)
        if not has_carry:
            raise ValueError(
                "fit: tbptt needs a loss that hands on the carry: pass has_carry=True and "
                "loss_fn(params, batch, carry) -> (loss, carry)."
            )
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir.")
    if clip_norm is not None:
        if not (isinstance(clip_norm, (int, float)) and clip_norm > 0):
            raise ValueError(f"fit: clip_norm must be a positive number, got {clip_norm!r}.")
        optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)

    from tqdm.auto import tqdm

    placement = None
    devices = jax.devices() if data_parallel_devices is None else list(data_parallel_devices)
    if data_parallel and len(devices) > 1:
        placement = make_data_parallel(devices)

    state = init_state(params, optimizer, key)
    resumed_from = None
    if resume:
        restored = _checkpoint.restore_checkpoint(checkpoint_dir, state)
        if restored is not None:
            state = restored
            resumed_from = int(state.step)
    if placement is not None:
        state = jax.device_put(state, placement.replicated)
    params, opt_state, rng = state.params, state.opt_state, state.rng
    start = int(state.step)

    plain_loss = loss_fn if has_carry else (lambda p, b, c: (loss_fn(p, b), c))
    train_step = make_train_step(plain_loss, optimizer, has_carry=True)

    @jax.jit
    def next_batch(rng):
        rng, data_key = jax.random.split(rng)
        return rng, sample_batch(data_key)

    bar = tqdm(total=steps, initial=start, unit="step", disable=not progress, dynamic_ncols=True)
    log = _Log(metrics_path, bar)

    def run_eval(step: int) -> None:
        log.flush()
        values = eval_fn(params)
        if not isinstance(values, dict):
            values = {"metric": values}
        record = {"step": step, **{f"eval_{k}": float(v) for k, v in values.items()}}
        log.write(record)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k != "step")
        bar.write(f"step {step}: {shown}")

    def save(step: int) -> None:
        log.flush()
        if jax.process_index() != 0:  # multi-host: one writer; params are replicated
            return
        current = TrainState(params, opt_state, jnp.asarray(step, jnp.int32), rng)
        _checkpoint.save_checkpoint(checkpoint_dir, current, keep=keep_checkpoints)

    try:
        for step in range(start + 1, steps + 1):
            rng, batch = next_batch(rng)
            batch = place_batch(batch, placement)
            carry = initial_carry(batch) if initial_carry is not None else None
            if carry is not None and placement is not None:
                carry = jax.device_put(carry, placement.batch)
            chunks = [batch] if tbptt is None else time_chunks(batch, tbptt)
            chunk_metrics = []
            for chunk in chunks:
                params, opt_state, carry, metrics = train_step(params, opt_state, chunk, carry)
                chunk_metrics.append(metrics)
            if len(chunk_metrics) > 1:
                metrics = {
                    "loss": jnp.mean(jnp.stack([m["loss"] for m in chunk_metrics])),
                    "grad_norm": jnp.mean(jnp.stack([m["grad_norm"] for m in chunk_metrics])),
                    "skipped": jnp.max(jnp.stack([m["skipped"] for m in chunk_metrics])),
                }
            log.add(step, metrics)
            bar.update(1)
            if step % log_every == 0 or step == steps:
                log.flush()
            if eval_fn is not None and eval_every and step % eval_every == 0:
                run_eval(step)
            if checkpoint_dir is not None and checkpoint_every and step % checkpoint_every == 0:
                save(step)
        log.flush()
        end = max(start, steps)
        if eval_fn is not None and not (eval_every and end % eval_every == 0 and end > start):
            run_eval(end)
        if checkpoint_dir is not None and not (
            checkpoint_every and end % checkpoint_every == 0 and end > start
        ):
            save(end)
    finally:
        bar.close()
    final = TrainState(params, opt_state, jnp.asarray(max(start, steps), jnp.int32), rng)
    return FitResult(final, log.history, log.skipped, resumed_from)
