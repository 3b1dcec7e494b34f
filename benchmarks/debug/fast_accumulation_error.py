"""What ``_scaled_mm(use_fast_accum=True)`` costs in accuracy and gains in speed, per GEMM shape (GPU aid).

The FP8 operands are exact, so their float64 product is the exact answer: any deviation of the GEMM's fp32 output
is the accumulation's.  Shapes: the input-gradient GEMMs dX = dY W (E5M2 x E4M3; K = a layer's output width) and
forward GEMMs (E4M3 x E4M3) of the 953M model and of Llama-2-7B, and one weight-gradient shape (K = tokens) for
comparison.  Gradient-like operands: heavy-tailed values scaled to the formats' ranges.

    python benchmarks/debug/fast_accumulation_error.py --tokens 8192
"""

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/: the shared GPU helpers
from gpu.quant import back_to_back_ms  # noqa: E402

DEVICE = "cuda"


def fp8(shape, dtype):
    """Heavy-tailed values (Student-t, 3 degrees of freedom) cast to ``dtype`` at a scale that fills its range."""
    t = torch.distributions.StudentT(3.0).sample(shape).to(DEVICE)
    t = t / t.abs().max() * torch.finfo(dtype).max / 2
    return t.to(dtype)


def errors(a, b):
    one = torch.ones((), device=DEVICE)
    exact = (a.double() @ b.double())
    out = {}
    for fast in (False, True):
        got = torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast).double()
        diff = (got - exact).abs()
        scale = exact.abs()
        # relative to each output's magnitude (outputs near 0 skipped) and to the output's rms
        big = scale > scale.mean()
        out[fast] = {"max_rel": float((diff[big] / scale[big]).max()),
                     "rms_rel": float(diff.pow(2).mean().sqrt() / exact.pow(2).mean().sqrt()),
                     "ms": back_to_back_ms(lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one,
                                                                     out_dtype=torch.bfloat16, use_fast_accum=fast),
                                           20)}
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    torch.manual_seed(0)
    m = args.tokens
    e4m3, e5m2 = torch.float8_e4m3fn, torch.float8_e5m2
    shapes = [  # (name, M, K, N, a dtype)
        ("953M dgrad q/k/v/o/down (K 2048)", m, 2048, 2048, e5m2),
        ("953M dgrad gate/up (K 5632)", m, 5632, 2048, e5m2),
        ("7B dgrad q/k/v/o/down (K 4096)", m, 4096, 4096, e5m2),
        ("7B dgrad gate/up (K 11008)", m, 11008, 4096, e5m2),
        ("7B forward down (K 11008)", m, 11008, 4096, e4m3),
        ("953M wgrad gate (K = tokens)", 5632, m, 2048, e5m2),
    ]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, M/K tokens {m}")
    print(f"{'GEMM':36} {'max rel fp32':>13} {'max rel fast':>13} {'rms rel fp32':>13} {'rms rel fast':>13} "
          f"{'ms fp32':>8} {'ms fast':>8} {'speedup':>8}")
    for name, rows, k, n, a_dtype in shapes:
        a = fp8((rows, k), a_dtype)
        b = fp8((n, k), e4m3).t()  # column-major second operand
        r = errors(a, b)
        print(f"{name:36} {r[False]['max_rel']:13.2e} {r[True]['max_rel']:13.2e} {r[False]['rms_rel']:13.2e} "
              f"{r[True]['rms_rel']:13.2e} {r[False]['ms']:8.3f} {r[True]['ms']:8.3f} "
              f"{r[False]['ms'] / r[True]['ms']:8.3f}")


if __name__ == "__main__":
    main()
