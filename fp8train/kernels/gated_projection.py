"""Triton FP8 GEMMs with the gated product in their epilogue: gate/up projection + ``act(gate) * up`` forward,
down_proj's input gradient + the product's backward.

Forward, one kernel instead of two ``torch._scaled_mm`` calls and the gated-product pass: each program computes a
[BM, BN] tile of both ``gate = x W_gate^T`` and ``up = x W_up^T`` (two accumulators over the same x tile), rounds
them to the model dtype as the GEMMs' outputs would be, and writes straight from registers what the rest of the
step reads -- the E4M3 1x16 copies of gate and up that backward keeps, and ``h = act(gate) * up`` as per-tensor
E4M3 (row-major and transposed) for down_proj, encoded with the predicted amax of
:mod:`fp8train.delayed_scaling`.  The bf16 gate and up (2 x 2 bytes per element written and read again) never
exist.

Backward, one kernel instead of ``_scaled_mm`` for dh and the gated backward pass: each program computes a tile of
``dh = dy W_down`` (dy per-tensor E5M2, the transposed FP8 copy of W_down), rounds it to the model dtype, reads
the same tile of the saved gate/up copies and writes ``dgate`` and ``dup`` as per-tensor E5M2 (row-major and
transposed) for the gate/up projections' backward, again with predicted amaxes.

As in :mod:`.gated_product`, every per-tensor encoding with a predicted amax is followed by a repair launch that
re-runs the tile only where the prediction was unusable; when it was fine its programs read four numbers and exit.

Reference: :func:`fp8train.nn.gated_projection.gated_projection_forward` / ``..._backward`` run the same maths as
``_scaled_mm`` + the gated-product ops (on CPU: the fp32 emulation).  Results differ from them only by the GEMMs'
fp32 summation order (and what that flips in one bf16 rounding).

Used with ``Recipe.gated_gemm`` only, which is off by default: Triton 3.6's FP8 main loop with fp32 promotion runs
at ~2/3 of cuBLAS's speed on Hopper, more than the fusion saves (docs/performance.md, "Session 10").
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..delayed_scaling import HEADROOM, MARGIN
from .activation import ACT_CODE, act_derivative, act_value
from .gated_product import store_group_copy
from .predicted_scale import first_program, settle_prediction, settle_prediction_pair
from .launch import cdiv
from .plans import sm_count
from .quantize import (E4M3_MAX, amax_and_scale, encode_multiplier, fold_amax_bits, load_group_copy,
                       store_tensorwise, tile_amax_bits)

__all__ = ["GemmTile", "TILES", "tile", "set_tile", "gated_projection_forward", "gated_projection_backward"]


@dataclasses.dataclass(frozen=True)
class GemmTile:
    """How a fused GEMM launches: [block_m, block_n] output tiles (of each of the two outputs in the forward),
    block_k deep per step, ``stages`` software-pipelined TMA loads, ``warps`` warps, tiles ordered in groups of
    ``group_m`` rows (L2 reuse of the weight tiles).  A choice of speed only: every tile computes the same."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 128
    stages: int = 3
    warps: int = 8
    group_m: int = 8
    persistent: bool = False  # one program per SM looping over tiles, instead of one program per tile
    warp_specialize: bool = False  # Triton's producer/consumer warp groups for the tile loop


# the shipped tiles: the fastest of the sweep in benchmarks/gpu/gated_gemm.py on an H200 with the 953M MLP's shapes
# (2026-11-28-h200-session10-gated-gemm-sweep.md); small tiles win: more programs per SM hide the long epilogues
TILES = {"forward": GemmTile(64, 64, 128, stages=4, warps=4), "backward": GemmTile(64, 64, 128, stages=4, warps=4)}
_tiles = dict(TILES)


def tile(direction: str) -> GemmTile:
    return _tiles[direction]


def set_tile(direction: str, new: GemmTile | None) -> None:
    """Use ``new`` for ``direction`` ("forward" / "backward") in this process (None: back to TILES)."""
    if direction not in TILES:
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    _tiles[direction] = new if new is not None else TILES[direction]


