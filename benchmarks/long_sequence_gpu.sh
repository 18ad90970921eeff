#!/usr/bin/env bash
# GPU check for long sequences (about 5 minutes on one H100): the issue's grid
# T in {1k, 10k, 100k}, H in {16, 32, 64}, B in {1, 8}, most informative points first, stopping
# cleanly after the time budget. Results: long_sequence_gpu.{json,md,png} in $OUT (default
# benchmarks/results), then the proposed parallel.AUTO_MIN_TIME.
#
#   OUT=gpu_results bash benchmarks/long_sequence_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
python3 -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 350 python3 benchmarks/long_sequence.py \
    --device gpu --budget 300 --repeats 5 --out "$OUT" "$@"
if [ -f "$OUT/long_sequence_gpu.json" ]; then
  echo "== proposed parallel.AUTO_MIN_TIME (paste, then run the tests)"
  python3 benchmarks/gpu_tables.py --long "$OUT/long_sequence_gpu.json"
fi
