"""SiLU / GELU (exact erf and tanh approximation) that save their input as FP8 1x16 groups.

    y, saved = activation_forward(x, "silu")
    dx = activation_backward(dy, saved)

Forward is exact (computed in fp32, returned in x's dtype, as torch does).  Backward evaluates the derivative
at the FP8 copy: ``dx = dy * act'(x_hat)``.  Saved: 1.125 B/element vs 2 B/element (bf16 input) for torch.

Names: ``"silu"`` (= swish), ``"gelu"`` (erf), ``"gelu_tanh"`` (the tanh approximation: HF gelu_new,
gelu_pytorch_tanh, gelu_fast, gelu_accurate).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
from torch import nn

from .. import mixed_granularity as mg
from ..quant import QuantizedTensor

__all__ = ["ACTIVATIONS", "ActivationSaved", "activation_forward", "activation_backward", "activation",
           "activation_name", "act_fn", "act_grad", "FP8Activation"]

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; fp8train has FP8 kernels for {ACTIVATIONS}")
    return name


def act_fn(x: torch.Tensor, name: str) -> torch.Tensor:
    """act(x) in x's (compute) dtype."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x * _INV_SQRT_2))
    inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
    return 0.5 * x * (1.0 + torch.tanh(inner))


def act_grad(x: torch.Tensor, name: str) -> torch.Tensor:
    """d act / dx at x."""
    if name == "silu":
        s = torch.sigmoid(x)
        return s * (1.0 + x * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2)) + x * _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_forward(x: torch.Tensor, name: str) -> torch.Tensor:
    cdt = _compute_dtype(x.dtype)
    xc = x.to(cdt)
    # torch's own ops for the forward, so the result equals F.silu / F.gelu bit for bit on CPU
    if name == "silu":
        y = torch.nn.functional.silu(xc)
    else:
        y = torch.nn.functional.gelu(xc, approximate="tanh" if name == "gelu_tanh" else "none")
    return y.to(x.dtype)


@dataclasses.dataclass
class ActivationSaved:
    x: QuantizedTensor  # FP8 E4M3 1x16 copy of the input
    activation: str


def activation_forward(x: torch.Tensor, activation: str = "silu", *, quantize_output: bool = False,
                       output_transpose: bool = False):
    """``(y, saved)``; ``quantize_output=True`` returns y as per-tensor E4M3 for the next linear layer."""
    check_activation(activation)
    if not torch.is_floating_point(x):
        raise TypeError(f"activation expects a floating-point input, got {x.dtype}")
    if mg.use_kernels("activation", x):
        from ..kernels import activation as kernel

        y, copy = kernel.activation_forward(x, activation, quantize_output=quantize_output,
                                            output_transpose=output_transpose)
        return y, ActivationSaved(x=copy, activation=activation)
    y = _reference_forward(x, activation)
    saved = ActivationSaved(x=mg.save_for_nonlinear(x), activation=activation)
    if quantize_output:
        y = mg.quantize_for_linear(y, with_transpose=output_transpose)
    return y, saved


def activation_backward(dy: torch.Tensor, saved: ActivationSaved) -> torch.Tensor:
    """``dx = dy * act'(x_hat)`` in x's dtype."""
    if mg.use_kernels("activation", dy) and mg.is_kernel_copy(saved.x):
        from ..kernels import activation as kernel

        return kernel.activation_backward(dy, saved.x, saved.activation)
    cdt = _compute_dtype(saved.x.dtype)
    x_hat = saved.x.dequantize(cdt)
    return (dy.to(cdt) * act_grad(x_hat, saved.activation)).to(saved.x.dtype)


class ActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, name):
        y, saved = activation_forward(x, name)
        tensors, ctx.meta = mg.pack(saved.x)
        ctx.save_for_backward(*tensors)
        ctx.activation = name
        return y

    @staticmethod
    def backward(ctx, dy):
        data, amax = ctx.saved_tensors
        saved = ActivationSaved(x=mg.unpack(ctx.meta, data, amax), activation=ctx.activation)
        return activation_backward(dy, saved), None


def activation(x: torch.Tensor, name: str = "silu") -> torch.Tensor:
    """Differentiable activation that saves FP8 for backward."""
    return ActivationFunction.apply(x, check_activation(name))


def activation_name(module: nn.Module) -> Optional[str]:
    """The FP8 activation that reproduces ``module`` (torch or transformers.activations), or None."""
    kind = type(module).__name__
    if isinstance(module, nn.SiLU) or kind in ("SiLUActivation", "SiLU", "Swish"):
        return "silu"
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    if kind in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation", "AccurateGELUActivation"):
        return "gelu_tanh"
    if kind == "GELUActivation":
        return "gelu"  # both its torch and its python (erf) forms
    return None


class FP8Activation(nn.Module):
    """Activation module that keeps an FP8 copy of its input; replaces nn.SiLU / nn.GELU / HF activations."""

    def __init__(self, name: str = "silu"):
        super().__init__()
        self.name = check_activation(name)

    @classmethod
    def from_module(cls, module: nn.Module) -> "FP8Activation":
        name = activation_name(module)
        if name is None:
            raise ValueError(f"no FP8 activation for {type(module).__name__}; supported: {ACTIVATIONS} "
                             "(nn.SiLU, nn.GELU, transformers' SiLUActivation, GELUActivation, NewGELUActivation, "
                             "GELUTanh, FastGELUActivation, AccurateGELUActivation)")
        return cls(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation(x, self.name)

    def extra_repr(self) -> str:
        return f"{self.name}, saves=E4M3 1x16"
