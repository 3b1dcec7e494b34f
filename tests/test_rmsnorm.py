"""FP8RMSNorm / rms_norm against HF modules and float64 autograd; what it saves; bad input."""

import math

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from fp8train import mixed_granularity as mg
from fp8train.nn.residual import residual_add
from fp8train.nn.rmsnorm import STYLES, FP8RMSNorm, rms_norm, rmsnorm_backward, rmsnorm_forward
from saved_memory import saved_bytes

H = 128


def _data(rows=48, hidden=H, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, hidden, generator=gen) * torch.exp(0.5 * torch.randn(rows, hidden, generator=gen)))
    x[:, 5] *= 20  # an outlier channel, as residual streams have
    w = 1 + 0.3 * torch.randn(hidden, generator=gen)
    dy = torch.randn(rows, hidden, generator=gen)
    return x.to(dtype), w.to(dtype), dy


def _reference64(x, w, eps, style):
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if w is None:
        return n
    return n * (w.double() + (1.0 if style == "gemma" else 0.0))


@pytest.mark.parametrize("cls,style", [(LlamaRMSNorm, "llama"), (Qwen3RMSNorm, "llama"), (GemmaRMSNorm, "gemma")])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float32])
def test_from_hf_module_reuses_weight_and_matches_forward_bit_for_bit(cls, style, weight_dtype):
    x, w, _ = _data()
    hf = cls(H, eps=1e-5)
    with torch.no_grad():
        hf.weight.copy_(w.float() - (1.0 if style == "gemma" else 0.0))
    hf = hf.to(weight_dtype)
    norm = FP8RMSNorm.from_module(hf)
    assert norm.style == style and norm.eps == 1e-5
    assert norm.weight is hf.weight and list(norm.state_dict()) == list(hf.state_dict())
    y = norm(x)
    expected = hf(x)
    assert y.dtype == expected.dtype and torch.equal(y, expected)


def test_from_torch_rmsnorm():
    x, w, _ = _data()
    ref = nn.RMSNorm(H, eps=None).to(torch.bfloat16)
    with torch.no_grad():
        ref.weight.copy_(w)
    norm = FP8RMSNorm.from_module(ref)
    assert norm.style == "torch" and norm.weight is ref.weight
    y, expected = norm(x), ref(x)
    assert y.dtype == expected.dtype
    torch.testing.assert_close(y, expected, rtol=2**-8, atol=0)  # one bf16 rounding apart at most


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("affine", [True, False])
def test_backward_formula_gradcheck_without_quantization(style, affine):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    with mg.quantization_disabled():
        inputs = (x, w) if affine else (x,)
        fn = (lambda a, b: rms_norm(a, b, 1e-5, style=style)) if affine else (lambda a: rms_norm(a, None, 1e-5,
                                                                                                   style=style))
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("style", STYLES)
def test_quantized_gradients_within_the_fp8_error_bound(style):
    """dx and dweight use the FP8 copy x_hat.  With e = (x_hat - x) * rstd and eps_row = |e| / |n| (<= 2^-4, the
    E4M3 half step), perturbation of dx = rstd (g - n mean(g n)) gives, per row,
    |dx - dx_true| <= rstd |g| (2 eps_row + eps_row^2); dweight differs by at most sum_rows |dy| (|e| + 2^-8 |n|)
    (plus the bf16 rounding of n in the llama style); both plus one bf16 rounding of the result."""
    x, w, dy = _data()
    eps = 1e-6
    xr = x.detach().requires_grad_(True)
    wr = w.detach().requires_grad_(True)
    y = rms_norm(xr, wr, eps, style=style)
    y.backward(dy.to(y.dtype))
    x64 = x.double().requires_grad_(True)
    w64 = w.double().requires_grad_(True)
    _reference64(x64, w64, eps, style).backward(dy.to(y.dtype).double())
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
    x_hat = mg.save_for_nonlinear(x).dequantize(torch.float64)
    e = (x_hat - x.double()) * rstd
    n = x.double() * rstd
    eps_row = e.norm(dim=-1) / n.norm(dim=-1)
    assert float(eps_row.max()) <= 2**-4
    g = dy.to(y.dtype).double() * (w.double() + (1.0 if style == "gemma" else 0.0))
    bound_dx = rstd.squeeze(-1) * g.norm(dim=-1) * (2 * eps_row + eps_row**2) * 1.001
    err_dx = (xr.grad.double() - x64.grad).norm(dim=-1)
    assert bool((err_dx <= bound_dx + 2**-8 * x64.grad.norm(dim=-1)).all())
    dyd = dy.to(y.dtype).double()
    bound_dw = (dyd.abs() * (e.abs() + 2**-8 * n.abs())).sum(0) * 1.001 + 2**-8 * w64.grad.abs()
    assert bool(((wr.grad.double() - w64.grad).abs() <= bound_dw).all())
    # and the errors are those of FP8, not of a broken formula: same order as the bound's leading term
    assert float(err_dx.sum()) < 0.5 * float(bound_dx.sum())


