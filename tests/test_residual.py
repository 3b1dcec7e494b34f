"""Residual add: the sum, the optional FP8 copy for the next norm, nothing saved for backward."""

import pytest
import torch

from fp8train import mixed_granularity as mg
from fp8train.nn.residual import ResidualAdd, residual_add
from saved_memory import saved_bytes


def test_sum_equals_torch_and_copy_equals_save_for_nonlinear():
    gen = torch.Generator().manual_seed(0)
    r = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    x = torch.randn(3, 5, 64, generator=gen).to(torch.bfloat16)
    total = residual_add(r, x)
    assert torch.equal(total, r + x)
    total2, copy = residual_add(r, x, emit_fp8_copy=True)
    assert torch.equal(total2, r + x)
    expected = mg.save_for_nonlinear(r + x)
    assert torch.equal(copy.data.view(torch.uint8), expected.data.view(torch.uint8))
    assert torch.equal(copy.amax, expected.amax) and copy.shape == total.shape and copy.dtype == total.dtype


def test_mixed_dtypes_promote_like_torch():
    r = torch.randn(4, 32)
    x = torch.randn(4, 32).to(torch.bfloat16)
    total = residual_add(r, x)
    assert total.dtype == torch.float32 and torch.equal(total, r + x)


def test_gradients_pass_through_and_nothing_is_saved():
    r = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(8, 32, requires_grad=True)
    assert saved_bytes(lambda a, b: residual_add(a, b, emit_fp8_copy=True)[0], r, x) == 0
    total, copy = residual_add(r, x, emit_fp8_copy=True)
    assert not copy.data.requires_grad
    g = torch.randn(8, 32)
    total.backward(g)
    assert torch.equal(r.grad, g) and torch.equal(x.grad, g)
    module = ResidualAdd()
    assert torch.equal(module(r, x), r + x)


def test_gradcheck_without_quantization():
    r = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    with mg.quantization_disabled():
        assert torch.autograd.gradcheck(lambda a, b: residual_add(a, b, emit_fp8_copy=True)[0], (r, x))
        _, copy = residual_add(r, x, emit_fp8_copy=True)
        assert torch.equal(copy.dequantize(), r + x)


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="equal shapes"):
        residual_add(torch.ones(2, 16), torch.ones(1, 16))
