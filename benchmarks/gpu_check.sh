#!/usr/bin/env bash
# GPU check: the fast path's correctness tests on the GPU, the unroll tuning, the GPU quick grid
# of benchmarks/speed.py (jaxrnn vs PyTorch cuDNN, Flax nn.RNN, jax.experimental.rnn and the
# plain scan), then the bfloat16 stretch cell. Needs jax (CUDA), flax and torch; no network.
# Budget: under 6 minutes on one H100 (measured: 4 min 53 s, before the tune cap went from
# 30 to 70 s). Writes JSON, PNG and logs to $OUT (default gpu_results).
#
#   OUT=gpu_results bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the GPU: no preallocation, so PyTorch's cuDNN gets its memory.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
PY="${PYTHON:-python3}"
log="$OUT/gpu_check.log"
: > "$log"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
  "$PY" -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices()); \
print('flax', flax.__version__, 'torch', torch.__version__, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee -a "$log"

echo "== fast path vs reference scan on the GPU (subset, 80 s cap)" | tee -a "$log"
# The tests' float32 tolerances are for full-precision matmuls; on an H100 the default is TF32
# (10-bit mantissa), which the fast path and the reference scan round differently.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 80 "$PY" -m pytest tests/test_fastpath.py -q -x -p no:cacheprovider \
  -k "equals_reference and everything_time_major_reverse or check_grads_order_2 and lstm" \
  2>&1 | tail -5 | tee -a "$log"

echo "== unroll factors of the fast path (for fastpath.UNROLL_TABLE; 70 s cap)" | tee -a "$log"
# About 12 s per small cell and 25 s per large one (H100); the JSON is written after each.
timeout 70 "$PY" benchmarks/speed.py --device gpu --tune --passes fwdbwd --reps 10 \
  --cells lstm:8:1000:128,gru:8:1000:128,lstm:64:500:512,lstm:128:500:1024 \
  --out "$OUT/gpu_tune.json" \
  2>&1 | tee -a "$log"

echo "== GPU quick grid, float32 (TF32 matmuls on both sides; 190 s cap)" | tee -a "$log"
timeout 190 "$PY" benchmarks/speed.py --device gpu --grid quick --peers torch,flax,cudnn,scan \
  --reps 20 --out "$OUT/gpu_quick.json" --plot "$OUT/gpu_quick.png" 2>&1 | tee -a "$log"

echo "== stretch: bfloat16 LSTM B16 T1024 H768 (PyTorch fp16 persistent cuDNN: 2.56 / 7.60 ms)" \
  | tee -a "$log"
timeout 45 "$PY" benchmarks/speed.py --device gpu --dtype bfloat16 --cells lstm:16:1024:768 \
  --peers torch,cudnn --reps 20 --out "$OUT/gpu_bf16_stretch.json" 2>&1 | tee -a "$log"
echo "== float32 data, jaxrnn's matmuls in bfloat16 with f32 accumulation (40 s cap)" | tee -a "$log"
timeout 40 "$PY" benchmarks/speed.py --device gpu --matmul-dtype bfloat16 --peers torch \
  --cells lstm:8:1000:128,lstm:128:500:1024,gru:128:500:1024 --reps 20 \
  --out "$OUT/gpu_bf16_matmul.json" 2>&1 | tee -a "$log"
echo "== proposed fastpath.UNROLL_TABLE['gpu'] (paste, then run the tests)" | tee -a "$log"
if [ -s "$OUT/gpu_tune.json" ]; then
  "$PY" benchmarks/gpu_tables.py --tune "$OUT/gpu_tune.json" 2>&1 | tee -a "$log"
else
  echo "no gpu_tune.json: the tune step measured no cell within its cap" | tee -a "$log"
fi
date -u | tee -a "$log"
