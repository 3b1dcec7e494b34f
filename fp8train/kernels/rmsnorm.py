"""Triton RMSNorm: forward writes y (or per-tensor FP8 y) and the E4M3 1x16 copy of x in one read of x;
backward reads the FP8 copy, rstd and dy once and writes dx plus per-program dweight partial sums.

Reference: :mod:`fp8train.nn.rmsnorm` (same styles, same rounding points).  Each program owns ``BM`` whole rows
(``BLOCK_N`` = next power of two of the hidden size, a compile-time constant; the row count is a runtime
argument, so new batch sizes or sequence lengths never recompile).

quantize_output: pass 1 (this row kernel) also folds max |y| into per-program partial maxima; pass 2
(``_rmsnorm_apply_kernel``, 2-D tiles) recomputes y from x and the saved rstd and writes FP8 y, row-major and/or
transposed, with the global amax -- the two-stage group-scaling amax without a bf16 y round trip.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant import PER_TENSOR, QuantizedTensor
from . import plans
from .launch import cdiv, fast_launch, next_power_of_2
from .quantize import (E4M3_MAX, INV_E4M3_MAX, amax_and_scale, as_rows, encode_multiplier, fold_amax_bits,
                       load_group_copy, quantize_group_tile, row_major_tile, saturate, shared_amax, store_tensorwise,
                       tile_amax_bits, transposes_aligned)

__all__ = ["rmsnorm_forward", "rmsnorm_backward"]

_STYLE_CODE = {"llama": 0, "torch": 1, "gemma": 2}


@triton.jit
def _normed_output(n, w, X_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, STYLE: tl.constexpr, HAS_W: tl.constexpr):
    """y from n = x * rstd (float32) as the reference computes it, rounded to the output dtype, as float32."""
    if HAS_W:
        if STYLE == 0:  # llama: weight * n.to(x.dtype), in the promoted dtype
            y = n.to(X_DTYPE).to(tl.float32) * w[None, :]
        elif STYLE == 1:  # torch: (n * weight).to(x.dtype)
            y = n * w[None, :]
        else:  # gemma: (n * (1 + weight)).to(x.dtype)
            y = n * (1.0 + w[None, :])
    else:
        y = n
    return y.to(Y_DTYPE).to(tl.float32)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _rmsnorm_fwd_kernel(x_ptr, stride_x, w_ptr, y_ptr, rstd_ptr, q_ptr, qamax_ptr, partials_ptr,
                        r_ptr, stride_r, h_ptr, M, num_programs, iters, eps,
                        N: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, STYLE: tl.constexpr,
                        HAS_W: tl.constexpr, WRITE_Y: tl.constexpr, WRITE_COPY: tl.constexpr,
                        WRITE_AMAX: tl.constexpr, ADD_RESIDUAL: tl.constexpr):
    """ADD_RESIDUAL: the norm's input is h = residual + x (rounded to h's dtype), which is written too."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        rows = (pid + i * num_programs) * BM + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if ADD_RESIDUAL:
            r = tl.load(r_ptr + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = (r + x).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + rows64 * N + cols[None, :], h, mask=mask)
            x = h.to(tl.float32)
        # h_ptr is x_ptr itself without ADD_RESIDUAL, so its type is the norm input's dtype either way
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1) / N + eps)
        tl.store(rstd_ptr + rows, rstd, mask=rmask)
        y = _normed_output(x * rstd[:, None], w, h_ptr.dtype.element_ty, y_ptr.dtype.element_ty, STYLE, HAS_W)
        if WRITE_Y:
            tl.store(y_ptr + rows64 * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
        if WRITE_AMAX:
            acc = tl.maximum(acc, tile_amax_bits(tl.where(mask, y, 0.0)))
        if WRITE_COPY:
            q, amax = quantize_group_tile(x, BM, BLOCK_N, 16, 448.0, True)
            tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
            gcols = tl.arange(0, BLOCK_N // 16)
            gmask = rmask[:, None] & (gcols < N // 16)[None, :]
            tl.store(qamax_ptr + rows64 * (N // 16) + gcols[None, :], amax.to(qamax_ptr.dtype.element_ty),
                     mask=gmask)
    if WRITE_AMAX:
        tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _rmsnorm_apply_kernel(x_ptr, stride_x, w_ptr, rstd_ptr, y_dtype_ptr, partials_ptr, num_partials, amax_out_ptr,
                          q_ptr, q_t_ptr, deq_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr, BLOCK_P: tl.constexpr,
                          STYLE: tl.constexpr, HAS_W: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr,
                          WRITE_DEQ: tl.constexpr, T_ALIGNED: tl.constexpr):
    """WRITE_DEQ: also write the FP8 values back in ``deq_ptr``'s dtype, with dequantize_tensorwise's roundings
    (the flow norm returns them as its output tensor: one more write here instead of a pass of its own)."""
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, E4M3_MAX)
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=rows < M, other=0.0)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    else:
        w = tl.zeros((BN,), tl.float32)
    y = _normed_output(x.to(tl.float32) * rstd[:, None], w, x_ptr.dtype.element_ty, y_dtype_ptr.dtype.element_ty,
                       STYLE, HAS_W)
    inv = encode_multiplier(amax, E4M3_MAX)
    store_tensorwise(y, inv, rows, cols, M, N, q_ptr, N, q_t_ptr, WRITE_ROW, WRITE_T, E4M3_MAX, T_ALIGNED)
    if WRITE_DEQ:
        q = saturate(y * inv, E4M3_MAX).to(q_ptr.dtype.element_ty).to(tl.float32)
        tl.store(deq_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                 ((q * INV_E4M3_MAX) * amax).to(deq_ptr.dtype.element_ty), mask=mask)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _rmsnorm_bwd_kernel(dy_ptr, stride_dy, dy2_ptr, stride_dy2, dy3_ptr, stride_dy3, q_ptr, qamax_ptr, rstd_ptr,
                        w_ptr, dx_ptr, dw_partial_ptr, dres_ptr, stride_dres, amax_ptr, M, num_programs, iters,
                        N: tl.constexpr, BLOCK_N: tl.constexpr, BM: tl.constexpr, STYLE: tl.constexpr,
                        HAS_W: tl.constexpr, HAS_RES: tl.constexpr, HAS_DY2: tl.constexpr, HAS_DY3: tl.constexpr,
                        GATHER: tl.constexpr, AMAX: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < N
    gcols = tl.arange(0, BLOCK_N // 16)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        if STYLE == 2:
            w = w + 1.0
    dw_acc = tl.zeros((BLOCK_N,), tl.float32)
    bits = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        rows = (pid + i * num_programs) * BM + tl.arange(0, BM)
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows[:, None].to(tl.int64)
        x_hat = load_group_copy(q_ptr, qamax_ptr, rows, cols, gcols, M, N, BM, BLOCK_N, GATHER)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)
        n = x_hat * rstd[:, None]
        dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DY2:  # a second output gradient (the norm feeds two linears): summed in fp32, never rounded
            dy += tl.load(dy2_ptr + rows64 * stride_dy2 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_DY3:  # a third (q/k/v read one norm output): the same fp32 sum
            dy += tl.load(dy3_ptr + rows64 * stride_dy3 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            g = dy * w[None, :]
            if STYLE == 0:  # forward multiplied the weight with n rounded to x's dtype
                dw_acc += tl.sum(dy * n.to(dx_ptr.dtype.element_ty).to(tl.float32), axis=0)
            else:
                dw_acc += tl.sum(dy * n, axis=0)
        else:
            g = dy
        mean_gn = tl.sum(g * n, axis=1) / N
        dx = rstd[:, None] * (g - n * mean_gn[:, None])
        if HAS_RES:  # gradient arriving through the residual connection, added before the one rounding
            dx += tl.load(dres_ptr + rows64 * stride_dres + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dx = dx.to(dx_ptr.dtype.element_ty)
        tl.store(dx_ptr + rows64 * N + cols[None, :], dx, mask=mask)
        if AMAX:  # max |dx| as stored, for the FP8 linear that quantizes this gradient next (masked lanes: +0)
            bits = tl.maximum(bits, tile_amax_bits(tl.where(mask, dx.to(tl.float32), 0.0)))
    if HAS_W:
        tl.store(dw_partial_ptr + pid * N + cols, dw_acc, mask=cmask)
    if AMAX:
        fold_amax_bits(amax_ptr, bits)


def _row_plan(M: int, N: int, target: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_N, BM, num_warps) for kernels that keep BM whole rows of N in registers."""
    block_n = next_power_of_2(N)
    bm = max(1, min(64, target // block_n))
    warps = min(16, max(4, bm * block_n // 512))
    return block_n, bm, warps


def _backward_row_plan(dy: torch.Tensor, M: int, N: int, plan: Optional[tuple] = None
                       ) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BM, num_warps, programs, row blocks per program) of the norm backward kernels, whose programs
    loop over row blocks and keep per-program weight-gradient partials.

    Default: one row per block, 4 warps (8 from 8K columns up), 16 programs per SM -- on the 953M model's
    case (8192 x 2048, residual gradient, second dy) 2.6x faster than two rows, 8 warps and 8 programs per SM
    (H200, benchmarks/results/2026-11-27-h200-session4-plans-sweep-suite.md); many small programs keep more
    loads in flight.  ``plan`` = (rows per block, warps, programs per SM) overrides it -- a tuning aid
    (benchmarks/gpu/ops.py sweeps it); results change only through fp32 summation order (the row sums' warp
    layout, the dweight partials)."""
    block_n = next_power_of_2(N)
    bm, warps, per_sm = plan if plan is not None else (1, 4 if block_n <= 4096 else 8, 16)
    row_blocks = cdiv(M, bm)
    nprog = max(1, min(row_blocks, per_sm * plans.sm_count(dy)))
    return block_n, bm, warps, nprog, cdiv(row_blocks, nprog)


def rmsnorm_forward(x, weight, eps, style, *, quantize_output=False, output_transpose=False, write_copy=True,
                    residual=None, dequantized_dtype=None):
    """Returns ``(y, rstd, x_copy)``: y as a tensor (promoted dtype for llama style), or the per-tensor E4M3
    QuantizedTensor (``(q, data_t)`` with ``output_transpose``); rstd float32 ``x.shape[:-1]``; x_copy the E4M3
    1x16 QuantizedTensor of x (None when ``write_copy`` is False).

    With ``residual``, the norm's input is ``h = residual + x`` and the result is ``(h, y, rstd, h_copy)``.
    ``dequantized_dtype`` (with ``quantize_output``): also return the FP8 y's values in that dtype, last --
    the bits of ``q.dequantize(dtype)``."""
    from ..mixed_granularity import NONLINEAR_FORMAT, NONLINEAR_GRANULARITY, LINEAR_FORMAT

    x2 = as_rows(x)
    M, N = x2.shape
    dev = x.device
    if residual is not None:
        r2 = as_rows(residual)
        h = torch.empty(x.shape, dtype=torch.promote_types(residual.dtype, x.dtype), device=dev)
        h2 = h.view(-1, N)
    else:
        r2 = h2 = x2
    in_dtype = h2.dtype
    y_dtype = torch.promote_types(weight.dtype, in_dtype) if (style == "llama" and weight is not None) else in_dtype
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=dev)
    copy_data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev) if write_copy else rstd
    copy_amax = torch.empty(*x.shape[:-1], N // 16, dtype=torch.bfloat16, device=dev) if write_copy else rstd
    block_n, bm, warps = _row_plan(M, N)
    row_blocks = cdiv(M, bm)
    w = weight if weight is not None else rstd
    if quantize_output:
        nprog = max(1, min(row_blocks, plans.partials_capacity(x, "norm")))
        partials = torch.empty(nprog, dtype=torch.int32, device=dev)
        y_dummy = torch.empty(1, dtype=y_dtype, device=dev)
        y_arg = y_dummy
    else:
        nprog, partials = row_blocks, rstd
        y = torch.empty(x.shape, dtype=y_dtype, device=dev)
        y_arg = y
    iters = cdiv(row_blocks, nprog)
    _rmsnorm_fwd_kernel[(nprog,)](x2, x2.stride(0), w, y_arg, rstd, copy_data, copy_amax, partials,
                                  r2, r2.stride(0), h2, M, nprog, iters, float(eps), N=N, BLOCK_N=block_n, BM=bm,
                                  STYLE=_STYLE_CODE[style], HAS_W=weight is not None, WRITE_Y=not quantize_output,
                                  WRITE_COPY=write_copy, WRITE_AMAX=quantize_output,
                                  ADD_RESIDUAL=residual is not None, num_warps=warps)
    copy = None
    if write_copy:
        copy = QuantizedTensor(data=copy_data, amax=copy_amax, fmt=NONLINEAR_FORMAT,
                               granularity=NONLINEAR_GRANULARITY, shape=x.shape, dtype=in_dtype)
    lead = (h,) if residual is not None else ()
    if not quantize_output:
        return (*lead, y, rstd, copy)
    x2 = h2  # pass 2 normalises the sum it just wrote
    amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
    data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else amax
    bm2, bn2 = plans.elementwise_tile(N, "norm", output_transpose)
    tiles = cdiv(M, bm2) * cdiv(N, bn2)
    deq = torch.empty(x.shape, dtype=dequantized_dtype, device=dev) if dequantized_dtype is not None else amax
    _rmsnorm_apply_kernel[(tiles,)](x2, x2.stride(0), w, rstd, y_dummy, partials, nprog, amax, data,
                                    data_t, deq, M, N, BM=bm2, BN=bn2,
                                    BLOCK_P=plans.partials_block(x2, "norm"), STYLE=_STYLE_CODE[style],
                                    HAS_W=weight is not None, WRITE_ROW=True, WRITE_T=output_transpose,
                                    WRITE_DEQ=dequantized_dtype is not None,
                                    T_ALIGNED=transposes_aligned(M),
                                    num_warps=plans.warps("norm", output_transpose))
    q = QuantizedTensor(data=data, amax=amax_view, fmt=LINEAR_FORMAT, granularity=PER_TENSOR, shape=x.shape,
                        dtype=y_dtype, scale_hint=scale_view)
    tail = (deq,) if dequantized_dtype is not None else ()
    return (*lead, ((q, data_t) if output_transpose else q), rstd, copy, *tail)


def rmsnorm_backward(dy, x_copy: QuantizedTensor, rstd, weight, style, residual_grad=None, second_dy=None,
                     plan=None, third_dy=None, amax_slot=None):
    """``(dx, dweight)`` from the E4M3 1x16 copy of x (bf16 group amax), rstd and dy (+ ``second_dy``
    + ``third_dy``, summed in fp32) (+ ``residual_grad``, added to dx).  ``amax_slot``: a zeroed int32 slot
    (fp8train.nn.grad_amax.new_slot) that receives the float32 bits of max|dx|."""
    dy2 = as_rows(dy)
    dres = as_rows(residual_grad) if residual_grad is not None else dy2
    dsecond = as_rows(second_dy) if second_dy is not None else dy2
    dthird = as_rows(third_dy) if third_dy is not None else dy2
    M, N = dy2.shape
    dev = dy.device
    dx = torch.empty(x_copy.shape, dtype=x_copy.dtype, device=dev)
    block_n, bm, warps, nprog, iters = _backward_row_plan(dy, M, N, plan)
    dw_partial = torch.empty(nprog, N, dtype=torch.float32, device=dev) if weight is not None else rstd
    _rmsnorm_bwd_kernel[(nprog,)](dy2, dy2.stride(0), dsecond, dsecond.stride(0), dthird, dthird.stride(0),
                                  x_copy.data, x_copy.amax, rstd,
                                  weight if weight is not None else rstd, dx, dw_partial, dres, dres.stride(0),
                                  amax_slot if amax_slot is not None else rstd,
                                  M, nprog, iters, N=N, BLOCK_N=block_n, BM=bm, STYLE=_STYLE_CODE[style],
                                  HAS_W=weight is not None, HAS_RES=residual_grad is not None,
                                  HAS_DY2=second_dy is not None, HAS_DY3=third_dy is not None,
                                  GATHER=plans.plan("norm").gather_scales, AMAX=amax_slot is not None,
                                  num_warps=warps)
    dweight = dw_partial.sum(0).to(weight.dtype) if weight is not None else None
    return dx, dweight
