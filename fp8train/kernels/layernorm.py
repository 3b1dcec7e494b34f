"""Triton LayerNorm over the last dim (optional weight / bias): forward writes y (or per-tensor FP8 y) and the
E4M3 1x16 copy of the *centred* input in one read of x; backward reads that copy, rstd and dy once.

Reference: :mod:`fp8train.nn.layernorm`.  Same structure as :mod:`fp8train.kernels.rmsnorm` (BM whole rows per
program, runtime row count; quantize_output in two passes, the second recomputing y from x, mean and rstd).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import PER_TENSOR, QuantizedTensor
from . import plans
from .quantize import (E4M3_MAX, amax_and_scale, as_rows, encode_multiplier, load_group_copy, quantize_group_tile,
                       row_major_tile, shared_amax, store_tensorwise, tile_amax_bits, transposes_aligned)
from .rmsnorm import _backward_row_plan, _row_plan
from .launch import cdiv, fast_launch

__all__ = ["layernorm_forward", "layernorm_backward"]



@triton.jit
def _affine(n, w, b, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    y = n
    if HAS_W:
        y = y * w[None, :]
    if HAS_B:
        y = y + b[None, :]
    return y


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _layernorm_fwd_kernel(x_ptr, stride_x, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, q_ptr, qamax_ptr, partials_ptr,
                          M, num_programs, iters, eps,
                          N: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_AMAX: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else tl.zeros((BLOCK_N,), tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_B else tl.zeros((BLOCK_N,), tl.float32)
    gcols = tl.arange(0, BLOCK_N // 16)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        rows = (pid + i * num_programs) * BM + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N
        centered = tl.where(mask, x - mean[:, None], 0.0)
        rstd = tl.math.rsqrt(tl.sum(centered * centered, axis=1) / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        y = _affine(centered * rstd[:, None], w, b, HAS_W, HAS_B).to(y_ptr.dtype.element_ty)
        if WRITE_Y:
            tl.store(y_ptr + rows64 * N + cols[None, :], y, mask=mask)
        if WRITE_AMAX:
            tl.store(mean_ptr + rows, mean, mask=rmask)
            acc = tl.maximum(acc, tile_amax_bits(tl.where(mask, y.to(tl.float32), 0.0)))
        # the saved copy is made from the centred values rounded to x's dtype (as the reference does)
        c_rounded = centered.to(x_ptr.dtype.element_ty).to(tl.float32)
        q, amax = quantize_group_tile(c_rounded, BM, BLOCK_N, 16, 448.0, True)
        tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(qamax_ptr + rows64 * (N // 16) + gcols[None, :], amax.to(qamax_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (gcols < N // 16)[None, :])
    if WRITE_AMAX:
        tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _layernorm_apply_kernel(x_ptr, stride_x, w_ptr, b_ptr, mean_ptr, rstd_ptr, partials_ptr, num_partials,
                            amax_out_ptr, q_ptr, q_t_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                            BLOCK_P: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                            WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr):
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, E4M3_MAX)
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    rmask = rows < M
    cmask = cols < N
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else tl.zeros((BN,), tl.float32)
    b = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_B else tl.zeros((BN,), tl.float32)
    centered = x.to(tl.float32) - mean[:, None]
    y = _affine(centered * rstd[:, None], w, b, HAS_W, HAS_B).to(x_ptr.dtype.element_ty).to(tl.float32)
    store_tensorwise(y, encode_multiplier(amax, E4M3_MAX), rows, cols, M, N, q_ptr, N, q_t_ptr,
                     WRITE_ROW, WRITE_T, E4M3_MAX, T_ALIGNED)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _layernorm_bwd_kernel(dy_ptr, stride_dy, q_ptr, qamax_ptr, rstd_ptr, w_ptr, dx_ptr, dw_partial_ptr,
                          db_partial_ptr, M, num_programs, iters,
                          N: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, HAS_W: tl.constexpr,
                          HAS_B: tl.constexpr, GATHER: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    gcols = tl.arange(0, BLOCK_N // 16)
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32) if HAS_W else tl.zeros((BLOCK_N,), tl.float32)
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    db_acc = tl.zeros((BLOCK_N,), tl.float32)
    for i in range(0, iters):
        rows = (pid + i * num_programs) * BM + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        n = load_group_copy(q_ptr, qamax_ptr, rows, cols, gcols, M, N, BM, BLOCK_N, GATHER) * rstd[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = dy * w[None, :]
            dw_acc += tl.sum(dy * n, axis=0)
        else:
            g = dy
        if HAS_B:
            db_acc += tl.sum(dy, axis=0)
        mean_g = tl.sum(g, axis=1) / N
        mean_gn = tl.sum(g * n, axis=1) / N
        dx = rstd[:, None] * (g - mean_g[:, None] - n * mean_gn[:, None])
        tl.store(dx_ptr + rows64 * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_W:
        tl.store(dw_partial_ptr + pid * N + cols, dw_acc, mask=cmask)
    if HAS_B:
        tl.store(db_partial_ptr + pid * N + cols, db_acc, mask=cmask)


def layernorm_forward(x, weight, bias, eps, *, quantize_output=False, output_transpose=False):
    """``(y, rstd, centred_copy)`` -- y a tensor in x's dtype, or the per-tensor E4M3 QuantizedTensor
    (``(q, data_t)`` with ``output_transpose``)."""
    from ..mixed_granularity import LINEAR_FORMAT, NONLINEAR_FORMAT, NONLINEAR_GRANULARITY

    x2 = as_rows(x)
    M, N = x2.shape
    dev = x.device
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=dev)
    copy_data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    copy_amax = torch.empty(*x.shape[:-1], N // 16, dtype=torch.bfloat16, device=dev)
    block_n, bm, warps = _row_plan(M, N)
    row_blocks = cdiv(M, bm)
    w = weight if weight is not None else rstd
    b = bias if bias is not None else rstd
    if quantize_output:
        nprog = max(1, min(row_blocks, plans.partials_capacity(x, "norm")))
        partials = torch.empty(nprog, dtype=torch.int32, device=dev)
        mean = torch.empty(M, dtype=torch.float32, device=dev)
        y = torch.empty(1, dtype=x.dtype, device=dev)  # only its dtype is used
    else:
        nprog, partials, mean = row_blocks, rstd, rstd
        y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    iters = cdiv(row_blocks, nprog)
    _layernorm_fwd_kernel[(nprog,)](x2, x2.stride(0), w, b, y, mean, rstd, copy_data, copy_amax, partials,
                                    M, nprog, iters, float(eps), N=N, BLOCK_N=block_n, BM=bm,
                                    HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Y=not quantize_output,
                                    WRITE_AMAX=quantize_output, num_warps=warps)
    copy = QuantizedTensor(data=copy_data, amax=copy_amax, fmt=NONLINEAR_FORMAT, granularity=NONLINEAR_GRANULARITY,
                           shape=x.shape, dtype=x.dtype)
    if not quantize_output:
        return y, rstd, copy
    amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
    data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else amax
    bm2, bn2 = plans.elementwise_tile(N, "norm", output_transpose)
    tiles = cdiv(M, bm2) * cdiv(N, bn2)
    _layernorm_apply_kernel[(tiles,)](x2, x2.stride(0), w, b, mean, rstd, partials, nprog, amax, data,
                                      data_t, M, N, BM=bm2, BN=bn2,
                                      BLOCK_P=plans.partials_block(x2, "norm"), HAS_W=weight is not None,
                                      HAS_B=bias is not None, WRITE_ROW=True, WRITE_T=output_transpose,
                                      T_ALIGNED=transposes_aligned(M),
                                      num_warps=plans.warps("norm", output_transpose))
    q = QuantizedTensor(data=data, amax=amax_view, scale_hint=scale_view, fmt=LINEAR_FORMAT, granularity=PER_TENSOR,
                        shape=x.shape, dtype=x.dtype)
    return ((q, data_t) if output_transpose else q), rstd, copy


def layernorm_backward(dy, centered: QuantizedTensor, rstd, weight, has_bias):
    """``(dx, dweight, dbias)`` (float32 partial sums reduced with torch; None where absent)."""
    dy2 = as_rows(dy)
    M, N = dy2.shape
    dev = dy.device
    dx = torch.empty(centered.shape, dtype=centered.dtype, device=dev)
    block_n, bm, warps, nprog, iters = _backward_row_plan(dy, M, N)
    dw_partial = torch.empty(nprog, N, dtype=torch.float32, device=dev) if weight is not None else rstd
    db_partial = torch.empty(nprog, N, dtype=torch.float32, device=dev) if has_bias else rstd
    _layernorm_bwd_kernel[(nprog,)](dy2, dy2.stride(0), centered.data, centered.amax, rstd,
                                    weight if weight is not None else rstd, dx, dw_partial, db_partial,
                                    M, nprog, iters, N=N, BLOCK_N=block_n, BM=bm, HAS_W=weight is not None,
                                    HAS_B=has_bias, GATHER=plans.plan("norm").gather_scales, num_warps=warps)
    out_dtype = weight.dtype if weight is not None else centered.dtype
    dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db_partial.sum(0).to(out_dtype) if has_bias else None
    return dx, dweight, dbias
