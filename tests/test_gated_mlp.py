"""The gated product act(gate) * up and FP8GatedMLP against float64 autograd and HF's LlamaMLP."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from fp8train import mixed_granularity as mg
from fp8train.nn.gated_mlp import (FP8GatedMLP, gated_product, gated_product_backward, gated_product_forward)
from saved_memory import saved_bytes
from test_activation import TAIL, derivative_bounds, exact64

NAMES = ("silu", "gelu", "gelu_tanh")


def _data(shape=(40, 64), dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    gate = torch.randn(shape, generator=gen) * 2
    up = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    dh = torch.randn(shape, generator=gen)
    return gate.to(dtype), up.to(dtype), dh.to(dtype)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_exact(name):
    gate, up, _ = _data()
    h = gated_product(gate, up, name)
    h64 = exact64(gate, name) * up.double()
    assert h.dtype == gate.dtype
    tail = TAIL * (1 + gate.double().abs()) * up.double().abs()
    assert bool(((h.double() - h64).abs() <= 2**-8 * h64.abs() + tail).all())


@pytest.mark.parametrize("name", NAMES)
def test_backward_formula_gradcheck_without_quantization(name):
    gen = torch.Generator().manual_seed(4)
    g = (torch.randn(3, 32, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    u = torch.randn(3, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    with mg.quantization_disabled():
        assert torch.autograd.gradcheck(lambda a, b: gated_product(a, b, name), (g, u))


@pytest.mark.parametrize("name", NAMES)
def test_quantized_gradients_within_the_fp8_error_bound(name):
    """dgate = dh u_hat act'(g_hat), dup = dh act(g_hat).  With d_g = |g_hat - g|, d_u = |u_hat - u|:
    |dgate - dgate_true| <= |dh| (d_u max|act'| + |u| max|act''| d_g), |dup - dup_true| <= |dh| max|act'| d_g,
    plus one bf16 rounding."""
    gate, up, dh = _data()
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    gated_product(g, u, name).backward(dh)
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    (exact64(g64, name) * u64).backward(dh.double())
    first, second = derivative_bounds(name)
    d_g = (mg.save_for_nonlinear(gate).dequantize(torch.float64) - gate.double()).abs()
    d_u = (mg.save_for_nonlinear(up).dequantize(torch.float64) - up.double()).abs()
    dh64 = dh.double().abs()
    tail = dh64 * TAIL * (1 + gate.double().abs()) * (1 + up.double().abs())
    bound_g = dh64 * (d_u * first + up.double().abs() * second * d_g) * 1.001 + 2**-8 * g64.grad.abs() + tail
    bound_u = dh64 * first * d_g * 1.001 + 2**-8 * u64.grad.abs() + tail
    assert bool(((g.grad.double() - g64.grad).abs() <= bound_g).all())
    assert bool(((u.grad.double() - u64.grad).abs() <= bound_u).all())


def test_backward_function_and_quantize_output():
    gate, up, dh = _data()
    h, saved = gated_product_forward(gate, up, "silu")
    dgate, dup = gated_product_backward(dh, saved)
    g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    gated_product(g, u, "silu").backward(dh)
    assert torch.equal(dgate, g.grad) and torch.equal(dup, u.grad)
    q, _ = gated_product_forward(gate, up, "silu", quantize_output=True)
    expected = mg.quantize_for_linear(h)
    assert torch.equal(q.amax, expected.amax) and torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))


def _llama_mlp(act="silu"):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=160, hidden_act=act)
    return LlamaMLP(cfg).to(torch.bfloat16)


def test_fp8_gated_mlp_from_llama_mlp():
    mlp = _llama_mlp()
    fp8 = FP8GatedMLP.from_module(mlp)
    assert fp8.activation == "silu" and fp8.gate_proj is mlp.gate_proj
    assert list(fp8.state_dict()) == sorted(mlp.state_dict()) or set(fp8.state_dict()) == set(mlp.state_dict())
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = fp8(a), mlp(b)
    torch.testing.assert_close(ya, yb, rtol=2**-7, atol=1e-3)  # the product is rounded once instead of twice
    ya.float().sum().backward()
    yb.float().sum().backward()
    rel = (a.grad.float() - b.grad.float()).norm() / b.grad.float().norm()
    assert rel < 2**-4  # FP8 copies of gate and up in backward


def test_fused_gate_up_projection():
    mlp = _llama_mlp("gelu_pytorch_tanh")
    fused = torch.nn.Linear(64, 320, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    fp8 = FP8GatedMLP(mlp.down_proj, "gelu_tanh", gate_up_proj=fused)
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    torch.testing.assert_close(fp8(x), FP8GatedMLP.from_module(mlp)(x), rtol=2**-7, atol=1e-3)


def test_saves_two_fp8_copies_instead_of_three_bf16_tensors():
    gate, up, _ = _data((64, 256))
    gate.requires_grad_(True)
    up.requires_grad_(True)
    ours = saved_bytes(lambda a, b: gated_product(a, b, "silu"), gate, up)
    theirs = saved_bytes(lambda a, b: torch.nn.functional.silu(a) * b, gate, up)
    assert ours == 2 * (gate.numel() + gate.numel() // 16 * 2)
    assert theirs == 3 * gate.numel() * 2
    assert ours / theirs == pytest.approx(2.25 / 6)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="same shape"):
        gated_product(torch.ones(2, 16), torch.ones(2, 32))


def test_backward_can_emit_the_projections_e5m2_gradients():
    gate, up, dh = _data()
    _, saved = gated_product_forward(gate, up, "silu")
    dgate, dup = gated_product_backward(dh, saved)
    (qg, qg_t), (qu, qu_t) = gated_product_backward(dh, saved, quantize_output=True, output_transpose=True)
    for q, q_t, g in ((qg, qg_t, dgate), (qu, qu_t, dup)):
        expected = mg.quantize_grad_for_linear(g)
        assert q.fmt.name == "E5M2" and torch.equal(q.amax, expected.amax)
        assert torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))
        assert torch.equal(q_t.view(torch.uint8), q.data.t().contiguous().view(torch.uint8))
