"""The engine's Triton kernels (the experts' GEMMs, their weight gradients, the MoE dispatch, the FP8 weights' casts)
on a CPU under Triton's interpreter: tests/interpreted_kernels.py, one process per kernel, since `triton.jit` reads
TRITON_INTERPRET when the kernel modules are imported. Where Triton is not installed (a CPU torch does not bring it; the dev extra does), these
skip; on a GPU the compiled kernels have their own tests."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
SCRIPT = Path(__file__).resolve().parent / "interpreted_kernels.py"


@pytest.mark.parametrize("check", ["ragged_mm", "gate_up_swiglu", "grouped_wgrad", "moe_dispatch", "weight_casts"])
def test_triton_kernel_under_the_interpreter(check):
    proc = subprocess.run([sys.executable, str(SCRIPT), check], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and f"{check}: ok" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
