"""fp8train.quant against float64 math, for every format and granularity, and its edge cases."""

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train.formats import E2M1, E3M4, E4M3, E5M2, INT4, INT8, IntFormat
from fp8train.quant import (BLOCK128, GROUP16, GROUP128, PER_ROW, PER_TENSOR, Granularity, expand_to,
                            fake_quantize, group_amax, group_scaling_amax, quantize)

FORMATS = [E4M3, E5M2, E3M4, E2M1, INT8, INT4]
GRANULARITIES = [PER_TENSOR, PER_ROW, GROUP16, GROUP128, BLOCK128, Granularity("block", 32)]
SHAPES = [(3, 37), (2, 5, 130), (257, 300), (7,), (128, 256)]


def reference_dequant(x: torch.Tensor, fmt, gran: Granularity) -> torch.Tensor:
    """Float64 model of quantize+dequantize: amax per group from exhaustive python loops over a 2-D view."""
    x64 = x.double()
    amax = group_amax(x64, gran).double()
    scaled = x64 * expand_to(torch.where(amax > 0, fmt.max / amax, torch.zeros_like(amax)), gran, x.shape)
    q = fmt.round(scaled.clamp(-fmt.max, fmt.max))
    return q / fmt.max * expand_to(amax, gran, x.shape)


def brute_amax(x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() else x.reshape(1, 1)
    rows, cols = x2.shape
    if gran.kind == "tensor":
        return x.abs().max().float()
    if gran.kind == "row":
        return x2.abs().amax(-1).reshape(*x.shape[:-1], 1)
    size = gran.size
    if gran.kind == "group":
        out = torch.zeros(rows, -(-cols // size))
        for r in range(rows):
            for g in range(out.shape[1]):
                out[r, g] = x2[r, g * size:(g + 1) * size].abs().max()
        return out.reshape(*x.shape[:-1], out.shape[1])
    out = torch.zeros(-(-rows // size), -(-cols // size))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x2[i * size:(i + 1) * size, j * size:(j + 1) * size].abs().max()
    return out


def error_bound(x, fmt, gran):
    amax = expand_to(group_amax(x, gran).double(), gran, x.shape)
    if isinstance(fmt, IntFormat):
        # x * (qmax/amax) is rounded to fp32 before rounding to an integer: allow that much past half a step
        return amax / fmt.max / 2 * (1 + 1e-4)
    relative = x.double().abs() * 2.0 ** -(fmt.man_bits + 1)
    absolute = amax / fmt.max * fmt.min_subnormal / 2  # below the format's normal range: half a subnormal step
    return torch.maximum(relative, absolute) * (1 + 1e-5) + 1e-30


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_model_and_error_bound(fmt, gran, shape):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fmt.name}{gran}{shape}".encode()))
    # heavy-tailed values spanning many binades, as activations and gradients do
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 2)
    q = quantize(x, fmt, gran)
    assert q.data.shape == x.shape and q.data.dtype == fmt.storage_dtype
    out = q.dequantize()
    assert out.dtype == x.dtype and out.shape == x.shape
    ref = reference_dequant(x, fmt, gran)
    # the fp32 pipeline may differ from float64 only where x*fmax/amax lands within fp32 rounding of a tie
    close = (out.double() - ref).abs() <= ref.abs() * 2e-6 + 1e-30
    assert close.float().mean() > 0.999
    assert bool(((out.double() - x.double()).abs() <= error_bound(x, fmt, gran)).all())


@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
@pytest.mark.parametrize("shape", [(3, 37), (2, 5, 130), (129, 131)], ids=str)
def test_amax_shapes_and_values_against_loops(gran, shape):
    x = torch.randn(shape)
    assert torch.equal(group_amax(x, gran), brute_amax(x, gran))


def test_group_scaling_amax_is_the_tensor_max():
    x = torch.randn(33, 70) * 3
    x[5, 69] = -50.0
    assert group_scaling_amax(x).item() == 50.0
    assert group_scaling_amax(x, 128).item() == 50.0
    assert group_amax(x, PER_TENSOR).item() == 50.0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
def test_zero_and_constant_groups_round_trip_exactly(fmt, gran):
    for value in (0.0, 1 / 3, -1e-3, 12345.678, 7e-20):
        x = torch.full((130, 260), value)
        assert torch.equal(quantize(x, fmt, gran).dequantize(), x), (value, fmt.name, gran)
    x = torch.zeros(4, 48)
    x[:, 16:32] = 0.3  # one constant group among zero groups
    assert torch.equal(quantize(x, fmt, GROUP16).dequantize(), x)


@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (0, 16), (4, 0), (2, 0, 5)], ids=str)
def test_empty_tensors(gran, shape):
    x = torch.empty(shape)
    q = quantize(x, E4M3, gran)
    assert q.dequantize().shape == x.shape
    assert q.amax.numel() == 0 or float(q.amax.abs().sum()) == 0.0


def test_scalar_tensor():
    x = torch.tensor(3.3)
    for gran in GRANULARITIES:
        assert torch.equal(quantize(x, E4M3, gran).dequantize(), x)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("gran", GRANULARITIES, ids=str)
def test_nonfinite_raises_or_propagates(bad, gran):
    x = torch.randn(64, 256)
    x[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize(x, E4M3, gran)
    out = quantize(x, E4M3, gran, nonfinite="propagate").dequantize()
    # the group holding the bad value dequantizes to NaN/inf, never to a finite number
    assert not math.isfinite(out[3, 17].item())
    group = expand_to(group_amax(x, gran), gran, x.shape).expand(x.shape)
    assert not torch.isfinite(out[~torch.isfinite(group)]).any()
    assert torch.isfinite(out[torch.isfinite(group)]).all()


def test_bf16_scales_round_up_and_stay_consistent():
    x = torch.randn(64, 256) * 7
    q = quantize(x, E4M3, GROUP16, scale_dtype=torch.bfloat16)
    assert q.amax.dtype == torch.bfloat16
    assert bool((q.amax.float() >= group_amax(x, GROUP16)).all())
    assert bool(((q.dequantize() - x).abs() <= x.abs() / 16 + q.amax.float().max() / 448 * 2**-9).all())
    assert q.nbytes == x.numel() + x.numel() // 16 * 2


def test_given_amax_saturates_instead_of_overflowing():
    x = torch.tensor([1.0, 2.0, 4.0])
    q = quantize(x, E4M3, PER_TENSOR, amax=torch.tensor(1.0))
    assert q.data.float().tolist() == [448.0, 448.0, 448.0]
    q = quantize(x, E5M2, PER_TENSOR, amax=torch.tensor(1.0))
    assert q.data.float().max().item() == 57344.0


def test_dtypes_kept_and_errors():
    x = torch.randn(8, 32, dtype=torch.bfloat16)
    assert fake_quantize(x, "e4m3", "1x16").dtype == torch.bfloat16
    with pytest.raises(TypeError):
        quantize(torch.ones(4, dtype=torch.int32), E4M3)
    with pytest.raises(ValueError, match="unknown granularity"):
        quantize(x, E4M3, "diagonal")
    assert str(Granularity.parse("1x128")) == "1x128" and Granularity.parse("128x128") == BLOCK128


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), scale=st.floats(1e-6, 1e6),
       gran=st.sampled_from(GRANULARITIES), fmt=st.sampled_from([E4M3, E5M2, INT8]))
def test_error_bound_property(rows, cols, scale, gran, fmt):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    x = torch.randn(rows, cols, generator=gen) * scale
    out = quantize(x, fmt, gran).dequantize()
    assert bool(((out.double() - x.double()).abs() <= error_bound(x, fmt, gran)).all())
