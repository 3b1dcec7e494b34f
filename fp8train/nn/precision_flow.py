"""COAT's precision flow for Llama-style decoder blocks: FP8 handed from op to op, only FP8 kept for backward.

A Llama-style block (HF ``LlamaDecoderLayer`` and relatives) and what the fast path saves for backward:

    h ── input_layernorm ──▶ y ──▶ q/k/v_proj ──▶ RoPE + attention (HF, bf16) ──▶ o_proj ──▶ + h
         saves h as E4M3 1x16 + rstd;           one E4M3 per-tensor y for all three;     E4M3 attention output
         hands y to q/k/v already quantized
    h' ── post_attention_layernorm + gate/up + act(gate)*up + down_proj  (one autograd Function) ──▶ + h'
         saves h' as E4M3 1x16 + rstd, the normed h' once as E4M3 per-tensor, gate and up as E4M3 1x16;
         act(gate)*up is recomputed from those in backward (``Recipe.recompute_gated_product``) or kept
         as E4M3 per-tensor

With recomputation, act(gate) * up is computed from the FP8 1x16 gate/up in forward too (as COAT's FP8 SiLU
and mul kernels do), so backward rebuilds exactly the tensor forward multiplied with down_proj's weight.

How the pieces meet without forking HF's model classes: :class:`FlowRMSNorm` replaces the two norms (same
``weight`` Parameter) and :class:`FlowMLP` the MLP (same ``gate_proj``/``up_proj``/``down_proj`` children), so
parameter names and state_dict keys do not change.  HF's decoder-layer code still calls them in its own order;
the norm *attaches* to its output the FP8 forms it computed in the same pass (:mod:`fp8train.nn.handoff`):

* ``linear_input`` -- the per-tensor E4M3 copy: FP8 linears reading the output use it instead of
  quantizing (and saving) their own;
* ``rmsnorm`` -- the norm's input, weight and saved state: :class:`FlowMLP` seeing this on its input runs
  the norm's backward itself, so the MLP Function connects straight to the residual stream and the norm's
  own autograd node (and its saved tensors) is dropped as soon as the norm output goes out of scope;
* ``grad_fanout`` -- spare aliases of the output, one per extra FP8 linear reading it (q/k/v): each linear hands
  autograd its own, so the three input gradients arrive at the norm's backward separately and its kernel sums
  them in fp32 (:func:`fp8train.nn.handoff.grad_input`) instead of autograd adding them in bf16 first.

The norm still returns a real tensor (the dequantized FP8 values, in the compute dtype), so any other
consumer -- a LoRA adapter, a hook, an unusual block -- gets correct values and a correct gradient.
Attachments are checked against the tensor's version counter and die with it.

With ``Recipe.fused_residual`` the block's two residual adds also move next to these Functions
(:mod:`fp8train.nn.residual_stream`): the input norm hands back a pass-through of h for the first add
(:meth:`FlowRMSNorm.forward_with_residual`) and the MLP Function does the second (:meth:`FlowMLP.forward_residual`),
so both residual gradients are added by the norm backward kernels, which publish the sum's amax
(:mod:`fp8train.nn.grad_amax`) for o_proj and the previous block's down_proj.

Requirements of the fused MLP: the three projections are :class:`~fp8train.nn.linear.FP8Linear` with a
per-tensor E4M3 recipe; otherwise (a projection excluded or wrapped by PEFT after conversion) the MLP falls
back to calling its submodules, with the FP8 gated product in between.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn

from .. import mixed_granularity as mg
from ..delayed_scaling import BUFFER_NAME, new_prediction
from ..recipes import Recipe, linear_formats, resolve_recipe
from . import grad_amax, handoff
from .activation import act_fn, activation_name
from .eager_ops import autocast_off, eager_op
from .gated_mlp import GatedSaved, gated_product
from .gated_projection import gated_projection_backward, gated_projection_forward
from .linear import (FP8Linear, LinearInput, LinearSaved, _as_matrix, _quantize, attach_linear_input,
                     compute_dtype, fp8_linear_backward, fp8_linear_forward, load_linear, quantize_linear_input,
                     save_linear, wants_transpose)
from .rmsnorm import FP8RMSNorm, RMSNormSaved, rmsnorm_backward, rmsnorm_forward

__all__ = ["FlowRMSNorm", "FlowMLP", "NormOutput", "flow_supported"]

NORM_KEY = "rmsnorm"


def flow_supported(recipe: Recipe) -> bool:
    """The fast path hands per-tensor E4M3 tensors between ops; other linear recipes use the generic path."""
    (in_fmt, _), _, _ = linear_formats(recipe)
    return recipe.per_tensor and in_fmt == mg.LINEAR_FORMAT and recipe.compress_activations


class NormOutput(NamedTuple):
    """What :class:`FlowRMSNorm` attaches to its output for a fused consumer."""

    x: torch.Tensor  # the norm's input (the residual stream)
    weight: Optional[torch.Tensor]
    saved: RMSNormSaved  # E4M3 1x16 copy of x + rstd
    y: LinearInput  # the output as E4M3 per-tensor (+ transposed copy on the _scaled_mm path)


# -- the norm --------------------------------------------------------------------------------------------------

# Spare outputs of the flow norm (aliases of its output): q/k/v each hand one to autograd (handoff.grad_input), so
# their three input gradients reach the norm's backward separately and its kernel sums them in fp32 -- instead of
# autograd's two bf16 adds of full activations before the norm's backward runs.  FP8TRAIN_NORM_GRAD_FANIN=0 in
# the environment turns it off (for comparisons: the values differ only by the adds' bf16 rounding).
SPARE_OUTPUTS = 0 if os.environ.get("FP8TRAIN_NORM_GRAD_FANIN", "1") == "0" else 2


class _FlowNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, style, transpose, out_dtype, box, residual):
        with autocast_off(x.device.type):
            out, saved, y = rmsnorm_forward(x, weight, eps, style=style, quantize_output=True,
                                            output_transpose=transpose, dequantized_dtype=out_dtype)
            y_in = LinearInput(*out) if transpose else LinearInput(out)
        (data, amax), ctx.x_meta = mg.pack(saved.x)
        ctx.save_for_backward(data, amax, saved.rstd, weight)
        ctx.style, ctx.residual = style, residual
        ctx.set_materialize_grads(False)  # an unused output gives None, not a buffer of zeros to add
        box.append((y_in, saved))  # non-tensor results travel in a box: Function outputs must be tensors
        # aliases of y's memory, not views: a view would hold y itself (its _base), and the spares wait in y's
        # handoff entry, which lives until y dies -- a norm whose spares nobody takes would then never die
        spares = tuple(y.detach() for _ in range(SPARE_OUTPUTS))
        # with ``residual``, x itself comes back (as a view) for the block's residual add: its gradient then
        # reaches this backward too, which adds it to dx in the same kernel pass instead of autograd adding later
        return (y, *spares, x.view_as(x)) if residual else (y, *spares)

    @staticmethod
    def backward(ctx, *grads):
        dres = grads[-1] if ctx.residual else None
        dys = [g for g in (grads[:-1] if ctx.residual else grads) if g is not None]
        if not dys:
            return (dres, *(None,) * 7)
        data, amax, rstd, weight = ctx.saved_tensors
        saved = RMSNormSaved(mg.unpack(ctx.x_meta, data, amax), rstd, ctx.style)
        # x's whole gradient when the residual one is in: publish its amax for the FP8 linear quantizing it next
        slot = grad_amax.new_slot(dys[0].device) if dres is not None and grad_amax.enabled() else None
        with autocast_off(dys[0].device.type):
            dx, dweight = rmsnorm_backward(dys[0], saved, weight, residual_grad=dres,
                                           second_dy=dys[1] if len(dys) > 1 else None,
                                           third_dy=dys[2] if len(dys) > 2 else None, amax_slot=slot)
        if slot is not None:
            grad_amax.publish(dx, slot)
        return dx, dweight, None, None, None, None, None, None


class FlowRMSNorm(FP8RMSNorm):
    """RMSNorm that saves its input as E4M3 1x16 and hands its output to FP8 consumers already quantized.

    ``FlowRMSNorm.from_module(norm, recipe=...)`` keeps ``norm.weight`` (the same Parameter).  The output is
    the dequantized per-tensor E4M3 values in the compute dtype; the FP8 form and the norm's state are
    attached to it (see the module docstring).
    """

    recipe: Recipe

    @classmethod
    def from_module(cls, norm: nn.Module, *, style: Optional[str] = None,
                    recipe: Union[Recipe, str] = "coat") -> "FlowRMSNorm":
        new = super().from_module(norm, style=style)
        new.recipe = resolve_recipe(recipe)
        return new

    @eager_op  # eager FP8 ops; torch.compile compiles the model around them
    def forward(self, x: torch.Tensor, x_saved=None) -> torch.Tensor:
        recipe = getattr(self, "recipe", None)
        if x_saved is not None or recipe is None or not flow_supported(recipe):
            return super().forward(x, x_saved)
        return self._flow(x, recipe, residual=False)[0]

    @eager_op
    def forward_with_residual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(x), x')`` where ``x'`` is x for the block's residual add: a view of x whose gradient comes back
        through this norm's backward, which adds it to the norm's input gradient in the same kernel pass (and
        publishes that sum's amax, :mod:`fp8train.nn.grad_amax`).  Used by :mod:`fp8train.nn.residual_stream`."""
        recipe = getattr(self, "recipe", None)
        if recipe is None or not flow_supported(recipe):
            return self.forward(x), x
        return self._flow(x, recipe, residual=True)

    def _flow(self, x: torch.Tensor, recipe: Recipe, residual: bool) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
        if torch.is_autocast_enabled(x.device.type):
            out_dtype = torch.get_autocast_dtype(x.device.type)
        elif self.weight is not None and self.style == "llama":
            out_dtype = torch.promote_types(self.weight.dtype, x.dtype)
        else:
            out_dtype = x.dtype
        box: list = []
        y, *spares = _FlowNormFunction.apply(x, self.weight, eps, self.style, wants_transpose(x.device, recipe),
                                             out_dtype, box, residual)
        x_residual = spares.pop() if residual else x
        y_in, saved = box[0]
        attach_linear_input(y, recipe, y_in)
        handoff.attach(y, NORM_KEY, NormOutput(x, self.weight, saved, y_in))
        handoff.attach(y, handoff.GRAD_FANOUT, spares)
        return y, x_residual

    def extra_repr(self) -> str:
        return super().extra_repr() + ", hands E4M3 per-tensor output to FP8 linears"


