"""Recipe.gated_gemm: the fused FP8 GEMM + gated product path (kernels: tests/triton_interpreter.py
``check_gated_projection``; GPU: benchmarks/gpu/gated_gemm.py).  On CPU the reference composition runs."""

import pytest
import torch

import fp8train
from fp8train.bench import parse_config
from fp8train.nn.gated_projection import gated_projection_backward, gated_projection_forward
from fp8train.nn.gated_mlp import gated_product_backward, gated_product_forward
from fp8train.nn.linear import fp8_linear_backward, fp8_linear_forward, quantize_linear_input


def test_recipe_field_and_bench_suffix():
    assert fp8train.Recipe.named("coat-lean").gated_gemm is False
    with pytest.raises(TypeError, match="gated_gemm"):
        fp8train.Recipe(gated_gemm="yes")
    with pytest.raises(ValueError, match="delayed_scaling=True"):
        fp8train.Recipe.named("coat-lean").replace(delayed_scaling=False, gated_gemm=True)
    assert parse_config("fp8train_coat_lean_gated_gemm_graphed") == ("fp8train_coat_lean", {"gated_gemm": True}, True)


def test_cpu_runs_the_separate_ops_bit_for_bit():
    """On CPU (no FP8 GEMM kernels) the op is exactly the composition of the separate ops, gated_gemm or not."""
    recipe = fp8train.Recipe.named("coat-lean").replace(gated_gemm=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16)
    w_gate, w_up = (torch.randn(48, 32, generator=gen).to(torch.bfloat16) for _ in range(2))
    w_down = torch.randn(32, 48, generator=gen).to(torch.bfloat16)
    dout = torch.randn(2, 5, 32, generator=gen).to(torch.bfloat16)
    x_in = quantize_linear_input(x, recipe)
    pred, pred_r = torch.zeros(3), torch.zeros(3)
    h_in, gated, saved_gate, up_amax = gated_projection_forward(x_in, w_gate, w_up, "silu", recipe=recipe,
                                                                out_dtype=torch.bfloat16, prediction=pred[0:1])
    gate, saved_ref = fp8_linear_forward(x_in, w_gate, recipe=recipe, out_dtype=torch.bfloat16)
    up, saved_up = fp8_linear_forward(x_in, w_up, recipe=recipe, out_dtype=torch.bfloat16)
    h_ref, gated_ref = gated_product_forward(gate, up, "silu", quantize_output=True, prediction=pred_r[0:1])
    assert torch.equal(h_in.q.data.view(torch.uint8), h_ref.data.view(torch.uint8))
    assert torch.equal(h_in.q.amax, h_ref.amax) and torch.equal(pred, pred_r)
    assert torch.equal(gated.gate.data.view(torch.uint8), gated_ref.gate.data.view(torch.uint8))
    assert torch.equal(up_amax, saved_up.weight_amax) and saved_gate.x.data.data_ptr() == saved_ref.x.data.data_ptr()

    _, saved_down = fp8_linear_forward(h_in, w_down, recipe=recipe, out_dtype=torch.bfloat16)
    dgate, dup, dw_down, _ = gated_projection_backward(dout, saved_down, w_down, gated, recipe=recipe,
                                                       quantize_grads=True, prediction=pred[1:3])
    dh, dw_ref, _ = fp8_linear_backward(dout, saved_down, w_down, recipe=recipe)
    dgate_ref, dup_ref = gated_product_backward(dh, gated, quantize_output=True, prediction=pred_r[1:3])
    assert torch.equal(dw_down, dw_ref) and torch.equal(pred, pred_r)
    for got, ref in ((dgate, dgate_ref), (dup, dup_ref)):
        assert torch.equal(got.q.data.view(torch.uint8), ref.data.view(torch.uint8))
        assert torch.equal(got.q.amax, ref.amax)