# -- shared pieces -------------------------------------------------------------------------------------------------

@triton.jit
def _tile_position(tile_id, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of output tile ``tile_id``: tiles run down groups of GROUP_M row blocks, so tiles that run
    at the same time share their B (weight) tiles in L2."""
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    per_group = GROUP_M * tiles_n
    first_m = (tile_id // per_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile_id % per_group) % size_m, (tile_id % per_group) // size_m


@triton.jit
def _dot(a, b, acc, BK: tl.constexpr, FAST_ACC: tl.constexpr):
    """acc + a @ b.  Hopper's FP8 tensor cores accumulate with less than fp32 precision; unless FAST_ACC
    (``Recipe.fast_accumulation``, as _scaled_mm's use_fast_accum) each K step's partial sum is promoted into
    the fp32 accumulator (DeepSeek-V3's remedy, every 128 elements with the shipped tiles)."""
    if FAST_ACC:
        return tl.dot(a, b, acc)
    return tl.dot(a, b, acc, max_num_imprecise_acc=BK)


# Operands come through TMA tensor descriptors (made on the host): A is (M, K) row-major, B an (N, K) row-major
# matrix read as [BN, BK] blocks and transposed in shared memory -- K-major, as the FP8 tensor cores want it.
# Blocks past the end of a matrix read zeros, so neither loop needs masks; stores are masked.

# -- forward -------------------------------------------------------------------------------------------------------

@triton.jit
def _gate_up_tile(x_desc, wg_desc, wu_desc, scales_ptr, off_m, off_n, K, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, FAST_ACC: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """gate and up of one tile in float32, each rounded to the model dtype as a GEMM output would be."""
    acc_g = tl.zeros((BM, BN), tl.float32)
    acc_u = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        a = x_desc.load([off_m, k * BK])
        acc_g = _dot(a, wg_desc.load([off_n, k * BK]).T, acc_g, BK, FAST_ACC)
        acc_u = _dot(a, wu_desc.load([off_n, k * BK]).T, acc_u, BK, FAST_ACC)
    # scales: [x, W_gate, W_up] dequantization factors; scale_x * scale_w as _scaled_mm's alpha
    x_scale = tl.load(scales_ptr)
    gate = (acc_g * (x_scale * tl.load(scales_ptr + 1))).to(OUT_DTYPE).to(tl.float32)
    up = (acc_u * (x_scale * tl.load(scales_ptr + 2))).to(OUT_DTYPE).to(tl.float32)
    return gate, up


@triton.jit(do_not_specialize=["M"])
def _gate_up_gemm_kernel(x_desc, wg_desc, wu_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, prediction_ptr,
                         seen_ptr, q_ptr, q_t_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                         GROUP_M: tl.constexpr, FAST_ACC: tl.constexpr, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr,
                         WRITE_T: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    predicted = tl.load(prediction_ptr)
    if first_program():
        tl.store(seen_ptr + 1, predicted.to(tl.int32, bitcast=True))
    inv = encode_multiplier(predicted, E4M3_MAX)
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_position(tile_id, M, N, BM, BN, GROUP_M)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        gate, up = _gate_up_tile(x_desc, wg_desc, wu_desc, scales_ptr, pid_m * BM, pid_n * BN, K, BM, BN, BK,
                                 FAST_ACC, OUT_DTYPE)
        rmask = rows < M
        mask = rmask[:, None] & (cols < N)[None, :]
        h = (act_value(gate, ACT) * up).to(OUT_DTYPE).to(tl.float32)
        fold_amax_bits(seen_ptr, tile_amax_bits(tl.where(mask, h, 0.0)))
        store_tensorwise(h, inv, rows, cols, M, N, q_ptr, N, q_t_ptr, True, WRITE_T, E4M3_MAX)
        rows64 = rows[:, None].to(tl.int64)
        gcols = pid_n * (BN // 16) + tl.arange(0, BN // 16)
        store_group_copy(gate, rows64, rmask, cols, gcols, mask, N, gq_ptr, gamax_ptr, BM, BN)
        store_group_copy(up, rows64, rmask, cols, gcols, mask, N, uq_ptr, uamax_ptr, BM, BN)


@triton.jit(do_not_specialize=["M"])
def _gate_up_repair_kernel(x_desc, wg_desc, wu_desc, scales_ptr, seen_ptr, prediction_ptr, amax_out_ptr, q_ptr,
                           q_t_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                           GROUP_M: tl.constexpr, FAST_ACC: tl.constexpr, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr,
                           WRITE_T: tl.constexpr, MARGIN: tl.constexpr, HEADROOM: tl.constexpr):
    """Publish the amax h was encoded with, update the prediction, and recompute + re-encode h just in time when
    the prediction was unusable (the first call, an overflow, a collapse: rare, so the GEMM is simply redone)."""
    seen, repair = settle_prediction(seen_ptr, prediction_ptr, amax_out_ptr, E4M3_MAX, MARGIN, HEADROOM)
    if repair:
        inv = encode_multiplier(seen, E4M3_MAX)
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            pid_m, pid_n = _tile_position(tile_id, M, N, BM, BN, GROUP_M)
            gate, up = _gate_up_tile(x_desc, wg_desc, wu_desc, scales_ptr, pid_m * BM, pid_n * BN, K, BM, BN, BK,
                                     FAST_ACC, OUT_DTYPE)
            h = (act_value(gate, ACT) * up).to(OUT_DTYPE).to(tl.float32)
            store_tensorwise(h, inv, pid_m * BM + tl.arange(0, BM), pid_n * BN + tl.arange(0, BN), M, N, q_ptr, N,
                             q_t_ptr, True, WRITE_T, E4M3_MAX)


# -- backward ------------------------------------------------------------------------------------------------------

@triton.jit
def _gated_grads_tile(dy_desc, w_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, pid_m, pid_n, M, N, K,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, FAST_ACC: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, ACT: tl.constexpr):
    """(rows, cols, dgate, dup) of one tile, rounded to the model dtype: dh = dy W_down from the GEMM, then the
    gated product's backward from the saved 1x16 copies of gate and up (0 outside the matrix)."""
    acc = tl.zeros((BM, BN), tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        acc = _dot(dy_desc.load([pid_m * BM, k * BK]), w_desc.load([pid_n * BN, k * BK]).T, acc, BK, FAST_ACC)
    dh = (acc * (tl.load(scales_ptr) * tl.load(scales_ptr + 1))).to(OUT_DTYPE).to(tl.float32)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    gcols = pid_n * (BN // 16) + tl.arange(0, BN // 16)
    g_hat = load_group_copy(gq_ptr, gamax_ptr, rows, cols, gcols, M, N, BM, BN, False)
    u_hat = load_group_copy(uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN, False)
    dgate = (dh * u_hat * act_derivative(g_hat, ACT)).to(OUT_DTYPE).to(tl.float32)
    dup = (dh * act_value(g_hat, ACT)).to(OUT_DTYPE).to(tl.float32)
    return rows, cols, dgate, dup


@triton.jit(do_not_specialize=["M"])
def _down_grad_gemm_kernel(dy_desc, w_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, prediction_ptr,
                           seen_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, M, N, K, BM: tl.constexpr,
                           BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, FAST_ACC: tl.constexpr,
                           OUT_DTYPE: tl.constexpr, ACT: tl.constexpr, FMAX: tl.constexpr, WRITE_T: tl.constexpr,
                           WARP_SPECIALIZE: tl.constexpr):
    predicted_g = tl.load(prediction_ptr)
    predicted_u = tl.load(prediction_ptr + 1)
    if first_program():
        tl.store(seen_ptr + 2, predicted_g.to(tl.int32, bitcast=True))
        tl.store(seen_ptr + 3, predicted_u.to(tl.int32, bitcast=True))
    inv_g = encode_multiplier(predicted_g, FMAX)
    inv_u = encode_multiplier(predicted_u, FMAX)
    num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_position(tile_id, M, N, BM, BN, GROUP_M)
        rows, cols, dgate, dup = _gated_grads_tile(dy_desc, w_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr,
                                                   pid_m, pid_n, M, N, K, BM, BN, BK, FAST_ACC, OUT_DTYPE, ACT)
        fold_amax_bits(seen_ptr, tile_amax_bits(dgate))
        fold_amax_bits(seen_ptr + 1, tile_amax_bits(dup))
        store_tensorwise(dgate, inv_g, rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, WRITE_T, FMAX)
        store_tensorwise(dup, inv_u, rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, WRITE_T, FMAX)


@triton.jit(do_not_specialize=["M"])
def _down_grad_repair_kernel(dy_desc, w_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, seen_ptr,
                             prediction_ptr, amax_out_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, M, N, K,
                             BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                             FAST_ACC: tl.constexpr, OUT_DTYPE: tl.constexpr, ACT: tl.constexpr, FMAX: tl.constexpr,
                             WRITE_T: tl.constexpr, MARGIN: tl.constexpr, HEADROOM: tl.constexpr):
    seen_g, seen_u, repair_g, repair_u = settle_prediction_pair(seen_ptr, prediction_ptr, amax_out_ptr, FMAX, MARGIN,
                                                                HEADROOM)
    if repair_g | repair_u:
        num_tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
        for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            pid_m, pid_n = _tile_position(tile_id, M, N, BM, BN, GROUP_M)
            rows, cols, dgate, dup = _gated_grads_tile(dy_desc, w_desc, scales_ptr, gq_ptr, gamax_ptr, uq_ptr,
                                                       uamax_ptr, pid_m, pid_n, M, N, K, BM, BN, BK, FAST_ACC,
                                                       OUT_DTYPE, ACT)
            if repair_g:
                store_tensorwise(dgate, encode_multiplier(seen_g, FMAX), rows, cols, M, N, qg_ptr, N, qg_t_ptr,
                                 True, WRITE_T, FMAX)
            if repair_u:
                store_tensorwise(dup, encode_multiplier(seen_u, FMAX), rows, cols, M, N, qu_ptr, N, qu_t_ptr, True,
                                 WRITE_T, FMAX)


# -- host side -----------------------------------------------------------------------------------------------------

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _launch(t: GemmTile, a: torch.Tensor, b: torch.Tensor) -> tuple[tuple, dict, object, object]:
    """(grid, launch options, A descriptor, B descriptor) of ``a @ b.T`` with tile ``t``."""
    M, N = a.shape[0], b.shape[0]
    tiles = cdiv(M, t.block_m) * cdiv(N, t.block_n)
    grid = (max(1, min(tiles, sm_count(a))) if t.persistent else tiles,)
    options = dict(BM=t.block_m, BN=t.block_n, BK=t.block_k, GROUP_M=t.group_m, num_warps=t.warps,
                   num_stages=t.stages)
    return (grid, options, TensorDescriptor.from_tensor(a, [t.block_m, t.block_k]),
            TensorDescriptor.from_tensor(b, [t.block_n, t.block_k]))


def gated_projection_forward(x_data, w_gate_data, w_up_data, scales, out_dtype, activation, prediction,
                             output_transpose, fast_accumulation=False):
    """The fused forward on (M, K) E4M3 x and two (N, K) E4M3 weights.

    ``scales``: float32 [3] = dequantization scales of x, W_gate, W_up.  Returns ``(data, data_t, amax_buffer,
    (gate_q, gate_amax), (up_q, up_amax))``: h's per-tensor E4M3 data (and transposed data, or None), the
    0-d views of the amax h was encoded with and its dequantization scale, and the two 1x16 copies as
    ``(data, group maxima)``."""
    M, K = x_data.shape
    N = w_gate_data.shape[0]
    dev = x_data.device
    gq = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=dev)
    uq = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=dev)
    gamax = torch.empty(M, N // 16, dtype=torch.bfloat16, device=dev)
    uamax = torch.empty(M, N // 16, dtype=torch.bfloat16, device=dev)
    data = torch.empty(M, N, dtype=torch.float8_e4m3fn, device=dev)
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if output_transpose else None
    amax, amaxes, scales_out = amax_and_scale(dev)
    seen = torch.zeros(2, dtype=torch.int32, device=dev)
    t = tile("forward")
    grid, options, x_desc, wg_desc = _launch(t, x_data, w_gate_data)
    wu_desc = TensorDescriptor.from_tensor(w_up_data, [t.block_n, t.block_k])
    common = dict(OUT_DTYPE=_TL_DTYPES[out_dtype], ACT=ACT_CODE[activation], WRITE_T=output_transpose,
                  FAST_ACC=fast_accumulation, **options)
    t_arg = data_t if data_t is not None else data
    _gate_up_gemm_kernel[grid](x_desc, wg_desc, wu_desc, scales, gq, gamax, uq, uamax, prediction, seen, data, t_arg,
                               M, N, K, WARP_SPECIALIZE=t.warp_specialize, **common)
    _gate_up_repair_kernel[grid](x_desc, wg_desc, wu_desc, scales, seen, prediction, amax, data, t_arg, M, N, K,
                                 MARGIN=MARGIN, HEADROOM=HEADROOM, **common)
    return data, data_t, (amaxes[0], scales_out[0]), (gq, gamax), (uq, uamax)


def gated_projection_backward(dy_data, w_down_t_data, scales, gate_copy, up_copy, out_dtype, activation, fmt,
                              prediction, output_transpose, fast_accumulation=False):
    """The fused backward on (M, K) per-tensor FP8 dy and W_down's transposed (N, K) E4M3 copy (K = hidden).

    ``scales``: float32 [2] = dequantization scales of dy and W_down; ``gate_copy`` / ``up_copy``: the (M, N)
    data and (M, N // 16) group maxima the forward wrote.  Returns one ``(data, data_t, amax, scale)`` each for
    dgate and dup: per-tensor data in ``fmt``, transposed data (or None), 0-d views of the amax it was encoded
    with and of its dequantization scale."""
    M, K = dy_data.shape
    N = w_down_t_data.shape[0]
    dev = dy_data.device
    qg = torch.empty(M, N, dtype=fmt.torch_dtype, device=dev)
    qu = torch.empty(M, N, dtype=fmt.torch_dtype, device=dev)
    qg_t = torch.empty(N, M, dtype=fmt.torch_dtype, device=dev) if output_transpose else None
    qu_t = torch.empty(N, M, dtype=fmt.torch_dtype, device=dev) if output_transpose else None
    amax, amaxes, scales_out = amax_and_scale(dev, 2)
    seen = torch.zeros(4, dtype=torch.int32, device=dev)
    t = tile("backward")
    grid, options, dy_desc, w_desc = _launch(t, dy_data, w_down_t_data)
    common = dict(OUT_DTYPE=_TL_DTYPES[out_dtype], ACT=ACT_CODE[activation], FMAX=float(fmt.max),
                  WRITE_T=output_transpose, FAST_ACC=fast_accumulation, **options)
    (gq, gamax), (uq, uamax) = gate_copy, up_copy
    t_args = (qg_t if qg_t is not None else qg, qu_t if qu_t is not None else qu)
    _down_grad_gemm_kernel[grid](dy_desc, w_desc, scales, gq, gamax, uq, uamax, prediction, seen, qg, t_args[0], qu,
                                 t_args[1], M, N, K, WARP_SPECIALIZE=t.warp_specialize, **common)
    _down_grad_repair_kernel[grid](dy_desc, w_desc, scales, gq, gamax, uq, uamax, seen, prediction, amax, qg,
                                   t_args[0], qu, t_args[1], M, N, K, MARGIN=MARGIN, HEADROOM=HEADROOM, **common)
    return (qg, qg_t, amaxes[0], scales_out[0]), (qu, qu_t, amaxes[1], scales_out[1])
