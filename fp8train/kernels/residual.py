"""Triton residual add: reads residual and x once, writes the sum and (optionally) its E4M3 1x16 copy -- the
tensor the next norm saves for backward -- so nobody re-reads the bf16 sum to quantize it (precision flow).

Reference: :mod:`fp8train.nn.residual`.  The sum is computed in float32 and rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import QuantizedTensor
from . import plans
from .quantize import as_rows, quantize_group_tile
from .launch import cdiv, fast_launch

__all__ = ["residual_add"]


@fast_launch
@triton.jit(do_not_specialize=["M"])
def _residual_add_kernel(r_ptr, stride_r, x_ptr, stride_x, out_ptr, q_ptr, qamax_ptr, M, N,
                         BM: tl.constexpr, BN: tl.constexpr, WRITE_COPY: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    total = (r + x).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64 * N + cols[None, :], total, mask=mask)
    if WRITE_COPY:
        q, amax = quantize_group_tile(total.to(tl.float32), BM, BN, 16, 448.0, True)
        tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        gcols = pid_n * (BN // 16) + tl.arange(0, BN // 16)
        tl.store(qamax_ptr + rows64 * (N // 16) + gcols[None, :], amax.to(qamax_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (gcols < N // 16)[None, :])


def residual_add(residual, x, *, emit_fp8_copy=False):
    """``(sum, copy)`` with ``copy`` the E4M3 1x16 QuantizedTensor of the sum (None unless ``emit_fp8_copy``)."""
    from ..mixed_granularity import NONLINEAR_FORMAT, NONLINEAR_GRANULARITY

    r2, x2 = as_rows(residual), as_rows(x)
    M, N = r2.shape
    dev = x.device
    dtype = torch.promote_types(residual.dtype, x.dtype)
    total = torch.empty(x.shape, dtype=dtype, device=dev)
    if emit_fp8_copy:
        data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
        amax = torch.empty(*x.shape[:-1], N // 16, dtype=torch.bfloat16, device=dev)
    else:
        data = amax = total  # unused
    bm, bn = plans.elementwise_tile(N, "residual")
    grid = (cdiv(M, bm), cdiv(N, bn))
    _residual_add_kernel[grid](r2, r2.stride(0), x2, x2.stride(0), total, data, amax, M, N, BM=bm, BN=bn,
                               WRITE_COPY=emit_fp8_copy, num_warps=plans.warps("residual"))
    copy = None
    if emit_fp8_copy:
        copy = QuantizedTensor(data=data, amax=amax, fmt=NONLINEAR_FORMAT, granularity=NONLINEAR_GRANULARITY,
                               shape=x.shape, dtype=dtype)
    return total, copy
