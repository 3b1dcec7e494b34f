"""LayerNorm (with or without affine weight/bias) that saves its input as FP8 1x16 groups.

    y, saved = layernorm_forward(x, weight, bias, eps)
    dx, dweight, dbias = layernorm_backward(dy, saved, weight)

Forward is exact (``F.layer_norm`` semantics: computed in fp32, returned in x's dtype).  What is saved is the
**centred** input ``x - mean`` as E4M3 1x16 groups plus the fp32 ``rstd`` (4 B/row).  Saving the centred values
instead of ``x`` costs nothing (the row mean is already in registers) and avoids the cancellation that
``x_hat - mean`` would suffer when a row's mean is large against its spread; the mean itself is then not needed.
Backward: ``n = c_hat * rstd``, ``g = dy * weight``, ``dx = rstd * (g - mean(g) - n * mean(g * n))``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .. import mixed_granularity as mg
from ..quant import QuantizedTensor

__all__ = ["LayerNormSaved", "layernorm_forward", "layernorm_backward", "layer_norm", "FP8LayerNorm"]


@dataclasses.dataclass
class LayerNormSaved:
    """What LayerNorm keeps for backward."""

    centered: QuantizedTensor  # FP8 E4M3 1x16 copy of x - mean(x)
    rstd: torch.Tensor  # float32, shape x.shape[:-1]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(x, weight, bias):
    if not torch.is_floating_point(x):
        raise TypeError(f"LayerNorm expects a floating-point input, got {x.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != x.shape[-1:]:
            raise ValueError(f"LayerNorm {name} has shape {tuple(p.shape)} but the input's last dim is {x.shape[-1]}")


def _reference_forward(x, weight, bias, eps):
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    centered = xc - xc.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centered.pow(2).mean(-1) + eps)
    y = centered * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(cdt)
    if bias is not None:
        y = y + bias.to(cdt)
    return y.to(x.dtype), centered, rstd


def layernorm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, *,
                      quantize_output: bool = False, output_transpose: bool = False):
    """LayerNorm forward that returns ``(y, saved)``; ``quantize_output`` as in
    :func:`fp8train.nn.rmsnorm.rmsnorm_forward` (per-tensor E4M3 for the next linear layer)."""
    _check(x, weight, bias)
    if mg.use_kernels("layernorm", x, weight, bias):
        from ..kernels import layernorm as kernel

        y, rstd, copy = kernel.layernorm_forward(x, weight, bias, eps, quantize_output=quantize_output,
                                                 output_transpose=output_transpose)
        return y, LayerNormSaved(centered=copy, rstd=rstd)
    y, centered, rstd = _reference_forward(x, weight, bias, eps)
    # the copy is made from the centred values rounded to x's dtype, as the kernel writes them
    saved = LayerNormSaved(centered=mg.save_for_nonlinear(centered.to(x.dtype)), rstd=rstd)
    if quantize_output:
        y = mg.quantize_for_linear(y, with_transpose=output_transpose)
    return y, saved


def layernorm_backward(dy: torch.Tensor, saved: LayerNormSaved, weight: Optional[torch.Tensor],
                       has_bias: bool = True):
    """``(dx, dweight, dbias)``; dweight/dbias are None for a non-affine LayerNorm (or ``has_bias=False``)."""
    if mg.use_kernels("layernorm", dy, weight) and mg.is_kernel_copy(saved.centered):
        from ..kernels import layernorm as kernel

        return kernel.layernorm_backward(dy, saved.centered, saved.rstd, weight, has_bias)
    x_dtype = saved.centered.dtype
    cdt = _compute_dtype(x_dtype)
    rstd = saved.rstd.to(cdt).unsqueeze(-1)
    n = saved.centered.dequantize(cdt) * rstd
    dy_c = dy.to(cdt)
    g = dy_c * weight.to(cdt) if weight is not None else dy_c
    dx = rstd * (g - g.mean(-1, keepdim=True) - n * (g * n).mean(-1, keepdim=True))
    hidden = n.shape[-1]
    dweight = (dy_c * n).reshape(-1, hidden).sum(0).to(weight.dtype) if weight is not None else None
    dbias = dy_c.reshape(-1, hidden).sum(0).to(weight.dtype if weight is not None else x_dtype) if has_bias else None
    return dx.to(x_dtype), dweight, dbias


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, saved = layernorm_forward(x, weight, bias, eps)
        tensors, ctx.meta = mg.pack(saved.centered)
        ctx.save_for_backward(*tensors, saved.rstd, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        data, amax, rstd, weight = ctx.saved_tensors
        saved = LayerNormSaved(centered=mg.unpack(ctx.meta, data, amax), rstd=rstd)
        dx, dweight, dbias = layernorm_backward(dy, saved, weight, has_bias=ctx.has_bias)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               eps: float = 1e-5) -> torch.Tensor:
    """Differentiable LayerNorm over the last dim that saves FP8 for backward."""
    return LayerNormFunction.apply(x, weight, bias, eps)


class FP8LayerNorm(nn.Module):
    """Drop-in ``nn.LayerNorm`` over the last dim; ``from_module`` reuses the original weight/bias Parameters."""

    def __init__(self, hidden_size: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=dtype)) if bias else None
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_module(cls, norm: nn.Module) -> "FP8LayerNorm":
        shape = tuple(getattr(norm, "normalized_shape", ()))
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if len(shape) != 1 and weight is not None:
            shape = tuple(weight.shape)
        if len(shape) != 1:
            raise ValueError(f"FP8LayerNorm normalizes over the last dim only; {type(norm).__name__} has "
                             f"normalized_shape {shape}")
        eps = getattr(norm, "eps", None)
        if eps is None:
            eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            raise ValueError(f"cannot find the epsilon of {type(norm).__name__} (looked for eps, variance_epsilon)")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.normalized_shape = shape
        new.eps = float(eps)
        if weight is not None:
            new.weight = weight  # the original Parameter objects: state_dict keys unchanged
        else:
            new.register_parameter("weight", None)
        if bias is not None:
            new.bias = bias
        else:
            new.register_parameter("bias", None)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.weight is not None}, saves=E4M3 1x16"
