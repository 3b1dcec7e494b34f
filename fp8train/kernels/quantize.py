"""Triton quantizers: 1xG groups, and per-tensor with the two-stage group-scaling amax (+ transposed copy).

Same numbers as :func:`fp8train.quant.quantize` (the reference):

* group amax = max |x| of the group, float32; NaN/inf propagate (the max runs on the IEEE bit patterns of |x|
  as int32, which order like the values and put NaN above inf);
* with ``scale_dtype=bfloat16`` the amax is rounded *up* to bf16 and that rounded value is used to encode;
* ``q = saturate(x * (448 / amax))`` cast to FP8 (round to nearest even), where ``448 / amax`` is computed like
  torch does, ``(1 / amax) * 448`` with IEEE division; ``amax == 0`` (or NaN) encodes zeros.

The shared ``@triton.jit`` helpers here (``quantize_group_tile``, ``tile_amax_bits``, ``global_amax``,
``store_tensorwise``) are used by the fused producer kernels (norms, activations, gated product, residual add).

Shapes: any number of rows (a runtime argument, never a specialisation key), last dim a multiple of the
group size; leading dims are flattened into rows; the last dim must be contiguous (rows may be strided).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ..quant import PER_TENSOR, Granularity, QuantizedTensor
from . import plans
from .launch import cdiv, fast_launch

__all__ = ["INV_E4M3_MAX", "quantize_groups", "quantize_tensorwise", "dequantize_tensorwise", "shared_amax",
           "loop_tile", "row_major_tile", "load_group_copy", "as_rows", "tensorwise_amax", "amax_and_scale",
           "dequant_scale", "SLOT", "quantize_group_tile", "tile_amax_bits", "tile_amax_bits_pair", "global_amax",
           "store_tensorwise", "transposes_aligned"]

E4M3_MAX = tl.constexpr(448.0)  # globals read inside @triton.jit must be constexpr
INV_E4M3_MAX = tl.constexpr(1.0 / 448.0)  # what dequantize_tensorwise multiplies by (its INV_FMAX for E4M3)
# floats between the values a per-tensor kernel stores (amax, GEMM scale): 256 bytes, so each is an aligned
# pointer -- cuBLASLt refuses a scale pointer 4 bytes into an allocation (CUBLAS_STATUS_NOT_SUPPORTED)
SLOT = tl.constexpr(64)
# Shortcuts the GPU allows and the CPU interpreter does not: the float32 -> FP8 cast saturates by itself
# (``saturate``), SiLU's and GELU-tanh's sigmoid runs on the MUFU approximations (:mod:`.activation`).
# FP8TRAIN_PRECISE_KERNELS=1 turns them off on the GPU too (A/B checks: the clamps give the same bits, the exact
# sigmoid differs by ~2 float32 ulps).
GPU_SHORTCUTS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1"
                             and os.environ.get("FP8TRAIN_PRECISE_KERNELS", "0") != "1")


# --------------------------------------------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------------------------------------------

@triton.jit
def saturate(x, FMAX: tl.constexpr):
    """Clamp to [-FMAX, FMAX] (NaN stays NaN) for a cast to FP8 right after.

    On the GPU the cast does this itself: Triton lowers float32 -> E4M3 / E5M2 to ``cvt.rn.satfinite`` (SASS
    ``F2FP.SATFINITE``), which clamps +-inf and overflow to +-FMAX and keeps NaN -- the same bits as clamping
    first -- so the two min/max instructions per element are skipped there (the one-pass producer kernels are
    instruction-bound, ``benchmarks/debug/sass_census.py``).  The CPU interpreter's cast does not saturate."""
    if GPU_SHORTCUTS:
        return x
    x = tl.maximum(x, -FMAX, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, FMAX, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def encode_multiplier(amax, FMAX: tl.constexpr):
    """448 / amax the way torch computes ``fmt.max / amax`` (reciprocal, then multiply); 0 where amax <= 0 or NaN."""
    one = tl.full(amax.shape, 1.0, tl.float32)
    return tl.where(amax > 0, tl.div_rn(one, amax) * FMAX, 0.0)


@triton.jit
def quantize_group_tile(x, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, FMAX: tl.constexpr,
                        ROUND_BF16: tl.constexpr):
    """Quantize a float32 tile [BM, BN] in 1xG groups along its columns.

    Returns (q, amax): q is float32 [BM, BN] on the FP8 grid's scale, to be cast to FP8 right away (``saturate``
    leaves the clamping to the GPU's cast), amax float32
    [BM, BN // G] (rounded up to bf16 when ROUND_BF16).  Masked-out elements must be loaded as 0.
    """
    xg = tl.reshape(x, (BM, BN // G, G))
    bits = tl.max(tl.abs(xg).to(tl.int32, bitcast=True), axis=2)
    if ROUND_BF16:
        # round the float32 bit pattern up to the next bfloat16; NaN/inf keep theirs (0x7FFFFFFF would overflow)
        bits = tl.where(bits < 0x7F800000, (bits + 0xFFFF) & -65536, bits)
    amax = bits.to(tl.float32, bitcast=True)
    inv = encode_multiplier(amax, FMAX)
    q = saturate(xg * inv[:, :, None], FMAX)
    return tl.reshape(q, (BM, BN)), amax


@triton.jit
def dequantize_group_tile(q, amax, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, FMAX: tl.constexpr):
    """FP8 tile [BM, BN] and its group amax [BM, BN // G] -> float32 values q * (amax / FMAX).

    One multiply per element with a per-group scale; the reference computes (q / FMAX) * amax, which can differ
    in the last float32 bit -- far below the FP8 error."""
    amax = amax.to(tl.float32)
    scale = tl.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32))
    qg = tl.reshape(q.to(tl.float32), (BM, BN // G, G))
    return tl.reshape(qg * scale[:, :, None], (BM, BN))


@triton.jit
def tile_amax_bits(x):
    """max |x| over a whole tile as the int32 bit pattern of a non-negative float32 (NaN-propagating)."""
    return tl.max(tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=1), axis=0)


@triton.jit
def _max_pair(a0, b0, a1, b1):
    return tl.maximum(a0, a1), tl.maximum(b0, b1)


@triton.jit
def tile_amax_bits_pair(x, y):
    """``(tile_amax_bits(x), tile_amax_bits(y))`` in one reduction: one round of warp shuffles and shared memory
    for both (6 barriers per gated backward tile instead of 9 in the SASS census)."""
    bits = tl.reduce((tl.abs(x).to(tl.int32, bitcast=True), tl.abs(y).to(tl.int32, bitcast=True)), 1, _max_pair)
    return tl.reduce(bits, 0, _max_pair)


@triton.jit
def fold_amax_bits(slot_ptr, bits):
    """Fold one program's amax bits into an int32 slot (fp8train.nn.grad_amax): one atomic max, skipped when the
    slot already holds as much."""
    tl.atomic_max(slot_ptr, bits, mask=bits > tl.load(slot_ptr))


@triton.jit
def global_amax(partials_ptr, num_partials, BLOCK_P: tl.constexpr):
    """Finish the two-stage amax: max over the int32 partial maxima written by a first pass."""
    offs = tl.arange(0, BLOCK_P)
    bits = tl.load(partials_ptr + offs, mask=offs < num_partials, other=0)
    return tl.max(bits, axis=0).to(tl.float32, bitcast=True)


@triton.jit
def load_group_copy(q_ptr, qamax_ptr, rows, cols, gcols, M, N, BM: tl.constexpr, BN: tl.constexpr,
                    GATHER: tl.constexpr):
    """The float32 values of one [BM, BN] tile (columns ``cols``, group columns ``gcols``) of an E4M3 copy with
    1x16 group maxima, row stride N -- the copies non-linear ops save for backward; 0 outside the tensor.

    GATHER (a plan choice, same bits): load each element's group maximum with the element (16 lanes read one
    address, served by the cache) instead of one per group broadcast through a [BM, BN // 16, 16] reshape."""
    rmask = rows < M
    rows64 = rows[:, None].to(tl.int64)
    mask = rmask[:, None] & (cols < N)[None, :]
    q = tl.load(q_ptr + rows64 * N + cols[None, :], mask=mask, other=0.0)
    if GATHER:
        qamax = tl.load(qamax_ptr + rows64 * (N // 16) + (cols // 16)[None, :], mask=mask, other=0.0)
        scale = tl.div_rn(qamax.to(tl.float32), tl.full((BM, BN), 448.0, tl.float32))
        return q.to(tl.float32) * scale
    qamax = tl.load(qamax_ptr + rows64 * (N // 16) + gcols[None, :], mask=rmask[:, None] & (gcols < N // 16)[None, :],
                    other=0.0)
    return dequantize_group_tile(q, qamax, BM, BN, 16, 448.0)


@triton.jit
def dequant_scale(amax, FMAX: tl.constexpr):
    """amax / FMAX as torch computes ``amax / fmt.max`` on CUDA: times the float32 reciprocal of the scalar."""
    inv = tl.div_rn(tl.full((), 1.0, tl.float32), tl.full((), FMAX, tl.float32))
    return amax * inv


@triton.jit
def shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P: tl.constexpr, FMAX: tl.constexpr):
    """Stage 2 of every per-tensor kernel: the global amax from stage 1's partials, stored once for the host
    in ``amax_out[0]``, with the GEMM's dequantization scale amax / FMAX in ``amax_out[SLOT]``."""
    amax = global_amax(partials_ptr, num_partials, BLOCK_P)
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(amax_out_ptr, amax)
        tl.store(amax_out_ptr + SLOT, dequant_scale(amax, FMAX))
    return amax


@triton.jit
def row_major_tile(M, N, BM: tl.constexpr, BN: tl.constexpr):
    """``(rows, cols, mask, column tile)`` of this program's tile on a 1-D grid numbering the tiles row-major:
    programs running side by side read neighbouring memory.  Launch with ``cdiv(M, BM) * cdiv(N, BN)`` programs.
    (The gated backward's stores took 1.00 ms this way, 1.33 ms on a 2-D grid in column order, on an H200:
    benchmarks/debug/gated_backward_costs.py, session 14.)"""
    t = tl.program_id(0)
    rows, cols, mask = loop_tile(t, M, N, BM, BN)
    return rows, cols, mask, t % tl.cdiv(N, BN)


@triton.jit
def loop_tile(t, M, N, BM: tl.constexpr, BN: tl.constexpr):
    """``(rows, cols, mask)`` of tile ``t`` (tiles numbered row-major) for kernels whose programs loop over
    tiles; tiles past the end are fully masked."""
    tiles_n = tl.cdiv(N, BN)
    rows = (t // tiles_n) * BM + tl.arange(0, BM)
    cols = (t % tiles_n) * BN + tl.arange(0, BN)
    return rows, cols, (rows < M)[:, None] & (cols < N)[None, :]


@triton.jit
def store_tensorwise(vals, inv, rows, cols, M, N, out_ptr, stride_out, out_t_ptr,
                     WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr, FMAX: tl.constexpr,
                     T_ALIGNED: tl.constexpr = False):
    """Scale a float32 tile by ``inv``, saturate, cast to the output's FP8 type and store it row-major
    (``out[rows, cols]``) and/or transposed (``out_t[cols, rows]``, row stride M).  ``T_ALIGNED``: the caller
    guarantees M % 16 == 0 (:func:`transposes_aligned`)."""
    q = saturate(vals * inv, FMAX)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    if WRITE_ROW:
        tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_out + cols[None, :],
                 q.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_T:
        # M is not a specialisation key (no recompiles for new token counts), so the compiler cannot see that
        # the transposed rows start 16-byte aligned, nor that the row mask is constant over 16 rows, and stores a
        # byte at a time; writing M as a multiple of 16 shows both, and the stores become vectors
        # (benchmarks/debug/gated_backward_costs.py)
        M_t = M
        if T_ALIGNED:
            M_t = (M // 16) * 16
        q_t = tl.trans(q.to(out_t_ptr.dtype.element_ty))
        tl.store(out_t_ptr + cols[:, None].to(tl.int64) * M_t + rows[None, :], q_t,
                 mask=(cols < N)[:, None] & (rows < M_t)[None, :])


def transposes_aligned(M: int) -> bool:
    """T_ALIGNED for a kernel writing (N, M) transposed copies: one more compiled variant per kernel for token
    counts that are not a multiple of 16, none for new counts that are."""
    return M % 16 == 0


# --------------------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------------------

@fast_launch
@triton.jit(do_not_specialize=["M"])
def _quantize_groups_kernel(x_ptr, stride_x, q_ptr, amax_ptr, M, N,
                            BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, FMAX: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    x = tl.load(x_ptr + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q, amax = quantize_group_tile(x, BM, BN, G, FMAX, ROUND_BF16)
    tl.store(q_ptr + rows64 * N + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
    gcols = pid_n * (BN // G) + tl.arange(0, BN // G)
    gmask = (rows < M)[:, None] & (gcols < N // G)[None, :]
    tl.store(amax_ptr + rows64 * (N // G) + gcols[None, :], amax.to(amax_ptr.dtype.element_ty), mask=gmask)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _amax_partials_kernel(x_ptr, stride_x, partials_ptr, M, N, num_programs, iters,
                          BM: tl.constexpr, BN: tl.constexpr):
    """Stage 1 of group scaling: each program folds its share of tiles into one partial max (int32 bits).
    Tile t goes to program t % num_programs; tiles past the end are fully masked."""
    pid = tl.program_id(0)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        rows, cols, mask = loop_tile(pid + i * num_programs, M, N, BM, BN)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
        acc = tl.maximum(acc, tile_amax_bits(x.to(tl.float32)))
    tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_partials"])
def _quantize_tensorwise_kernel(x_ptr, stride_x, partials_ptr, num_partials, amax_out_ptr, q_ptr, q_t_ptr, M, N,
                                BM: tl.constexpr, BN: tl.constexpr, BLOCK_P: tl.constexpr, FMAX: tl.constexpr,
                                WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr, T_ALIGNED: tl.constexpr):
    """Stage 2: global amax from the partials, then scale + cast one tile (row-major and/or transposed)."""
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, FMAX)
    inv = encode_multiplier(amax, FMAX)
    rows, cols, mask, _ = row_major_tile(M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0)
    store_tensorwise(x.to(tl.float32), inv, rows, cols, M, N, q_ptr, N, q_t_ptr, WRITE_ROW, WRITE_T, FMAX, T_ALIGNED)


# --------------------------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------------------------

def as_rows(x: torch.Tensor) -> torch.Tensor:
    """View ``x`` as 2-D (rows, last dim) with a contiguous last dim; copies only when no such view exists."""
    if x.dim() == 0:
        x = x.reshape(1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, x.shape[-1])
    except RuntimeError:
        return x.contiguous().view(-1, x.shape[-1])


def amax_and_scale(device, count: int = 1) -> tuple[torch.Tensor, list, list]:
    """``(buffer, amaxes, scales)``: the float32 buffer a per-tensor kernel writes -- ``count`` amaxes, then their
    ``count`` GEMM scales, ``SLOT`` floats apart -- and 0-d views of each value."""
    slot = SLOT.value
    buffer = torch.empty(2 * count * slot, dtype=torch.float32, device=device)
    return buffer, [buffer[i * slot] for i in range(count)], [buffer[(count + i) * slot] for i in range(count)]


def _fmax(fmt) -> float:
    if fmt.torch_dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise ValueError(f"the Triton quantizers write float8_e4m3fn or float8_e5m2, not {fmt.name}")
    return float(fmt.max)


def quantize_groups(x: torch.Tensor, fmt, group_size: int = 16, scale_dtype: torch.dtype = torch.bfloat16
                    ) -> QuantizedTensor:
    """1xG group quantization of ``x`` (last dim a multiple of ``group_size``); returns a QuantizedTensor."""
    fmax = _fmax(fmt)
    x2 = as_rows(x)
    M, N = x2.shape
    if N % group_size:
        raise ValueError(f"last dim {N} is not a multiple of the group size {group_size}")
    data = torch.empty(x.shape, dtype=fmt.torch_dtype, device=x.device)
    amax = torch.empty(*x.shape[:-1], N // group_size, dtype=scale_dtype, device=x.device)
    if x2.numel():
        bm, bn = plans.elementwise_tile(N, "quantize", group=group_size)
        grid = (cdiv(M, bm), cdiv(N, bn))
        _quantize_groups_kernel[grid](x2, x2.stride(0), data, amax, M, N, BM=bm, BN=bn, G=group_size, FMAX=fmax,
                                      ROUND_BF16=scale_dtype == torch.bfloat16, num_warps=plans.warps("quantize"))
    return QuantizedTensor(data=data, amax=amax, fmt=fmt, granularity=Granularity("group", group_size),
                           shape=x.shape, dtype=x.dtype)


def tensorwise_amax(x2: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Stage 1 alone: int32 partial maxima of a 2-D ``x2`` and how many there are."""
    M, N = x2.shape
    bm, bn = plans.elementwise_tile(N, "quantize")
    num = max(1, min(cdiv(M, bm) * cdiv(N, bn), plans.partials_capacity(x2, "quantize")))
    iters = cdiv(cdiv(M, bm) * cdiv(N, bn), num)
    partials = torch.empty(num, dtype=torch.int32, device=x2.device)
    _amax_partials_kernel[(num,)](x2, x2.stride(0), partials, M, N, num, iters, BM=bm, BN=bn,
                                  num_warps=plans.warps("quantize"))
    return partials, num


def quantize_tensorwise(x: torch.Tensor, fmt, *, amax: Optional[torch.Tensor] = None, with_transpose: bool = False,
                        write_rowmajor: bool = True, prediction: Optional[torch.Tensor] = None):
    """Per-tensor quantization with the two-stage group-scaling amax (or a given float32 ``amax``, or -- with
    ``prediction``, a 1-element float32 buffer view, and no ``amax`` -- in one pass with the amax predicted from
    the previous call and repaired when wrong: :mod:`fp8train.kernels.predicted_scale`).

    Returns a QuantizedTensor, or ``(QuantizedTensor, data_t)`` with ``with_transpose`` where ``data_t`` is the
    (K, M) transposed FP8 copy of ``x`` viewed as (M, K).  ``write_rowmajor=False`` skips the row-major data
    (then ``q.data`` is None) for callers that only need the transposed copy.
    """
    fmax = _fmax(fmt)
    x2 = as_rows(x)
    M, N = x2.shape
    predicted = prediction is not None and amax is None and M > 0
    if predicted:
        partials, num = None, 0
    elif amax is not None:
        if amax.dtype != torch.float32 or amax.device != x.device or amax.requires_grad:
            amax = amax.detach().to(device=x.device, dtype=torch.float32)
        # the published amaxes (weights, gradients) already are float32 on x's device: no ops but the views
        partials = (amax if amax.dim() == 1 else amax.reshape(1)).view(torch.int32)
        num = 1
    else:
        partials, num = tensorwise_amax(x2)
    # The in-kernel transposed store scrambles tiles loaded from float32 inputs (seen on an H200 with Triton 3.6,
    # whichever side of the FP8 cast the transpose is on; bf16 inputs are right): for float32 inputs -- the
    # master weights -- transpose the 1-byte result with torch instead (cheap next to the float32 read).
    transpose_after = with_transpose and x2.dtype == torch.float32
    if transpose_after:
        with_transpose, write_rowmajor, keep_rowmajor = False, True, write_rowmajor
    amax_out, (amax_view,), (scale_view,) = amax_and_scale(x.device)  # the given amax is in partials now
    data = torch.empty(x.shape, dtype=fmt.torch_dtype, device=x.device) if write_rowmajor else None
    data_t = torch.empty(N, M, dtype=fmt.torch_dtype, device=x.device) if with_transpose else None
    if predicted:
        from .predicted_scale import quantize_predicted

        quantize_predicted(x2, fmax, prediction, amax_out, data, data_t, write_rowmajor, with_transpose)
    else:
        bm, bn = plans.elementwise_tile(N, "quantize", with_transpose)
        tiles = cdiv(M, bm) * cdiv(N, bn)
        _quantize_tensorwise_kernel[(tiles,)](x2, x2.stride(0), partials, num, amax_out,
                                              data if data is not None else amax_out,
                                              data_t if data_t is not None else amax_out, M, N,
                                              BM=bm, BN=bn, BLOCK_P=plans.partials_block(x2, "quantize"),
                                              FMAX=fmax, WRITE_ROW=write_rowmajor, WRITE_T=with_transpose,
                                              T_ALIGNED=transposes_aligned(M),
                                              num_warps=plans.warps("quantize", with_transpose))
    if transpose_after:
        data_t = data.reshape(M, N).t().contiguous()
        q = QuantizedTensor(data=data if keep_rowmajor else None, amax=amax_view, fmt=fmt, granularity=PER_TENSOR,
                            shape=x.shape, dtype=x.dtype, scale_hint=scale_view)
        return q, data_t
    q = QuantizedTensor(data=data, amax=amax_view, fmt=fmt, granularity=PER_TENSOR, shape=x.shape, dtype=x.dtype,
                        scale_hint=scale_view)
    return (q, data_t) if with_transpose else q


@fast_launch
@triton.jit(do_not_specialize=["n"])
def _dequantize_tensorwise_kernel(q_ptr, amax_ptr, out_ptr, n, INV_FMAX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.load(amax_ptr).to(tl.float32)
    # the torch reference's roundings on CUDA: torch divides by a scalar as a product with its float32
    # reciprocal (on CPU it divides: up to one float32 ulp apart), then * amax, then the output cast
    y = (q * INV_FMAX) * amax
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_tensorwise(data: torch.Tensor, amax: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    """A per-tensor FP8 tensor's values in ``dtype``: one pass (1 byte read, 2-4 written per element) where the
    torch reference makes four (float copy, division, product, cast)."""
    data = data.contiguous()
    out = torch.empty(data.shape, dtype=dtype, device=data.device)
    n = data.numel()
    if n:
        block = plans.plan("dequantize").tile_elements
        _dequantize_tensorwise_kernel[(cdiv(n, block),)](data, amax, out, n, INV_FMAX=1.0 / fmax,
                                                                 BLOCK=block, num_warps=plans.warps("dequantize"))
    return out
