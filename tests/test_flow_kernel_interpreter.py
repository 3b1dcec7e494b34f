"""The precision-flow Triton kernel (act(gate_hat) * up_hat from FP8 copies) vs its torch reference, run by the
Triton CPU interpreter on tiny shapes in a subprocess (TRITON_INTERPRET must be set before triton loads).

Checks indexing, masking, both output layouts and the amax; GPU float8 rounding is checked on the H100
(benchmarks/gpu/layer.py compares the coat layer with bf16 there).
"""

import os

import pytest

from triton_interpreter import run_under_interpreter

def test_product_from_copies_under_interpreter():
    pytest.importorskip("triton")
    run_under_interpreter(__file__, marker="product_from_copies: ok")


def check():
    import torch

    import triton_interpreter as ti
    from fp8train.kernels.gated_from_copies import product_from_copies
    from fp8train.nn.gated_mlp import GatedSaved
    from fp8train.nn.precision_flow import _product_from_fp8
    from fp8train.quant import quantize
    from fp8train.recipes import Recipe

    ti.patch_interpreter()
    recipe = Recipe.named("coat")
    for shape in ((5, 48), (3, 3, 64), (33, 160)):
        gate, up = ti._inputs(shape, torch.float32), ti._inputs(shape, torch.float32, seed=1)
        copies = [quantize(t, "e4m3", "1x16", scale_dtype=torch.bfloat16) for t in (gate, up)]
        for name in ("silu", "gelu", "gelu_tanh"):
            for dtype in (torch.float32, torch.bfloat16):
                gated = GatedSaved(copies[0], copies[1], name)
                ref = _product_from_fp8(gated, dtype, recipe, transpose=True)
                q, t = product_from_copies(copies[0], copies[1], name, dtype, with_transpose=True)
                ti.close(q.amax, ref.q.amax, dtype, scale=2)
                ti.same_fp8(q.data, ref.q.data, steps=2)
                ti.same_fp8(t, ref.data_t, steps=2)
                q_only_t, t2 = product_from_copies(copies[0], copies[1], name, dtype, write_rowmajor=False,
                                                   with_transpose=True)
                assert q_only_t.data is None and torch.equal(t2.float(), t.float())
    print("product_from_copies: ok")


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    check()
