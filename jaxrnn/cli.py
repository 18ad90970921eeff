"""The ``jaxrnn`` command line: ``jaxrnn train`` and ``jaxrnn diagnose``.

Examples::

    jaxrnn train --task adding --cell lstm --seq-len 100 --steps 2000 --checkpoint-dir ckpt
    jaxrnn train --task adding --cell lstm --seq-len 100 --steps 3000 --checkpoint-dir ckpt \\
        --resume
    jaxrnn diagnose --cells elman,lstm,gru --seq-len 200 --out grads.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

CELLS = ("elman", "lstm", "gru")
TASK_NAMES = ("adding", "copy", "char", "majority")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _cell_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in CELLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown cell {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from {', '.join(CELLS)} (comma-separated)"
        )
    return names


def make_cell(name: str, hidden_size: int):
    """The cell called ``name`` (``elman`` (tanh), ``lstm`` or ``gru``) of ``hidden_size``."""
    import jaxrnn

    if name not in CELLS:
        raise ValueError(f"unknown cell {name!r}; choose from {', '.join(CELLS)}.")
    return getattr(jaxrnn, name)(hidden_size)


def train_on_task(
    *,
    task: str,
    cell: str,
    seq_len: int,
    steps: int,
    batch_size: int = 50,
    hidden_size: int = 64,
    learning_rate: float = 3e-3,
    clip_norm: float | None = 1.0,
    eval_every: int = 0,
    eval_size: int = 1000,
    seed: int = 0,
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 0,
    resume: bool = False,
    metrics_path: str | None = None,
    text_path: str | None = None,
    tbptt: int | None = None,
    progress: bool = True,
    data_parallel: bool = True,
) -> dict:
    """Trains ``cell`` on ``task`` with Adam and returns a summary (what ``jaxrnn train`` runs).

    The model is ``jaxrnn.train.sequence_model(cell, task.output_size)``; the test metric is
    measured on ``eval_size`` held-out sequences drawn from a key derived from ``seed``.

    Returns:
      ``{"task", "cell", "seq_len", "steps", "metric", "test_metric", "baseline",
      "baseline_note", "skipped_steps", "seconds", "resumed_from"}``.
    """
    import time

    import jax
    import optax

    from jaxrnn import tasks, train

    kwargs = {"path": text_path} if task == "char" and text_path is not None else {}
    the_task = tasks.get_task(task, seq_len, **kwargs)
    model = train.sequence_model(
        make_cell(cell, hidden_size), the_task.output_size, readout=the_task.readout
    )
    k_params, k_data, k_test = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = model.init(k_params, the_task.input_size)
    test_batch = the_task.sample(k_test, eval_size)
    metric_fn = jax.jit(train.task_metric(model, the_task))

    def eval_fn(p):
        return {the_task.metric_name: metric_fn(p, test_batch)}

    initial_carry = None
    if tbptt is not None:
        initial_carry = lambda batch: model.initial_carry(batch.inputs.shape[0])  # noqa: E731
    start = time.perf_counter()
    result = train.fit(
        train.task_loss(model, the_task),
        params,
        optax.adam(learning_rate),
        lambda key: the_task.sample(key, batch_size),
        steps=steps,
        key=k_data,
        has_carry=True,
        initial_carry=initial_carry,
        tbptt=tbptt,
        clip_norm=clip_norm,
        eval_fn=eval_fn,
        eval_every=eval_every,
        log_every=max(1, min(50, steps // 20 or 1)),
        metrics_path=metrics_path,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        data_parallel=data_parallel,
    )
    seconds = time.perf_counter() - start
    test_metric = float(metric_fn(result.state.params, test_batch))
    return {
        "task": task,
        "cell": cell,
        "seq_len": seq_len,
        "steps": int(result.state.step),
        "metric": the_task.metric_name,
        "test_metric": test_metric,
        "baseline": the_task.baseline,
        "baseline_note": the_task.baseline_note,
        "higher_is_better": the_task.higher_is_better,
        "skipped_steps": result.skipped_steps,
        "seconds": seconds,
        "resumed_from": result.resumed_from,
        "params": result.state.params,
    }


def diagnose_cells(
    cells: list[str],
    *,
    seq_len: int,
    hidden_size: int = 64,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint_dir: str | None = None,
) -> dict:
    """Gradient norms through time of the adding problem's loss, per cell, in float64.

    With ``checkpoint_dir``, the params of ``cell`` are read from the newest checkpoint in
    ``checkpoint_dir/<cell>`` (as written by ``jaxrnn train --task adding --cell <cell>
    --checkpoint-dir checkpoint_dir/<cell>``); otherwise they are freshly initialised.

    Returns:
      ``{cell: {"grad_norms": (T,), "jacobian_norms": (T,), "ratio": float}}`` where ``ratio``
      is ``|dL/dh_1| / |dL/dh_T|``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxrnn import diagnostics, tasks, train

    task = tasks.adding(seq_len)
    out = {}
    with jax.enable_x64(True):
        for name in cells:
            cell = make_cell(name, hidden_size)
            model = train.sequence_model(cell, 1)
            k_params, k_data = jax.random.split(jax.random.PRNGKey(seed))
            params = model.init(k_params, task.input_size)
            if checkpoint_dir is not None:
                params = _params_from_checkpoint(os.path.join(checkpoint_dir, name), params)
                try:
                    cell.check_params(params.cell)
                except (TypeError, ValueError) as e:
                    raise ValueError(
                        f"the checkpoint of {name} does not fit a {name} of hidden size "
                        f"{hidden_size}: {e} Pass the --hidden-size it was trained with."
                    ) from None
            params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), params)
            batch = task.sample(k_data, batch_size)
            inputs = batch.inputs.astype(jnp.float64)
            targets = batch.targets.astype(jnp.float64)

            def loss_fn(ys, carry, params=params, targets=targets):
                del carry
                prediction = ys[:, -1] @ params.readout.w + params.readout.b
                return jnp.mean((prediction - targets) ** 2)

            norms = np.asarray(diagnostics.grad_norms(cell, params.cell, inputs, loss_fn))
            jac = np.asarray(
                jnp.mean(diagnostics.jacobian_norms(cell, params.cell, inputs), axis=0)
            )
            ratio = float(norms[0] / norms[-1]) if norms[-1] > 0 else math.nan
            out[name] = {"grad_norms": norms, "jacobian_norms": jac, "ratio": ratio}
    return out


