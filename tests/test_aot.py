"""Ahead-of-time compilation of the train step for a TPU topology on this CPU machine (needs libtpu)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu]'); TPU topologies cannot be described")
def test_tiny_model_compiles_for_a_small_tpu_topology():
    cmd = [sys.executable, "-m", "scripts.aot_compile", "--config", "cpu_demo.py", "--topology", "v5e:2x2",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.batch_size=8", "--config.data.image_size=64"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mesh {'data': 2, 'fsdp': 2}" in out.stdout and "fits in 16 GiB" in out.stdout
    assert "traced for tpu" in out.stdout  # not the CPU program of the machine compiling it
