"""Explicit-sharding meshes: every runner mode gives the replicated result, batch-sharded.

The cases run in one fresh process with two CPU devices (`_sharded_worker.py`), because the
device count is fixed when JAX starts and the rest of the suite runs on one. Each case is
jitted twice, on replicated inputs and on inputs sharded over the batch axis of a
``jax.make_mesh`` mesh (explicit axes), and compared: outputs, carries, and gradients with
respect to params and inputs.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import _sharded_worker
import jax
import pytest
from conftest import fresh_key

WORKER = pathlib.Path(_sharded_worker.__file__)


@pytest.fixture(scope="module")
def report():
    seed = int(jax.random.randint(fresh_key(), (), 0, 2**30))
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(seed)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_worker_has_two_cpu_devices(report):
    assert report["devices"] == 2
    assert sorted(report["cases"]) == sorted(_sharded_worker.CASES)


# With bfloat16 matmuls the replicated run takes the native CPU kernel and the sharded one
# XLA's loop; their float32 carries differ in the last bits (the kernel's exp is a
# polynomial), and now and then that flips the bfloat16 rounding of an element of h: on an
# AMD EPYC (AVX512-BF16), 2 seeds in 300 moved the outputs by 2.4e-5 and 2.6e-5 (relative to
# their largest), one more in a full test run by 5.2e-5; the others by about 1e-7.
TOLERANCE = {"lstm-bf16-matmul": 5e-4}


@pytest.mark.parametrize("case", list(_sharded_worker.CASES))
def test_batch_sharded_equals_replicated(report, case):
    result = report["cases"][case]
    assert "error" not in result, result.get("error")
    tolerance = TOLERANCE.get(case, 1e-5)
    assert result["out"] < tolerance, result
    assert result["grad"] < tolerance, result
    # The outputs keep the batch sharding of the inputs: nothing was gathered.
    assert result["ys_spec"] == result["xs_spec"], result


def test_xs_sharded_over_time_is_refused(report):
    assert report["time_sharded_error"] == (
        "unroll: xs must not be sharded over its time axis (axis 1 of (*batch, time, "
        "features)), got xs of type float32[4,8@data,3] (time over mesh axes 'data'). Shard "
        "the batch axes instead, or gather time first with jax.sharding.reshard(xs, ...)."
    )
