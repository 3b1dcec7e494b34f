"""Triton kernel of the stability lab: round a tensor through a simulated minifloat in one pass.

Same numbers as the float32 torch path of :func:`fp8train.lab.simulated_linear.simulate_quantize` (the
reference), for scaling ``"none"``, ``"tensor"`` and ``"1xG"``:

* scaled: ``inv = (1 / amax) * MAX`` (IEEE division; what torch's ``MAX / amax`` computes for a tensor amax; 0
  where amax is 0 or NaN), ``v = x * inv``; unscaled: ``v = x``;
* ``v`` saturated to +-MAX and rounded to nearest-even on the format's grid: in the format's normal range by
  dropping the low ``23 - man_bits`` bits of the float32 encoding with round-to-nearest-even on the integer
  (a carry into the exponent is the correct rounding into the next binade); below the smallest normal, where
  the grid is the fixed quantum ``q = 2^(emin - man_bits)``, by ``(|v| + 2^23 q) - 2^23 q``, which float32
  addition rounds to a multiple of q (|v| < 2^man_bits q <= 2^23 q keeps the sum in one binade);
* scaled: ``out = (r / MAX) * amax``; NaN and inf inputs are stored unchanged.

The group maxima come from :func:`fp8train.quant.group_amax` (torch).  Any shape: the tensor is processed as a
flat contiguous array of ``rows x cols`` elements, ``cols`` a runtime argument (no recompiles per shape); a
kernel is compiled once per format.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from .launch import cdiv, fast_launch

__all__ = ["simulate_round"]

BLOCK = 1024


@fast_launch
@triton.jit(do_not_specialize=["n", "cols", "n_groups"])
def _simulate_round_kernel(x_ptr, out_ptr, amax_ptr, n, cols, n_groups,
                           FMAX: tl.constexpr, MIN_NORMAL: tl.constexpr, MAGIC: tl.constexpr, SHIFT: tl.constexpr,
                           FNUZ: tl.constexpr, SCALED: tl.constexpr, GROUP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = x
    if SCALED:
        if GROUP > 0:
            group = (offs // cols) * n_groups + (offs % cols) // GROUP
        else:
            group = tl.zeros_like(offs)
        amax = tl.load(amax_ptr + group, mask=mask, other=1.0)
        one = tl.full(amax.shape, 1.0, tl.float32)
        inv = tl.where(amax > 0, tl.div_rn(one, amax) * FMAX, 0.0)  # as torch computes `max / amax`
        v = x * inv
    # saturate (NaN stays NaN)
    v = tl.minimum(tl.maximum(v, -FMAX, propagate_nan=tl.PropagateNan.ALL), FMAX, propagate_nan=tl.PropagateNan.ALL)
    bits = v.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # 0x80000000
    mag_bits = bits & 0x7FFFFFFF
    mag = mag_bits.to(tl.float32, bitcast=True)
    if SHIFT > 0:
        lsb = (mag_bits >> SHIFT) & 1
        normal_bits = (mag_bits + ((1 << (SHIFT - 1)) - 1) + lsb) & -(1 << SHIFT)
        normal = normal_bits.to(tl.float32, bitcast=True)
    else:
        normal = mag
    subnormal = (mag + MAGIC) - MAGIC
    rounded = tl.where(mag < MIN_NORMAL, subnormal, normal)
    rounded = (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
    if FNUZ:
        rounded = rounded + 0.0  # no negative zero in fnuz formats
    out = rounded
    if SCALED:
        out = tl.div_rn(rounded, tl.full(rounded.shape, FMAX, tl.float32)) * amax
    finite = (x.to(tl.int32, bitcast=True) & 0x7F800000) != 0x7F800000  # not NaN, not inf
    out = tl.where(finite, out, x)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def simulate_round(x: torch.Tensor, fmt, amax=None, group: int = 0) -> torch.Tensor:
    """``x`` rounded through the minifloat ``fmt`` (CUDA, float32/bf16/fp16), in x's dtype and shape.

    ``amax``: None (no scaling), a 0-d tensor (per tensor) or the ``(*lead, ceil(cols / group))`` group maxima of
    1x``group`` groups along the last dim (float32).  The caller checks that ``fmt``'s grid fits float32.
    """
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.numel()
    if n == 0:
        return out
    cols = x.shape[-1] if x.dim() else 1
    scaled = amax is not None
    if scaled:
        amax = amax.float().contiguous()
        n_groups = amax.shape[-1] if group > 0 else 1
    else:
        amax, n_groups = x, 1  # unused pointer
    grid = (cdiv(n, BLOCK),)
    _simulate_round_kernel[grid](
        x, out, amax, n, cols, n_groups,
        FMAX=float(fmt.max), MIN_NORMAL=float(fmt.min_normal), MAGIC=math.ldexp(1.0, fmt.emin - fmt.man_bits + 23),
        SHIFT=23 - fmt.man_bits, FNUZ=fmt.variant == "fnuz", SCALED=scaled, GROUP=group if scaled else 0,
        BLOCK=BLOCK)
    return out