def test_quantize_output_returns_the_next_linears_per_tensor_e4m3():
    x, w, _ = _data()
    y, _ = rmsnorm_forward(x, w, 1e-5)
    (q, data_t), saved = rmsnorm_forward(x, w, 1e-5, quantize_output=True, output_transpose=True)
    expected = mg.quantize_for_linear(y)
    assert q.granularity == expected.granularity and torch.equal(q.amax, expected.amax)
    assert torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert torch.equal(data_t.view(torch.uint8), q.data.t().contiguous().view(torch.uint8))
    assert saved.x.data.dtype == torch.float8_e4m3fn and saved.rstd.dtype == torch.float32


def test_copy_from_the_residual_add_is_used_as_is():
    x, w, dy = _data()
    r = torch.randn_like(x)
    a = x.detach().requires_grad_(True)
    h, h_copy = residual_add(r, a, emit_fp8_copy=True)
    rms_norm(h, w, 1e-5, x_saved=h_copy).backward(dy.to(x.dtype))
    b = x.detach().requires_grad_(True)
    rms_norm(r + b, w, 1e-5).backward(dy.to(x.dtype))
    assert torch.equal(a.grad, b.grad)


def test_backward_function_equals_autograd_path():
    x, w, dy = _data()
    y, saved = rmsnorm_forward(x, w, 1e-5)
    dx, dw = rmsnorm_backward(dy.to(y.dtype), saved, w)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    rms_norm(xr, wr, 1e-5).backward(dy.to(y.dtype))
    assert torch.equal(dx, xr.grad) and torch.equal(dw, wr.grad)


def test_saves_fp8_instead_of_fp32():
    rows, hidden = 64, 256
    x, w, _ = _data(rows, hidden)
    hf = LlamaRMSNorm(hidden).to(torch.bfloat16)
    fp8 = FP8RMSNorm.from_module(hf)
    xin = x.requires_grad_(True)
    ours = saved_bytes(fp8, xin, params=[hf.weight])
    theirs = saved_bytes(hf, xin, params=[hf.weight])
    assert ours == rows * hidden * 1 + rows * hidden // 16 * 2 + rows * 4  # E4M3 + bf16 amax + fp32 rstd
    assert theirs >= rows * hidden * 6  # fp32 upcast of x plus the bf16 normalised x
    assert ours / theirs < 0.2


def test_bad_input_is_rejected_with_a_clear_message():
    x, w, _ = _data()
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, w[:-1], 1e-5)
    with pytest.raises(ValueError, match="unknown RMSNorm style"):
        rms_norm(x, w, 1e-5, style="t5")
    with pytest.raises(TypeError, match="floating-point"):
        rms_norm(torch.ones(3, 16, dtype=torch.int64), None, 1e-5)


def test_three_dim_input_and_no_weight():
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, None, 1e-6)
    assert y.shape == x.shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape and math.isfinite(float(x.grad.float().abs().sum()))


