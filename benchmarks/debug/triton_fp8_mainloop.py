"""How fast can a plain Triton FP8 GEMM go on this GPU?  A diagnostic for the fused gated GEMMs.

    python benchmarks/debug/triton_fp8_mainloop.py

A TMA-fed FP8 GEMM (``C = A B^T``, bf16 output, nothing else in the epilogue) at the 953M MLP's gate+up shape,
per tile and accumulation mode, against torch._scaled_mm on the same operands.  If this mainloop alone is far
from cuBLAS, no epilogue fusion can win; if it is close, the fused kernels' epilogue is what costs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing
from triton.tools.tensor_descriptor import TensorDescriptor


@triton.jit
def _gemm_kernel(a_desc, b_desc, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 GROUP_M: tl.constexpr, FAST_ACC: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(tl.cdiv(M, BM) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = a_desc.load([pid_m * BM, k * BK])
        b = b_desc.load([pid_n * BN, k * BK])
        if FAST_ACC:
            acc = tl.dot(a, b.T, acc)
        else:
            acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=BK)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(tl.bfloat16),
             mask=(rows < M)[:, None] & (cols < N)[None, :])


def gemm(a, b, tile, fast_acc):
    bm, bn, bk, stages, warps = tile
    M, N = a.shape[0], b.shape[0]
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _gemm_kernel[grid](TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk]), c,
                       M, N, a.shape[1], BM=bm, BN=bn, BK=bk, GROUP_M=8, FAST_ACC=fast_acc, num_warps=warps,
                       num_stages=stages)
    return c


def main():
    M, K, N = 8192, 2048, 11264
    a = torch.randn(M, K, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(N, K, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")
    flops = 2 * M * K * N
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for fast in (False, True):
        ms = triton.testing.do_bench(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one,
                                                              out_dtype=torch.bfloat16, use_fast_accum=fast),
                                     return_mode="median")
        print(f"_scaled_mm fast_accum={fast}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s")
    ref = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16).float()
    for tile in ((128, 128, 128, 3, 8), (128, 256, 128, 3, 8), (128, 256, 64, 4, 8), (128, 128, 128, 4, 4),
                 (64, 256, 128, 3, 4)):
        for fast in (False, True):
            try:
                got = gemm(a, b, tile, fast).float()
                err = float(((got - ref).abs() / ref.abs().clamp_min(1)).max())
                ms = triton.testing.do_bench(lambda: gemm(a, b, tile, fast), return_mode="median")
                print(f"triton tile {tile} fast_acc={fast}: {ms:.4f} ms {flops / ms / 1e9:.0f} TFLOP/s "
                      f"max rel err {err:.2e}")
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"triton tile {tile} fast_acc={fast}: failed: {str(error)[:150]}")


if __name__ == "__main__":
    main()
