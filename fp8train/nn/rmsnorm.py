"""RMSNorm that saves its input as FP8 1x16 groups (COAT) instead of bf16/fp32.

    y, saved = rmsnorm_forward(x, weight, eps)                         # y in the model's dtype
    y_q, saved = rmsnorm_forward(x, weight, eps, quantize_output=True) # y as per-tensor E4M3, for the next linear
    dx, dweight = rmsnorm_backward(dy, saved, weight)

Forward computes from the exact input, exactly like the module it replaces; only backward sees the FP8 copy
(x_hat) and the fp32 ``rstd`` of the forward: ``dx = rstd * (g - n * mean(g * n))`` with ``n = x_hat * rstd`` and
``g = dy * weight``.  Saved: 1.125 B/element (E4M3 + one bf16 amax per 16) + 4 B/row, vs 4 B/element for HF's
fp32 upcast that autograd keeps (plus the bf16 input).

Styles (how the weight is applied; ``FP8RMSNorm.from_module`` picks it from the module it replaces):

* ``"llama"`` -- HF LlamaRMSNorm/Qwen/Mistral...: ``weight * (x_fp32 * rstd).to(x.dtype)``; the result has the
  promoted dtype of weight and x, as in HF.
* ``"torch"`` -- ``torch.nn.RMSNorm`` / ``F.rms_norm``: ``(x_fp32 * rstd * weight).to(x.dtype)``.
* ``"gemma"`` -- Gemma/Qwen3-Next-style zero-centred weight: ``(x_fp32 * rstd * (1 + weight)).to(x.dtype)``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Optional

import torch
from torch import nn

from .. import mixed_granularity as mg
from ..kernels import warn_once
from ..quant import QuantizedTensor

__all__ = ["RMSNormSaved", "rmsnorm_forward", "rmsnorm_backward", "rms_norm", "add_rmsnorm_forward", "add_rms_norm",
           "FP8RMSNorm", "STYLES"]

STYLES = ("llama", "torch", "gemma")


@dataclasses.dataclass
class RMSNormSaved:
    """What RMSNorm keeps for backward."""

    x: QuantizedTensor  # FP8 E4M3 1x16 copy of the input
    rstd: torch.Tensor  # 1 / sqrt(mean(x^2) + eps), float32, shape x.shape[:-1]
    style: str = "llama"


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown RMSNorm style {style!r}; use one of {STYLES}")
    if not torch.is_floating_point(x):
        raise TypeError(f"RMSNorm expects a floating-point input, got {x.dtype}")
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"RMSNorm weight has shape {tuple(weight.shape)} but the input's last dim is {x.shape[-1]}")


def _output_dtype(x: torch.Tensor, weight: Optional[torch.Tensor], style: str) -> torch.dtype:
    if style == "llama" and weight is not None:
        return torch.promote_types(weight.dtype, x.dtype)
    return x.dtype


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_forward(x, weight, eps, style):
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
    n = xc * rstd.unsqueeze(-1)
    if weight is None:
        y = n.to(x.dtype)
    elif style == "llama":
        y = weight * n.to(x.dtype)
    else:
        w = weight.to(cdt) + (1.0 if style == "gemma" else 0.0)
        y = (n * w).to(x.dtype)
    return y, rstd


def rmsnorm_forward(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *, style: str = "llama",
                    quantize_output: bool = False, output_transpose: bool = False,
                    x_saved: Optional[QuantizedTensor] = None, dequantized_dtype: Optional[torch.dtype] = None):
    """RMSNorm forward that returns ``(y, saved)``.

    ``quantize_output=True`` returns ``y`` as the per-tensor E4M3 QuantizedTensor that the next linear layer
    consumes (precision flow), and ``output_transpose=True`` then returns ``(y_q, y_data_t)`` with the
    transposed FP8 copy for the weight-gradient GEMM.  ``x_saved`` is the FP8 1x16 copy of ``x`` when the
    producer of ``x`` already wrote it (:func:`fp8train.nn.residual.residual_add` with ``emit_fp8_copy``).
    ``dequantized_dtype`` (with ``quantize_output``): return ``(y, saved, y_values)`` where ``y_values`` is
    ``y_q.dequantize(dequantized_dtype)`` -- on CUDA written by the same pass that writes the FP8 y.
    """
    _check(x, weight, style)
    if dequantized_dtype is not None and not quantize_output:
        raise ValueError("dequantized_dtype needs quantize_output=True (it is the FP8 output's values)")
    if mg.use_kernels("rmsnorm", x, weight) and (x_saved is None or mg.is_kernel_copy(x_saved)):
        from ..kernels import rmsnorm as kernel

        y, rstd, copy, *values = kernel.rmsnorm_forward(x, weight, eps, style, quantize_output=quantize_output,
                                                        output_transpose=output_transpose,
                                                        write_copy=x_saved is None,
                                                        dequantized_dtype=dequantized_dtype)
        saved = RMSNormSaved(x=copy if x_saved is None else x_saved, rstd=rstd, style=style)
        return (y, saved, *values)
    y, rstd = _reference_forward(x, weight, eps, style)
    if x_saved is None:
        x_saved = mg.save_for_nonlinear(x)
    saved = RMSNormSaved(x=x_saved, rstd=rstd, style=style)
    if quantize_output:
        y = mg.quantize_for_linear(y, with_transpose=output_transpose)
    if dequantized_dtype is not None:
        return y, saved, (y[0] if output_transpose else y).dequantize(dequantized_dtype)
    return y, saved


def rmsnorm_backward(dy: torch.Tensor, saved: RMSNormSaved, weight: Optional[torch.Tensor], *,
                     residual_grad: Optional[torch.Tensor] = None, second_dy: Optional[torch.Tensor] = None,
                     third_dy: Optional[torch.Tensor] = None, amax_slot: Optional[torch.Tensor] = None):
    """``(dx, dweight)`` from the output gradient and what forward saved (``dweight`` is None without weight).

    ``residual_grad``: the gradient that reaches the norm's input through the residual connection; when given,
    ``dx`` is ``residual_grad + dx_norm`` (rounded once), which the kernel adds in the same pass.
    ``second_dy``: a second gradient of the norm's output (a norm feeding two linears gets one from each);
    the output gradient is ``dy + second_dy``, summed in fp32 and never rounded.  ``third_dy``: a third one
    (q/k/v projections reading one norm output), summed the same way.  ``amax_slot``: a zeroed int32 slot
    (:func:`fp8train.nn.grad_amax.new_slot`) that receives the float32 bits of max|dx| (the kernel finds it as it
    stores dx).
    """
    if third_dy is not None and second_dy is None:
        second_dy, third_dy = third_dy, None
    for name, extra in (("residual_grad", residual_grad), ("second_dy", second_dy), ("third_dy", third_dy)):
        if extra is not None and extra.shape != saved.x.shape:
            raise ValueError(f"{name} has shape {tuple(extra.shape)}, expected {tuple(saved.x.shape)}")
    if mg.use_kernels("rmsnorm", dy, weight, residual_grad, second_dy, third_dy) and mg.is_kernel_copy(saved.x):
        from ..kernels import rmsnorm as kernel

        return kernel.rmsnorm_backward(dy, saved.x, saved.rstd, weight, saved.style, residual_grad=residual_grad,
                                       second_dy=second_dy, third_dy=third_dy, amax_slot=amax_slot)
    if second_dy is not None:
        dy = dy.float() + second_dy.float()
    if third_dy is not None:
        dy = dy + third_dy.float()
    x_dtype = saved.x.dtype
    cdt = _compute_dtype(x_dtype)
    x_hat = saved.x.dequantize(cdt)
    rstd = saved.rstd.to(cdt).unsqueeze(-1)
    n = x_hat * rstd
    dy_c = dy.to(cdt)
    dweight = None
    if weight is None:
        g = dy_c
    elif saved.style == "llama":
        g = dy_c * weight.to(cdt)
        # forward multiplied the weight with n rounded to the input dtype
        dweight = (dy_c * n.to(x_dtype).to(cdt)).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
    else:
        g = dy_c * (weight.to(cdt) + (1.0 if saved.style == "gemma" else 0.0))
        dweight = (dy_c * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)
    dx = rstd * (g - n * (g * n).mean(-1, keepdim=True))
    if residual_grad is not None:
        dx = dx + residual_grad.to(cdt)
    dx = dx.to(x_dtype)
    if amax_slot is not None and dx.numel():
        amax_slot.view(torch.float32).copy_(dx.abs().amax().float())
    return dx, dweight


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, style, x_saved_data, x_saved_amax, x_saved_meta):
        x_saved = None if x_saved_data is None else mg.unpack(x_saved_meta, x_saved_data, x_saved_amax)
        y, saved = rmsnorm_forward(x, weight, eps, style=style, x_saved=x_saved)
        tensors, ctx.x_meta = mg.pack(saved.x)
        ctx.save_for_backward(*tensors, saved.rstd, weight)
        ctx.style = style
        return y

    @staticmethod
    def backward(ctx, dy):
        data, amax, rstd, weight = ctx.saved_tensors
        saved = RMSNormSaved(x=mg.unpack(ctx.x_meta, data, amax), rstd=rstd, style=ctx.style)
        dx, dweight = rmsnorm_backward(dy, saved, weight)
        return dx, dweight, None, None, None, None, None


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *, style: str = "llama",
             x_saved: Optional[QuantizedTensor] = None) -> torch.Tensor:
    """Differentiable RMSNorm that saves FP8 for backward (the generic, module-swap path)."""
    if x_saved is None:
        return RMSNormFunction.apply(x, weight, eps, style, None, None, None)
    (data, amax), meta = mg.pack(x_saved)
    return RMSNormFunction.apply(x, weight, eps, style, data, amax, meta)


def add_rmsnorm_forward(residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *,
                        style: str = "llama", quantize_output: bool = False, output_transpose: bool = False):
    """The residual add that feeds a norm, fused with it: ``h = residual + x`` and ``y = RMSNorm(h)``.

    Returns ``(h, y, saved)``; ``saved`` holds the FP8 1x16 copy of h and its rstd.  On the GPU one kernel reads
    residual and x once and writes h, its FP8 copy and y; with ``quantize_output`` (per-tensor E4M3 y for the next
    linear) a second pass re-reads h to scale y, so no bf16 y is ever written.  Backward:
    ``dh = rmsnorm_backward(dy, saved, weight, residual_grad=dh_next)`` is the gradient of both residual and x.
    """
    if residual.shape != x.shape:
        raise ValueError(f"residual add needs equal shapes, got {tuple(residual.shape)} and {tuple(x.shape)}")
    if mg.use_kernels("add_rmsnorm", residual, x, weight):
        _check(x, weight, style)
        from ..kernels import rmsnorm as kernel

        h, y, rstd, copy = kernel.rmsnorm_forward(x, weight, eps, style, quantize_output=quantize_output,
                                                  output_transpose=output_transpose, residual=residual)
        return h, y, RMSNormSaved(x=copy, rstd=rstd, style=style)
    from .residual import residual_add_forward

    h, _ = residual_add_forward(residual, x)
    y, saved = rmsnorm_forward(h, weight, eps, style=style, quantize_output=quantize_output,
                               output_transpose=output_transpose)
    return h, y, saved


class AddRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, residual, x, weight, eps, style):
        h, y, saved = add_rmsnorm_forward(residual, x, weight, eps, style=style)
        tensors, ctx.x_meta = mg.pack(saved.x)
        ctx.save_for_backward(*tensors, saved.rstd, weight)
        ctx.style = style
        ctx.dtypes = (residual.dtype, x.dtype)
        return h, y

    @staticmethod
    def backward(ctx, dh, dy):
        data, amax, rstd, weight = ctx.saved_tensors
        saved = RMSNormSaved(x=mg.unpack(ctx.x_meta, data, amax), rstd=rstd, style=ctx.style)
        if dy is None:
            total, dweight = dh, None
        else:
            total, dweight = rmsnorm_backward(dy, saved, weight, residual_grad=dh)
        return total.to(ctx.dtypes[0]), total.to(ctx.dtypes[1]), dweight, None, None


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *,
                 style: str = "llama") -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable fused ``h = residual + x; y = RMSNorm(h)`` returning ``(h, y)`` (h feeds the next residual)."""
    return AddRMSNormFunction.apply(residual, x, weight, eps, style)