def _params_from_checkpoint(directory: str, params):
    import optax

    from jaxrnn import train

    if not train.checkpoint_steps(directory):
        raise FileNotFoundError(f"no checkpoint in {directory!r}")
    # The optimizer state's structure must match what `jaxrnn train` saved: Adam after clipping.
    template = train.init_state(
        params, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)), [0, 0]
    )
    return train.restore_checkpoint(directory, template).params


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxrnn", description="Train recurrent networks and look at their gradients."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a cell on a task")
    t.add_argument("--task", required=True, choices=TASK_NAMES)
    t.add_argument("--cell", required=True, choices=CELLS)
    t.add_argument(
        "--seq-len",
        type=_positive_int,
        required=True,
        help="sequence length (the delay T for the copy task)",
    )
    t.add_argument("--steps", type=_positive_int, required=True, help="batches to train on")
    t.add_argument("--batch-size", type=_positive_int, default=50)
    t.add_argument("--hidden-size", type=_positive_int, default=64)
    t.add_argument("--lr", type=_positive_float, default=3e-3, help="Adam's learning rate")
    t.add_argument(
        "--clip", type=_positive_float, default=1.0, help="clip gradients to this global norm"
    )
    t.add_argument(
        "--eval-every",
        type=_non_negative_int,
        default=0,
        help="evaluate on the test set every N steps (0: only at the end)",
    )
    t.add_argument("--eval-size", type=_positive_int, default=1000)
    t.add_argument("--seed", type=_non_negative_int, default=0)
    t.add_argument("--checkpoint-dir", help="write checkpoints here")
    t.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=0,
        help="checkpoint every N steps (0: only at the end)",
    )
    t.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in --checkpoint-dir",
    )
    t.add_argument("--metrics", help="append JSONL metrics to this file")
    t.add_argument("--text", help="text file for --task char (default: the shipped text)")
    t.add_argument(
        "--tbptt", type=_positive_int, help="truncated BPTT: update every N steps of each sequence"
    )
    t.add_argument("--loss-plot", help="save the loss curve as this PNG")
    t.add_argument("--json", help="write the summary to this JSON file")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument(
        "--single-device", action="store_true", help="do not split the batch over all devices"
    )

    d = sub.add_parser("diagnose", help="gradient norms through time per cell")
    d.add_argument(
        "--cells",
        type=_cell_list,
        default=list(CELLS),
        help="comma-separated cells (default: elman,lstm,gru)",
    )
    d.add_argument("--seq-len", type=_positive_int, default=200)
    d.add_argument("--hidden-size", type=_positive_int, default=64)
    d.add_argument("--batch-size", type=_positive_int, default=16)
    d.add_argument("--seed", type=_non_negative_int, default=0)
    d.add_argument(
        "--checkpoint-dir", help="read each cell's params from DIR/<cell> (written by jaxrnn train)"
    )
    d.add_argument("--out", help="save the plot as this PNG")
    d.add_argument("--tanh-plot", help="also save tanh and tanh' as this PNG")
    return parser


