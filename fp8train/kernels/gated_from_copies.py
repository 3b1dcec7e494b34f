"""Triton: down_proj's FP8 input ``act(gate_hat) * up_hat`` rebuilt from the saved E4M3 1x16 gate/up copies.

The precision-flow MLP (:mod:`fp8train.nn.precision_flow`, ``recompute_gated_product``) computes the product
from the FP8 copies in forward and rebuilds the identical tensor in backward instead of saving it.  Two passes
over the copies (1 byte/element each): the first computes the product's per-tensor amax (partial maxima per
program), the second recomputes the product, scales it and writes the E4M3 data row-major and/or transposed.

Reference: ``fp8train.nn.precision_flow._product_from_fp8`` (dequantize ``q / 448 * amax``, act, multiply,
round to the output dtype, per-tensor E4M3).  Shared device helpers come from :mod:`fp8train.kernels.quantize`
and :mod:`fp8train.kernels.activation`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant import PER_TENSOR, QuantizedTensor
from . import plans
from .launch import cdiv, fast_launch
from .activation import ACT_CODE, act_value
from .quantize import (E4M3_MAX, amax_and_scale, encode_multiplier, load_group_copy, loop_tile, row_major_tile,
                       shared_amax, store_tensorwise, tile_amax_bits, transposes_aligned)

__all__ = ["product_from_copies"]



@triton.jit
def _product_tile(gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, h_dtype_ptr, rows, cols, gcols, M, N,
                  BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr):
    """act(gate_hat) * up_hat for one [BM, BN] tile, rounded to the output dtype, as float32 (0 outside)."""
    rmask = rows < M
    mask = rmask[:, None] & (cols < N)[None, :]
    g_hat = load_group_copy(gq_ptr, gamax_ptr, rows, cols, gcols, M, N, BM, BN, GATHER)
    u_hat = load_group_copy(uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN, GATHER)
    h = (act_value(g_hat, ACT) * u_hat).to(h_dtype_ptr.dtype.element_ty).to(tl.float32)
    return tl.where(mask, h, 0.0)


@fast_launch
@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _product_amax_kernel(gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, h_dtype_ptr, partials_ptr, M, N, num_programs,
                         iters, BM: tl.constexpr, BN: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    acc = tl.full((), 0, tl.int32)
    for i in range(0, iters):
        t = pid + i * num_programs
        rows, cols, _ = loop_tile(t, M, N, BM, BN)
        gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
        h = _product_tile(gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, h_dtype_ptr, rows, cols, gcols, M, N, BM, BN, ACT,
                          GATHER)
        acc = tl.maximum(acc, tile_amax_bits(h))
    tl.store(partials_ptr + pid, acc)


@fast_launch
@triton.jit(do_not_specialize=["M"])
def _product_apply_kernel(gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, h_dtype_ptr, partials_ptr, num_partials,
                          amax_out_ptr, q_ptr, q_t_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                          BLOCK_P: tl.constexpr, ACT: tl.constexpr, WRITE_ROW: tl.constexpr, WRITE_T: tl.constexpr,
                          GATHER: tl.constexpr, T_ALIGNED: tl.constexpr):
    amax = shared_amax(partials_ptr, num_partials, amax_out_ptr, BLOCK_P, E4M3_MAX)
    rows, cols, _, tile_n = row_major_tile(M, N, BM, BN)
    gcols = tile_n * (BN // 16) + tl.arange(0, BN // 16)
    h = _product_tile(gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, h_dtype_ptr, rows, cols, gcols, M, N, BM, BN, ACT,
                          GATHER)
    store_tensorwise(h, encode_multiplier(amax, E4M3_MAX), rows, cols, M, N, q_ptr, N, q_t_ptr,
                     WRITE_ROW, WRITE_T, E4M3_MAX, T_ALIGNED)


def product_from_copies(gate: QuantizedTensor, up: QuantizedTensor, name: str, out_dtype: torch.dtype, *,
                        write_rowmajor: bool = True, with_transpose: bool = False):
    """Per-tensor E4M3 ``act(gate_hat) * up_hat`` from two contiguous E4M3 1x16 CUDA copies (last dim % 16 == 0).

    Returns ``(QuantizedTensor, data_t)``; ``data_t`` (the (K, M) transposed data) is None without
    ``with_transpose``, and ``q.data`` is None without ``write_rowmajor``.
    """
    from ..mixed_granularity import LINEAR_FORMAT

    N = gate.shape[-1]
    M = gate.data.numel() // N if N else 0
    dev = gate.data.device
    h_dtype = torch.empty(1, dtype=out_dtype, device=dev)  # only its dtype is used
    family = "product_from_copies"
    plan = plans.plan(family)
    bm, bn = plans.elementwise_tile(N, family)
    num_tiles = cdiv(M, bm) * cdiv(N, bn)
    nprog = max(1, min(num_tiles, plans.partials_capacity(gate.data, family)))
    partials = torch.empty(nprog, dtype=torch.int32, device=dev)
    iters = cdiv(num_tiles, nprog)
    if M:
        _product_amax_kernel[(nprog,)](gate.data, gate.amax, up.data, up.amax, h_dtype, partials, M, N, nprog, iters,
                                       BM=bm, BN=bn, ACT=ACT_CODE[name], GATHER=plan.gather_scales,
                                       num_warps=plan.warps)
    amax, (amax_view,), (scale_view,) = amax_and_scale(dev)
    data = torch.empty(gate.shape, dtype=torch.float8_e4m3fn, device=dev) if write_rowmajor else None
    data_t = torch.empty(N, M, dtype=torch.float8_e4m3fn, device=dev) if with_transpose else None
    if M:
        bm2, bn2 = plans.elementwise_tile(N, family, with_transpose)
        tiles = cdiv(M, bm2) * cdiv(N, bn2)
        _product_apply_kernel[(tiles,)](gate.data, gate.amax, up.data, up.amax, h_dtype, partials, nprog,
                                        amax, data if data is not None else amax,
                                        data_t if data_t is not None else amax, M, N, BM=bm2, BN=bn2,
                                        BLOCK_P=plans.partials_block(gate.data, family),
                                        ACT=ACT_CODE[name], WRITE_ROW=write_rowmajor,
                                        WRITE_T=with_transpose, GATHER=plan.gather_scales,
                                        T_ALIGNED=transposes_aligned(M),
                                        num_warps=plans.warps(family, with_transpose))
    else:  # an empty tensor: amax 0 (no kernel runs)
        amax.zero_()
    q = QuantizedTensor(data=data, amax=amax_view, scale_hint=scale_view, fmt=LINEAR_FORMAT, granularity=PER_TENSOR,
                        shape=gate.shape, dtype=out_dtype)
    return q, data_t
