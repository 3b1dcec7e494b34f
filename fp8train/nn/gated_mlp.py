"""The gated MLP product ``h = act(gate) * up`` (SwiGLU / GeGLU) with FP8 1x16 saved inputs.

    h, saved = gated_product_forward(gate, up, "silu")                         # h in the model's dtype
    h_q, saved = gated_product_forward(gate, up, "silu", quantize_output=True) # per-tensor E4M3 for down_proj
    dgate, dup = gated_product_backward(dh, saved)

Saved: ``gate`` and ``up`` as E4M3 1x16 (2 x 1.125 B/element); ``act(gate)`` is recomputed in backward instead
of being saved (COAT saves it too, as a third FP8 tensor).  A bf16 HF MLP keeps gate, up and act(gate) --
6 B/element -- for the product alone.  Forward is exact; backward uses the FP8 copies:
``dgate = dh * up_hat * act'(gate_hat)``, ``dup = dh * act(gate_hat)``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .. import mixed_granularity as mg
from ..delayed_scaling import encode_amax
from ..quant import QuantizedTensor
from .activation import ACTIVATIONS, act_fn, act_grad, activation_name, check_activation

__all__ = ["GatedSaved", "gated_product_forward", "gated_product_backward", "gated_product", "FP8GatedProduct",
           "FP8GatedMLP"]


@dataclasses.dataclass
class GatedSaved:
    gate: QuantizedTensor  # FP8 E4M3 1x16
    up: QuantizedTensor  # FP8 E4M3 1x16
    activation: str


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check(gate, up):
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if not (torch.is_floating_point(gate) and torch.is_floating_point(up)):
        raise TypeError(f"gated product expects floating-point inputs, got {gate.dtype} and {up.dtype}")


def _reference_forward(gate, up, name):
    dtype = torch.promote_types(gate.dtype, up.dtype)
    cdt = _compute_dtype(dtype)
    return (act_fn(gate.to(cdt), name) * up.to(cdt)).to(dtype)


def gated_product_forward(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", *,
                          quantize_output: bool = False, output_transpose: bool = False,
                          prediction: Optional[torch.Tensor] = None):
    """``(h, saved)`` with ``h = act(gate) * up`` computed in fp32 and rounded once to the inputs' dtype.

    ``prediction`` (with ``quantize_output``): a 1-element float32 view of a prediction buffer -- h is encoded
    with the predicted amax in the same pass, repaired when it overflows (:mod:`fp8train.delayed_scaling`).
    """
    check_activation(activation)
    _check(gate, up)
    prediction = prediction if quantize_output else None
    if mg.use_kernels("gated_product", gate, up):
        from ..kernels import gated_product as kernel

        h, g_copy, u_copy = kernel.gated_product_forward(gate, up, activation, quantize_output=quantize_output,
                                                         output_transpose=output_transpose, prediction=prediction)
        return h, GatedSaved(gate=g_copy, up=u_copy, activation=activation)
    h = _reference_forward(gate, up, activation)
    saved = GatedSaved(gate=mg.save_for_nonlinear(gate), up=mg.save_for_nonlinear(up), activation=activation)
    if quantize_output:
        amax = None if prediction is None else encode_amax(_amax(h), prediction[0])
        h = mg.quantize_for_linear(h, amax=amax, with_transpose=output_transpose)
    return h, saved


def _amax(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax().float() if x.numel() else torch.zeros((), dtype=torch.float32, device=x.device)


def gated_product_backward(dh: torch.Tensor, saved: GatedSaved, *, quantize_output: bool = False,
                           output_transpose: bool = False, prediction: Optional[torch.Tensor] = None):
    """``(dgate, dup)`` in the dtypes of gate and up.

    ``quantize_output=True`` returns each as the per-tensor E5M2 QuantizedTensor that the gate / up projections'
    backward consumes (``(q, data_t)`` with ``output_transpose``: the transposed copy for the weight gradient);
    the kernel then never writes the bf16 gradients.  ``prediction``: a 2-element float32 view (dgate's, dup's)
    of a prediction buffer -- one pass with predicted scales (:mod:`fp8train.delayed_scaling`).
    """
    prediction = prediction if quantize_output else None
    if mg.use_kernels("gated_product", dh) and mg.is_kernel_copy(saved.gate) and mg.is_kernel_copy(saved.up):
        from ..kernels import gated_product as kernel

        return kernel.gated_product_backward(dh, saved.gate, saved.up, saved.activation,
                                             quantize_output=quantize_output, output_transpose=output_transpose,
                                             prediction=prediction)
    cdt = _compute_dtype(torch.promote_types(saved.gate.dtype, saved.up.dtype))
    g_hat = saved.gate.dequantize(cdt)
    u_hat = saved.up.dequantize(cdt)
    dh_c = dh.to(cdt)
    dgate = (dh_c * u_hat * act_grad(g_hat, saved.activation)).to(saved.gate.dtype)
    dup = (dh_c * act_fn(g_hat, saved.activation)).to(saved.up.dtype)
    if quantize_output:
        amaxes = [None, None] if prediction is None else [encode_amax(_amax(d), prediction[i])
                                                          for i, d in enumerate((dgate, dup))]
        return (mg.quantize_grad_for_linear(dgate, amax=amaxes[0], with_transpose=output_transpose),
                mg.quantize_grad_for_linear(dup, amax=amaxes[1], with_transpose=output_transpose))
    return dgate, dup


class GatedProductFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, name):
        h, saved = gated_product_forward(gate, up, name)
        (g_data, g_amax), ctx.gate_meta = mg.pack(saved.gate)
        (u_data, u_amax), ctx.up_meta = mg.pack(saved.up)
        ctx.save_for_backward(g_data, g_amax, u_data, u_amax)
        ctx.activation = name
        return h

    @staticmethod
    def backward(ctx, dh):
        g_data, g_amax, u_data, u_amax = ctx.saved_tensors
        saved = GatedSaved(gate=mg.unpack(ctx.gate_meta, g_data, g_amax),
                           up=mg.unpack(ctx.up_meta, u_data, u_amax), activation=ctx.activation)
        dgate, dup = gated_product_backward(dh, saved)
        return dgate, dup, None


def gated_product(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """Differentiable ``act(gate) * up`` that saves FP8 gate and up for backward."""
    return GatedProductFunction.apply(gate, up, check_activation(activation))


class FP8GatedProduct(nn.Module):
    """``forward(gate, up) = act(gate) * up`` as a module (for hooks / printing)."""

    def __init__(self, activation: str = "silu"):
        super().__init__()
        self.activation = check_activation(activation)

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return gated_product(gate, up, self.activation)

    def extra_repr(self) -> str:
        return f"act={self.activation}, saves=E4M3 1x16 gate and up"


class FP8GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with the FP8 gated product, reusing an HF gated MLP's projections.

    ``from_module`` accepts MLPs with ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama, Mistral, Qwen, Gemma)
    or a fused ``gate_up_proj`` whose output is ``[gate | up]`` (Phi-3), and an ``act_fn`` module.  The
    projections are the original submodules (whatever the linear conversion made of them), so parameter names
    stay the same.
    """

    def __init__(self, down_proj: nn.Module, activation: str, gate_proj: Optional[nn.Module] = None,
                 up_proj: Optional[nn.Module] = None, gate_up_proj: Optional[nn.Module] = None):
        super().__init__()
        if gate_up_proj is None and (gate_proj is None or up_proj is None):
            raise ValueError("FP8GatedMLP needs gate_proj and up_proj, or a fused gate_up_proj")
        if gate_up_proj is not None:
            self.gate_up_proj = gate_up_proj
        else:
            self.gate_proj = gate_proj
            self.up_proj = up_proj
        self.down_proj = down_proj
        self.activation = check_activation(activation)

    @classmethod
    def from_module(cls, mlp: nn.Module) -> "FP8GatedMLP":
        act = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
        name = activation_name(act) if isinstance(act, nn.Module) else None
        if name is None:
            raise ValueError(f"{type(mlp).__name__}: activation {type(act).__name__} has no FP8 gated kernel "
                             f"(supported: {ACTIVATIONS})")
        if not hasattr(mlp, "down_proj"):
            raise ValueError(f"{type(mlp).__name__} has no down_proj; not a gated MLP this class understands")
        return cls(mlp.down_proj, name, gate_proj=getattr(mlp, "gate_proj", None),
                   up_proj=getattr(mlp, "up_proj", None), gate_up_proj=getattr(mlp, "gate_up_proj", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(gated_product(gate, up, self.activation))
