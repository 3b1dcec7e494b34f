"""Dynamic Range Expansion against float64 math (COAT's centre/scale form), its error bounds and edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train.dynamic_range_expansion import (K_CODE_MAX, K_CODE_MIN, dre_dequantize, dre_quantize,
                                              expansion_exponent, metadata_shape, target_range)
from fp8train.formats import E4M3, E5M2
from fp8train.quant import quantize

FORMATS = [E4M3, E5M2]
SHAPES = [(), (1,), (7,), (300,), (3, 128), (5, 130), (2, 3, 257), (4, 1)]


def float64_reference(x: torch.Tensor, fmt, group_size=128, amax_dtype=torch.float32):
    """COAT's formulas in float64, one group at a time: centre c, exponent k, scale s, encode, FP8 round, decode."""
    x2 = x.double().reshape(-1, x.shape[-1]) if x.dim() else x.double().reshape(1, 1)
    rows, cols = x2.shape
    out = torch.zeros_like(x2)
    codes = []
    for r in range(rows):
        for g0 in range(0, cols, group_size):
            grp = x2[r, g0:g0 + group_size]
            mags = grp.abs()
            big = mags.max().item()
            if amax_dtype == torch.bfloat16:  # the stored maximum: rounded up to bfloat16
                big = float(torch.tensor(big, dtype=torch.float32).view(torch.int32).add(0xFFFF)
                            .bitwise_and(~0xFFFF).view(torch.float32))
            nz = mags[mags > 0]
            if big == 0:
                codes.append(None)
                continue
            small = nz.min().item()
            if big == small:
                k = K_CODE_MAX / 16
            else:
                k = min(max(math.floor(16 * math.log2(target_range(fmt)) / math.log2(big / small)), 1), 255) / 16
            codes.append(round(k * 16))
            c = math.sqrt(big) * math.sqrt(small)
            s = (big / c) ** k / fmt.max
            q = fmt.round(torch.sign(grp) * (mags / c) ** k / s)
            out[r, g0:g0 + group_size] = torch.sign(q) * c * (q.abs() * s) ** (1 / k)
    return out.reshape(x.shape), codes


