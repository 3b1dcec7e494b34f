"""The mixed-granularity policy: 1x16 E4M3 copies for non-linear ops, per-tensor E4M3/E5M2 for linear layers."""

import torch

from fp8train import mixed_granularity as mg
from fp8train.formats import E4M3, E5M2
from fp8train.quant import GROUP16, PER_TENSOR, quantize


def _x(shape=(6, 5, 64), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))).to(torch.bfloat16)


def test_save_for_nonlinear_is_e4m3_1x16_with_bf16_rounded_up_amax():
    x = _x()
    q = mg.save_for_nonlinear(x)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == x.shape
    assert q.amax.dtype == torch.bfloat16 and q.amax.shape == (6, 5, 4)
    assert q.fmt == E4M3 and q.granularity == GROUP16
    # 1 byte per element + 2 bytes per 16 elements
    assert q.nbytes == x.numel() * 1.125
    exact = x.float().reshape(6, 5, 4, 16).abs().amax(-1)
    assert bool((q.amax.float() >= exact).all())  # rounded up: nothing saturates
    assert bool((q.amax.float() <= exact * (1 + 2**-7)).all())  # by less than one bf16 step
    ref = quantize(x, E4M3, "1x16", scale_dtype=torch.bfloat16)
    assert torch.equal(q.data.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(q.amax, ref.amax)
    # elementwise error bound of E4M3 with an exact group max: half a step, 2^-4 relative (2^-10 of the
    # group scale below the normal range)
    err = (q.dequantize().double() - x.double()).abs()
    scale = q.amax.double().repeat_interleave(16, -1) / 448
    bound = torch.maximum(x.double().abs() * 2**-4, scale * 2**-10)
    assert bool((err <= bound * (1 + 1e-6)).all())


def test_quantize_for_linear_is_per_tensor_e4m3_from_the_group_scaling_max():
    x = _x((33, 48))
    q, data_t = mg.quantize_for_linear(x, with_transpose=True)
    assert q.fmt == E4M3 and q.granularity == PER_TENSOR and q.amax.dtype == torch.float32 and q.amax.dim() == 0
    assert q.amax.item() == x.float().abs().max().item()
    assert data_t.shape == (48, 33) and data_t.is_contiguous()
    assert torch.equal(data_t.view(torch.uint8), q.data.t().contiguous().view(torch.uint8))
    assert torch.equal(q.scale, q.amax / 448)
    given = mg.quantize_for_linear(x, amax=torch.tensor(100.0))
    assert given.amax.item() == 100.0


def test_quantize_grad_for_linear_is_e5m2_per_tensor():
    g = _x((2, 7, 32)) * 1e-4
    q = mg.quantize_grad_for_linear(g)
    assert q.fmt == E5M2 and q.data.dtype == torch.float8_e5m2 and q.granularity == PER_TENSOR
    rel = (q.dequantize().float() - g.float()).abs() / g.float().abs().clamp_min(1e-30)
    big = g.float().abs() > q.amax * 2**-14  # normal range of E5M2 relative to the tensor scale
    assert bool((rel[big] <= 2**-3 + 1e-6).all())


def test_nonfinite_values_propagate_instead_of_raising():
    x = _x((2, 32)).float()
    x[0, 3] = float("nan")
    q = mg.save_for_nonlinear(x)
    out = q.dequantize()
    assert bool(out[0, :16].isnan().all()) and bool(out[0, 16:].isfinite().all()) and bool(out[1].isfinite().all())
    assert bool(mg.quantize_for_linear(x).dequantize().isnan().all())


def test_quantization_disabled_keeps_exact_copies():
    x = torch.randn(3, 32, dtype=torch.float64)
    with mg.quantization_disabled():
        q = mg.save_for_nonlinear(x)
        assert mg.is_quantization_disabled()
    assert not mg.is_quantization_disabled()
    assert isinstance(q, mg.UnquantizedTensor) and torch.equal(q.dequantize(), x)
    tensors, meta = mg.pack(q)
    assert torch.equal(mg.unpack(meta, *tensors).dequantize(), x)


def test_pack_unpack_round_trip():
    x = _x((4, 32))
    q = mg.save_for_nonlinear(x)
    tensors, meta = mg.pack(q)
    back = mg.unpack(meta, *tensors)
    assert torch.equal(back.dequantize(), q.dequantize()) and back.dtype == x.dtype and back.shape == x.shape
