"""Predicted per-tensor scales on the GPU (:mod:`fp8train.delayed_scaling`): one encoding pass, then a repair pass
that re-encodes just in time when the prediction was unusable.

The rule's pieces every predicted-scale kernel shares (the gated product's, the fused gated GEMMs', the per-tensor
quantizer's) and that quantizer itself, :func:`quantize_predicted`: a linear layer's input or output gradient
whose producer publishes no amax (o_proj's input after attention; v_proj's gradient) is encoded in the pass that
reads it, instead of an amax pass plus an encoding pass.

``seen`` is a per-call int32 buffer: the true amaxes (float bits, folded by atomic max), then the predictions the
encoding pass used -- the repair pass reads those, never the prediction buffer, which its program 0 overwrites for
the next call.  A repair pass runs a few persistent programs per SM (:func:`repair_programs`): when nothing needs
repairing each reads four numbers and exits.  Reference: :func:`fp8train.delayed_scaling.encode_amax`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..delayed_scaling import HEADROOM, MARGIN
from . import plans
from .launch import cdiv, fast_launch
from .quantize import (SLOT, dequant_scale, encode_multiplier, fold_amax_bits, loop_tile, row_major_tile,
                       store_tensorwise, tile_amax_bits, transposes_aligned)

__all__ = ["first_program", "settle_prediction", "settle_prediction_pair", "repair_programs", "quantize_predicted"]


@triton.jit
def _next_prediction(seen, MARGIN: tl.constexpr):
    following = seen * MARGIN
    return tl.where(following <= 3.4028234663852886e38, following, 0.0)  # inf / NaN -> 0: just in time next call


@triton.jit
def _needs_repair(seen, predicted, HEADROOM: tl.constexpr):
    """Whether the prediction was unusable: below the true amax, over HEADROOM x above it, or NaN."""
    return (seen > predicted) | (predicted > seen * HEADROOM) | (seen != seen) | (predicted != predicted)


@triton.jit
def first_program():
    return (tl.program_id(0) == 0) & (tl.program_id(1) == 0)


@triton.jit
def settle_prediction(seen_ptr, prediction_ptr, amax_out_ptr, FMAX: tl.constexpr, MARGIN: tl.constexpr,
                      HEADROOM: tl.constexpr):
    """Start of a repair pass for one tensor: ``(seen, repair)`` from the per-call slots (seen_ptr[0] the true
    amax, seen_ptr[1] the prediction the encoding pass used); program 0 publishes the amax the tensor ends up
    encoded with (and its scale, SLOT floats on) and writes the next call's prediction."""
    seen = tl.load(seen_ptr).to(tl.float32, bitcast=True)
    predicted = tl.load(seen_ptr + 1).to(tl.float32, bitcast=True)
    repair = _needs_repair(seen, predicted, HEADROOM)
    if first_program():
        amax = tl.where(repair, seen, predicted)
        tl.store(amax_out_ptr, amax)
        tl.store(amax_out_ptr + SLOT, dequant_scale(amax, FMAX))
        tl.store(prediction_ptr, _next_prediction(seen, MARGIN))
    return seen, repair


@triton.jit
def settle_prediction_pair(seen_ptr, prediction_ptr, amax_out_ptr, FMAX: tl.constexpr, MARGIN: tl.constexpr,
                           HEADROOM: tl.constexpr):
    """The same for two tensors (dgate, dup): slots seen_g, seen_u, predicted_g, predicted_u; outputs amax_g,
    amax_u, scale_g, scale_u SLOT floats apart.  Returns ``(seen_g, seen_u, repair_g, repair_u)``."""
    seen_g = tl.load(seen_ptr).to(tl.float32, bitcast=True)
    seen_u = tl.load(seen_ptr + 1).to(tl.float32, bitcast=True)
    predicted_g = tl.load(seen_ptr + 2).to(tl.float32, bitcast=True)
    predicted_u = tl.load(seen_ptr + 3).to(tl.float32, bitcast=True)
    repair_g = _needs_repair(seen_g, predicted_g, HEADROOM)
    repair_u = _needs_repair(seen_u, predicted_u, HEADROOM)
    if first_program():
        amax_g = tl.where(repair_g, seen_g, predicted_g)
        amax_u = tl.where(repair_u, seen_u, predicted_u)
        tl.store(amax_out_ptr, amax_g)
        tl.store(amax_out_ptr + SLOT, amax_u)
        tl.store(amax_out_ptr + 2 * SLOT, dequant_scale(amax_g, FMAX))
        tl.store(amax_out_ptr + 3 * SLOT, dequant_scale(amax_u, FMAX))
        tl.store(prediction_ptr, _next_prediction(seen_g, MARGIN))
        tl.store(prediction_ptr + 1, _next_prediction(seen_u, MARGIN))
    return seen_g, seen_u, repair_g, repair_u


