"""Triton gated product ``h = act(gate) * up``: forward reads gate and up once and writes h (or per-tensor FP8 h)
plus both E4M3 1x16 copies; backward reads the two FP8 copies and dh once and writes dgate and dup, recomputing
act(gate_hat) instead of loading a saved copy of it.

Per-tensor FP8 outputs take two passes with just-in-time scales (an amax pass, then the encoding pass re-reads
the inputs) or one pass plus a repair pass that is almost always empty with predicted scales
(``prediction=``, :mod:`fp8train.delayed_scaling`).

Reference: :mod:`fp8train.nn.gated_mlp`.  gate and up may be strided row views (e.g. the two halves of a fused
gate_up projection); their last dim must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..delayed_scaling import HEADROOM, MARGIN
from ..quant import PER_TENSOR, QuantizedTensor
from . import plans
from .launch import cdiv, fast_launch
from .activation import ACT_CODE, act_derivative, act_value
from .predicted_scale import first_program, repair_programs, settle_prediction, settle_prediction_pair
from .quantize import (E4M3_MAX, SLOT, amax_and_scale, as_rows, dequant_scale, encode_multiplier, fold_amax_bits,
                       global_amax, load_group_copy, loop_tile, quantize_group_tile, row_major_tile,
                       shared_amax, store_tensorwise, tile_amax_bits, tile_amax_bits_pair, transposes_aligned)

__all__ = ["gated_product_forward", "gated_product_backward"]


@triton.jit
def store_group_copy(vals, rows64, rmask, cols, gcols, mask, N, q_ptr, qamax_ptr, BM: tl.constexpr,
                      BN: tl.constexpr):
    q, amax = quantize_group_tile(vals, BM, BN, 16, 448.0, True)
    tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(qamax_ptr + rows64 * (N // 16) + gcols[None, :], amax.to(qamax_ptr.dtype.element_ty),
             mask=rmask[:, None] & (gcols < N // 16)[None, :])


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _gated_fwd_kernel(g_ptr, stride_g, u_ptr, stride_u, h_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, partials_ptr,
                      M, N, num_programs, iters, BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr,
                      WRITE_H: tl.constexpr, WRITE_AMAX: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        t = pid + i * num_programs
        rows, cols, mask = loop_tile(t, M, N, BM, BN)
        gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
        rmask = rows < M
        rows64 = rows[:, None].to(tl.int64)
        g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        h = (act_value(g, ACT) * u).to(h_ptr.dtype.element_ty)
        if WRITE_H:
            tl.store(h_ptr + rows64 * N + cols[None, :], h, mask=mask)
        if WRITE_AMAX:
            acc = tl.maximum(acc, tile_amax_bits(tl.where(mask, h.to(tl.float32), 0.0)))
        store_group_copy(g, rows64, rmask, cols, gcols, mask, N, gq_ptr, gamax_ptr, BM, BN)
        store_group_copy(u, rows64, rmask, cols, gcols, mask, N, uq_ptr, uamax_ptr, BM, BN)
    if WRITE_AMAX:
        tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _gated_apply_kernel(g_ptr, stride_g, u_ptr, stride_u, h_dtype_ptr, partials_ptr, num_partials, amax_out_ptr,
                        q_ptr, q_t_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr, BLOCK_P: tl.constexpr,
                        ACT: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr,
                        T_ALIGNED: tl.constexpr):
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, E4M3_MAX)
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    rows64 = rows[:, None].to(tl.int64)
    g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (act_value(g, ACT) * u).to(h_dtype_ptr.dtype.element_ty).to(tl.float32)
    store_tensorwise(h, encode_multiplier(amax, E4M3_MAX), rows, cols, M, N, q_ptr, N, q_t_ptr,
                     WRITE_ROW, WRITE_T, E4M3_MAX, T_ALIGNED)


@triton.jit
def _gated_grads(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N,
                 BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr):
    """(dgate, dup, mask) of one tile in float32, from the FP8 copies of gate and up and dh."""
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    g_hat = load_group_copy(gq_ptr, gamax_ptr, rows, cols, gcols, M, N, BM, BN, GATHER)
    u_hat = load_group_copy(uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN, GATHER)
    rows64 = rows[:, None].to(tl.int64)
    dh = tl.load(dh_ptr + rows64 * stride_dh + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return dh * u_hat * act_derivative(g_hat, ACT), dh * act_value(g_hat, ACT), mask


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _gated_bwd_kernel(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, dg_ptr, du_ptr, partials_ptr,
                      M, N, num_programs, iters, BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr,
                      WRITE_GRADS: tl.constexpr, WRITE_AMAX: tl.constexpr, GATHER: tl.constexpr):
    """Writes dgate and dup (WRITE_GRADS), or folds their max |.| into two rows of partial maxima (WRITE_AMAX:
    pass 1 of the per-tensor E5M2 outputs; dg_ptr / du_ptr then only give the gradients' dtypes)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    acc_g = tl.full((), 0, tl.int32)
    acc_u = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        t = pid + i * num_programs
        rows, cols, _ = loop_tile(t, M, N, BM, BN)
        gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
        dg, du, mask = _gated_grads(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols,
                                    M, N, BM, BN, ACT, GATHER)
        dg = dg.to(dg_ptr.dtype.element_ty)
        du = du.to(du_ptr.dtype.element_ty)
        if WRITE_GRADS:
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            tl.store(dg_ptr + offs, dg, mask=mask)
            tl.store(du_ptr + offs, du, mask=mask)
        if WRITE_AMAX:
            acc_g = tl.maximum(acc_g, tile_amax_bits(tl.where(mask, dg.to(tl.float32), 0.0)))
            acc_u = tl.maximum(acc_u, tile_amax_bits(tl.where(mask, du.to(tl.float32), 0.0)))
    if WRITE_AMAX:
        tl.store(partials_ptr + pid, acc_g)
        tl.store(partials_ptr + num_programs + pid, acc_u)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _gated_bwd_apply_kernel(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, dg_dtype_ptr, du_dtype_ptr,
                            partials_ptr, num_partials, amax_out_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, M, N,
                            BM: tl.constexpr, BN: tl.constexpr, BLOCK_P: tl.constexpr, ACT: tl.constexpr,
                            FMAX: tl.constexpr, WRITE_T: tl.constexpr, GATHER: tl.constexpr,
                            T_ALIGNED: tl.constexpr):
    """Pass 2: recompute dgate / dup and write them per-tensor FP8 (row-major and optionally transposed)."""
    rows, cols, _, tile_n = row_major_tile(M, N, BM, BN)
    amax_g = global_amax(partials_ptr, num_partials, BLOCK_P)
    amax_u = global_amax(partials_ptr + num_partials, num_partials, BLOCK_P)
    if tl.program_id(0) == 0:  # amax_g, amax_u, scale_g, scale_u, SLOT floats apart
        tl.store(amax_out_ptr, amax_g)
        tl.store(amax_out_ptr + SLOT, amax_u)
        tl.store(amax_out_ptr + 2 * SLOT, dequant_scale(amax_g, FMAX))
        tl.store(amax_out_ptr + 3 * SLOT, dequant_scale(amax_u, FMAX))
    gcols = tile_n * (BN // 16) + tl.arange(0, BN // 16)
    dg, du, mask = _gated_grads(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N,
                                BM, BN, ACT, GATHER)
    dg = dg.to(dg_dtype_ptr.dtype.element_ty).to(tl.float32)
    du = du.to(du_dtype_ptr.dtype.element_ty).to(tl.float32)
    store_tensorwise(dg, encode_multiplier(amax_g, FMAX), rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, WRITE_T,
                     FMAX, T_ALIGNED)
    store_tensorwise(du, encode_multiplier(amax_u, FMAX), rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, WRITE_T,
                     FMAX, T_ALIGNED)


@fast_launch
@triton.jit(do_not_specialize=["M"])
def _gated_fwd_predicted_kernel(g_ptr, stride_g, u_ptr, stride_u, h_dtype_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr,
                                prediction_ptr, seen_ptr, q_ptr, q_t_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                                ACT: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr):
    """The whole forward in one pass: h encoded with the predicted amax (row-major, optionally transposed), the
    two 1x16 copies, h's true amax folded into seen[0].  A 1-D grid of row-major tiles."""
    rows, cols, mask, tile_n = row_major_tile(M, N, BM, BN)
    rmask = rows < M
    rows64 = rows[:, None].to(tl.int64)
    gcols = tile_n * (BN // 16) + tl.arange(0, BN // 16)
    g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = (act_value(g, ACT) * u).to(h_dtype_ptr.dtype.element_ty).to(tl.float32)
    predicted = tl.load(prediction_ptr)
    if first_program():
        tl.store(seen_ptr + 1, predicted.to(tl.int32, bitcast=True))
    store_tensorwise(h, encode_multiplier(predicted, E4M3_MAX), rows, cols, M, N, q_ptr, N, q_t_ptr, True, WRITE_T,
                     E4M3_MAX, T_ALIGNED)
    store_group_copy(g, rows64, rmask, cols, gcols, mask, N, gq_ptr, gamax_ptr, BM, BN)
    store_group_copy(u, rows64, rmask, cols, gcols, mask, N, uq_ptr, uamax_ptr, BM, BN)
    # the amax after the stores: fewer registers live across the reduction (gated_backward_costs.py)
    fold_amax_bits(seen_ptr, tile_amax_bits(tl.where(mask, h, 0.0)))


@fast_launch
@triton.jit(do_not_specialize=["M", "num_tiles", "num_programs"])
def _gated_fwd_repair_kernel(g_ptr, stride_g, u_ptr, stride_u, h_dtype_ptr, seen_ptr, prediction_ptr, amax_out_ptr,
                             q_ptr, q_t_ptr, M, N, num_tiles, num_programs, BM: tl.constexpr, BN: tl.constexpr,
                             ACT: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr,
                             MARGIN: tl.constexpr, HEADROOM: tl.constexpr):
    """Publish the amax h was encoded with, update the prediction, and re-encode just in time on overflow.
    Persistent programs (see :func:`repair_programs`): when nothing needs repairing they read four numbers and
    exit."""
    seen, repair = settle_prediction(seen_ptr, prediction_ptr, amax_out_ptr, E4M3_MAX, MARGIN, HEADROOM)
    if repair:
        inv = encode_multiplier(seen, E4M3_MAX)
        for t in range(tl.program_id(0), num_tiles, num_programs):
            rows, cols, mask = loop_tile(t, M, N, BM, BN)
            rows64 = rows[:, None].to(tl.int64)
            g = tl.load(g_ptr + rows64 * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + rows64 * stride_u + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            h = (act_value(g, ACT) * u).to(h_dtype_ptr.dtype.element_ty).to(tl.float32)
            store_tensorwise(h, inv, rows, cols, M, N, q_ptr, N, q_t_ptr, True, WRITE_T, E4M3_MAX, T_ALIGNED)


@fast_launch
@triton.jit(do_not_specialize=["M"])
def _gated_bwd_predicted_kernel(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, dg_dtype_ptr, du_dtype_ptr,
                                prediction_ptr, seen_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, M, N, BM: tl.constexpr,
                                BN: tl.constexpr, ACT: tl.constexpr, FMAX: tl.constexpr, WRITE_T: tl.constexpr,
                                GATHER: tl.constexpr, T_ALIGNED: tl.constexpr, JOINT_AMAX: tl.constexpr):
    """The whole backward in one pass: dgate / dup encoded with their predicted amaxes, their true amaxes folded
    into seen[0] / seen[1].  A 1-D grid of row-major tiles."""
    rows, cols, _, tile_n = row_major_tile(M, N, BM, BN)
    gcols = tile_n * (BN // 16) + tl.arange(0, BN // 16)
    dg, du, mask = _gated_grads(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N,
                                BM, BN, ACT, GATHER)
    dg = dg.to(dg_dtype_ptr.dtype.element_ty).to(tl.float32)
    du = du.to(du_dtype_ptr.dtype.element_ty).to(tl.float32)
    predicted_g = tl.load(prediction_ptr)
    predicted_u = tl.load(prediction_ptr + 1)
    if first_program():
        tl.store(seen_ptr + 2, predicted_g.to(tl.int32, bitcast=True))
        tl.store(seen_ptr + 3, predicted_u.to(tl.int32, bitcast=True))
    store_tensorwise(dg, encode_multiplier(predicted_g, FMAX), rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, WRITE_T,
                     FMAX, T_ALIGNED)
    store_tensorwise(du, encode_multiplier(predicted_u, FMAX), rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, WRITE_T,
                     FMAX, T_ALIGNED)
    # the amaxes after the stores: fewer registers live across the reductions (gated_backward_costs.py)
    if JOINT_AMAX:
        amax_g, amax_u = tile_amax_bits_pair(tl.where(mask, dg, 0.0), tl.where(mask, du, 0.0))
    else:
        amax_g = tile_amax_bits(tl.where(mask, dg, 0.0))
        amax_u = tile_amax_bits(tl.where(mask, du, 0.0))
    fold_amax_bits(seen_ptr, amax_g)
    fold_amax_bits(seen_ptr + 1, amax_u)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_tiles", "num_programs"])
def _gated_bwd_repair_kernel(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, dg_dtype_ptr, du_dtype_ptr,
                             seen_ptr, prediction_ptr, amax_out_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, M, N,
                             num_tiles, num_programs, BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr,
                             FMAX: tl.constexpr, WRITE_T: tl.constexpr, GATHER: tl.constexpr,
                             T_ALIGNED: tl.constexpr, MARGIN: tl.constexpr, HEADROOM: tl.constexpr):
    """Publish the amaxes dgate / dup were encoded with, update the predictions, re-encode whichever missed
    (persistent programs, as in the forward's repair)."""
    seen_g, seen_u, repair_g, repair_u = settle_prediction_pair(seen_ptr, prediction_ptr, amax_out_ptr, FMAX, MARGIN,
                                                                HEADROOM)
    if repair_g | repair_u:
        for t in range(tl.program_id(0), num_tiles, num_programs):
            rows, cols, _ = loop_tile(t, M, N, BM, BN)
            gcols = (t % tl.cdiv(N, BN)) * (BN // 16) + tl.arange(0, BN // 16)
            dg, du, mask = _gated_grads(dh_ptr, stride_dh, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols,
                                        M, N, BM, BN, ACT, GATHER)
            if repair_g:
                dg = dg.to(dg_dtype_ptr.dtype.element_ty).to(tl.float32)
                store_tensorwise(dg, encode_multiplier(seen_g, FMAX), rows, cols, M, N, qg_ptr, N, qg_t_ptr, True,
                                 WRITE_T, FMAX, T_ALIGNED)
            if repair_u:
                du = du.to(du_dtype_ptr.dtype.element_ty).to(tl.float32)
                store_tensorwise(du, encode_multiplier(seen_u, FMAX), rows, cols, M, N, qu_ptr, N, qu_t_ptr, True,
                                 WRITE_T, FMAX, T_ALIGNED)


def _copy_tensors(shape, N, dev):
    return (torch.empty(shape, dtype=torch.float8_e4m3fn, device=dev),
            torch.empty(*shape[:-1], N // 16, dtype=torch.bfloat16, device=dev))


def gated_product_forward(gate, up, name, *, quantize_output=False, output_transpose=False, prediction=None):
    """``(h, gate_copy, up_copy)``; h in the promoted dtype, or per-tensor E4M3 (``(q, data_t)`` with transpose),
    encoded with a predicted amax in one pass when ``prediction`` (a 1-element float32 buffer view) is given."""
    from ..mixed_granularity import LINEAR_FORMAT, NONLINEAR_FORMAT, NONLINEAR_GRANULARITY

    g2, u2 = as_rows(gate), as_rows(up)
    M, N = g2.shape
    dev = gate.device
    h_dtype = torch.promote_types(gate.dtype, up.dtype)
    gq, gamax = _copy_tensors(gate.shape, N, dev)
    uq, uamax = _copy_tensors(up.shape, N, dev)
    copies = [QuantizedTensor(data=d, amax=a, fmt=NONLINEAR_FORMAT, granularity=NONLINEAR_GRANULARITY,
                              shape=t.shape, dtype=t.dtype) for d, a, t in ((gq, gamax, gate), (uq, uamax, up))]
    family = "gated_forward"
    if quantize_output and prediction is not None and M > 0:
        h = torch.empty(1, dtype=h_dtype, device=dev)  # only its dtype is used
        seen = torch.zeros(2, dtype=torch.int32, device=dev)
        amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
        data = torch.empty(gate.shape, dtype=torch.float8_e4m3fn, device=dev)
        data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else amax
        bm, bn = plans.elementwise_tile(N, "gated_forward_predicted", True)
        tiles = cdiv(M, bm) * cdiv(N, bn)
        common = dict(BM=bm, BN=bn, ACT=ACT_CODE[name], WRITE_T=output_transpose, T_ALIGNED=transposes_aligned(M),
                      num_warps=plans.warps("gated_forward_predicted", True),
                      **plans.register_cap("gated_forward_predicted"))
        _gated_fwd_predicted_kernel[(tiles,)](g2, g2.stride(0), u2, u2.stride(0), h, gq, gamax, uq, uamax,
                                              prediction, seen, data, data_t, M, N, **common)
        nprog = repair_programs(tiles, gate)
        _gated_fwd_repair_kernel[(nprog,)](g2, g2.stride(0), u2, u2.stride(0), h, seen, prediction, amax, data,
                                           data_t, M, N, tiles, nprog, MARGIN=MARGIN, HEADROOM=HEADROOM, **common)
        q = QuantizedTensor(data=data, amax=amax_view, scale_hint=scale_view, fmt=LINEAR_FORMAT,
                            granularity=PER_TENSOR, shape=gate.shape, dtype=h_dtype)
        return ((q, data_t) if output_transpose else q), copies[0], copies[1]
    bm, bn = plans.elementwise_tile(N, family)
    num_tiles = cdiv(M, bm) * cdiv(N, bn)
    if quantize_output:
        nprog = max(1, min(num_tiles, plans.partials_capacity(gate, family)))
        partials = torch.empty(nprog, dtype=torch.int32, device=dev)
        h = torch.empty(1, dtype=h_dtype, device=dev)  # only its dtype is used
    else:
        nprog = num_tiles
        h = torch.empty(gate.shape, dtype=h_dtype, device=dev)
        partials = gamax  # unused
    iters = cdiv(num_tiles, nprog)
    _gated_fwd_kernel[(nprog,)](g2, g2.stride(0), u2, u2.stride(0), h, gq, gamax, uq, uamax, partials,
                                M, N, nprog, iters, BM=bm, BN=bn, ACT=ACT_CODE[name], WRITE_H=not quantize_output,
                                WRITE_AMAX=quantize_output, num_warps=plans.warps(family))
    if not quantize_output:
        return h, copies[0], copies[1]
    amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
    data = torch.empty(gate.shape, dtype=torch.float8_e4m3fn, device=dev)
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else amax
    bm2, bn2 = plans.elementwise_tile(N, family, output_transpose)
    tiles = cdiv(M, bm2) * cdiv(N, bn2)
    _gated_apply_kernel[(tiles,)](g2, g2.stride(0), u2, u2.stride(0), h, partials, nprog, amax, data,
                                  data_t, M, N, BM=bm2, BN=bn2,
                                  BLOCK_P=plans.partials_block(gate, family), ACT=ACT_CODE[name],
                                  WRITE_ROW=True, WRITE_T=output_transpose,
                                  T_ALIGNED=transposes_aligned(M),
                                  num_warps=plans.warps(family, output_transpose))
    q = QuantizedTensor(data=data, amax=amax_view, scale_hint=scale_view, fmt=LINEAR_FORMAT, granularity=PER_TENSOR,
                        shape=gate.shape, dtype=h_dtype)
    return ((q, data_t) if output_transpose else q), copies[0], copies[1]


def gated_product_backward(dh, gate_copy: QuantizedTensor, up_copy: QuantizedTensor, name, *,
                           quantize_output=False, output_transpose=False, prediction=None):
    """``(dgate, dup)`` in the dtypes of gate and up; with ``quantize_output`` each is the per-tensor E5M2
    QuantizedTensor the gate / up projections' backward consumes (``(q, data_t)`` with ``output_transpose``),
    encoded with predicted amaxes in one pass when ``prediction`` (2-element float32 buffer view) is given."""
    from ..mixed_granularity import GRAD_FORMAT

    dh2 = as_rows(dh)
    M, N = dh2.shape
    dev = dh.device
    family = "gated_backward"
    plan = plans.plan(family)
    bm, bn = plans.elementwise_tile(N, family)
    num_tiles = cdiv(M, bm) * cdiv(N, bn)
    if not quantize_output:
        dgate = torch.empty(gate_copy.shape, dtype=gate_copy.dtype, device=dev)
        dup = torch.empty(up_copy.shape, dtype=up_copy.dtype, device=dev)
        _gated_bwd_kernel[(num_tiles,)](dh2, dh2.stride(0), gate_copy.data, gate_copy.amax, up_copy.data,
                                        up_copy.amax, dgate, dup, dgate, M, N, num_tiles, 1, BM=bm, BN=bn,
                                        ACT=ACT_CODE[name], WRITE_GRADS=True, WRITE_AMAX=False,
                                        GATHER=plan.gather_scales, num_warps=plan.warps)
        return dgate, dup
    dg_dtype = torch.empty(1, dtype=gate_copy.dtype, device=dev)
    du_dtype = torch.empty(1, dtype=up_copy.dtype, device=dev)
    fmt = GRAD_FORMAT
    amax, amaxes, scales = amax_and_scale(dev, 2)
    qg = torch.empty(gate_copy.shape, dtype=fmt.torch_dtype, device=dev)
    qu = torch.empty(up_copy.shape, dtype=fmt.torch_dtype, device=dev)
    qg_t = torch.empty(N, M, dtype=fmt.torch_dtype, device=dev) if output_transpose else qg
    qu_t = torch.empty(N, M, dtype=fmt.torch_dtype, device=dev) if output_transpose else qu
    if prediction is not None and M > 0:
        seen = torch.zeros(4, dtype=torch.int32, device=dev)
        predicted = plans.plan("gated_backward_predicted")
        bm2, bn2 = predicted.transposed_tile
        common = dict(BM=bm2, BN=bn2, ACT=ACT_CODE[name], FMAX=float(fmt.max), WRITE_T=output_transpose,
                      GATHER=predicted.gather_scales, T_ALIGNED=transposes_aligned(M),
                      num_warps=predicted.transposed_warps, **plans.register_cap("gated_backward_predicted"))
        tiles = cdiv(M, bm2) * cdiv(N, bn2)
        _gated_bwd_predicted_kernel[(tiles,)](dh2, dh2.stride(0), gate_copy.data, gate_copy.amax,
                                              up_copy.data, up_copy.amax, dg_dtype, du_dtype, prediction,
                                              seen, qg, qg_t, qu, qu_t, M, N, JOINT_AMAX=predicted.joint_amax,
                                              **common)
        nprog = repair_programs(tiles, dh)
        _gated_bwd_repair_kernel[(nprog,)](dh2, dh2.stride(0), gate_copy.data, gate_copy.amax, up_copy.data,
                                           up_copy.amax, dg_dtype, du_dtype, seen, prediction, amax, qg, qg_t, qu,
                                           qu_t, M, N, tiles, nprog, MARGIN=MARGIN, HEADROOM=HEADROOM, **common)
        return _gradient_outputs(qg, qg_t, qu, qu_t, amaxes, scales, gate_copy, up_copy, fmt, output_transpose)
    bm2, bn2 = plans.elementwise_tile(N, family, output_transpose)
    tiles = cdiv(M, bm2) * cdiv(N, bn2)
    nprog = max(1, min(num_tiles, plans.partials_capacity(dh, family)))
    partials = torch.empty(2, nprog, dtype=torch.int32, device=dev)
    _gated_bwd_kernel[(nprog,)](dh2, dh2.stride(0), gate_copy.data, gate_copy.amax, up_copy.data, up_copy.amax,
                                dg_dtype, du_dtype, partials, M, N, nprog, cdiv(num_tiles, nprog), BM=bm,
                                BN=bn, ACT=ACT_CODE[name], WRITE_GRADS=False, WRITE_AMAX=True,
                                GATHER=plan.gather_scales, num_warps=plan.warps)
    _gated_bwd_apply_kernel[(tiles,)](dh2, dh2.stride(0), gate_copy.data, gate_copy.amax, up_copy.data,
                                      up_copy.amax, dg_dtype, du_dtype, partials, nprog, amax, qg, qg_t,
                                      qu, qu_t, M, N, BM=bm2, BN=bn2,
                                      BLOCK_P=plans.partials_block(dh, family), ACT=ACT_CODE[name],
                                      FMAX=float(fmt.max), WRITE_T=output_transpose,
                                      GATHER=plan.gather_scales, T_ALIGNED=transposes_aligned(M),
                                      num_warps=plans.warps(family, output_transpose))
    return _gradient_outputs(qg, qg_t, qu, qu_t, amaxes, scales, gate_copy, up_copy, fmt, output_transpose)


def _gradient_outputs(qg, qg_t, qu, qu_t, amaxes, scales, gate_copy, up_copy, fmt, output_transpose):
    out = []
    for data, data_t, a, s, copy in ((qg, qg_t, amaxes[0], scales[0], gate_copy),
                                     (qu, qu_t, amaxes[1], scales[1], up_copy)):
        q = QuantizedTensor(data=data, amax=a, fmt=fmt, granularity=PER_TENSOR, shape=copy.shape, dtype=copy.dtype,
                            scale_hint=s)
        out.append((q, data_t) if output_transpose else q)
    return out[0], out[1]