# -- the MLP ---------------------------------------------------------------------------------------------------

class _FlowMLPFunction(torch.autograd.Function):
    """[norm +] gate/up + act(gate)*up + down; saves only FP8 tensors (plus fp32 rstd and scalars)."""

    @staticmethod
    def forward(ctx, src, norm_weight, w_gate, b_gate, w_up, b_up, w_down, b_down,
                norm, x_in, recipe, activation, out_dtype, recompute, add_residual, prediction):
        transpose = wants_transpose(src.device, recipe)
        with autocast_off(src.device.type):
            if norm is not None:
                x_in = norm.y
            if recompute:
                gate, saved_gate = fp8_linear_forward(x_in, w_gate, b_gate, recipe=recipe, out_dtype=out_dtype)
                up, saved_up = fp8_linear_forward(x_in, w_up, b_up, recipe=recipe, out_dtype=out_dtype)
                up_weight_amax = saved_up.weight_amax
                # COAT's flow: act and mul read the FP8 1x16 gate/up, so backward can rebuild the product
                # bit for bit from what it saves (and its gradient is the gradient of what forward computed)
                gated = GatedSaved(mg.save_for_nonlinear(gate), mg.save_for_nonlinear(up), activation)
                h_in = _product_from_fp8(gated, out_dtype, recipe, transpose)
                del gate, up
            else:
                # gate/up GEMMs + the one-pass gated product (one fused Triton GEMM with Recipe.gated_gemm)
                h_in, gated, saved_gate, up_weight_amax = gated_projection_forward(
                    x_in, w_gate, w_up, activation, recipe=recipe, out_dtype=out_dtype, b_gate=b_gate, b_up=b_up,
                    prediction=None if prediction is None else prediction[0:1], output_transpose=transpose)
            out, saved_down = fp8_linear_forward(h_in, w_down, b_down, recipe=recipe, out_dtype=out_dtype)

        # gate and up read the same FP8 input: save it once, with each projection's weight amax
        x_tensors, ctx.x_meta = save_linear(saved_gate)
        (g_data, g_amax), ctx.gate_meta = mg.pack(gated.gate)
        (u_data, u_amax), ctx.up_meta = mg.pack(gated.up)
        if recompute:
            h_tensors, ctx.h_meta = [None, None, None, saved_down.weight_amax], None
            ctx.h_shape, ctx.h_dtype = saved_down.input_shape, saved_down.input_dtype
        else:
            h_tensors, ctx.h_meta = save_linear(saved_down)
        if norm is not None:
            (n_data, n_amax), ctx.norm_meta = mg.pack(norm.saved.x)
            norm_tensors, ctx.norm_style = [n_data, n_amax, norm.saved.rstd], norm.saved.style
        else:
            norm_tensors, ctx.norm_meta = [None, None, None], None
        ctx.save_for_backward(*x_tensors, up_weight_amax, g_data, g_amax, u_data, u_amax, *h_tensors,
                              *norm_tensors, norm_weight, w_gate, w_up, w_down)
        ctx.recipe, ctx.activation, ctx.recompute = recipe, activation, recompute
        ctx.prediction = prediction  # a module buffer updated in place: not a saved tensor
        ctx.has_bias = (b_gate is not None, b_up is not None, b_down is not None)
        ctx.src_dtype, ctx.out_dtype, ctx.add_residual = src.dtype, out.dtype, add_residual
        # with add_residual the block's residual add happens here (src + out, as HF's ``residual + hidden``), so
        # its gradient arrives in this backward, whose norm kernel adds it to dx in the same pass
        return src + out if add_residual else out

    @staticmethod
    def backward(ctx, dout):
        (x_data, x_amax, x_scale, wg_amax, wu_amax, g_data, g_amax, u_data, u_amax, h_data, h_amax, h_scale, wd_amax,
         n_data, n_amax, rstd, norm_weight, w_gate, w_up, w_down) = ctx.saved_tensors
        recipe = ctx.recipe
        needs = ctx.needs_input_grad
        dres = None
        if ctx.add_residual:  # d(src + out): the same gradient for both, cast like autograd casts it
            dres, dout = dout, dout.to(ctx.out_dtype)
        with autocast_off(dout.device.type):
            gated = GatedSaved(mg.unpack(ctx.gate_meta, g_data, g_amax), mg.unpack(ctx.up_meta, u_data, u_amax),
                               ctx.activation)
            if ctx.recompute:
                saved_down = _recompute_product(gated, wd_amax, ctx.h_shape, ctx.h_dtype, recipe, dout.device)
            else:
                saved_down = load_linear(ctx.h_meta, h_data, h_amax, h_scale, wd_amax)
            # the gated product's backward can write dgate/dup directly as the projections' E5M2 per-tensor
            # gradients (+ transposed copies), skipping the bf16 round trip
            # (not with biases: their gradient is an exact sum of the unquantized dgate/dup)
            fused_quantize = linear_formats(recipe)[2][0] == mg.GRAD_FORMAT and not any(ctx.has_bias[:2])
            transpose = wants_transpose(dout.device, recipe)
            dgate, dup, dw_down, db_down = gated_projection_backward(
                dout, saved_down, w_down, gated, recipe=recipe, has_bias=ctx.has_bias[2], needs_weight_grad=needs[6],
                quantize_grads=fused_quantize, output_transpose=fused_quantize and transpose,
                prediction=None if ctx.prediction is None else ctx.prediction[1:3])
            saved_gate = load_linear(ctx.x_meta, x_data, x_amax, x_scale, wg_amax)
            saved_up = saved_gate._replace(weight_amax=wu_amax)
            dx_gate, dw_gate, db_gate = fp8_linear_backward(dgate, saved_gate, w_gate, recipe=recipe,
                                                            has_bias=ctx.has_bias[0], needs_weight_grad=needs[2])
            dx_up, dw_up, db_up = fp8_linear_backward(dup, saved_up, w_up, recipe=recipe,
                                                      has_bias=ctx.has_bias[1], needs_weight_grad=needs[4])
            dnorm_weight = None
            if ctx.norm_meta is not None:
                # the norm's backward sums the two input gradients in fp32 as it reads them (no fp32 copies),
                # plus the residual gradient; that sum is src's whole gradient: publish its amax (grad_amax)
                norm_saved = RMSNormSaved(mg.unpack(ctx.norm_meta, n_data, n_amax), rstd, ctx.norm_style)
                slot = grad_amax.new_slot(dout.device) if dres is not None and grad_amax.enabled() else None
                dx, dnorm_weight = rmsnorm_backward(dx_gate, norm_saved, norm_weight, second_dy=dx_up,
                                                    residual_grad=dres, amax_slot=slot)
                if slot is not None and dx.dtype == ctx.src_dtype:
                    grad_amax.publish(dx, slot)
            else:
                dx = dx_gate.float() + dx_up.float()  # one rounding for the sum
                if dres is not None:
                    dx = dx + dres.float()
            dx = dx.to(ctx.src_dtype)
        return (dx, dnorm_weight, dw_gate, db_gate, dw_up, db_up, dw_down, db_down,
                None, None, None, None, None, None, None, None)


