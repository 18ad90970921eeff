"""``benchmarks/gpu_tables.py``: the rules that turn a GPU run's JSON into table proposals.

The reports here have the shape the GPU scripts write (`speed.py --tune`, `pallas_gpu.py`,
`long_sequence.py`); `test_pallas` and `test_benchmark_speed` feed the script real reports
made on the CPU, so that the shapes cannot drift apart.
"""

from __future__ import annotations

import json

from conftest import load_script

gpu_tables = load_script("benchmarks/gpu_tables.py")
NEVER = 1 << 62


def _tune_row(cell, pass_, ms):
    return {"cell": cell, "pass": pass_, "ms_by_unroll": ms, "best": min(ms, key=ms.get)}


def test_unroll_table_picks_the_fastest_factor_per_size_and_merges_neighbours():
    rows = [
        # keys as JSON gives them back: strings
        _tune_row("lstm:128:500:1024", "fwdbwd", {"1": 40.0, "2": 38.0, "4": 39.0, "8": 41.0}),
        _tune_row("lstm:8:1000:128", "fwd", {"1": 9.0, "2": 7.0, "4": 5.0, "8": 4.5}),
        _tune_row("lstm:8:1000:128", "fwdbwd", {"1": 20.0, "2": 15.0, "4": 12.0, "8": 12.6}),
        _tune_row("gru:8:1000:128", "fwdbwd", {"1": 20.0, "2": 15.0, "4": 11.0, "8": 14.0}),
        _tune_row("gru:16:1000:256", "fwdbwd", {"1": 20.0, "2": 15.0, "4": 14.0, "8": 14.5}),
    ]
    table, reasons = gpu_tables.unroll_table(rows)
    # lstm B8 H128: fwd+fwdbwd totals 29, 22, 17, 17.1 -> 4; gru B8: 4; gru 16*256: 4;
    # lstm 128*1024: 2, unbounded
    assert table == ((4096, 4), (NEVER, 2))
    assert any("lstm:8:1000:128 (batch*hidden 1024)" in r and r.endswith("-> 4") for r in reasons)


def test_unroll_table_one_factor_is_one_unbounded_row():
    rows = [_tune_row("gru:2:5:8", "fwdbwd", {"1": 1.0, "8": 2.0})]
    assert gpu_tables.unroll_table(rows)[0] == ((NEVER, 1),)


def _pallas_row(cell, dtype, ms):
    return {"cell": cell, "dtype": dtype, "ms": ms, "compile_s": {}}


def _times(pallas_fwd, pallas_bwd, base_fwd=1.0, base_bwd=2.0):
    return {
        "jaxrnn/fwd": base_fwd,
        "jaxrnn/fwdbwd": base_bwd,
        "unroll_pallas/fwd": pallas_fwd,
        "unroll_pallas/fwdbwd": pallas_bwd,
    }


def _check(kind, out=1e-4, grad=1e-4, bf16=(1e-2, 1e-2)):
    return {
        f"{kind}/float32": {"unroll_pallas": {"out_rel_err": out, "grad_rel_err": grad}},
        f"{kind}/float32/lengths_resets_reverse": {
            "unroll_pallas": {"out_rel_err": out, "grad_rel_err": grad}
        },
        f"{kind}/bfloat16": {"unroll_pallas": {"out_rel_err": bf16[0], "grad_rel_err": bf16[1]}},
    }


def test_pallas_table_takes_per_dtype_the_largest_batch_won_at_every_batch_up_to_it():
    report = {
        "check": {**_check("lstm"), **_check("gru"), **_check("elman")},
        "rows": [
            # float32 LSTM: forward wins at 8 and 64; the gradient pass at 8 only
            _pallas_row("lstm:8:1000:128", "float32", _times(0.5, 1.5)),
            _pallas_row("lstm:64:1000:128", "float32", _times(0.9, 2.5)),
            # bfloat16 LSTM: both passes win at both batches
            _pallas_row("lstm:8:1000:128", "bfloat16", _times(0.4, 1.2)),
            _pallas_row("lstm:64:1000:128", "bfloat16", _times(0.8, 1.0)),
            # bfloat16 GRU: loses the forward at 8, so that bound is 0 even though 64 wins
            _pallas_row("gru:8:1000:128", "bfloat16", _times(0.99, 1.0)),
            _pallas_row("gru:64:1000:128", "bfloat16", _times(0.5, 1.0)),
            # Elman: never faster by the margin -> left out of the table
            _pallas_row("elman:8:1000:128", "float32", _times(0.97, 1.97)),
        ],
    }
    table, reasons = gpu_tables.pallas_table(report, margin=0.95)
    assert table == {
        ("lstm", "float32"): (64, 8, 128),
        ("lstm", "bfloat16"): (64, 64, 128),
        ("gru", "bfloat16"): (0, 64, 128),
    }
    assert "lstm:64:1000:128 bfloat16 fwdbwd: unroll_pallas 1.0 ms, jaxrnn 2.0 ms" in reasons