def test_residual_grad_is_added_in_the_same_pass():
    x, w, dy = _data()
    dy = dy.to(x.dtype)
    _, saved = rmsnorm_forward(x, w, 1e-5)
    dres = torch.randn_like(x)
    dx, dw = rmsnorm_backward(dy, saved, w)
    dx_sum, dw_sum = rmsnorm_backward(dy, saved, w, residual_grad=dres)
    assert torch.equal(dw, dw_sum) and dx_sum.dtype == x.dtype
    # one rounding of (fp32 dx + residual grad) instead of two
    exact = dx.double() + dres.double()
    assert bool(((dx_sum.double() - exact).abs() <= 2**-8 * dx.double().abs() + 2**-8 * exact.abs() + 1e-6).all())
    with pytest.raises(ValueError, match="residual_grad has shape"):
        rmsnorm_backward(dy, saved, w, residual_grad=dres[:-1])


def test_fused_residual_add_and_norm():
    from fp8train.nn.rmsnorm import add_rms_norm, add_rmsnorm_forward

    x, w, dy = _data()
    r = torch.randn_like(x)
    h, y, saved = add_rmsnorm_forward(r, x, w, 1e-5)
    assert torch.equal(h, r + x)
    y_ref, saved_ref = rmsnorm_forward(r + x, w, 1e-5)
    assert torch.equal(y, y_ref) and torch.equal(saved.rstd, saved_ref.rstd)
    assert torch.equal(saved.x.data.view(torch.uint8), saved_ref.x.data.view(torch.uint8))
    _, q, _ = add_rmsnorm_forward(r, x, w, 1e-5, quantize_output=True)
    assert torch.equal(q.data.view(torch.uint8), mg.quantize_for_linear(y_ref).data.view(torch.uint8))
    # autograd: h feeds the next residual, y the next linear; both gradients reach residual and x
    dh = torch.randn_like(x)
    a, b, wa = r.clone().requires_grad_(True), x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h1, y1 = add_rms_norm(a, b, wa, 1e-5)
    torch.autograd.backward([h1, y1], [dh, dy.to(x.dtype)])
    c, d, wb = r.clone().requires_grad_(True), x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2 = residual_add(c, d)
    y2 = rms_norm(h2, wb, 1e-5)
    torch.autograd.backward([h2, y2], [dh, dy.to(x.dtype)])
    # fused: dh + dx_norm rounded once; unfused: dx_norm rounded to bf16 first, then the sum rounded again
    dx_norm = rmsnorm_backward(dy.to(x.dtype), saved, w)[0].double()
    bound = 2**-7 * (dx_norm.abs() + c.grad.double().abs()) + 1e-30  # one bf16 step of each
    assert bool(((a.grad.double() - c.grad.double()).abs() <= bound).all())
    assert torch.equal(a.grad, b.grad) and torch.equal(wa.grad, wb.grad)
    with mg.quantization_disabled():
        args = [torch.randn(3, 32, dtype=torch.float64, requires_grad=True) for _ in range(3)]
        assert torch.autograd.gradcheck(lambda p, q, s: add_rms_norm(p, q, s[0], 1e-5), (args[0], args[1], args[2]))


def test_dequantized_output_is_the_fp8_values():
    from fp8train.nn.rmsnorm import rmsnorm_forward

    x = torch.randn(6, 64, dtype=torch.bfloat16)
    w = torch.rand(64, dtype=torch.bfloat16) + 0.5
    (q, data_t), _, values = rmsnorm_forward(x, w, 1e-6, quantize_output=True, output_transpose=True,
                                             dequantized_dtype=torch.float32)
    assert values.dtype == torch.float32 and torch.equal(values, q.dequantize(torch.float32))
    assert torch.equal(data_t.t().float(), q.data.float())
    with pytest.raises(ValueError, match="needs quantize_output=True"):
        rmsnorm_forward(x, w, 1e-6, dequantized_dtype=torch.float32)