def _product_from_fp8(gated: GatedSaved, dtype: torch.dtype, recipe: Recipe, transpose: bool,
                      rowmajor: bool = True) -> LinearInput:
    """act(gate_hat) * up_hat from the FP8 1x16 copies, rounded to ``dtype``, quantized for down_proj.

    ``rowmajor=False`` (backward, with ``transpose``) lets the CUDA kernel write only the transposed copy.
    """
    if _product_kernel_applies(gated, dtype):
        from ..kernels.gated_from_copies import product_from_copies

        q, data_t = product_from_copies(gated.gate, gated.up, gated.activation, dtype,
                                        write_rowmajor=rowmajor or not transpose, with_transpose=transpose)
        return LinearInput(q, data_t)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    h = (act_fn(gated.gate.dequantize(cdt), gated.activation) * gated.up.dequantize(cdt)).to(dtype)
    (fmt, granularity), _, _ = linear_formats(recipe)
    return _quantize(h, fmt, granularity, transpose=transpose)


def _product_kernel_applies(gated: GatedSaved, dtype: torch.dtype) -> bool:
    from ..kernels import triton_available

    g, u = gated.gate, gated.up
    return (g.data.is_cuda and dtype in (torch.bfloat16, torch.float16, torch.float32) and mg.is_kernel_copy(g)
            and mg.is_kernel_copy(u) and g.shape == u.shape and g.shape[-1] % 16 == 0 and triton_available())