def test_pallas_table_leaves_out_a_kind_and_dtype_whose_check_failed_or_errored():
    rows = [
        _pallas_row(f"{k}:8:1000:128", d, _times(0.1, 0.1))
        for k in ("lstm", "gru")
        for d in ("float32", "bfloat16")
    ]
    check = {**_check("lstm", grad=0.2), **_check("gru")}
    check["gru/bfloat16"]["unroll_pallas"] = {"error": "CompilationError: out of shared memory"}
    table, reasons = gpu_tables.pallas_table({"check": check, "rows": rows}, tolerance=1e-2)
    # the float32 LSTM failed its check (its bfloat16 passed); the bfloat16 GRU errored
    assert table == {("lstm", "bfloat16"): (8, 8, 128), ("gru", "float32"): (8, 8, 128)}
    assert "lstm float32: left out (the on-device check did not pass)" in reasons
    assert "gru bfloat16: left out (the on-device check did not pass)" in reasons
    assert any("gru/bfloat16" in r and r.endswith("FAILED") for r in reasons)
    # a dtype with timings but no check at all is left out too
    unchecked = {
        "check": _check("lstm"),
        "rows": [_pallas_row("gru:8:9:128", "float32", _times(0.1, 0.1))],
    }
    assert gpu_tables.pallas_table(unchecked)[0] == {}
    # bfloat16 gets ten times the tolerance: 1e-2 passes at 1e-2 * 10 ...
    ok = {"check": {**_check("lstm", bf16=(0.09, 0.05))}, "rows": rows[1:2]}
    assert gpu_tables.pallas_table(ok, tolerance=1e-2)[0] == {("lstm", "bfloat16"): (8, 8, 128)}
    # ... float32 does not
    bad = {"check": {**_check("lstm", out=0.011)}, "rows": rows[:1]}
    assert gpu_tables.pallas_table(bad, tolerance=1e-2)[0] == {}


def test_pallas_backward_table_takes_the_largest_batch_whose_gradient_won_at_every_batch():
    check = {**_check("lstm"), **_check("gru"), **_check("elman")}
    for runs in check.values():  # the backward kernel's own check, as good
        runs["unroll_pallas_bwd"] = dict(runs["unroll_pallas"])
    check["lstm/bfloat16"]["unroll_pallas_bwd"] = {"error": "CompilationError: shared memory"}

    def row(cell, dtype, bwd_kernel, bwd_xla=2.0):
        times = {**_times(0.5, bwd_xla), "unroll_pallas_bwd/fwdbwd": bwd_kernel}
        return _pallas_row(cell, dtype, {**times, "unroll_pallas_bwd/fwd": 0.5})

    report = {
        "check": check,
        "rows": [
            row("elman:8:1000:128", "float32", 1.4),  # wins at 8 and 64
            row("elman:64:1000:128", "float32", 1.8),
            row("gru:8:1000:128", "float32", 1.95),  # 0.975 of XLA's: not by the margin
            row("gru:64:1000:128", "float32", 1.0),  # ... so 64 does not count either
            row("gru:8:1000:128", "bfloat16", 1.0),  # wins at 8, loses at 64
            row("gru:64:1000:128", "bfloat16", 2.5),
            row("lstm:8:1000:128", "bfloat16", 1.0),  # its check errored: left out
        ],
    }
    table, reasons = gpu_tables.pallas_backward_table(report, margin=0.95)
    assert table == {("elman_tanh", "float32"): 64, ("gru", "bfloat16"): 8}
    assert "lstm bfloat16: left out (the on-device check did not pass)" in reasons
    assert "gru:8:1000:128 float32 fwdbwd: unroll_pallas_bwd 1.95 ms, unroll_pallas 2.0 ms" in (
        reasons
    )


def _long(T, method, fwd_bwd_s, H=16, B=8, converged=True):
    return {
        "T": T,
        "H": H,
        "B": B,
        "method": method,
        "fwd_bwd_s": fwd_bwd_s,
        "converged": converged,
    }


def test_auto_min_time_is_the_shortest_length_won_from_there_on():
    rows = [
        _long(1_000, "sequential", 1.0),
        _long(1_000, "quasi_deer", 2.0),
        _long(10_000, "sequential", 10.0),
        _long(10_000, "quasi_deer", 5.0),
        _long(10_000, "sequential", 10.0, H=64),
        _long(10_000, "quasi_deer", 6.0, H=64),
        _long(100_000, "sequential", 100.0),
        _long(100_000, "quasi_deer", 20.0),
        _long(100_000, "deer", 1.0),  # not "auto"'s method for the GRU
    ]
    assert gpu_tables.auto_min_time(rows)[0] == 10_000
    # one (H, B) lost at 10k: from 100k on
    rows[5] = _long(10_000, "quasi_deer", 11.0, H=64)
    assert gpu_tables.auto_min_time(rows)[0] == 100_000
    # not converged counts as lost
    rows[7] = _long(100_000, "quasi_deer", 20.0, converged=False)
    threshold, reasons = gpu_tables.auto_min_time(rows)
    assert threshold == NEVER and reasons[-1].endswith("keep the scan")


def test_main_prints_pasteable_python(tmp_path, capsys):
    tune = tmp_path / "tune.json"
    tune.write_text(json.dumps({"meta": {}, "tune": [_tune_row("gru:8:9:4", "fwd", {"4": 1.0})]}))
    long = tmp_path / "long.json"
    long.write_text(json.dumps({"meta": {}, "rows": [_long(10, "sequential", 1.0)]}))
    got = gpu_tables.main(["--tune", str(tune), "--long", str(long)])
    assert got == {"UNROLL_TABLE['gpu']": ((NEVER, 4),), "AUTO_MIN_TIME": NEVER}
    printed = capsys.readouterr().out
    assert "UNROLL_TABLE['gpu'] = ((1 << 62, 4),)" in printed
    assert "AUTO_MIN_TIME = 1 << 62" in printed