def relative_error_bound(x, q_data, k_code, fmt, group_size=128):
    """|x_hat/x - 1| <= max((1+e)^(1/k) - 1, 1 - (1-e)^(1/k)), e = relative rounding error of y in [fmax/R, fmax]."""
    y_min = fmt.max / target_range(fmt)
    e_normal = 2.0 ** -(fmt.man_bits + 1)
    e_sub = fmt.min_subnormal / 2 / y_min  # below min_normal: half a subnormal step, y >= fmax / R
    e = max(e_normal, e_sub)
    k = k_code.double().repeat_interleave(group_size, dim=-1)[..., : (x.shape[-1] if x.dim() else 1)] / 16
    k = k.reshape(x.shape)
    return torch.maximum((1 + e) ** (1 / k) - 1, 1 - (1 - e) ** (1 / k))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_coat_formulas(fmt, shape):
    torch.manual_seed(hash(shape) % 1000)
    x = torch.randn(shape) * torch.exp(torch.randn(shape))
    q = dre_quantize(x, fmt, amax_dtype=torch.float32)
    assert q.data.dtype == fmt.torch_dtype and q.data.shape == x.shape
    assert q.amax.shape == metadata_shape(x.shape) == q.k_code.shape
    ref, codes = float64_reference(x, fmt)
    ours = [int(c) for c in q.k_code.flatten()]
    assert ours == [c if c is not None else K_CODE_MAX for c in codes]
    got = dre_dequantize(*q, fmt).double()
    # float32 vs float64 can put a value on the other side of a rounding midpoint: allow one FP8 step
    bound = relative_error_bound(x, q.data, q.k_code, fmt) * 2 + 1e-6
    assert ((got - ref).abs() <= bound * ref.abs().clamp_min(1e-30) + 1e-30).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("amax_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_error_bound(fmt, amax_dtype):
    torch.manual_seed(1)
    x = torch.randn(64, 384) * torch.exp(1.5 * torch.randn(64, 384))
    q = dre_quantize(x, fmt, amax_dtype=amax_dtype)
    got = dre_dequantize(*q, fmt).double()
    rel = (got / x.double() - 1).abs()
    bound = relative_error_bound(x, q.data, q.k_code, fmt)
    assert (rel <= bound * (1 + 1e-4) + 2e-6).all(), (rel - bound).max()


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_dre_beats_plain_on_moderate_range(fmt):
    """Groups spanning ~1e2 (like Adam's first moment): DRE is several times more accurate than absmax scaling."""
    torch.manual_seed(2)
    x = torch.randn(128, 1024)
    dre = dre_dequantize(*dre_quantize(x, fmt), fmt)
    plain = quantize(x, fmt, "1x128").dequantize()
    assert (plain - x).norm() > 1.5 * (dre - x).norm()


def test_all_zero_groups():
    x = torch.zeros(3, 200)
    x[1, 150] = 2.0  # one non-zero element in the second group of row 1
    q = dre_quantize(x)
    out = dre_dequantize(*q)
    assert torch.equal(out, x)
    assert q.amax[0].eq(0).all() and q.amax[1, 0] == 0 and q.amax[1, 1] == 2.0


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_constant_groups_round_trip(fmt):
    x = torch.full((2, 256), -0.3)
    q = dre_quantize(x, fmt, amax_dtype=torch.float32)
    assert (q.k_code == K_CODE_MAX).all()
    assert torch.equal(dre_dequantize(*q, fmt), x)
    # with bfloat16 metadata the stored maximum is rounded up, so the values are within the bound instead
    qb = dre_quantize(x, fmt, amax_dtype=torch.bfloat16)
    rel = (dre_dequantize(*qb, fmt) / x - 1).abs()
    assert rel.max() < 2.0 ** -(fmt.man_bits + 1) / (K_CODE_MAX / 16) * 1.1


def test_zero_first_element_does_not_collapse_k():
    """COAT's reduction lets a zero in lane 0 into the minimum (k -> 1/8); zeros must not count."""
    torch.manual_seed(3)
    x = torch.rand(4, 128) + 0.5  # range < 3: k is large
    with_zero = x.clone()
    with_zero[:, 0] = 0.0
    k_plain = dre_quantize(x[:, 1:]).k_code
    k_zero = dre_quantize(with_zero).k_code
    assert torch.equal(k_plain, k_zero)
    assert (k_zero.float() / 16 > 8).all()
    out = dre_dequantize(*dre_quantize(with_zero))
    assert (out[:, 0] == 0).all()


def test_exponent_bounds():
    # a nearly flat group asks for an enormous k: clamped to 255/16
    assert expansion_exponent(torch.tensor([1.0001]), torch.tensor([1.0])).item() == K_CODE_MAX
    # a group spanning the whole float32 range (subnormals included) gets the smallest k, and stays finite
    x = torch.tensor([[1e-45, 1e38, -3e-20, 5.0]])
    q = dre_quantize(x)
    assert q.k_code.item() == K_CODE_MIN
    out = dre_dequantize(*q)
    assert torch.isfinite(out).all() and out[0, 1] == pytest.approx(1e38, rel=0.05)
    # COAT's examples: ratio 10 -> k 5, ratio 1e3 -> 1.625, ratio 1e5 -> 1.0
    codes = expansion_exponent(torch.tensor([10.0, 1e3, 1e5]), torch.tensor([1.0, 1.0, 1.0]))
    assert codes.tolist() == [80, 26, 16]


def test_groups_follow_rows_and_last_dim():
    torch.manual_seed(4)
    x = torch.randn(3, 130)
    q = dre_quantize(x)
    assert q.amax.shape == (3, 2)
    y = x.clone()
    y[1] *= 1000  # another row: other rows' metadata and codes must not move
    qy = dre_quantize(y)
    assert torch.equal(q.data[0].float(), qy.data[0].float()) and torch.equal(q.amax[2], qy.amax[2])
    # the 2-element tail group of each row is its own group
    assert torch.equal(q.amax[:, 1].float(), x[:, 128:].abs().amax(-1).to(torch.bfloat16).float()) or \
        (q.amax[:, 1].float() >= x[:, 128:].abs().amax(-1)).all()


def test_nan_input_raises():
    with pytest.raises(ValueError, match="NaN or inf"):
        dre_quantize(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="e4m3"):
        dre_quantize(torch.ones(3), "int8")


def test_metadata_bytes_per_group():
    for amax_dtype, nbytes in ((torch.float32, 5), (torch.bfloat16, 3)):
        q = dre_quantize(torch.randn(16, 1024), amax_dtype=amax_dtype)
        meta = q.amax.numel() * q.amax.element_size() + q.k_code.numel() * q.k_code.element_size()
        assert meta == nbytes * 16 * 8 and q.k_code.dtype == torch.uint8 and q.amax.dtype == amax_dtype


finite_floats = st.floats(allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=150, deadline=None)
@given(st.lists(finite_floats, min_size=1, max_size=300), st.sampled_from(FORMATS),
       st.sampled_from([torch.float32, torch.bfloat16]))
def test_properties(values, fmt, amax_dtype):
    x = torch.tensor(values, dtype=torch.float32)
    q = dre_quantize(x, fmt, amax_dtype=amax_dtype)
    out = dre_dequantize(*q, fmt)
    assert torch.isfinite(out).all()
    assert ((out == 0) | (torch.sign(out) == torch.sign(x))).all()  # signs survive (or flush to zero)
    assert (out.abs() <= q.amax.float().repeat_interleave(128)[: x.numel()] * (1 + 1e-6)).all()
    # monotone within a group: the code is a monotone map of the value
    for g0 in range(0, x.numel(), 128):
        xs, os_ = x[g0:g0 + 128], out[g0:g0 + 128]
        order = torch.argsort(xs)
        assert (torch.diff(os_[order]) >= 0).all()
    # the group maximum comes back within one rounding of the expanded value
    k = q.k_code.float() / 16
    for gi, g0 in enumerate(range(0, x.numel(), 128)):
        xs = x[g0:g0 + 128].double()
        i = int(xs.abs().argmax())
        # below float32's (and bfloat16's) smallest normal the amax itself has fewer mantissa bits (a bf16
        # subnormal amax is 2**-133 apart), so "one rounding" holds for normal group maxima only
        if abs(xs[i]) >= torch.finfo(torch.float32).tiny:
            e = 2.0 ** -(fmt.man_bits + 1)
            bound = max((1 + e) ** (1 / k[gi].item()) - 1, 1 - (1 - e) ** (1 / k[gi].item()))
            assert abs(out[g0 + i].item() / xs[i].item() - 1) <= bound + 1e-5
