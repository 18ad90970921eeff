"""``benchmarks/speed.py`` does not rot: tiny runs in a fresh process.

Not a timing test: the cells are too small to mean anything, and only the structure of the
report is checked (which runners ran, on how many devices).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from jaxrnn._src import native

SPEED = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def _run(tmp_path, *argv):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(SPEED), "--device", "cpu", "--reps", "1", "--out", str(out), *argv],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_reports_every_runner_and_ratio(tmp_path):
    report, stdout = _run(tmp_path, "--cells", "elman:2:5:8,gru:2:5:8", "--peers", "flax,scan")
    assert report["complete"] and [r["cell"] for r in report["results"]] == [
        "elman:2:5:8",
        "gru:2:5:8",
    ]
    for r in report["results"]:
        assert r["jaxrnn_devices"] == 1
        for pass_ in ("fwd", "fwdbwd"):
            assert set(r[pass_]) == {"jaxrnn", "flax", "scan"}
            assert all(v["median_ms"] > 0 for v in r[pass_].values())
    assert "| gru 2 5 8 | fwdbwd |" in stdout and "ratio flax" in stdout
    # Multiply-adds: T·B·G·H·(I + H) forward, three times that for the gradient; jaxrnn's
    # rate against XLA's large matmul, measured in the same run.
    elman, gru = report["results"]
    assert elman["multiply_adds"] == {"fwd": 5 * 2 * 8 * 16, "fwdbwd": 3 * 5 * 2 * 8 * 16}
    assert gru["multiply_adds"] == {"fwd": 5 * 2 * 3 * 8 * 16, "fwdbwd": 3 * 5 * 2 * 3 * 8 * 16}
    matmul = report["meta"]["xla_matmul"]
    assert matmul["n"] == 2048 and matmul["dtype"] == "float32"
    assert matmul["g_multiply_adds_per_s"] > 0
    for r in report["results"]:
        for pass_ in ("fwd", "fwdbwd"):
            rate = r[pass_]["jaxrnn"]["g_multiply_adds_per_s"]
            assert rate == pytest.approx(
                r["multiply_adds"][pass_] / r[pass_]["jaxrnn"]["median_ms"] / 1e6
            )
    assert "jaxrnn G multiply-adds/s (of XLA's matmul)" in stdout
    assert "XLA's 2048×2048 float32 matmul in the same run" in stdout
    # Which CPU, and how the native kernel multiplies bfloat16 there.
    cpu = report["meta"]["cpu"]
    assert cpu["model"] and isinstance(cpu["native_kernel"], bool)
    assert cpu["native_bf16"] in ("amx", "avx512_bf16", None)
    assert cpu["native_lanes"] in ((16, 8, 0) if cpu["native_kernel"] else (None,))


def test_networks_time_every_layer_and_direction(tmp_path):
    """``--layers 2 --bidirectional``: jaxrnn's `stack`, Flax's stacked ``nn.Bidirectional``
    and jaxrnn with its kernels off (PyTorch's ``num_layers`` where it is installed) run the
    same network; the multiply-adds count both directions of both layers, the second layer's
    inputs ``2H`` wide; the single-layer plain scan is not a network and is left out."""
    pytest.importorskip("torch")
    report, stdout = _run(
        tmp_path, "--cells", "lstm:2:5:8", "--layers", "2", "--bidirectional",
        "--peers", "torch,flax,xla,scan",
    )  # fmt: skip
    (r,) = report["results"]
    assert (r["layers"], r["bidirectional"]) == (2, True)
    assert (report["meta"]["layers"], report["meta"]["bidirectional"]) == (2, True)
    forward = 2 * 5 * 2 * 4 * 8 * ((8 + 8) + (16 + 8))  # D·T·B·G·H·(I + H), layer by layer
    assert r["multiply_adds"] == {"fwd": forward, "fwdbwd": 3 * forward}
    for pass_ in ("fwd", "fwdbwd"):
        assert set(r[pass_]) == {"jaxrnn", "torch", "flax", "xla"}
    assert "| lstm 2 5 8 ×2 layers, bidirectional | fwdbwd |" in stdout
    assert "networks ×2 layers, bidirectional" in stdout


def test_network_options_are_checked():
    for argv, message in (
        (["--layers", "0"], "--layers must be at least 1, got 0"),
        (["--bidirectional", "--matmul-dtype", "bfloat16"], "not with --tune or --matmul-dtype"),
    ):
        proc = subprocess.run(
            [sys.executable, str(SPEED), "--device", "cpu", *argv],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode != 0 and message in proc.stderr


def test_host_devices_shard_the_batch(tmp_path):
    """``--host-devices 2``: jaxrnn runs batch-sharded over two CPU devices where the batch
    divides, on one device where it does not; ``jaxrnn1`` is the one-device run."""
    report, stdout = _run(
        tmp_path, "--host-devices", "2", "--cells", "lstm:4:5:8,lstm:3:5:8", "--peers", "jaxrnn1"
    )
    assert report["meta"]["jax_devices"] == ["cpu:0", "cpu:1"]
    assert [r["jaxrnn_devices"] for r in report["results"]] == [2, 1]
    assert set(report["results"][0]["fwdbwd"]) == {"jaxrnn", "jaxrnn1"}
    assert "| lstm 4 5 8 [2 devices] | fwd |" in stdout
    assert "jaxrnn batch over 2 CPU devices" in stdout


def test_tune_rows_feed_the_gpu_table_proposal(tmp_path):
    """``--tune`` (as ``gpu_check.sh`` runs it on a GPU) writes what ``gpu_tables.py`` reads."""
    report, stdout = _run(tmp_path, "--tune", "--passes", "fwdbwd", "--cells", "gru:2:5:8")
    assert [r["cell"] for r in report["tune"]] == ["gru:2:5:8"] and "-> best" in stdout
    proc = subprocess.run(
        [
            sys.executable,
            str(SPEED.parent / "gpu_tables.py"),
            "--tune",
            str(tmp_path / "speed.json"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "UNROLL_TABLE['gpu'] = ((1 << 62, " in proc.stdout
    assert "gru:2:5:8 (batch*hidden 16): ms by unroll {1: " in proc.stdout


def test_isa_avx2_caps_every_library(tmp_path):
    """``--isa avx2``: jaxrnn's kernel built for x86-64-v3 (its 8-lane code); PyTorch on its
    AVX2 kernels; what was set is in the report."""
    if not native.on_x86_64():
        pytest.skip("AVX2 is an x86 instruction set")
    pytest.importorskip("torch")
    report, stdout = _run(tmp_path, "--isa", "avx2", "--cells", "lstm:2:5:8", "--peers", "torch")
    meta = report["meta"]
    assert meta["isa"] == "avx2" and meta["cpu"]["native_arch"] == "x86-64-v3"
    assert meta["cpu"]["native_kernel"] is True and meta["cpu"]["native_lanes"] == 8
    assert meta["cpu"]["native_bf16"] is None
    assert meta["torch"]["cpu_capability"] == "AVX2"
    assert meta["isa_environment"]["DNNL_MAX_CPU_ISA"] == "AVX2"
    assert "--xla_cpu_max_isa=AVX2" in meta["isa_environment"]["XLA_FLAGS"]
    assert "every library capped at AVX2" in stdout and "| lstm 2 5 8 | fwdbwd |" in stdout


@pytest.mark.parametrize("option, value", [("--isa", "avx2"), ("--host-devices", "2")])
def test_cpu_only_options_are_refused_on_gpu(option, value):
    proc = subprocess.run(
        [sys.executable, str(SPEED), "--device", "gpu", option, value],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and f"{option}: CPU only (--device cpu)" in proc.stderr


def test_vmap_speed_reports_every_pass(tmp_path):
    """``benchmarks/vmap_speed.py`` runs and reports its passes per cell: the three of a
    shared-weight `vmap` and the ensemble's four (one call, and a loop over members)."""
    out = tmp_path / "vmap.json"
    script = SPEED.with_name("vmap_speed.py")
    proc = subprocess.run(
        [sys.executable, str(script), "--cells", "gru:2:1:5:8", "--reps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["pass_"] for r in rows] == [
        "fwd", "per_example_grad", "grad_of_vmap", "ensemble_fwd", "ensemble_fwd_loop",
        "ensemble_grad", "ensemble_grad_loop",
    ]  # fmt: skip
    assert all(r["batched_ms"] > 0 and r["vmapped_ms"] > 0 for r in rows)
    assert "| gru 2 × 1, 5, 8 | grad_of_vmap |" in proc.stdout
    assert "| gru 2 × 1, 5, 8 | ensemble_grad_loop |" in proc.stdout
