"""Triton rotary position embedding: one launch rotates q and k (forward), one launch their gradients (backward).

Reference: :mod:`fp8train.nn.rotary` (Hugging Face's ``q * cos + rotate_half(q) * sin``).  The kernel rounds
exactly where torch's eager ops do, so results are bit-identical:

* forward, with ``r`` = round to the output dtype (``promote_types(q.dtype, cos.dtype)``):
  ``out1 = r(r(x1 * c1) + r(-x2 * s1))``, ``out2 = r(r(x2 * c2) + r(x1 * s2))``
* backward, with ``R`` = round to the gradient's dtype, then to q's dtype (autograd casts each grad to its
  input's dtype): ``dx1 = R(d1 * c1) + R(d2 * s2)``, ``dx2 = R(d2 * c2) - R(d1 * s1)``, summed in fp32 and
  rounded once to q's dtype; ``+ 0.0`` turns a -0 sum into +0, as autograd's sum with zero-padded slices does.

Products and sums are fp32; the launches pass ``enable_fp_fusion=False`` so a multiply and an add never become
one fma (torch rounds the product first).  One program handles all heads of q and k at one (batch, position),
so cos/sin are read once per position; q/k are read once and written once (memory-bound).  Sequence length,
batch and head counts are runtime values; only head_dim / 2 and the head block are compile-time constants.
Backward can also fold max|gradient| of what it stored into a slot per tensor (fp8train.nn.grad_amax), so the
q/k projections' E5M2 quantizers skip their amax pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .quantize import fold_amax_bits, tile_amax_bits
from .launch import fast_launch, next_power_of_2

__all__ = ["rotary_apply"]


@triton.jit
def _rotate_heads(x_ptr, x_sb, x_ss, x_sh, x_sd, y_ptr, y_sb, y_ss, y_sh, y_sd, b, s, n_heads,
                  c1, c2, s1, s2, offs, dmask, amax_ptr, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                  BACKWARD: tl.constexpr, AMAX: tl.constexpr):
    x_base = x_ptr + b * x_sb + s * x_ss
    y_base = y_ptr + b * y_sb + s * y_ss
    in_dtype = x_ptr.dtype.element_ty
    out_dtype = y_ptr.dtype.element_ty
    bits = tl.full((), 0, tl.int32)
    for h0 in range(0, n_heads, BLOCK_H):
        heads = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
        mask = (heads < n_heads)[:, None] & dmask[None, :]
        x1_ptrs = x_base + heads[:, None] * x_sh + offs[None, :] * x_sd
        y1_ptrs = y_base + heads[:, None] * y_sh + offs[None, :] * y_sd
        x1 = tl.load(x1_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x1_ptrs + HALF * x_sd, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            # x is the output's gradient; each of autograd's partial grads is rounded to the output dtype (the
            # mul's result), then to q's dtype (the engine's cast), before they are summed in q's dtype
            a1 = (x1 * c1[None, :]).to(in_dtype).to(out_dtype).to(tl.float32)
            a2 = (x2 * c2[None, :]).to(in_dtype).to(out_dtype).to(tl.float32)
            b1 = (x1 * s1[None, :]).to(in_dtype).to(out_dtype).to(tl.float32)
            b2 = (x2 * s2[None, :]).to(in_dtype).to(out_dtype).to(tl.float32)
            y1 = (a1 + b2) + 0.0
            y2 = (a2 - b1) + 0.0
        else:
            y1 = (x1 * c1[None, :]).to(out_dtype).to(tl.float32) + (-x2 * s1[None, :]).to(out_dtype).to(tl.float32)
            y2 = (x2 * c2[None, :]).to(out_dtype).to(tl.float32) + (x1 * s2[None, :]).to(out_dtype).to(tl.float32)
        y1 = y1.to(out_dtype)
        y2 = y2.to(out_dtype)
        tl.store(y1_ptrs, y1, mask=mask)
        tl.store(y1_ptrs + HALF * y_sd, y2, mask=mask)
        if AMAX:  # max |stored value| for the projection's E5M2 quantizer (masked lanes hold +0)
            bits = tl.maximum(bits, tl.maximum(tile_amax_bits(y1.to(tl.float32)), tile_amax_bits(y2.to(tl.float32))))
    if AMAX:
        fold_amax_bits(amax_ptr, bits)


@fast_launch
@triton.jit(do_not_specialize=["S"])
def _rotary_kernel(q_ptr, q_sb, q_ss, q_sh, q_sd, k_ptr, k_sb, k_ss, k_sh, k_sd,
                   qo_ptr, qo_sb, qo_ss, qo_sh, qo_sd, ko_ptr, ko_sb, ko_ss, ko_sh, ko_sd,
                   cos_ptr, cos_sb, cos_ss, cos_sd, sin_ptr, sin_sb, sin_ss, sin_sd, S, n_q_heads, n_k_heads,
                   q_amax_ptr, k_amax_ptr,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
                   BACKWARD: tl.constexpr, AMAX: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // S
    s = pid % S
    offs = tl.arange(0, BLOCK_HALF)
    dmask = offs < HALF
    cos_row = cos_ptr + b * cos_sb + s * cos_ss
    sin_row = sin_ptr + b * sin_sb + s * sin_ss
    c1 = tl.load(cos_row + offs * cos_sd, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_row + (offs + HALF) * cos_sd, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_row + offs * sin_sd, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_row + (offs + HALF) * sin_sd, mask=dmask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, q_sb, q_ss, q_sh, q_sd, qo_ptr, qo_sb, qo_ss, qo_sh, qo_sd, b, s, n_q_heads,
                  c1, c2, s1, s2, offs, dmask, q_amax_ptr, HALF, BLOCK_HQ, BACKWARD, AMAX)
    _rotate_heads(k_ptr, k_sb, k_ss, k_sh, k_sd, ko_ptr, ko_sb, ko_ss, ko_sh, ko_sd, b, s, n_k_heads,
                  c1, c2, s1, s2, offs, dmask, k_amax_ptr, HALF, BLOCK_HK, BACKWARD, AMAX)


def _head_block(n_heads: int, block_half: int) -> int:
    # about 2048 elements per half-tile: all 16 heads of a 128-dim q in one step, fewer for wider heads
    return max(1, min(next_power_of_2(n_heads), 2048 // block_half))


def rotary_apply(q, k, q_out, k_out, cos, sin, *, backward: bool = False, amax_slots=None) -> None:
    """Write the rotated q/k (or, with ``backward``, the q/k gradients from the outputs' gradients in ``q``/``k``)
    into ``q_out``/``k_out``.  ``amax_slots`` (backward only): two zeroed int32 slots
    (:func:`fp8train.nn.grad_amax.new_slot`) that receive the float32 bits of max|q_out| and max|k_out|.

    Every tensor is indexed as (batch, position, head, dim): ``q``/``k``/``q_out``/``k_out`` are 4-D views in that
    order (any strides; callers permute Hugging Face's (batch, head, position, dim) views), ``cos``/``sin`` are
    (batch, position, dim) views (stride 0 where broadcast).  head_dim must be even.
    """
    B, S, n_q_heads, D = q.shape
    n_k_heads = k.shape[2]
    half = D // 2
    block_half = next_power_of_2(half)
    grid = (B * S,)
    _rotary_kernel[grid](q, *q.stride(), k, *k.stride(), q_out, *q_out.stride(), k_out, *k_out.stride(),
                         cos, *cos.stride(), sin, *sin.stride(), S, n_q_heads, n_k_heads,
                         *(amax_slots if amax_slots is not None else (cos, cos)),
                         HALF=half, BLOCK_HALF=block_half, BLOCK_HQ=_head_block(n_q_heads, block_half),
                         BLOCK_HK=_head_block(n_k_heads, block_half), BACKWARD=backward,
                         AMAX=backward and amax_slots is not None, num_warps=4,
                         enable_fp_fusion=False)

