"""fp8train.formats against torch's float8 casts (bit-for-bit) and against brute-force float64 math."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp8train import formats
from fp8train.formats import E2M1, E3M4, E4M3, E4M3FNUZ, E5M2, E5M2FNUZ, INT4, INT8, Minifloat

NATIVE = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2), (E4M3FNUZ, torch.float8_e4m3fnuz),
          (E5M2FNUZ, torch.float8_e5m2fnuz)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


@pytest.mark.parametrize("fmt,dtype", NATIVE, ids=lambda v: getattr(v, "name", str(v)))
def test_constants_match_torch(fmt, dtype):
    info = torch.finfo(dtype)
    assert fmt.max == info.max
    assert fmt.min_normal == info.tiny
    assert fmt.min_subnormal == info.smallest_normal * 2.0 ** -fmt.man_bits or fmt.min_subnormal == 2.0 ** (fmt.emin - fmt.man_bits)
    assert E4M3.max == 448 and E5M2.max == 57344


@pytest.mark.parametrize("fmt,dtype", NATIVE, ids=lambda v: getattr(v, "name", str(v)))
def test_all_256_codes_round_to_themselves(fmt, dtype):
    codes = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = torch.isfinite(codes)
    assert torch.equal(bits(fmt.round(codes[finite])), bits(codes[finite]))
    positives = torch.unique(codes[finite & (codes >= 0)]).double()
    assert torch.equal(fmt.values(), positives)


@pytest.mark.parametrize("fmt,dtype", NATIVE, ids=lambda v: getattr(v, "name", str(v)))
def test_midpoints_and_neighbours_match_torch_cast(fmt, dtype):
    vals = fmt.values()
    mids = (vals[1:] + vals[:-1]) / 2  # exact in float64 and float32 (few mantissa bits)
    x = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 4)])
    x = torch.cat([x, -x]).float()
    ours = fmt.round(x)
    theirs = x.to(dtype).float()
    assert torch.equal(bits(ours), bits(theirs))
    # ties go to the even code: the midpoint between codes 2k and 2k+1 rounds down to 2k
    tie = fmt.round(mids.float())
    even = vals[:-1][::2].float()
    assert torch.equal(tie[::2], even)


@pytest.mark.parametrize("fmt,dtype", NATIVE, ids=lambda v: getattr(v, "name", str(v)))
def test_random_values_across_30_binades_match_torch(fmt, dtype):
    gen = torch.Generator().manual_seed(0)
    top = math.floor(math.log2(fmt.max))
    exps = torch.randint(top - 29, top + 1, (200_000,), generator=gen)
    x = torch.ldexp(1 + torch.rand(200_000, generator=gen), exps)
    x = x * torch.where(torch.rand(200_000, generator=gen) < 0.5, -1.0, 1.0)
    x = x[x.abs() <= fmt.max]
    assert torch.equal(bits(fmt.round(x)), bits(x.to(dtype).float()))
    # bf16 inputs too (bf16 -> float8 rounding goes through the same values)
    xb = x.bfloat16()
    assert torch.equal(fmt.round(xb).float(), xb.to(dtype).float())


def test_subnormals_match_torch():
    for fmt, dtype in NATIVE:
        x = torch.linspace(0, 2 * fmt.min_normal, 4097)
        assert torch.equal(bits(fmt.round(x)), bits(x.to(dtype).float())), fmt.name


def test_out_of_range_and_nonfinite_behaviour():
    x = torch.tensor([449.0, 464.0, 1e9, -1e9, math.inf, -math.inf, math.nan])
    r = E4M3.round(x)
    assert r[:4].tolist() == [448.0, 448.0, 448.0, -448.0]
    assert r[4].item() == 448.0 and r[5].item() == -448.0  # no inf in E4M3FN: saturating
    assert math.isnan(r[6].item())
    y = torch.tensor([57344.0, 61439.0, 61440.0, 1e9, math.inf, math.nan])
    ry = E5M2.round(y)
    assert ry[:2].tolist() == [57344.0, 57344.0]
    assert math.isinf(ry[2].item()) and math.isinf(ry[3].item()) and math.isinf(ry[4].item())
    assert math.isnan(ry[5].item())
    sat = Minifloat(5, 2, overflow="saturate")
    assert sat.round(torch.tensor([1e9])).item() == 57344.0
    assert E4M3.to_storage(torch.tensor([1e6])).float().item() == 448.0
    assert E5M2.to_storage(torch.tensor([1e6])).float().item() == 57344.0


def brute_force_round(fmt: Minifloat, x: torch.Tensor) -> torch.Tensor:
    """Nearest value by exhaustive search in float64; ties to the even code (even index in values())."""
    vals = fmt.values()
    mag = x.double().abs().clamp(max=fmt.max)
    dist = (mag[:, None] - vals[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    candidates = (dist == best)
    # among tied candidates prefer the even code (mantissa LSB 0); mantissa code = v / quantum(v) mod 2^m
    odd = torch.remainder(vals / fmt.quantum(vals), 2)
    score = candidates.double() * (2.0 - odd)[None, :]
    pick = score.argmax(dim=1)
    return torch.copysign(vals[pick], x.double())


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E3M4, E2M1, formats.E3M2, formats.E2M3, Minifloat(3, 3), Minifloat(4, 2, variant="fnuz"),
                                 Minifloat(5, 3, bias=11), Minifloat(4, 3, variant="fn", subnormals=False)],
                         ids=lambda f: f.name + ("-nosub" if not f.subnormals else "") + f"-b{f.bias}")
def test_round_equals_brute_force(fmt):
    gen = torch.Generator().manual_seed(1)
    vals = fmt.values()
    mids = (vals[1:] + vals[:-1]) / 2
    rand = (torch.rand(20000, generator=gen, dtype=torch.float64) * 2 - 1) * fmt.max * 1.02
    logs = torch.ldexp(torch.ones(5000, dtype=torch.float64),
                       torch.randint(fmt.emin - fmt.man_bits - 2, fmt.emax + 1, (5000,), generator=gen))
    x = torch.cat([rand, logs * (1 + torch.rand(5000, generator=gen, dtype=torch.float64)), mids, -mids, vals])
    x = x[x.abs() <= fmt.max]
    if not fmt.subnormals:
        x = x[(x.abs() >= fmt.min_normal) | (x.abs() <= fmt.min_normal / 2 * 0.999) | (x == 0)]
        x = x[x.abs() != fmt.min_normal / 2]
    assert torch.equal(fmt.round(x), brute_force_round(fmt, x))


def test_e2m1_value_set():
    assert E2M1.values().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert E2M1.max == 6.0 and E2M1.min_subnormal == 0.5


@settings(max_examples=60, deadline=None)
@given(exp_bits=st.integers(2, 8), man_bits=st.integers(1, 7), variant=st.sampled_from(["ieee", "fn", "fnuz"]),
       data=st.lists(st.floats(-1e6, 1e6, allow_nan=False, width=32), min_size=1, max_size=64))
def test_round_properties_any_format(exp_bits, man_bits, variant, data):
    fmt = Minifloat(exp_bits, man_bits, variant=variant, overflow="saturate")
    x = torch.tensor(data, dtype=torch.float64)
    r = fmt.round(x)
    assert torch.equal(fmt.round(r), r)  # idempotent: results are format values
    xs, order = torch.sort(x)
    assert bool((torch.diff(r[order]) >= 0).all())  # monotone
    inside = x.abs() <= fmt.max
    half_step = fmt.quantum(x) / 2
    assert bool(((r - x).abs()[inside] <= half_step[inside]).all())  # within half a step
    assert bool((r.abs() <= fmt.max).all())


def test_int_formats():
    x = torch.tensor([-200.0, -127.4, -0.5, 0.5, 1.5, 2.5, 126.6, 300.0])
    assert INT8.round(x).tolist() == [-127.0, -127.0, -0.0, 0.0, 2.0, 2.0, 127.0, 127.0]
    assert INT4.max == 7 and INT4.round(torch.tensor([9.0, -9.0])).tolist() == [7.0, -7.0]
    assert INT8.to_storage(x).dtype == torch.int8


def test_parse_format_and_errors():
    assert formats.parse_format("e4m3") is E4M3 and formats.parse_format("INT4") is INT4
    assert formats.parse_format("e6m2").max == Minifloat(6, 2).max
    with pytest.raises(ValueError, match="unknown number format"):
        formats.parse_format("e4m3x")
    with pytest.raises(ValueError, match="no infinities"):
        Minifloat(4, 3, variant="fn", overflow="inf")
    with pytest.raises(TypeError):
        E4M3.round(torch.tensor([1, 2]))
