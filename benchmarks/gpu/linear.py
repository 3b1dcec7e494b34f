"""GPU area "linear": FP8Linear on CUDA against the reference numerics, and FP8 GEMM throughput.

Checks (same quantized operands => same GEMM up to fp32 summation order and the bf16 output rounding):
  * FP8Linear forward / dgrad / wgrad on the torch._scaled_mm path vs the fp32 reference path on the same
    GPU (the reference is forced by pretending the GPU has no FP8 tensor cores), for a token count that is
    not a multiple of 16 (exercises the wgrad padding) and with a bias;
  * the same layer run on CPU (reference quantizers + fp32 matmul) vs CUDA (Triton quantizers +
    _scaled_mm): catches quantizer/GEMM layout disagreements between devices;
  * fp8-block recipe (emulated) runs on CUDA and matches its CPU result.
Benchmarks:
  * GEMM only: torch._scaled_mm (E4M3 x E4M3 -> bf16, per-tensor scales, fp32 accumulation) vs bf16
    torch.matmul at 4096^3, 8192^3 and the Llama-2-7B layer shapes (8 x 2048 tokens), in TFLOP/s;
  * the whole FP8Linear forward+backward (quantization included) vs nn.Linear on the 7B MLP shapes.
"""

from __future__ import annotations

import statistics
import time

import torch

from gpu.quant import event_times_ms

TOKENS_7B = 8 * 2048
SHAPES_7B = {  # name: (M, K, N) for y[M, N] = x[M, K] W[N, K]^T
    "7b_qkv": (TOKENS_7B, 4096, 3 * 4096),
    "7b_o": (TOKENS_7B, 4096, 4096),
    "7b_gate_up": (TOKENS_7B, 4096, 11008),
    "7b_down": (TOKENS_7B, 11008, 4096),
}


def _time_ms(fn, warmup=3, iters=10) -> float:
    return statistics.median(event_times_ms(fn, iters, warmup))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _run_layer(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def check_against_reference(report) -> None:
    import fp8train.nn.linear as linear_mod
    from fp8train.nn.linear import FP8Linear

    torch.manual_seed(0)
    tokens, k, n = 4 * 1000 + 7, 4096, 1536  # tokens % 16 != 0: wgrad pads its inner dim
    base = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    layer = FP8Linear.from_linear(base)
    x = (torch.randn(tokens, k, device="cuda") * torch.exp(0.5 * torch.randn(tokens, k, device="cuda"))).bfloat16()
    dy = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)

    fast = _run_layer(layer, x, dy)
    original = linear_mod.fp8_gemm_supported
    linear_mod.fp8_gemm_supported = lambda device: False
    try:
        reference = _run_layer(layer, x, dy)
    finally:
        linear_mod.fp8_gemm_supported = original
    # bf16 outputs round at 2^-9 relative; fp32 sums in a different order differ far less
    for name, a, b in zip(("forward", "dgrad", "wgrad", "bias_grad"), fast, reference):
        err = _rel(a, b)
        report.check(f"linear: _scaled_mm {name} == fp32 reference (same GPU)", err < 4e-3, rel_err=err)

    cpu_layer = FP8Linear.from_linear(torch.nn.Linear(k, n, dtype=torch.bfloat16))
    with torch.no_grad():
        cpu_layer.weight.copy_(base.weight.cpu())
        cpu_layer.bias.copy_(base.bias.cpu())
    rows = 1024  # keep the CPU matmul short
    cpu = _run_layer(cpu_layer, x[:rows].cpu(), dy[:rows].cpu())
    gpu = _run_layer(layer, x[:rows], dy[:rows])
    for name, a, b in zip(("forward", "dgrad", "wgrad"), gpu, cpu):
        err = _rel(a.cpu(), b)
        report.check(f"linear: CUDA {name} == CPU reference", err < 1e-2, rel_err=err)

    exact = x[:rows].float() @ base.weight.float().t() + base.bias.float()
    err = _rel(gpu[0], exact)
    report.check("linear: FP8 forward within E4M3 error of the exact product", err < 2 * 2.0**-4, rel_err=err)

    block = FP8Linear.from_linear(base, recipe="fp8-block")
    cpu_block = FP8Linear.from_linear(cpu_layer, recipe="fp8-block")
    a = _run_layer(block, x[:256], dy[:256])
    b = _run_layer(cpu_block, x[:256].cpu(), dy[:256].cpu())
    err = max(_rel(u.cpu(), v) for u, v in zip(a[:3], b[:3]))
    report.check("linear: fp8-block recipe CUDA == CPU", err < 1e-2, rel_err=err)


def bench_gemm(report) -> None:
    from fp8train.formats import E4M3
    from fp8train.nn.linear import _quantize, _scaled_mm_tensorwise
    from fp8train.quant import PER_TENSOR

    shapes = {"4096^3": (4096, 4096, 4096), "8192^3": (8192, 8192, 8192), **SHAPES_7B}
    for name, (m, k, n) in shapes.items():
        a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        qa, qb = _quantize(a, E4M3, PER_TENSOR).q, _quantize(b, E4M3, PER_TENSOR).q
        flops = 2.0 * m * n * k
        bf16_ms = _time_ms(lambda: torch.matmul(a, b.t()))
        fp8_ms = _time_ms(lambda: _scaled_mm_tensorwise(qa.data, qa.scale, qb.data.t(), qb.scale, torch.bfloat16,
                                                         False))
        fast_ms = _time_ms(lambda: _scaled_mm_tensorwise(qa.data, qa.scale, qb.data.t(), qb.scale, torch.bfloat16,
                                                          True))
        report.add_bench(f"linear: GEMM {name}", m=m, k=k, n=n,
                         bf16_tflops=round(flops / bf16_ms / 1e9, 1), fp8_tflops=round(flops / fp8_ms / 1e9, 1),
                         fp8_fast_accum_tflops=round(flops / fast_ms / 1e9, 1),
                         fp8_speedup=round(bf16_ms / fp8_ms, 2))
        del a, b, qa, qb
    torch.cuda.empty_cache()


def bench_layer_fwd_bwd(report) -> None:
    from fp8train.nn.linear import FP8Linear

    for name in ("7b_gate_up", "7b_down", "7b_o"):
        m, k, n = SHAPES_7B[name]
        base = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
        fp8 = FP8Linear.from_linear(base)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

        def step(layer):
            layer.weight.grad = None
            x.grad = None
            layer(x).backward(dy)

        bf16_ms = _time_ms(lambda: step(base), iters=5)
        fp8_ms = _time_ms(lambda: step(fp8), iters=5)
        flops = 6.0 * m * n * k
        report.add_bench(f"linear: fwd+bwd {name}", bf16_ms=round(bf16_ms, 2), fp8_ms=round(fp8_ms, 2),
                         speedup=round(bf16_ms / fp8_ms, 2), fp8_tflops=round(flops / fp8_ms / 1e9, 1),
                         bf16_tflops=round(flops / bf16_ms / 1e9, 1))
        del base, fp8, x, dy
        torch.cuda.empty_cache()


def run(report) -> None:
    if not torch.cuda.is_available():
        report.check("linear: CUDA available", False, detail="no GPU")
        return
    start = time.time()
    check_against_reference(report)
    from fp8train.nn.linear import fp8_gemm_supported

    if not fp8_gemm_supported(torch.device("cuda")):
        report.check("linear: GPU has FP8 tensor cores (sm89+)", False)
        return
    bench_gemm(report)
    bench_layer_fwd_bwd(report)
    report.add_bench("linear: area seconds", seconds=round(time.time() - start, 1))
