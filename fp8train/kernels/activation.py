"""Triton SiLU / GELU (erf) / GELU (tanh): forward writes act(x) (or per-tensor FP8 act(x)) and the E4M3 1x16
copy of x from one read of x; backward reads the FP8 copy and dy once and writes dx = dy * act'(x_hat).

Reference: :mod:`fp8train.nn.activation`.  Element-wise 2-D tiles over (rows, hidden); the row count is a
runtime argument.  ``act_value`` / ``act_derivative`` are shared with the gated product kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import PER_TENSOR, QuantizedTensor
from . import plans
from .launch import cdiv, fast_launch
from .quantize import (E4M3_MAX, GPU_SHORTCUTS, amax_and_scale, as_rows, encode_multiplier, load_group_copy, loop_tile,
                       quantize_group_tile, row_major_tile, shared_amax, store_tensorwise, tile_amax_bits,
                       transposes_aligned)

__all__ = ["activation_forward", "activation_backward", "act_value", "act_derivative", "ACT_CODE"]

ACT_CODE = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


# SiLU's and GELU-tanh's sigmoid as two MUFU approximations on the GPU (ex2.approx.ftz, rcp.approx.ftz: ~2 float32
# ulps, far below the bf16 rounding of what the kernels store); tl.sigmoid's exact-range exp and division cost ~14
# instructions per element in kernels that are instruction-bound (benchmarks/debug/sass_census.py).  The
# interpreter has no inline PTX: the CPU tests (and FP8TRAIN_PRECISE_KERNELS=1) run tl.sigmoid.
@triton.jit
def _sigmoid(x):
    if GPU_SHORTCUTS:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -1.4426950408889634],
                                      dtype=tl.float32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32,
                                         is_pure=True, pack=1)
    return tl.sigmoid(x)


@triton.jit
def _tanh(z):
    # tanh via the logistic function (no libdevice dependency); exact limits +-1 for large |z|
    return 2.0 * _sigmoid(2.0 * z) - 1.0


@triton.jit
def act_value(x, ACT: tl.constexpr):
    if ACT == 0:
        return x * _sigmoid(x)
    elif ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    else:
        return 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))


@triton.jit
def act_derivative(x, ACT: tl.constexpr):
    if ACT == 0:
        s = _sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        return (0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
                + x * 0.3989422804014327 * tl.exp(-0.5 * x * x))
    else:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * x * x)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _activation_fwd_kernel(x_ptr, stride_x, y_ptr, q_ptr, qamax_ptr, partials_ptr, M, N, num_programs, iters,
                           BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, WRITE_Y: tl.constexpr,
                           WRITE_AMAX: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        t = pid + i * num_programs
        rows, cols, mask = loop_tile(t, M, N, BM, BN)
        rmask = rows < M
        rows64 = rows[:, None].to(tl.int64)
        x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        y = act_value(x, ACT).to(x_ptr.dtype.element_ty)
        if WRITE_Y:
            tl.store(y_ptr + rows64 * N + cols[None, :], y, mask=mask)
        if WRITE_AMAX:
            acc = tl.maximum(acc, tile_amax_bits(tl.where(mask, y.to(tl.float32), 0.0)))
        q, amax = quantize_group_tile(x, BM, BN, 16, 448.0, True)
        tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
        tl.store(qamax_ptr + rows64 * (N // 16) + gcols[None, :], amax.to(qamax_ptr.dtype.element_ty),
                 mask=rmask[:, None] & (gcols < N // 16)[None, :])
    if WRITE_AMAX:
        tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _activation_apply_kernel(x_ptr, stride_x, partials_ptr, num_partials, amax_out_ptr, q_ptr, q_t_ptr, M, N,
                             BM: tl.constexpr, BN: tl.constexpr, BLOCK_P: tl.constexpr, ACT: tl.constexpr,
                             WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr):
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, E4M3_MAX)
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    y = act_value(x.to(tl.float32), ACT).to(x_ptr.dtype.element_ty).to(tl.float32)
    store_tensorwise(y, encode_multiplier(amax, E4M3_MAX), rows, cols, M, N, q_ptr, N, q_t_ptr,
                     WRITE_ROW, WRITE_T, E4M3_MAX, T_ALIGNED)


@fast_launch
@triton.jit(do_not_specialize=["M"])
def _activation_bwd_kernel(dy_ptr, stride_dy, q_ptr, qamax_ptr, dx_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                           ACT: tl.constexpr, GATHER: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    gcols = pid_n * (BN // 16) + tl.arange(0, BN // 16)
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x_hat = load_group_copy(q_ptr, qamax_ptr, rows, cols, gcols, M, N, BM, BN, GATHER)
    dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dx = dy * act_derivative(x_hat, ACT)
    tl.store(dx_ptr + rows64 * N + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)


def activation_forward(x, name, *, quantize_output=False, output_transpose=False):
    """``(y, x_copy)``: y = act(x) in x's dtype, or per-tensor E4M3 (``(q, data_t)`` with output_transpose)."""
    from ..mixed_granularity import LINEAR_FORMAT, NONLINEAR_FORMAT, NONLINEAR_GRANULARITY

    x2 = as_rows(x)
    M, N = x2.shape
    dev = x.device
    copy_data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    copy_amax = torch.empty(*x.shape[:-1], N // 16, dtype=torch.bfloat16, device=dev)
    bm, bn = plans.elementwise_tile(N, "activation")
    num_tiles = cdiv(M, bm) * cdiv(N, bn)
    if quantize_output:
        nprog = max(1, min(num_tiles, plans.partials_capacity(x, "activation")))
        partials = torch.empty(nprog, dtype=torch.int32, device=dev)
        y = copy_amax  # unused
    else:
        nprog = num_tiles
        partials = copy_amax  # unused
        y = torch.empty(x.shape, dtype=x.dtype, device=dev)
    iters = cdiv(num_tiles, nprog)
    _activation_fwd_kernel[(nprog,)](x2, x2.stride(0), y, copy_data, copy_amax, partials, M, N, nprog, iters,
                                     BM=bm, BN=bn, ACT=ACT_CODE[name], WRITE_Y=not quantize_output,
                                     WRITE_AMAX=quantize_output, num_warps=plans.warps("activation"))
    copy = QuantizedTensor(data=copy_data, amax=copy_amax, fmt=NONLINEAR_FORMAT, granularity=NONLINEAR_GRANULARITY,
                           shape=x.shape, dtype=x.dtype)
    if not quantize_output:
        return y, copy
    amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
    data = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=dev)
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else amax
    bm2, bn2 = plans.elementwise_tile(N, "activation", output_transpose)
    tiles = cdiv(M, bm2) * cdiv(N, bn2)
    _activation_apply_kernel[(tiles,)](x2, x2.stride(0), partials, nprog, amax, data, data_t, M, N,
                                       BM=bm2, BN=bn2, BLOCK_P=plans.partials_block(x, "activation"),
                                       ACT=ACT_CODE[name], WRITE_ROW=True, WRITE_T=output_transpose,
                                       T_ALIGNED=transposes_aligned(M),
                                       num_warps=plans.warps("activation", output_transpose))
    q = QuantizedTensor(data=data, amax=amax_view, scale_hint=scale_view, fmt=LINEAR_FORMAT, granularity=PER_TENSOR,
                        shape=x.shape, dtype=x.dtype)
    return ((q, data_t) if output_transpose else q), copy


def activation_backward(dy, x_copy: QuantizedTensor, name):
    dy2 = as_rows(dy)
    M, N = dy2.shape
    dx = torch.empty(x_copy.shape, dtype=x_copy.dtype, device=dy.device)
    bm, bn = plans.elementwise_tile(N, "activation")
    grid = (cdiv(M, bm), cdiv(N, bn))
    _activation_bwd_kernel[grid](dy2, dy2.stride(0), x_copy.data, x_copy.amax, dx, M, N, BM=bm, BN=bn,
                                 ACT=ACT_CODE[name], GATHER=plans.plan("activation").gather_scales,
                                 num_warps=plans.warps("activation"))
    return dx
