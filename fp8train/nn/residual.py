"""The residual add that produces the next layer's input, optionally emitting the FP8 copy the next norm saves.

    h = residual_add(residual, x)                         # residual + x (saves nothing for backward)
    h, h_fp8 = residual_add(residual, x, emit_fp8_copy=True)
    y = rms_norm(h, weight, eps, x_saved=h_fp8)           # the norm does not quantize h again

Precision flow: the add already has the sum in registers, so the GPU kernel writes the E4M3 1x16 copy
(1.125 B/element) in the same pass instead of the norm re-reading the bf16 sum to make it.
The sum is computed in fp32 and rounded once to the promoted dtype (the same value as torch's ``residual + x``).
"""

from __future__ import annotations


import torch
from torch import nn

from .. import mixed_granularity as mg

__all__ = ["residual_add_forward", "residual_add", "ResidualAdd"]


def _check(residual, x):
    if residual.shape != x.shape:
        raise ValueError(f"residual add needs equal shapes, got {tuple(residual.shape)} and {tuple(x.shape)}")


def _reference_sum(residual, x):
    dtype = torch.promote_types(residual.dtype, x.dtype)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    return (residual.to(cdt) + x.to(cdt)).to(dtype)


def residual_add_forward(residual: torch.Tensor, x: torch.Tensor, *, emit_fp8_copy: bool = False):
    """``(sum, copy)``: the sum and, with ``emit_fp8_copy``, its E4M3 1x16 QuantizedTensor (else None)."""
    _check(residual, x)
    if mg.use_kernels("residual_add", residual, x):
        from ..kernels import residual as kernel

        return kernel.residual_add(residual, x, emit_fp8_copy=emit_fp8_copy)
    total = _reference_sum(residual, x)
    return total, (mg.save_for_nonlinear(total) if emit_fp8_copy else None)


class ResidualAddFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, emit_fp8_copy):
        total, copy = residual_add_forward(residual, x, emit_fp8_copy=emit_fp8_copy)
        ctx.dtypes = (residual.dtype, x.dtype)
        if copy is None:
            return total
        data = copy.data.clone() if mg.is_quantization_disabled() else copy.data  # exact mode: not an alias
        ctx.mark_non_differentiable(data, copy.amax)
        return total, data, copy.amax

    @staticmethod
    def backward(ctx, d_total, *unused):
        return d_total.to(ctx.dtypes[0]), d_total.to(ctx.dtypes[1]), None


def residual_add(residual: torch.Tensor, x: torch.Tensor, *, emit_fp8_copy: bool = False):
    """``residual + x``; with ``emit_fp8_copy=True`` returns ``(sum, QuantizedTensor)`` where the second item is
    the E4M3 1x16 copy of the sum for the next norm's ``x_saved``.  Saves nothing for backward."""
    if not emit_fp8_copy:
        return ResidualAddFunction.apply(residual, x, False)
    total, data, amax = ResidualAddFunction.apply(residual, x, True)
    meta = mg.QuantMeta(mg.NONLINEAR_FORMAT, mg.NONLINEAR_GRANULARITY, total.shape, total.dtype, False)
    if mg.is_quantization_disabled():
        meta = mg.QuantMeta(None, None, total.shape, total.dtype, True)
    return total, mg.unpack(meta, data, amax)


class ResidualAdd(nn.Module):
    """``forward(residual, x) = residual + x`` (optionally with the FP8 copy) as a module."""

    def __init__(self, emit_fp8_copy: bool = False):
        super().__init__()
        self.emit_fp8_copy = emit_fp8_copy

    def forward(self, residual: torch.Tensor, x: torch.Tensor):
        return residual_add(residual, x, emit_fp8_copy=self.emit_fp8_copy)
