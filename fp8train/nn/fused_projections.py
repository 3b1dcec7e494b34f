"""One FP8 GEMM for sibling projections that read the same input (an attention block's q/k/v).

Hugging Face's attention calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` one after another.  With
``Recipe.fused_qkv`` the first of these calls runs a single GEMM against the three weights stacked as
``[Wq; Wk; Wv]``, returns its own slice of the output and keeps the other two for the calls that follow with
the same ``x`` (the same tensor object, unmodified).  Autograd's backward of the split concatenates the three
output gradients -- one copy that replaces the two adds summing the three input gradients -- and the fused
backward runs one input-gradient GEMM (K = the three widths) and one weight-gradient GEMM, whose result is
split back into the three weights' gradients.

Why: at the 953M model's shapes the q/k/v GEMMs (N = 2048) ran at ~70 % of the MLP GEMMs' throughput, and
each projection quantized its weight and output gradient in launches of its own.

Numerics: the stack gets one E4M3 scale and the three output gradients one E5M2 scale, where separate layers
have one each (TransformerEngine's fused QKV layers do the same); results are therefore close to, not bit for
bit, the unfused path.  Parameters, their names and state_dict keys are untouched: the stack is built in each
forward (and again in backward) from the three Parameters.

Falls back to the separate layers (each member's own FP8 GEMM) whenever a call does not match: another input
tensor, a member called twice, members whose weights differ in dtype or device.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch
from torch import nn

from ..recipes import Recipe
from .linear import (PROJECTION_GROUP_ATTR, FP8Linear, compute_dtype, fp8_linear_backward, fp8_linear_forward,
                     load_linear, quantize_linear_input, save_linear)
from .eager_ops import autocast_off

__all__ = ["ProjectionGroup", "fuse_projections", "fused_group"]

class _FusedProjectionFunction(torch.autograd.Function):
    """``x @ [W_0; W_1; ...]^T (+ [b_0; b_1; ...])`` with FP8 operands; one output, split by the caller."""

    @staticmethod
    def forward(ctx, x, x_in, recipe, out_dtype, n, *params):
        weights, biases = params[:n], params[n:]
        with autocast_off(x.device.type):
            stacked = torch.cat(weights, dim=0)
            bias = torch.cat(biases, dim=0) if biases else None
            y, saved = fp8_linear_forward(x_in, stacked, bias, recipe=recipe, out_dtype=out_dtype)
        tensors, ctx.saved_meta = save_linear(saved)
        ctx.save_for_backward(*tensors, *weights)
        ctx.recipe, ctx.n, ctx.has_bias = recipe, n, bool(biases)
        ctx.rows = [w.shape[0] for w in weights]
        return y

    @staticmethod
    def backward(ctx, dy):
        saved_tensors = ctx.saved_tensors
        n_linear = len(saved_tensors) - ctx.n
        linear_tensors, weights = saved_tensors[:n_linear], saved_tensors[n_linear:]
        needs = ctx.needs_input_grad
        weight_grads_needed = any(needs[5:5 + ctx.n])
        with autocast_off(dy.device.type):
            saved = load_linear(ctx.saved_meta, *linear_tensors)
            stacked = torch.cat(weights, dim=0)  # rebuilt rather than kept: no second copy of q/k/v's weights
            dx, dweight, dbias = fp8_linear_backward(dy.contiguous(), saved, stacked, recipe=ctx.recipe,
                                                     has_bias=ctx.has_bias, needs_input_grad=needs[0],
                                                     needs_weight_grad=weight_grads_needed)
        weight_grads = list(dweight.split(ctx.rows, dim=0)) if dweight is not None else [None] * ctx.n
        bias_grads = list(dbias.split(ctx.rows, dim=0)) if dbias is not None else ([None] * ctx.n
                                                                                 if ctx.has_bias else [])
        return (dx, None, None, None, None, *weight_grads, *bias_grads)


class _Pending:
    """The slices a fused call computed for the members not called yet, and the input they belong to."""

    def __init__(self, source: torch.Tensor, outputs: dict):
        self.source = weakref.ref(source)
        self.version = source._version
        self.outputs = outputs

    def take(self, member: nn.Module, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.source() is not x or self.version != x._version:
            return None
        return self.outputs.pop(member, None)


class ProjectionGroup:
    """FP8Linear layers that read the same input, computed by one GEMM (see the module docstring).

    Attached to each member (:func:`fuse_projections`); :class:`~fp8train.nn.linear.FP8Linear` hands its
    calls to :meth:`__call__`.
    """

    def __init__(self, members: Sequence[FP8Linear]):
        self.members = list(members)
        self.recipe: Recipe = members[0].recipe.replace(cache_fp8_weights=False)  # the stack is new each call
        self._pending: Optional[_Pending] = None

    def __getstate__(self):  # pickling / deepcopy: the pending slices belong to one forward, not to the model
        return {**self.__dict__, "_pending": None}

    def _usable(self) -> bool:
        weights = [m.weight for m in self.members]
        first = weights[0]
        return all(w.dtype == first.dtype and w.device == first.device and w.dim() == 2 for w in weights)

    def __call__(self, member: FP8Linear, x: torch.Tensor) -> torch.Tensor:
        if self._pending is not None:
            out = self._pending.take(member, x)
            if out is not None:
                if not self._pending.outputs:
                    self._pending = None
                return out
        self._pending = None
        if not self._usable():
            return member.forward_single(x)
        members = self.members
        biases = [m.bias for m in members]
        params = [m.weight for m in members] + (biases if biases[0] is not None else [])
        x_in = quantize_linear_input(x, self.recipe)
        y = _FusedProjectionFunction.apply(x, x_in, self.recipe, compute_dtype(x), len(members), *params)
        outputs = y.split([m.out_features for m in members], dim=-1)
        mine = members.index(member)
        self._pending = _Pending(x, {m: o for i, (m, o) in enumerate(zip(members, outputs)) if i != mine})
        return outputs[mine]


def fused_group(module: nn.Module) -> Optional[ProjectionGroup]:
    """The group ``module`` belongs to, if any."""
    return module.__dict__.get(PROJECTION_GROUP_ATTR)


def fuse_projections(parent: nn.Module, names: Sequence[str]) -> Optional[ProjectionGroup]:
    """Make ``parent``'s children ``names`` (FP8Linear layers reading the same input) one fused GEMM.

    Returns the group, or None when they cannot be fused: not all FP8Linear with the same per-tensor recipe
    and input width, biases on some but not all, or already grouped.
    """
    members = [getattr(parent, n, None) for n in names]
    if not all(type(m) is FP8Linear for m in members):
        return None
    first = members[0]
    if not first.recipe.per_tensor or any(m.recipe != first.recipe for m in members):
        return None
    if any(m.in_features != first.in_features for m in members):
        return None
    if len({m.bias is None for m in members}) != 1 or any(fused_group(m) is not None for m in members):
        return None
    group = ProjectionGroup(members)
    for m in members:
        m.__dict__[PROJECTION_GROUP_ATTR] = group  # a plain attribute: not a submodule, not in state_dict
    return group
