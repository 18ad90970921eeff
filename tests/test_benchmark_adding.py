"""benchmarks/adding_problem.py runs: one run per cell and seed, and a table over the seeds.

Its smoke run (``--quick``: T = 12, 20 steps) trains every cell once per seed and prints the
table, writing nothing under docs/ or into the README.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "adding_problem.py"


def _run(*argv):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )


def test_quick_run_trains_every_cell_per_seed_and_tabulates_the_seeds():
    readme = (ROOT / "README.md").read_text()
    proc = _run("--quick", "--seeds", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    for cell in ("elman", "lstm", "gru"):
        for seed in (0, 1):
            assert f"{cell}, seed {seed}: test mse" in out
    assert "median of 2 seeds (min–max) (T=12, 20 steps)" in out
    rows = [line for line in out.splitlines() if line.startswith(("| Elman", "| LSTM", "| GRU"))]
    assert len(rows) == 3
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        # "median (min–max)", "k of 2" learned, the time per run
        assert "–" in cells[1] and cells[2].endswith("of 2") and cells[3].endswith(" s")
    assert (ROOT / "README.md").read_text() == readme  # --quick writes nothing


def test_seeds_must_be_positive():
    proc = _run("--quick", "--seeds", "0")
    assert proc.returncode != 0
    assert "--seeds must be at least 1, got 0" in proc.stderr
