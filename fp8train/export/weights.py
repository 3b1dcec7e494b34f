"""Weight quantization for export: scales, round-to-nearest codes and the exact dequantization.

A quantized weight is ``codes`` (one per element) times ``scale`` (one per output channel, or per group of
``G`` input columns of a row).  Scales are chosen first and stored in bfloat16 (rounded up from
``amax / format_max``, or up to a power of two for ``w4a8-fp``); the codes are then computed *with the stored
scale*, so ``codes * scale`` is bit for bit what a checkpoint reader reconstructs.

Codes: int8 for INT8/INT4, ``torch.float8_e4m3fn`` for E4M3, float32 holding E2M1 values for FP4 (packing
into int32 / uint8 is the writer's business, see :mod:`.packing`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from ..quant import group_amax, round_up_to_bf16
from .power_of_two_scales import power_of_two_ceil, shared_max_scales
from .schemes import Scheme

__all__ = ["QuantizedWeight", "choose_scales", "encode", "expand_scale", "quantize_weight", "relative_error"]


@dataclasses.dataclass
class QuantizedWeight:
    codes: torch.Tensor
    scale: torch.Tensor  # bfloat16, [out, 1] or [out, in // group_size]
    scheme: Scheme
    lorc_u: Optional[torch.Tensor] = None  # bf16 [out, r]: low-rank error compensation (LoRC), see lorc.py
    lorc_v: Optional[torch.Tensor] = None  # bf16 [r, in]

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32, *, lorc: bool = True) -> torch.Tensor:
        """``codes * scale`` computed exactly in float32 (+ ``U @ V`` when LoRC factors are present), in ``dtype``.

        For every format the float32 product is exact, so ``dequantize(torch.bfloat16)`` is the single rounding
        of the exact value -- the same number a bf16 reader gets from ``codes.to(bf16) * scale``.
        """
        values = self.codes.float() * expand_scale(self.scale.float(), self.codes.shape[-1])
        if lorc and self.lorc_u is not None:
            values = values + self.lorc_u.float() @ self.lorc_v.float()
        return values.to(dtype)


def expand_scale(scale: torch.Tensor, columns: int) -> torch.Tensor:
    """Per-channel [out, 1] or per-group [out, n_groups] scales -> broadcastable against [out, columns]."""
    if scale.shape[-1] == 1:
        return scale
    group = columns // scale.shape[-1]
    return scale.repeat_interleave(group, dim=-1)


def choose_scales(weight: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Round-to-nearest scales for ``weight`` [out, in] (or a slice of whole groups of it), in bfloat16."""
    if scheme.group_size is None:
        amax = group_amax(weight, "row")
    else:
        if weight.shape[-1] % scheme.group_size:
            raise ValueError(f"{weight.shape[-1]} columns are not a multiple of the group size {scheme.group_size}")
        amax = group_amax(weight, f"group:{scheme.group_size}")
    return scales_from_amax(amax, scheme)


def scales_from_amax(amax: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    amax = amax.float()
    if not bool(torch.isfinite(amax).all()):
        raise ValueError("cannot quantize a weight that holds NaN or inf values; check the checkpoint")
    fmax = scheme.weight_format.max
    if scheme.scale_rule == "pow2":  # ZeroQuant-FP M1
        scale = power_of_two_ceil(torch.where(amax > 0, amax.double() / fmax, torch.ones_like(amax).double()))
        return scale.to(torch.bfloat16)  # a power of two is exact in bf16
    if scheme.scale_rule == "pow2-shared-max":  # ZeroQuant-FP M2: row max (bf16) over powers of two
        scale = torch.where(amax > 0, amax / fmax, torch.zeros_like(amax))
        row = round_up_to_bf16(scale.amax(dim=-1, keepdim=True)).float()
        row = torch.where(row > 0, row, torch.ones_like(row))
        scale = torch.where(scale > 0, scale, row)  # all-zero groups: any scale; use the row's
        return shared_max_scales(scale, row).to(torch.bfloat16)  # exact: bf16 value times 2**-k
    # Round the scale up so that amax / scale <= fmax: the largest element is not clipped.  An all-zero row
    # gets scale 1 (its codes are 0 anyway) so no reader ever divides by zero.
    scale = torch.where(amax > 0, amax / fmax, torch.ones_like(amax))
    # (amax / fmax is rounded once in float32; a value a fraction of an ulp past fmax saturates in encode.)
    return round_up_to_bf16(scale)


def encode(weight: torch.Tensor, scale: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    """Codes of ``weight`` with the given (stored) scales: round to nearest (ties to even), saturating."""
    scaled = weight.float() / expand_scale(scale.float(), weight.shape[-1])
    return scheme.weight_format.to_storage(scaled)


def quantize_weight(weight: torch.Tensor, scheme: Scheme) -> QuantizedWeight:
    """Round-to-nearest quantization of one [out, in] weight matrix."""
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().float()
    scale = choose_scales(w, scheme)
    return QuantizedWeight(codes=encode(w, scale, scheme), scale=scale, scheme=scheme)


def relative_error(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref = reference.detach().float()
    denom = ref.norm()
    return float((approx.float() - ref).norm() / denom) if denom > 0 else float((approx.float() - ref).norm())