def _recompute_product(gated: GatedSaved, w_amax: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                       recipe: Recipe, device: torch.device) -> LinearSaved:
    """Rebuild down_proj's FP8 input (identical to forward's) from the saved FP8 gate and up."""
    h_in = _product_from_fp8(gated, dtype, recipe, wants_transpose(device, recipe), rowmajor=False)
    return LinearSaved(_as_matrix(h_in.q, h_in.data_t), w_amax, shape, dtype)


class FlowMLP(nn.Module):
    """A gated MLP (``down(act(gate(x)) * up(x))``) run as one autograd Function that saves only FP8.

    ``FlowMLP.from_module(mlp, recipe=...)`` keeps the MLP's ``gate_proj``/``up_proj``/``down_proj`` and
    ``act_fn`` children (so state_dict keys are unchanged); convert them to FP8Linear before or after.
    When its input carries a :class:`FlowRMSNorm` attachment, the norm's backward runs inside this Function.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module,
                 activation: str, recipe: Union[Recipe, str] = "coat"):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn
        self.activation = activation
        self.recipe = resolve_recipe(recipe)
        if self.recipe.delayed_scaling:
            # predicted amaxes of act(gate)*up, dgate, dup (fp8train.delayed_scaling); not in state_dict, so
            # checkpoints keep HF's keys -- the trainer saves them beside the model
            device = next(down_proj.parameters(), torch.zeros(0)).device
            self.register_buffer(BUFFER_NAME, new_prediction(3, device), persistent=False)

    @classmethod
    def from_module(cls, mlp: nn.Module, *, recipe: Union[Recipe, str] = "coat") -> "FlowMLP":
        act = getattr(mlp, "act_fn", None)
        name = activation_name(act) if isinstance(act, nn.Module) else None
        if name is None:
            raise ValueError(f"{type(mlp).__name__}: activation {type(act).__name__} has no FP8 kernel")
        missing = [n for n in ("gate_proj", "up_proj", "down_proj") if not isinstance(getattr(mlp, n, None), nn.Module)]
        if missing:
            raise ValueError(f"{type(mlp).__name__} has no {', '.join(missing)}; not a gated MLP")
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act, name, recipe)

    def _fusable(self) -> bool:
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        return flow_supported(self.recipe) and all(type(p) is FP8Linear and p.recipe == self.recipe
                                                   for p in projections)

    @eager_op  # eager FP8 ops; torch.compile compiles the model around them
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fusable():
            return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), self.activation))
        return self._run_fused(x, handoff.attached(x, NORM_KEY), add_residual=False)

    @eager_op
    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``: when ``x`` is the flow norm's output of ``residual`` (the Llama block's second
        half), the add runs inside this Function, so the residual gradient joins the norm's backward kernel
        instead of an autograd add (:mod:`fp8train.nn.residual_stream`)."""
        norm = handoff.attached(x, NORM_KEY) if self._fusable() else None
        if norm is None or norm.x is not residual:
            return residual + self.forward(x)
        return self._run_fused(x, norm, add_residual=True)

    def _run_fused(self, x: torch.Tensor, norm: Optional[NormOutput], add_residual: bool) -> torch.Tensor:
        out_dtype = compute_dtype(x)
        if norm is not None:
            src, norm_weight, x_in = norm.x, norm.weight, None
        else:
            src, norm_weight, x_in = x, None, quantize_linear_input(x, self.recipe)
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        prediction = getattr(self, BUFFER_NAME, None)
        if prediction is not None and prediction.dtype != torch.float32:
            # model.to(torch.bfloat16) after conversion casts buffers too; the kernels keep float32 amaxes
            prediction = prediction.float()
            setattr(self, BUFFER_NAME, prediction)
        return _FlowMLPFunction.apply(src, norm_weight, g.weight, g.bias, u.weight, u.bias, d.weight, d.bias,
                                      norm, x_in, self.recipe, self.activation, out_dtype,
                                      self.recipe.recompute_gated_product, add_residual, prediction)

    def extra_repr(self) -> str:
        saves = "gate/up E4M3 1x16" + ("" if self.recipe.recompute_gated_product else ", act*up E4M3")
        scales = ", predicted scales" if self.recipe.delayed_scaling else ""
        return f"act={self.activation}, one autograd Function, saves {saves}{scales}"
