"""FP8LayerNorm / layer_norm against nn.LayerNorm and float64 autograd; what it saves."""

import pytest
import torch
from torch import nn

from fp8train import mixed_granularity as mg
from fp8train.nn.layernorm import FP8LayerNorm, layer_norm, layernorm_backward, layernorm_forward
from saved_memory import saved_bytes

H = 128


def _data(rows=48, hidden=H, dtype=torch.bfloat16, seed=0, offset=3.0):
    gen = torch.Generator().manual_seed(seed)
    # a large common offset: the centred copy must not lose the spread to it
    x = offset + torch.randn(rows, hidden, generator=gen) * torch.exp(0.5 * torch.randn(rows, hidden, generator=gen))
    w = 1 + 0.3 * torch.randn(hidden, generator=gen)
    b = 0.1 * torch.randn(hidden, generator=gen)
    dy = torch.randn(rows, hidden, generator=gen)
    return x.to(dtype), w.to(dtype), b.to(dtype), dy.to(dtype)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_from_module_reuses_parameters_and_matches_forward(affine, bias):
    x, w, b, _ = _data()
    ref = nn.LayerNorm(H, eps=1e-6, elementwise_affine=affine, bias=bias).to(torch.bfloat16)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(w)
            if bias:
                ref.bias.copy_(b)
    norm = FP8LayerNorm.from_module(ref)
    assert norm.eps == 1e-6 and list(norm.state_dict()) == list(ref.state_dict())
    assert norm.weight is ref.weight and norm.bias is ref.bias
    y, expected = norm(x), ref(x)
    assert y.dtype == expected.dtype
    exact = nn.functional.layer_norm(x.double(), (H,), *(None if p is None else p.double()
                                                          for p in (norm.weight, norm.bias)), eps=1e-6)
    # ours: one bf16 rounding of the float32 result; torch's CPU kernel: within two bf16 steps of ours
    assert bool(((y.double() - exact).abs() <= 2**-8 * exact.abs() + 1e-6).all())
    torch.testing.assert_close(y, expected, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("affine,bias", [(True, True), (True, False), (False, False)])
def test_backward_formula_gradcheck_without_quantization(affine, bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 32, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(32, generator=gen, dtype=torch.float64, requires_grad=True) if affine else None
    b = torch.randn(32, generator=gen, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]

    def fn(*args):
        it = iter(args)
        xx = next(it)
        ww = next(it) if affine else None
        bb = next(it) if bias else None
        return layer_norm(xx, ww, bb, 1e-5)

    with mg.quantization_disabled():
        assert torch.autograd.gradcheck(fn, tuple(inputs))


def test_quantized_gradients_within_the_fp8_error_bound():
    """Same bound as RMSNorm: e = (c_hat - c) * rstd, per row |dx - dx_true| <= rstd |g| (2 eps + eps^2)."""
    x, w, b, dy = _data()
    eps = 1e-5
    xr, wr, br = (t.detach().requires_grad_(True) for t in (x, w, b))
    layer_norm(xr, wr, br, eps).backward(dy)
    x64, w64, b64 = (t.double().requires_grad_(True) for t in (x, w, b))
    nn.functional.layer_norm(x64, (H,), w64, b64, eps).backward(dy.double())
    c = x.double() - x.double().mean(-1, keepdim=True)
    rstd = torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + eps)
    _, saved = layernorm_forward(x, w, b, eps)
    e = (saved.centered.dequantize(torch.float64) - c) * rstd
    n = c * rstd
    eps_row = e.norm(dim=-1) / n.norm(dim=-1)
    assert float(eps_row.max()) <= 2**-4 + 2**-8  # E4M3 half step (+ the bf16 rounding of the centred values)
    g = dy.double() * w.double()
    bound = rstd.squeeze(-1) * g.norm(dim=-1) * (2 * eps_row + eps_row**2) * 1.001 + 2**-8 * x64.grad.norm(dim=-1)
    err = (xr.grad.double() - x64.grad).norm(dim=-1)
    assert bool((err <= bound).all())
    bound_dw = (dy.double().abs() * e.abs()).sum(0) * 1.001 + 2**-8 * w64.grad.abs() + 1e-6
    assert bool(((wr.grad.double() - w64.grad).abs() <= bound_dw).all())
    torch.testing.assert_close(br.grad.double(), b64.grad, rtol=2**-8, atol=1e-5)  # exact up to bf16 rounding


def test_centred_copy_survives_a_large_mean():
    """A row of 1000 + small noise: a copy of x would lose the noise (E4M3 step at 1000 is 64); the centred copy
    keeps it to 2^-4 relative."""
    gen = torch.Generator().manual_seed(3)
    noise = torch.randn(4, 64, generator=gen)
    x = (1000 + noise).float()
    _, saved = layernorm_forward(x, None, None, 1e-5)
    c = x - x.mean(-1, keepdim=True)
    rel = (saved.centered.dequantize() - c).norm() / c.norm()
    assert rel < 2**-4
    naive = mg.save_for_nonlinear(x).dequantize()
    assert ((naive - naive.mean(-1, keepdim=True)) - c).norm() / c.norm() > 0.9  # the noise is gone


def test_quantize_output_and_backward_function():
    x, w, b, dy = _data()
    y, saved = layernorm_forward(x, w, b, 1e-5)
    q, _ = layernorm_forward(x, w, b, 1e-5, quantize_output=True)
    expected = mg.quantize_for_linear(y)
    assert torch.equal(q.amax, expected.amax) and torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))
    dx, dw, db = layernorm_backward(dy, saved, w)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    layer_norm(xr, wr, br, 1e-5).backward(dy)
    assert torch.equal(dx, xr.grad) and torch.equal(dw, wr.grad) and torch.equal(db, br.grad)


def test_saves_fp8():
    rows, hidden = 64, 256
    x, w, b, _ = _data(rows, hidden)
    ref = nn.LayerNorm(hidden).to(torch.bfloat16)
    ours = saved_bytes(FP8LayerNorm.from_module(ref), x.requires_grad_(True), params=list(ref.parameters()))
    assert ours == rows * hidden + rows * hidden // 16 * 2 + rows * 4
    theirs = saved_bytes(ref, x, params=list(ref.parameters()))
    assert theirs >= rows * hidden * 2 and ours < 0.6 * theirs


def test_bad_input():
    x, w, b, _ = _data()
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, w, b[:5])
    with pytest.raises(ValueError, match="last dim only"):
        FP8LayerNorm.from_module(nn.LayerNorm((4, 8)))
