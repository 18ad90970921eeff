"""Proposes the fast path's GPU tables from what a GPU run measured.

Four constants wait for GPU numbers: ``fastpath.UNROLL_TABLE["gpu"]`` (the scan's unroll
factor by ``batch * hidden``), ``fastpath.PALLAS_TABLE`` (per cell and dtype, the largest batch
whose forward-only pass and gradient pass run their primal on the persistent Pallas kernels),
``fastpath.PALLAS_BACKWARD_TABLE`` (the largest batch whose gradient pass on the kernels also
runs its backward loop on them) and ``parallel.AUTO_MIN_TIME`` (from how many steps
``method="auto"`` goes parallel on a GPU).
This script reads the JSON that the GPU scripts write and prints the Python for each, with the
measurements behind every entry. It edits nothing: paste, then run the tests.

    python benchmarks/gpu_tables.py --tune gpu_results/gpu_tune.json \\
        --pallas gpu_results/pallas_gpu.json --long gpu_results/long_sequence_gpu.json

Rules (each proposal follows only from its own file):

- unroll: per measured cell, the factor with the least total time over the measured passes;
  cells sorted by ``batch * hidden``, neighbours with the same factor merged, the last row
  unbounded.
- Pallas: a ``(kind, dtype)`` enters only if ``unroll_pallas`` (``jaxrnn.unroll`` on the
  kernels) passed the on-device check in every flag mode measured in that dtype (relative
  error of outputs and gradients under ``--tolerance``, ten times that for bfloat16). Per
  pass, the bound is the largest measured batch such that at every measured batch up to it
  ``unroll_pallas`` took at most ``--margin`` of plain ``jaxrnn``'s time; no such batch: 0
  (never); both 0: left out. The third entry is the largest hidden size measured:
  `fastpath.placements` takes the kernels no further.
- Pallas backward: the same with ``unroll_pallas_bwd`` (its on-device check, and its
  forward+backward time against ``unroll_pallas``'s): the largest such batch; 0: left out.
- auto: the smallest measured ``T`` from which quasi-DEER (converged) beat the sequential scan
  forward+backward at every measured ``(T, H, B)`` with at least as many steps; none: keep
  the scan (``1 << 62``).
"""

from __future__ import annotations

import argparse
import json

NEVER = 1 << 62  # the last row of an unroll table: every size
# pallas_gpu.py's cell names -> fastpath's kinds (its Elman cells are the default tanh).
PALLAS_KINDS = {"elman": "elman_tanh", "lstm": "lstm", "gru": "gru"}


def _cell(spec: str) -> tuple[str, int, int, int]:
    kind, batch, time_, hidden = spec.split(":")
    return kind, int(batch), int(time_), int(hidden)


def unroll_table(tune_rows: list[dict]) -> tuple[tuple[tuple[int, int], ...], list[str]]:
    """``speed.py --tune`` rows -> ``(UNROLL_TABLE["gpu"], reasons)``."""
    totals: dict[str, dict[int, float]] = {}
    for row in tune_rows:
        line = totals.setdefault(row["cell"], {})
        for factor, ms in row["ms_by_unroll"].items():
            line[int(factor)] = line.get(int(factor), 0.0) + float(ms)
    if not totals:
        raise ValueError("unroll_table: tune_rows has no measured cell")
    picks, reasons = [], []
    for spec, line in totals.items():
        _, batch, _, hidden = _cell(spec)
        best = min(line, key=line.get)
        picks.append((batch * hidden, best))
        shown = ", ".join(f"{f}: {ms:.2f}" for f, ms in sorted(line.items()))
        reasons.append(
            f"{spec} (batch*hidden {batch * hidden}): ms by unroll {{{shown}}} -> {best}"
        )
    picks.sort()
    rows: list[tuple[int, int]] = []
    for size, factor in picks:
        if rows and rows[-1][1] == factor:
            rows[-1] = (size, factor)
        else:
            rows.append((size, factor))
    rows[-1] = (NEVER, rows[-1][1])
    return tuple(rows), reasons


def _check_passes(
    check: dict, kind: str, dtype: str, tolerance: float, run: str = "unroll_pallas"
) -> tuple[bool, list[str]]:
    entries = {k: v for k, v in check.items() if k.split("/")[:2] == [kind, dtype]}
    ok, notes = bool(entries), []
    for key, runs in sorted(entries.items()):
        errors = runs.get(run, {"error": "not run"})
        good = "error" not in errors and max(
            errors["out_rel_err"], errors["grad_rel_err"]
        ) <= tolerance * (10 if "bfloat16" in key else 1)
        ok &= good
        notes.append(f"check {key} {run}: {errors} -> {'ok' if good else 'FAILED'}")
    return ok, notes


def _rows_by_key(report: dict) -> dict[tuple[str, str], dict[int, dict]]:
    """``pallas_gpu.py``'s timed rows by ``(cell kind, dtype name)``, then by batch."""
    by_key: dict[tuple[str, str], dict[int, dict]] = {}
    for row in report.get("rows", []):
        kind, batch, _, _ = _cell(row["cell"])
        by_key.setdefault((kind, row["dtype"]), {})[batch] = row
    return by_key


def _checked(report, kind, dtype, tolerance, run, reasons) -> bool:
    """Whether ``run`` passed every on-device check of ``(kind, dtype)``; notes in ``reasons``."""
    ok, notes = _check_passes(report.get("check", {}), kind, dtype, tolerance, run)
    reasons += notes
    if not ok:
        reasons.append(f"{kind} {dtype}: left out (the on-device check did not pass)")
    return ok


