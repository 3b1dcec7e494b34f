"""FP8Activation / activation (SiLU, GELU, GELU-tanh) against float64 autograd; module mapping; saved bytes."""

import math

import pytest
import torch
import transformers.activations as hf_act
from torch import nn

from fp8train import mixed_granularity as mg
from fp8train.nn.activation import (ACTIVATIONS, FP8Activation, act_fn, activation, activation_backward,
                                    activation_forward, activation_name)
from saved_memory import saved_bytes


def _data(shape=(32, 96), dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * 3
    dy = torch.randn(shape, generator=gen)
    return x.to(dtype), dy.to(dtype)


def exact64(x, name):
    x = x.double()
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


TAIL = 2.0**-21  # float32 evaluation error of act / act' far in the negative tail, relative to 1 + |x|


def derivative_bounds(name):
    """(max |act'|, max |act''|) over the real line, from a fine float64 grid (both decay outside [-20, 20])."""
    t = torch.linspace(-20, 20, 400001, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(exact64(t, name).sum(), t, create_graph=True)
    (d2,) = torch.autograd.grad(d1.sum(), t)
    return float(d1.detach().abs().max()) * 1.001, float(d2.abs().max()) * 1.001


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_is_exact_and_matches_torch(name):
    x, _ = _data()
    y = activation(x, name)
    assert y.dtype == x.dtype
    y64 = exact64(x, name)
    # one bf16 rounding, plus the float32 cancellation of 1 + erf / 1 + tanh in the negative tail (~|x| 2^-24)
    assert bool(((y.double() - y64).abs() <= 2**-8 * y64.abs() + TAIL * (1 + x.double().abs())).all())
    torch_y = nn.functional.silu(x) if name == "silu" else nn.functional.gelu(
        x, approximate="tanh" if name == "gelu_tanh" else "none")
    assert torch.equal(y, torch_y)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_formula_gradcheck_without_quantization(name):
    x = torch.randn(4, 32, dtype=torch.float64, requires_grad=True) * 3
    x = x.detach().requires_grad_(True)
    with mg.quantization_disabled():
        assert torch.autograd.gradcheck(lambda t: activation(t, name), (x,))


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_quantized_gradient_within_the_lipschitz_bound(name):
    """dx = dy * act'(x_hat): |dx - dy act'(x)| <= |dy| max|act''| |x_hat - x|, plus one bf16 rounding."""
    x, dy = _data()
    xr = x.clone().requires_grad_(True)
    activation(xr, name).backward(dy)
    x64 = x.double().requires_grad_(True)
    exact64(x64, name).backward(dy.double())
    _, second = derivative_bounds(name)
    x_hat = mg.save_for_nonlinear(x).dequantize(torch.float64)
    bound = (dy.double().abs() * (second * (x_hat - x.double()).abs() + TAIL * (1 + x.double().abs()))
             + 2**-8 * x64.grad.abs())
    err = (xr.grad.double() - x64.grad).abs()
    assert bool((err <= bound).all())
    assert float(err.sum()) < 0.5 * float(bound.sum())


def test_backward_function_equals_autograd_path():
    x, dy = _data()
    _, saved = activation_forward(x, "silu")
    xr = x.clone().requires_grad_(True)
    activation(xr, "silu").backward(dy)
    assert torch.equal(activation_backward(dy, saved), xr.grad)


def test_quantize_output():
    x, _ = _data()
    y, _ = activation_forward(x, "gelu")
    (q, data_t), _ = activation_forward(x, "gelu", quantize_output=True, output_transpose=True)
    expected = mg.quantize_for_linear(y)
    assert torch.equal(q.amax, expected.amax) and torch.equal(q.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert data_t.shape == (x.shape[1], x.shape[0])


@pytest.mark.parametrize("module,name", [
    (nn.SiLU(), "silu"), (hf_act.SiLUActivation(), "silu"), (nn.GELU(), "gelu"), (nn.GELU("tanh"), "gelu_tanh"),
    (hf_act.GELUActivation(), "gelu"), (hf_act.GELUActivation(use_gelu_python=True), "gelu"),
    (hf_act.NewGELUActivation(), "gelu_tanh"), (hf_act.GELUTanh(), "gelu_tanh"),
    (hf_act.FastGELUActivation(), "gelu_tanh"), (hf_act.AccurateGELUActivation(), "gelu_tanh"),
    (hf_act.ACT2FN["swish"], "silu"), (hf_act.ACT2FN["gelu_pytorch_tanh"], "gelu_tanh"),
])
def test_module_mapping_reproduces_the_module(module, name):
    assert activation_name(module) == name
    fp8 = FP8Activation.from_module(module)
    x, _ = _data(dtype=torch.float32)
    torch.testing.assert_close(fp8(x), module(x), rtol=1e-5, atol=1e-6)


def test_unsupported_activation_is_refused():
    assert activation_name(nn.ReLU()) is None
    with pytest.raises(ValueError, match="no FP8 activation"):
        FP8Activation.from_module(hf_act.QuickGELUActivation())
    with pytest.raises(ValueError, match="unsupported activation"):
        activation(torch.ones(2, 16), "relu")


def test_saves_fp8_instead_of_bf16():
    x, _ = _data((64, 256))
    x.requires_grad_(True)
    ours = saved_bytes(FP8Activation("silu"), x)
    theirs = saved_bytes(nn.SiLU(), x)
    assert ours == x.numel() + x.numel() // 16 * 2
    assert theirs == x.numel() * 2
    assert torch.equal(act_fn(torch.zeros(1), "silu"), torch.zeros(1))