def _train(args, parser) -> int:
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")
    if args.text is not None:
        if args.task != "char":
            parser.error(f"--text is for --task char, got --task {args.task}")
        if not os.path.isfile(args.text):
            parser.error(f"--text: file {args.text!r} does not exist")
    if args.tbptt is not None and args.task in ("adding", "majority"):
        parser.error(f"--tbptt needs a per-step task (copy, char), got --task {args.task}")
    if not args.single_device:
        import jax

        devices = jax.device_count()
        if args.batch_size % devices:
            parser.error(
                f"--batch-size {args.batch_size} must be a multiple of the {devices} devices the "
                "batch is split over; change it or pass --single-device"
            )
    summary = train_on_task(
        task=args.task,
        cell=args.cell,
        seq_len=args.seq_len,
        steps=args.steps,
        batch_size=args.batch_size,
        hidden_size=args.hidden_size,
        learning_rate=args.lr,
        clip_norm=args.clip,
        eval_every=args.eval_every,
        eval_size=args.eval_size,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        metrics_path=args.metrics,
        text_path=args.text,
        tbptt=args.tbptt,
        progress=not args.no_progress,
        data_parallel=not args.single_device,
    )
    summary.pop("params")
    better = (summary["test_metric"] > summary["baseline"]) == summary["higher_is_better"]
    print(
        f"{summary['task']} T={summary['seq_len']} {summary['cell']}: test "
        f"{summary['metric']} {summary['test_metric']:.4g} vs baseline "
        f"{summary['baseline']:.4g} ({summary['baseline_note']}) -> "
        f"{'better' if better else 'not better'} than the baseline after "
        f"{summary['steps']} steps ({summary['seconds']:.1f} s)"
    )
    if summary["skipped_steps"]:
        print(f"skipped {len(summary['skipped_steps'])} non-finite steps")
    if args.checkpoint_dir:
        print(f"checkpoints in {args.checkpoint_dir}")
    if args.loss_plot:
        if not args.metrics:
            parser.error("--loss-plot needs --metrics (the curve is read from it)")
        from jaxrnn import diagnostics

        diagnostics.plot_loss_curves({args.cell: args.metrics}, args.loss_plot)
        print(f"wrote {args.loss_plot}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0


def _diagnose(args, parser) -> int:
    if args.checkpoint_dir is not None:
        for name in args.cells:
            path = os.path.join(args.checkpoint_dir, name)
            if not os.path.isdir(path):
                parser.error(f"--checkpoint-dir: no directory {path!r} for cell {name}")
    try:
        results = diagnose_cells(
            args.cells,
            seq_len=args.seq_len,
            hidden_size=args.hidden_size,
            batch_size=args.batch_size,
            seed=args.seed,
            checkpoint_dir=args.checkpoint_dir,
        )
    except (FileNotFoundError, ValueError) as e:
        parser.error(f"--checkpoint-dir: {e}")
    state = "trained" if args.checkpoint_dir else "at initialisation"
    print(f"adding problem, T={args.seq_len}, hidden {args.hidden_size}, params {state}")
    print(f"{'cell':<6} {'|dL/dh_1| / |dL/dh_T|':>22} {'mean |dh_t/dh_t-1|':>20}")
    for name, r in results.items():
        print(f"{name:<6} {r['ratio']:>22.3e} {float(r['jacobian_norms'].mean()):>20.3f}")
    if args.out:
        from jaxrnn import diagnostics

        diagnostics.plot_grad_norms(
            {n: r["grad_norms"] for n, r in results.items()},
            args.out,
            jacobian_norms={n: r["jacobian_norms"] for n, r in results.items()},
            title=f"adding problem, T={args.seq_len}, {state}",
        )
        print(f"wrote {args.out}")
    if args.tanh_plot:
        from jaxrnn import diagnostics

        diagnostics.plot_tanh(args.tanh_plot)
        print(f"wrote {args.tanh_plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs the ``jaxrnn`` command line; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        return _train(args, parser)
    return _diagnose(args, parser)


if __name__ == "__main__":
    sys.exit(main())
