"""The Triton kernels against their torch references, run by the Triton CPU interpreter on tiny shapes.

This checks indexing, masking, strides and the fused arithmetic; GPU numerics (float8 casts, bf16 rounding) are
checked on the H100 by benchmarks/gpu/quant.py and benchmarks/gpu/ops.py.  Each op runs in a fresh interpreter
process because TRITON_INTERPRET must be set before the kernels are defined.
"""

import pathlib

import pytest

from triton_interpreter import run_under_interpreter

pytest.importorskip("triton")

HERE = pathlib.Path(__file__).resolve().parent


@pytest.mark.parametrize("op", ["quantize", "rmsnorm", "layernorm", "activation", "gated_product", "gated_projection",
                                "residual", "cross_entropy", "rotary"])
def test_kernel_matches_reference_under_interpreter(op):
    run_under_interpreter(str(HERE / "triton_interpreter.py"), op, marker=f"{op}: ok")
