#!/usr/bin/env bash
# GPU evaluation of the persistent Pallas kernels (jaxrnn/_src/pallas_rnn.py: Elman, LSTM,
# GRU) with benchmarks/pallas_gpu.py: correctness on the device against jaxrnn.unroll, then
# timings against jaxrnn.unroll on XLA's loop and PyTorch cuDNN, float32 and bfloat16, 8 warps (no spills
# in benchmarks/pallas_compile_check.py; 4 spill for the float32 LSTM).
# (CI runs the kernels' tests in Pallas's interpreter.) Needs jax (CUDA) and torch; no network.
# Budget: about 4-5 minutes on one H100 (measured: 3 min 46 s at 20 rounds, before the
# unroll_pallas_bwd runs were added: now 15 rounds). Writes JSON, a markdown table and a log to
# $OUT (the JSON after every cell, so a time limit keeps what was measured).
#
#   OUT=gpu_results bash benchmarks/pallas_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX and PyTorch share the GPU
PY="${PYTHON:-python3}"
log="$OUT/pallas_gpu.log"
: > "$log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version --format=csv 2>&1 || true
} 2>&1 | tee -a "$log"
echo "== on-device check and timings (300 s cap)" | tee -a "$log"
timeout 300 "$PY" benchmarks/pallas_gpu.py --reps 15 --out "$OUT/pallas_gpu.json" 2>&1 \
  | tee -a "$log"
echo "== proposed fastpath.PALLAS_TABLE and PALLAS_BACKWARD_TABLE (paste, then run the tests)" \
  | tee -a "$log"
"$PY" benchmarks/gpu_tables.py --pallas "$OUT/pallas_gpu.json" 2>&1 | tee -a "$log"
date -u | tee -a "$log"
