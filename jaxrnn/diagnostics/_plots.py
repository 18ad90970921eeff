"""Plots of training and of gradients through time, saved as PNG (matplotlib, imported lazily)."""

from __future__ import annotations

import json
import os

import numpy as np


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "jaxrnn.diagnostics plots need matplotlib: pip install 'jaxrnn[plot]'."
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fig.savefig(path, dpi=80)
    fig.clf()
    _pyplot().close(fig)
    return path


def read_jsonl(path: str) -> list[dict]:
    """The records of a JSONL metrics file, as written by ``jaxrnn.train.fit``."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_loss_curves(runs: dict, path: str, *, key: str = "loss", title: str | None = None):
    """Plots training curves, one line per run, on a log y axis, and saves a PNG.

    Args:
      runs: ``{label: records}`` where ``records`` is a list of dicts with ``"step"`` and
        ``key`` (``FitResult.history``) or the path of a JSONL metrics file.
      path: the PNG file to write.
      key: the record field to plot (e.g. ``"loss"`` or ``"eval_mse"``).
      title: the plot's title.

    Returns:
      ``path``.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, records in runs.items():
        if isinstance(records, (str, os.PathLike)):
            records = read_jsonl(records)
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or key)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_grad_norms(
    norms: dict,
    path: str,
    *,
    reference: dict | None = None,
    reference_label: str = "init",
    jacobian_norms: dict | None = None,
    title: str | None = None,
):
    r"""Plots :math:`\lVert \partial L/\partial h_t \rVert` against ``t`` on a log axis.

    Args:
      norms: ``{cell label: (time,) norms}`` (from `grad_norms`).
      path: the PNG file to write.
      reference: optional ``{cell label: (time,) norms}`` of the same cells in another state
        (e.g. at initialisation), drawn dashed in the cell's colour.
      reference_label: how the reference lines are labelled.
      jacobian_norms: optional ``{cell label: (time,) norms}`` (from `jacobian_norms`) for a
        second panel.
      title: the first panel's title.

    Returns:
      ``path``.
    """
    plt = _pyplot()
    panels = 1 if jacobian_norms is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0, 0]
    for label, values in norms.items():
        values = np.asarray(values)
        (line,) = ax.plot(np.arange(1, len(values) + 1), values, label=label)
        if reference is not None and label in reference:
            ref = np.asarray(reference[label])
            ax.plot(
                np.arange(1, len(ref) + 1),
                ref,
                ls="--",
                color=line.get_color(),
                label=f"{label} ({reference_label})",
            )
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$\|\partial L / \partial h_t\|$")
    ax.set_title(title or "gradient of the loss at the last step, through time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if jacobian_norms is not None:
        ax = axes[0, 1]
        for label, values in jacobian_norms.items():
            values = np.asarray(values)
            ax.plot(np.arange(1, len(values) + 1), values, label=label)
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set_xlabel("step t")
        ax.set_ylabel(r"$\|\partial h_t / \partial h_{t-1}\|_2$")
        ax.set_title(r"per-step Jacobian norm $\|\partial h_t / \partial h_{t-1}\|_2$")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def plot_tanh(path: str):
    r"""Plots :math:`\tanh` and :math:`\tanh' = 1 - \tanh^2` and saves a PNG.

    :math:`\tanh'` is at most 1 and decays like :math:`4 e^{-2|z|}`, so every step of an Elman
    RNN multiplies the backward signal by a factor at most :math:`\lVert W_h \rVert`.

    Args:
      path: the PNG file to write.

    Returns:
      ``path``.
    """
    plt = _pyplot()
    z = np.linspace(-4, 4, 401)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(z, np.tanh(z), label=r"$\tanh(z)$")
    ax.plot(z, 1 - np.tanh(z) ** 2, label=r"$\tanh'(z) = 1 - \tanh^2(z)$")
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("z")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)
