"""The README's code and the example scripts run as written."""

from __future__ import annotations

import pathlib
import re
import runpy
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
    blocks = _readme_blocks()
    assert blocks, "README.md has no python blocks"
    namespace: dict = {}
    for block in blocks:  # in order, sharing names, as a reader would paste them
        if "jax.distributed.initialize()" in block:
            continue  # needs a multi-host cluster; shown for the recipe only
        if "jax_num_cpu_devices" in block:
            continue  # sets up JAX's devices: runs in a fresh process below
        exec(compile(block, "README.md", "exec"), namespace)


def test_readme_host_devices_block_runs_in_a_fresh_process():
    (block,) = [b for b in _readme_blocks() if "jax_num_cpu_devices" in b]
    proc = subprocess.run(
        [sys.executable, "-c", block], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "('batch', None, None)" in proc.stdout  # P(...) or PartitionSpec(...)


@pytest.mark.parametrize("script", ["i_am_a_boy.py"])
def test_example_runs(script, capsys):
    runpy.run_path(str(ROOT / "examples" / script), run_name="__main__")
    out = capsys.readouterr().out
    assert "max |step-by-step - unroll| = 0.00e+00" in out or "e-0" in out
    assert "h3 after 'boy'" in out