def repair_programs(num_tiles: int, x, family: str = "gated_forward_predicted") -> int:
    """Programs of a repair pass over the encoding pass's ``num_tiles`` tiles: a few persistent programs per SM
    that loop over the tiles.  Repairs are rare, and a program per tile only to read four numbers and exit cost
    80-170 us per call at batch 32 x 2048 (0.5 ms per 8,192 tokens of the 953M step, H100)."""
    return max(1, min(num_tiles, plans.partials_capacity(x, family)))


# -- the per-tensor quantizer --------------------------------------------------------------------------------------

@fast_launch
@triton.jit(do_not_specialize=["M"])
def _quantize_predicted_kernel(x_ptr, stride_x, prediction_ptr, seen_ptr, q_ptr, q_t_ptr, M, N, BM: tl.constexpr,
                               BN: tl.constexpr, FMAX: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr,
                               T_ALIGNED: tl.constexpr):
    """x encoded with the predicted amax (row-major and/or transposed); x's true amax folded into seen[0]."""
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    predicted = tl.load(prediction_ptr)
    if first_program():
        tl.store(seen_ptr + 1, predicted.to(tl.int32, bitcast=True))
    store_tensorwise(x, encode_multiplier(predicted, FMAX), rows, cols, M, N, q_ptr, N, q_t_ptr, WRITE_ROW, WRITE_T,
                     FMAX, T_ALIGNED)
    fold_amax_bits(seen_ptr, tile_amax_bits(x))  # after the stores: fewer registers live across the reduction


@fast_launch
@triton.jit(do_not_specialize=["M", "num_tiles", "num_programs"])
def _quantize_repair_kernel(x_ptr, stride_x, seen_ptr, prediction_ptr, amax_out_ptr, q_ptr, q_t_ptr, M, N, num_tiles,
                            num_programs, BM: tl.constexpr, BN: tl.constexpr, FMAX: tl.constexpr,
                            WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr,
                            MARGIN: tl.constexpr, HEADROOM: tl.constexpr):
    """Publish the amax x was encoded with, update the prediction, re-encode just in time when it missed."""
    seen, repair = settle_prediction(seen_ptr, prediction_ptr, amax_out_ptr, FMAX, MARGIN, HEADROOM)
    if repair:
        inv = encode_multiplier(seen, FMAX)
        for t in range(tl.program_id(0), num_tiles, num_programs):
            rows, cols, mask = loop_tile(t, M, N, BM, BN)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask,
                        other=0.0).to(tl.float32)
            store_tensorwise(x, inv, rows, cols, M, N, q_ptr, N, q_t_ptr, WRITE_ROW, WRITE_T, FMAX, T_ALIGNED)


def quantize_predicted(x2: torch.Tensor, fmax: float, prediction: torch.Tensor, amax_out: torch.Tensor,
                       data: torch.Tensor, data_t, write_rowmajor: bool, with_transpose: bool) -> None:
    """Encode the (M, N) rows ``x2`` into ``data`` (and ``data_t``, its (N, M) transpose) with the amax predicted in
    ``prediction`` (a 1-element float32 buffer view, updated for the next call), repaired just in time when the
    prediction was unusable; the amax used and its GEMM scale land in ``amax_out`` (kernels.quantize layout).
    The caller (:func:`fp8train.kernels.quantize.quantize_tensorwise`) allocates the outputs."""
    M, N = x2.shape
    seen = torch.zeros(2, dtype=torch.int32, device=x2.device)
    bm, bn = plans.elementwise_tile(N, "quantize", with_transpose)
    tiles = cdiv(M, bm) * cdiv(N, bn)
    outputs = (data if data is not None else amax_out, data_t if data_t is not None else amax_out)
    common = dict(BM=bm, BN=bn, FMAX=fmax, WRITE_ROW=write_rowmajor, WRITE_T=with_transpose,
                  T_ALIGNED=transposes_aligned(M), num_warps=plans.warps("quantize", with_transpose))
    _quantize_predicted_kernel[(tiles,)](x2, x2.stride(0), prediction, seen, *outputs, M, N, **common)
    nprog = repair_programs(tiles, x2, "quantize")
    _quantize_repair_kernel[(nprog,)](x2, x2.stride(0), seen, prediction, amax_out, *outputs, M, N, tiles, nprog,
                                      MARGIN=MARGIN, HEADROOM=HEADROOM, **common)
