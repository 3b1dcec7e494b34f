"""The gated MLP's first projection and its backward, each as one op: FP8 GEMMs with the gated product fused in.

    h_in, gated, saved_gate, up_weight_amax = gated_projection_forward(x_in, w_gate, w_up, "silu", recipe=...,
                                                                       out_dtype=torch.bfloat16, prediction=p)
    dgate, dup, dw_down, db_down = gated_projection_backward(dout, saved_down, w_down, gated, recipe=..., ...)

Forward is ``gate = x W_gate^T``, ``up = x W_up^T`` (+ biases), ``h = act(gate) * up``: h comes back as down_proj's
per-tensor E4M3 input, gate and up as the E4M3 1x16 copies backward keeps.  Backward is ``dh = dy W_down`` and
the product's backward: dgate / dup come back as the per-tensor E5M2 gradients the gate/up projections' backward
consumes (with ``quantize_grads``), plus down_proj's weight (and bias) gradient.

The reference is the composition of the separate ops -- :func:`fp8train.nn.linear.fp8_linear_forward` /
``fp8_linear_backward`` and :func:`fp8train.nn.gated_mlp.gated_product_forward` / ``..._backward`` -- and is what
runs on CPU and wherever the fused kernels do not apply.  With ``Recipe.gated_gemm`` on a GPU with FP8 tensor
cores (per-tensor E4M3 operands, no biases, predicted scales of :mod:`fp8train.delayed_scaling`), one Triton
kernel per direction (:mod:`fp8train.kernels.gated_projection`) computes the same values from registers: the
GEMMs' bf16 outputs are never written and the gated-product passes that read them disappear.  It is off by
default because Triton 3.6's FP8 main loop with fp32 promotion runs at ~2/3 of cuBLAS's speed on Hopper, which
costs more than the fusion saves (docs/performance.md, "Session 10").
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import mixed_granularity as mg
from ..quant import PER_TENSOR, QuantizedTensor
from ..recipes import Recipe, linear_formats
from .gated_mlp import GatedSaved, gated_product_backward, gated_product_forward
from .linear import (LinearInput, LinearSaved, _as_matrix, fp8_gemm_supported, fp8_linear_backward,
                     fp8_linear_forward, fp8_weight, quantize_output_grad, wants_transpose)

__all__ = ["gated_projection_forward", "gated_projection_backward"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _fused_available(tensor: torch.Tensor, recipe: Recipe, prediction: Optional[torch.Tensor]) -> bool:
    """Whether the fused kernels can run (with ``Recipe.gated_gemm``; ``tensor``: a high-precision operand, for
    the device/dtype checks)."""
    if prediction is None or not fp8_gemm_supported(tensor.device) or not mg.use_kernels("gated_product", tensor):
        return False
    (x_fmt, x_gran), (w_fmt, w_gran), _ = linear_formats(recipe)
    return (x_fmt == mg.LINEAR_FORMAT and w_fmt == mg.LINEAR_FORMAT and x_gran.kind == "tensor"
            and w_gran.kind == "tensor")


def gated_projection_forward(x_in: LinearInput, w_gate: torch.Tensor, w_up: torch.Tensor, activation: str, *,
                             recipe: Recipe, out_dtype: torch.dtype, b_gate: Optional[torch.Tensor] = None,
                             b_up: Optional[torch.Tensor] = None, prediction: Optional[torch.Tensor] = None,
                             output_transpose: bool = False
                             ) -> tuple[LinearInput, GatedSaved, LinearSaved, torch.Tensor]:
    """``(h_in, gated, saved_gate, up_weight_amax)``: down_proj's E4M3 input (with the transposed copy when
    ``output_transpose``), the saved gate/up copies, what gate's (and, with ``up_weight_amax``, up's) backward
    needs of x.  ``prediction``: the 1-element predicted-amax view for h (required by the fused kernel)."""
    x_q = x_in.q
    K, N = x_q.shape[-1], w_gate.shape[0]
    if (recipe.gated_gemm and b_gate is None and b_up is None and out_dtype in _OUT_DTYPES
            and x_q.granularity.kind == "tensor" and x_q.fmt == mg.LINEAR_FORMAT and x_q.data.is_contiguous()
            and K % 16 == 0 and N % 16 == 0 and w_up.shape == w_gate.shape
            and _fused_available(w_gate, recipe, prediction)):
        return _fused_forward(x_in, w_gate, w_up, activation, recipe, out_dtype, prediction, output_transpose)
    gate, saved_gate = fp8_linear_forward(x_in, w_gate, b_gate, recipe=recipe, out_dtype=out_dtype)
    up, saved_up = fp8_linear_forward(x_in, w_up, b_up, recipe=recipe, out_dtype=out_dtype)
    h_out, gated = gated_product_forward(gate, up, activation, quantize_output=True,
                                         output_transpose=output_transpose, prediction=prediction)
    h_in = LinearInput(*h_out) if output_transpose else LinearInput(h_out)
    return h_in, gated, saved_gate, saved_up.weight_amax


def _fused_forward(x_in, w_gate, w_up, activation, recipe, out_dtype, prediction, output_transpose):
    from ..kernels import gated_projection as kernel

    x_q = x_in.q
    wg, wu = fp8_weight(w_gate, recipe).q, fp8_weight(w_up, recipe).q
    scales = torch.stack([x_q.scale.reshape(()), wg.scale.reshape(()), wu.scale.reshape(())]).float()
    N = w_gate.shape[0]
    data, data_t, (amax, scale), (gq, gamax), (uq, uamax) = kernel.gated_projection_forward(
        x_q.data.reshape(-1, x_q.shape[-1]), wg.data, wu.data, scales, out_dtype, activation, prediction,
        output_transpose, recipe.fast_accumulation)
    shape = torch.Size((*x_q.shape[:-1], N))
    group_shape = (*x_q.shape[:-1], N // 16)
    h = QuantizedTensor(data=data.view(shape), amax=amax, scale_hint=scale, fmt=mg.LINEAR_FORMAT,
                        granularity=PER_TENSOR, shape=shape, dtype=out_dtype)
    copies = [QuantizedTensor(data=d.view(shape), amax=a.view(group_shape), fmt=mg.NONLINEAR_FORMAT,
                              granularity=mg.NONLINEAR_GRANULARITY, shape=shape, dtype=out_dtype)
              for d, a in ((gq, gamax), (uq, uamax))]
    saved_gate = LinearSaved(_as_matrix(x_q, x_in.data_t), wg.amax, x_q.shape, x_q.dtype)
    return LinearInput(h, data_t), GatedSaved(copies[0], copies[1], activation), saved_gate, wu.amax


def gated_projection_backward(dout: torch.Tensor, saved_down: LinearSaved, w_down: torch.Tensor,
                              gated: GatedSaved, *, recipe: Recipe, has_bias: bool = False,
                              needs_weight_grad: bool = True, quantize_grads: bool = False,
                              output_transpose: bool = False, prediction: Optional[torch.Tensor] = None):
    """``(dgate, dup, dw_down, db_down)`` from down_proj's output gradient ``dout``.

    ``quantize_grads``: dgate / dup as per-tensor E5M2 :class:`LinearInput` s (transposed copies with
    ``output_transpose``) instead of tensors in gate's / up's dtype; ``prediction``: their 2-element
    predicted-amax view (required by the fused kernel)."""
    if (recipe.gated_gemm and quantize_grads and not has_bias and mg.is_kernel_copy(gated.gate)
            and mg.is_kernel_copy(gated.up) and saved_down.input_dtype in _OUT_DTYPES
            and gated.gate.dtype == gated.up.dtype == saved_down.input_dtype
            and _fused_available(dout, recipe, prediction)):
        return _fused_backward(dout, saved_down, w_down, gated, recipe, needs_weight_grad, output_transpose,
                               prediction)
    dh, dw_down, db_down = fp8_linear_backward(dout, saved_down, w_down, recipe=recipe, has_bias=has_bias,
                                               needs_weight_grad=needs_weight_grad)
    dgate, dup = gated_product_backward(dh, gated, quantize_output=quantize_grads, output_transpose=output_transpose,
                                        prediction=prediction)
    if quantize_grads:
        dgate, dup = (LinearInput(*d) if output_transpose else LinearInput(d) for d in (dgate, dup))
    return dgate, dup, dw_down, db_down


def _fused_backward(dout, saved_down, w_down, gated, recipe, needs_weight_grad, output_transpose, prediction):
    from ..kernels import gated_projection as kernel

    dy_in = quantize_output_grad(dout, recipe, transpose=needs_weight_grad and wants_transpose(dout.device, recipe))
    _, dw_down, _ = fp8_linear_backward(dy_in, saved_down, w_down, recipe=recipe, needs_input_grad=False,
                                        needs_weight_grad=needs_weight_grad)
    dy_q = dy_in.q
    w_in = fp8_weight(w_down, recipe, amax=saved_down.weight_amax, transpose=True)
    # the (F, H) transposed copy: K-major for dh = dy W_down (the weight cache makes it for _scaled_mm anyway)
    w_t = w_in.data_t if w_in.data_t is not None else w_in.q.data.t().contiguous()
    scales = torch.stack([dy_q.scale.reshape(()), w_in.q.scale.reshape(())]).float()
    g, u = gated.gate, gated.up
    grads = kernel.gated_projection_backward(
        dy_q.data.reshape(-1, dy_q.shape[-1]), w_t, scales, (g.data, g.amax), (u.data, u.amax),
        saved_down.input_dtype, gated.activation, mg.GRAD_FORMAT, prediction, output_transpose)
    out = []
    for (data, data_t, amax, scale), copy in zip(grads, (g, u)):
        q = QuantizedTensor(data=data.view(copy.shape), amax=amax, scale_hint=scale, fmt=mg.GRAD_FORMAT,
                            granularity=PER_TENSOR, shape=copy.shape, dtype=copy.dtype)
        out.append(LinearInput(q, data_t))
    return out[0], out[1], dw_down, None
