"""The stability lab's Triton rounding kernel against the torch path, under the Triton CPU interpreter.

The kernel uses no float8 casts (integer and float32 arithmetic only), so the interpreter's results are exact
for float32 and float16 tensors; for bfloat16 the interpreter truncates stores (compared to within one bf16
step) and flushes subnormal inputs to zero on load (those elements are not compared).  GPU numerics are checked by benchmarks/gpu/lab.py.
"""

from __future__ import annotations

import os

import pytest

from triton_interpreter import run_under_interpreter

def test_simulate_kernel_matches_torch_path_under_interpreter():
    pytest.importorskip("triton")
    run_under_interpreter(__file__, marker="simulate: ok")


def _check() -> None:
    import torch

    from fp8train.formats import E4M3FNUZ
    from fp8train.kernels.simulate import simulate_round
    from fp8train.lab.simulated_linear import parse_simulated_format, simulate_quantize
    from fp8train.quant import Granularity, group_amax

    gen = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e30, -1e30, 2.0**-140, -(2.0**-130), 1.0,
                             0.75, 3.0, -6.5, 7.0, 2.0**-9, 1.5 * 2.0**-9, 2.5 * 2.0**-9])
    for shape in ((5, 48), (3, 7, 40), (1, 16)):
        base = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-30, 20, shape, generator=gen).float())
        base.view(-1)[: min(base.numel(), specials.numel())] = specials[: base.numel()]
        for spec in ("e3m4", "e2m1", "e5m2", "e4m3", "bf16", "e8m3", "e5m7"):
            fmt = parse_simulated_format(spec)
            for fmt_ in ((fmt, E4M3FNUZ) if spec == "e4m3" else (fmt,)):
                for scaling in ("none", "tensor", "1x16", "1x32"):
                    for dtype in (torch.float32, torch.float16, torch.bfloat16):
                        x = base.to(dtype)
                        if scaling != "none":
                            x = torch.where(x.isfinite(), x, torch.zeros_like(x))  # keep the scales finite
                        g = None if scaling == "none" else Granularity.parse(scaling)
                        amax = None if g is None else group_amax(x, g)
                        got = simulate_round(x, fmt_, amax, group=g.size if g is not None and g.kind == "group" else 0)
                        ref = simulate_quantize(x, fmt_, scaling)
                        assert got.dtype == ref.dtype and got.shape == ref.shape
                        a, b = got.float(), ref.float()
                        same = (a == b) | (a.isnan() & b.isnan())
                        if dtype == torch.bfloat16:  # the interpreter flushes bf16 subnormals to zero on load
                            same |= (x.float().abs() < 2.0**-126) & (a == 0)
                        if dtype == torch.bfloat16 and scaling != "none":
                            # the interpreter truncates float32 -> bf16 stores: one bf16 step at most
                            step = torch.ldexp(torch.ones_like(b), torch.frexp(b.abs())[1] - 8)
                            same |= (a - b).abs() <= step
                        assert bool(same.all()), (spec, fmt_.name, scaling, dtype, a[~same][:5], b[~same][:5])
                        assert torch.equal(a.signbit() | a.isnan(), b.signbit() | b.isnan()) or fmt_.variant == "fnuz"
    # NaN in a scaled tensor poisons its group (like the torch path), inf stays inf
    x = torch.randn(2, 32, generator=gen)
    x[0, 3] = float("nan")
    x[1, 20] = float("inf")
    amax = group_amax(x, Granularity.parse("1x16"))
    got = simulate_round(x, parse_simulated_format("e3m4"), amax, group=16)
    ref = simulate_quantize(x, "e3m4", "1x16")
    assert torch.equal(got.isnan(), ref.isnan()) and got[1, 20] == float("inf")
    assert bool(got[0, :16].isnan().all()) and bool(got[0, 16:].isfinite().all())


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from triton_interpreter import patch_interpreter

    patch_interpreter()
    _check()
    print("simulate: ok")
