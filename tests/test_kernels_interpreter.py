"""The Triton kernels against their torch references, run by the Triton CPU interpreter on tiny shapes.

This checks indexing, masking, strides and the fused arithmetic; GPU numerics (float8 casts, bf16 rounding) are
checked on the H100 by benchmarks/gpu/quant.py and benchmarks/gpu/ops.py.  Each op runs in a fresh interpreter
process because TRITON_INTERPRET must be set before the kernels are defined.
"""

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("op", ["quantize", "rmsnorm", "layernorm", "activation", "gated_product", "residual",
                                "cross_entropy", "rotary"])
def test_kernel_matches_reference_under_interpreter(op):
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(HERE / "triton_interpreter.py"), op], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"{op}: ok" in proc.stdout