def _detect_style(norm: nn.Module) -> str:
    if isinstance(norm, getattr(nn, "RMSNorm", ())):
        return "torch"
    try:
        source = inspect.getsource(type(norm).forward)
        if "_norm" in source and hasattr(type(norm), "_norm"):
            source += inspect.getsource(type(norm)._norm)
    except (OSError, TypeError):
        source = ""
    if re.search(r"1(\.0)?\s*\+\s*self\.weight", source):
        return "gemma"
    if re.search(r"self\.weight\s*\*\s*\w+\.to\(", source):
        return "llama"
    if re.search(r"\.to\(\w*dtype\)\s*\*\s*self\.weight|\.type_as\(", source):
        return "torch"
    warn_once(f"rmsnorm-style-{type(norm).__name__}",
              f"FP8RMSNorm: could not tell how {type(norm).__name__} applies its weight; assuming the Llama style "
              "weight * norm(x).to(dtype). Pass style= to FP8RMSNorm.from_module if this is wrong.")
    return "llama"


class FP8RMSNorm(nn.Module):
    """Drop-in RMSNorm that keeps an FP8 copy of its input for backward.

    ``FP8RMSNorm.from_module(norm)`` reuses ``norm.weight`` (the same Parameter, so state_dict keys, optimizer
    state and FSDP sharding are unchanged) and its eps (``variance_epsilon`` in HF, ``eps`` elsewhere).
    """

    def __init__(self, hidden_size: int, eps: Optional[float] = 1e-6, *, style: str = "llama",
                 elementwise_affine: bool = True, device=None, dtype=None):
        super().__init__()
        if style not in STYLES:
            raise ValueError(f"unknown RMSNorm style {style!r}; use one of {STYLES}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.style = style
        if elementwise_affine:
            init = torch.zeros if style == "gemma" else torch.ones
            self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    @classmethod
    def from_module(cls, norm: nn.Module, *, style: Optional[str] = None) -> "FP8RMSNorm":
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.dim() != 1:
            raise ValueError(f"FP8RMSNorm supports a 1-D weight over the last dim; {type(norm).__name__} has "
                             f"shape {tuple(weight.shape)}")
        eps = getattr(norm, "variance_epsilon", None)
        if eps is None:
            eps = getattr(norm, "eps", None)
        if eps is None and not isinstance(norm, getattr(nn, "RMSNorm", ())):
            raise ValueError(f"cannot find the epsilon of {type(norm).__name__} (looked for variance_epsilon, eps)")
        if weight is not None:
            hidden = weight.shape[0]
        else:
            shape = getattr(norm, "normalized_shape", None) or (getattr(norm, "hidden_size", 0),)
            hidden = shape[-1] if isinstance(shape, (tuple, list)) else shape
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.hidden_size = int(hidden)
        new.eps = eps
        new.style = style or _detect_style(norm)
        if weight is not None:
            new.weight = weight  # the original Parameter object
        else:
            new.register_parameter("weight", None)
        return new

    def forward(self, x: torch.Tensor, x_saved: Optional[QuantizedTensor] = None) -> torch.Tensor:
        # nn.RMSNorm's eps=None: machine epsilon of the dtype it computes in (float32 for 16-bit inputs)
        eps = self.eps if self.eps is not None else torch.finfo(_compute_dtype(x.dtype)).eps
        return rms_norm(x, self.weight, eps, style=self.style, x_saved=x_saved)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, style={self.style}, saves=E4M3 1x16"
