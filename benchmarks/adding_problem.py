"""The adding problem: Elman (tanh) fails where LSTM and GRU succeed, and why.

Trains each cell with the ``jaxrnn train`` driver (`jaxrnn.cli.train_on_task`: Adam, gradient
clipping at norm 1, batch 50, hidden 64) on the adding problem, once per seed (``--seeds``,
default 3: the init, the training data and the test set all differ), measures the test MSE
on 1000 held-out sequences against the 0.167 baseline (always predict 1), then measures the
gradient norms through time of the trained models of seed 0 and of freshly initialised ones
(`jaxrnn.cli.diagnose_cells`, float64). A run *learned* the task when its test MSE is under a
tenth of the baseline.

Writes ``benchmarks/results/adding_problem.json`` and ``.md``, the plots ``docs/grads.png``
and ``docs/adding_loss.png``, and the table into README.md between the markers
``<!-- adding-problem:start -->`` and ``<!-- adding-problem:end -->``.

Run from the repository root: ``python benchmarks/adding_problem.py`` (about 3 minutes on 2
CPU cores with 3 seeds; ``--quick`` for a smoke run that writes nothing under docs/ or
README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax
import numpy as np

from jaxrnn import diagnostics
from jaxrnn.cli import diagnose_cells, train_on_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CELLS = ("elman", "lstm", "gru")
# Published results on the adding problem (test MSE; baseline 0.167).
PAPERS = [
    ("Bai et al. 2018, Table 1", "T=600", {"lstm": "0.164", "gru": "5.3e-5", "elman": "0.177"}),
    (
        "Le et al. 2015, Fig. 2",
        "T=150 to 400, read off the curves",
        {"lstm": "learns (MSE far below 0.17)", "gru": "not run", "elman": "stays at ~0.17"},
    ),
]


def _table(runs: dict, seq_len: int, steps: int) -> str:
    """The README's table: per cell the median test MSE over its seeds' runs, their range,
    how many learned (test MSE under a tenth of the task's baseline), and the median time of a
    run."""
    n = len(runs[CELLS[0]])
    baseline = runs[CELLS[0]][0]["baseline"]  # the task's: always predict 1
    mse_head = f"test MSE (T={seq_len}, {steps} steps)"
    if n > 1:
        mse_head = f"test MSE, median of {n} seeds (min–max) (T={seq_len}, {steps} steps)"
    lines = [
        f"| cell | ours: {mse_head} | ours: seeds that learned | ours: time per run | "
        + " | ".join(f"{name} ({t})" for name, t, _ in PAPERS)
        + " |",
        "|---|---|---|---|" + "---|" * len(PAPERS),
    ]
    for cell in CELLS:
        mse = [r["test_metric"] for r in runs[cell]]
        mid = float(np.median(mse))
        spread = f" ({min(mse):.3g}–{max(mse):.3g})" if n > 1 else ""
        row = [
            "Elman (tanh)" if cell == "elman" else cell.upper(),
            f"{mid:.3g}{spread}",
            f"{sum(m < baseline / 10 for m in mse)} of {n}",
            f"{float(np.median([r['seconds'] for r in runs[cell]])):.0f} s",
        ]
        row += [values[cell] for _, _, values in PAPERS]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(
        f"| baseline (predict 1) | {baseline:.3f} | | | "
        + " | ".join(["0.167"] * len(PAPERS))
        + " |"
    )
    return "\n".join(lines)


def _diagnose_text(diag: dict, seq_len: int, state: str) -> str:
    lines = [f"adding problem, T={seq_len}, hidden 64, params {state}"]
    lines.append(f"{'cell':<6} {'|dL/dh_1| / |dL/dh_T|':>22} {'mean |dh_t/dh_t-1|':>20}")
    for name, r in diag.items():
        lines.append(f"{name:<6} {r['ratio']:>22.3e} {float(np.mean(r['jacobian_norms'])):>20.3f}")
    return "\n".join(lines)


def _replace_between(path: str, start: str, end: str, text: str) -> bool:
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if start not in content or end not in content:
        return False
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(head + start + "\n" + text + "\n" + end + tail)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument(
        "--seeds", type=int, default=3, help="training runs per cell, seeds 0 to N-1"
    )
    parser.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    parser.add_argument(
        "--reuse",
        metavar="DIR",
        help="skip training: reuse the checkpoints and metrics a previous run left in DIR "
        "and its benchmarks/results/adding_problem.json (to redraw plots and tables)",
    )
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    seq_len, steps = (12, 20) if args.quick else (args.seq_len, args.steps)
    seeds = range(min(args.seeds, 2) if args.quick else args.seeds)

    runs, curves = {c: [] for c in CELLS}, {}
    if args.reuse:
        work = args.reuse
        with open(os.path.join(ROOT, "benchmarks", "results", "adding_problem.json")) as f:
            previous = json.load(f)
        seq_len, steps = previous["seq_len"], previous["steps"]
        runs = previous.get("runs") or {c: [previous["results"][c]] for c in CELLS}
        curves = {c: diagnostics.read_jsonl(os.path.join(work, f"{c}.jsonl")) for c in CELLS}
    else:
        work = tempfile.mkdtemp(prefix="adding_")
        print(f"checkpoints and metrics in {work}")
    for seed in seeds:
        if args.reuse:
            break
        # Seed 0 writes where `diagnose_cells` and the plots read; the others beside it.
        where = work if seed == 0 else os.path.join(work, f"seed{seed}")
        for cell in CELLS:
            metrics = os.path.join(where, f"{cell}.jsonl")
            summary = train_on_task(
                task="adding",
                cell=cell,
                seq_len=seq_len,
                steps=steps,
                batch_size=50,
                hidden_size=64,
                learning_rate=3e-3,
                clip_norm=1.0,
                eval_every=max(1, steps // 20),
                seed=seed,
                checkpoint_dir=os.path.join(where, cell),
                metrics_path=metrics,
                progress=False,
            )
            summary.pop("params")
            summary["seed"] = seed
            runs[cell].append(summary)
            if seed == 0:
                curves[cell] = diagnostics.read_jsonl(metrics)
            print(
                f"{cell}, seed {seed}: test mse {summary['test_metric']:.4g} "
                f"({summary['seconds']:.0f} s)"
            )

    trained = diagnose_cells(list(CELLS), seq_len=seq_len, checkpoint_dir=work)
    initial = diagnose_cells(list(CELLS), seq_len=seq_len)
    table = _table(runs, seq_len, steps)
    diag_text = (
        _diagnose_text(trained, seq_len, "trained")
        + "\n\n"
        + _diagnose_text(initial, seq_len, "at initialisation")
    )
    print(table)
    print(diag_text)
    if args.quick:
        return

    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__}",
        "date": time.strftime("%Y-%m-%d"),
        "diagnose": diag_text,
        "seq_len": seq_len,
        "steps": steps,
        "runs": runs,
        "ratios": {
            "trained": {c: trained[c]["ratio"] for c in CELLS},
            "initial": {c: initial[c]["ratio"] for c in CELLS},
        },
        "eval_curves": {
            c: [(r["step"], r["eval_mse"]) for r in curves[c] if "eval_mse" in r] for c in CELLS
        },
    }
    if args.reuse:  # the measurements are the earlier run's
        out["machine"], out["date"] = previous["machine"], previous["date"]
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    with open(os.path.join(ROOT, "benchmarks", "results", "adding_problem.json"), "w") as f:
        json.dump(out, f, indent=2)
    with open(os.path.join(ROOT, "benchmarks", "results", "adding_problem.md"), "w") as f:
        f.write(table + "\n\n```\n" + diag_text + "\n```\n")
    diagnostics.plot_grad_norms(
        {c: trained[c]["grad_norms"] for c in CELLS},
        os.path.join(ROOT, "docs", "grads.png"),
        reference={c: initial[c]["grad_norms"] for c in CELLS},
        reference_label="at init",
        jacobian_norms={c: trained[c]["jacobian_norms"] for c in CELLS},
        title=f"adding problem, T={seq_len}: trained (solid) and at init (dashed)",
    )
    diagnostics.plot_loss_curves(
        {c: curves[c] for c in CELLS},
        os.path.join(ROOT, "docs", "adding_loss.png"),
        key="eval_mse",
        title=f"adding problem, T={seq_len}: test MSE (baseline 0.167)",
    )
    readme = os.path.join(ROOT, "README.md")
    block = table + "\n\n```\n" + diag_text + "\n```"
    if _replace_between(
        readme, "<!-- adding-problem:start -->", "<!-- adding-problem:end -->", block
    ):
        print("updated README.md")


if __name__ == "__main__":
    main()