def _largest_won(batches, dtype, pass_, run, base, margin, reasons) -> int:
    """The largest batch such that at every measured batch up to it ``run`` took at most
    ``margin`` of ``base``'s time in ``pass_`` (0: none); the timings in ``reasons``."""
    bound = 0
    for batch in sorted(batches):
        row = batches[batch]
        mine, theirs = row["ms"].get(f"{run}/{pass_}"), row["ms"].get(f"{base}/{pass_}")
        reasons.append(f"{row['cell']} {dtype} {pass_}: {run} {mine} ms, {base} {theirs} ms")
        if mine is None or theirs is None or mine > margin * theirs:
            break
        bound = batch
    return bound


def pallas_table(report: dict, margin: float = 0.95, tolerance: float = 1e-2):
    """``pallas_gpu.py``'s report -> ``(PALLAS_TABLE, reasons)``, keyed by ``(kind, dtype
    name)``; bfloat16 checks get ten times ``tolerance``."""
    table, reasons = {}, []
    hiddens: dict[tuple[str, str], int] = {}
    for row in report.get("rows", []):
        kind, _, _, hidden = _cell(row["cell"])
        key = (kind, row["dtype"])
        hiddens[key] = max(hiddens.get(key, 0), hidden)
    for (kind, dtype), batches in sorted(_rows_by_key(report).items()):
        if not _checked(report, kind, dtype, tolerance, "unroll_pallas", reasons):
            continue
        bounds = [
            _largest_won(batches, dtype, pass_, "unroll_pallas", "jaxrnn", margin, reasons)
            for pass_ in ("fwd", "fwdbwd")
        ]
        if any(bounds):
            table[(PALLAS_KINDS[kind], dtype)] = (*bounds, hiddens[(kind, dtype)])
    return table, reasons


def pallas_backward_table(report: dict, margin: float = 0.95, tolerance: float = 1e-2):
    """``pallas_gpu.py``'s report -> ``(PALLAS_BACKWARD_TABLE, reasons)``: per ``(kind, dtype
    name)`` whose ``unroll_pallas_bwd`` passed every check, the largest measured batch such that
    at every measured batch up to it its forward+backward took at most ``margin`` of
    ``unroll_pallas``'s."""
    table, reasons = {}, []
    for (kind, dtype), batches in sorted(_rows_by_key(report).items()):
        if not _checked(report, kind, dtype, tolerance, "unroll_pallas_bwd", reasons):
            continue
        run, base = "unroll_pallas_bwd", "unroll_pallas"
        bound = _largest_won(batches, dtype, "fwdbwd", run, base, margin, reasons)
        if bound:
            table[(PALLAS_KINDS[kind], dtype)] = bound
    return table, reasons


def auto_min_time(rows: list[dict]) -> tuple[int, list[str]]:
    """``long_sequence.py`` rows -> ``(AUTO_MIN_TIME, reasons)``."""
    seq = {(r["T"], r["H"], r["B"]): r for r in rows if r.get("method") == "sequential"}
    wins: dict[int, bool] = {}
    reasons = []
    for r in rows:
        key = (r["T"], r["H"], r["B"])
        base = seq.get(key)
        if r.get("method") != "quasi_deer" or base is None:
            continue
        mine, ref = r.get("fwd_bwd_s"), base.get("fwd_bwd_s")
        won = bool(r.get("converged")) and mine is not None and ref is not None and mine < ref
        wins[r["T"]] = wins.get(r["T"], True) and won
        reasons.append(f"T={key[0]} H={key[1]} B={key[2]}: quasi_deer {mine} s, scan {ref} s")
    threshold = NEVER
    for t in sorted(wins, reverse=True):
        if not wins[t]:
            break
        threshold = t
    if threshold == NEVER:
        reasons.append("quasi_deer won at no measured length: keep the scan")
    return threshold, reasons


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tune", help="speed.py --tune JSON (gpu_check.sh: gpu_tune.json)")
    ap.add_argument("--pallas", help="pallas_gpu.py JSON (pallas_gpu.sh: pallas_gpu.json)")
    ap.add_argument("--long", help="long_sequence.py JSON (long_sequence_gpu.json)")
    ap.add_argument("--margin", type=float, default=0.95)
    ap.add_argument("--tolerance", type=float, default=1e-2)
    args = ap.parse_args(argv)
    out = {}

    def load(path):
        with open(path) as f:
            return json.load(f)

    if args.tune:
        out["UNROLL_TABLE['gpu']"] = unroll_table(load(args.tune)["tune"])
    if args.pallas:
        report = load(args.pallas)
        out["PALLAS_TABLE"] = pallas_table(report, args.margin, args.tolerance)
        out["PALLAS_BACKWARD_TABLE"] = pallas_backward_table(report, args.margin, args.tolerance)
    if args.long:
        out["AUTO_MIN_TIME"] = auto_min_time(load(args.long)["rows"])
    if not out:
        ap.error("give at least one of --tune, --pallas, --long")
    for name, (value, reasons) in out.items():
        print(f"# {name}, from:")
        for line in reasons:
            print(f"#   {line}")
        print(f"{name} = {value!r}\n".replace(str(NEVER), "1 << 62"))
    return {name: value for name, (value, _) in out.items()}


if __name__ == "__main__":
    main()
