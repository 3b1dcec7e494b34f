"""The residual stream of a Llama-style decoder layer, owned by fp8train so its gradient sums fuse into the norms.

Hugging Face's decoder layer (Llama, Mistral, Qwen2/3 and the families built the same way) reads

    residual = hidden_states
    hidden_states = self.input_layernorm(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, ...)
    hidden_states = residual + hidden_states
    residual = hidden_states
    hidden_states = self.post_attention_layernorm(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states

Each residual tensor is read twice -- by a norm and by an add -- so in backward autograd adds the two gradients:
two full-activation bf16 adds per layer, after the norm backward kernels that could have added them as they wrote
their output.  :func:`install` gives such a layer (as an instance attribute, the class is untouched) a forward
that makes the same calls in the same order, except that

* the first residual is the :class:`~fp8train.nn.precision_flow.FlowRMSNorm`'s pass-through view of its input
  (:meth:`FlowRMSNorm.forward_with_residual`), whose gradient returns through the norm's backward kernel;
* the second residual add runs inside the :class:`~fp8train.nn.precision_flow.FlowMLP` Function
  (:meth:`FlowMLP.forward_residual`), whose backward hands the gradient to the norm kernel it already runs.

Both kernels then write the residual stream's whole gradient -- which is o_proj's and the previous layer's
down_proj's output gradient -- and publish its amax (:mod:`fp8train.nn.grad_amax`), so those linears skip their
amax pass too.  Forward values are identical (the same adds, in the same dtypes); gradients differ only by the
rounding of the sums (one rounding, in fp32, instead of two).

The layer's forward source is checked against the listing above (its ``ast``, so comments and formatting do not
matter; the attention call must pass the layer's own arguments by name, ``**kwargs`` allowed): a family whose
layer does anything else keeps Hugging Face's forward.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from typing import Optional

from torch import nn

__all__ = ["install", "uninstall", "is_installed", "layer_plan"]

_MARK = "_fp8train_residual_stream"
_PLAN = "_fp8train_residual_plan"

# HF's body with the attention call's keywords elided (checked separately)
_TEMPLATE = [
    "residual = hidden_states",
    "hidden_states = self.input_layernorm(hidden_states)",
    "hidden_states, _ = self.self_attn()",
    "hidden_states = residual + hidden_states",
    "residual = hidden_states",
    "hidden_states = self.post_attention_layernorm(hidden_states)",
    "hidden_states = self.mlp(hidden_states)",
    "hidden_states = residual + hidden_states",
    "return hidden_states",
]


class _Plan(types.SimpleNamespace):
    """What a layer class's forward looks like: the arguments its attention call passes on, by name."""


def _dump(statement: ast.stmt) -> str:
    return ast.dump(statement, annotate_fields=False)


@functools.lru_cache(maxsize=None)
def _template() -> tuple:
    return tuple(_dump(ast.parse(line).body[0]) for line in _TEMPLATE)


@functools.lru_cache(maxsize=64)
def layer_plan(cls: type) -> Optional[_Plan]:
    """How to run ``cls``'s forward with an owned residual stream, or None when its forward is not the listing in
    this module's docstring."""
    forward = inspect.unwrap(cls.forward)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    fn = tree.body[0] if tree.body and isinstance(tree.body[0], ast.FunctionDef) else None
    if fn is None:
        return None
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # docstring
    if len(body) != len(_TEMPLATE):
        return None
    call = getattr(body[2], "value", None)
    if not isinstance(call, ast.Call) or call.args:
        return None
    passed, var_kwargs = [], False
    for kw in call.keywords:
        if kw.arg is None:
            if not isinstance(kw.value, ast.Name):
                return None
            var_kwargs = kw.value.id
        elif kw.arg != "hidden_states" and not (isinstance(kw.value, ast.Name) and kw.value.id == kw.arg):
            return None  # the attention call computes an argument: not the listing
        else:
            passed.append(kw.arg)
    if "hidden_states" not in passed:
        return None
    elided = ast.parse("hidden_states, _ = self.self_attn()").body[0]
    if _dump(ast.Assign(targets=body[2].targets, value=ast.Call(func=call.func, args=[], keywords=[]),
                        type_comment=None)) != _dump(elided):
        return None
    if any(_dump(s) != t for i, (s, t) in enumerate(zip(body, _template())) if i != 2):
        return None
    params = list(inspect.signature(forward).parameters.values())
    if len(params) < 2 or params[0].name != "self" or params[1].name != "hidden_states":
        return None
    names = {p.name for p in params}
    passed = [n for n in passed if n != "hidden_states"]
    if any(n not in names for n in passed):
        return None
    var_param = next((p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    if var_kwargs and var_kwargs != var_param:
        return None
    named = {p.name: p.default for p in params[2:] if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                  inspect.Parameter.KEYWORD_ONLY)}
    if any(named[n] is inspect.Parameter.empty for n in passed):
        return None  # a required argument: callers must name it, keep HF's forward
    return _Plan(passed=tuple(passed), var_kwargs=var_kwargs or None, named=named)


def _supported(layer: nn.Module) -> bool:
    from .precision_flow import FlowMLP, FlowRMSNorm

    return (isinstance(getattr(layer, "input_layernorm", None), FlowRMSNorm)
            and isinstance(getattr(layer, "post_attention_layernorm", None), FlowRMSNorm)
            and isinstance(getattr(layer, "mlp", None), FlowMLP)
            and isinstance(getattr(layer, "self_attn", None), nn.Module)
            and layer_plan(type(layer)) is not None)


def _forward(layer: nn.Module, hidden_states, *args, **kwargs):
    plan = layer.__dict__[_PLAN]  # found at install: no source parsing per call (nor under torch.compile)
    unknown = [k for k in kwargs if k not in plan.named]
    if args or (unknown and not plan.var_kwargs):
        # positional or unexpected arguments (Hugging Face passes keywords): the class's own forward
        return type(layer).forward(layer, hidden_states, *args, **kwargs)
    attention_kwargs = {name: kwargs.get(name, plan.named[name]) for name in plan.passed}
    if plan.var_kwargs:
        attention_kwargs.update({k: kwargs[k] for k in unknown})
    normed, residual = layer.input_layernorm.forward_with_residual(hidden_states)
    hidden_states, _ = layer.self_attn(hidden_states=normed, **attention_kwargs)
    hidden_states = residual + hidden_states
    return layer.mlp.forward_residual(layer.post_attention_layernorm(hidden_states), hidden_states)


def install(layer: nn.Module) -> bool:
    """Give ``layer`` (already converted: flow norms and FlowMLP) the owned-residual forward; False (and nothing
    changed) when its structure or forward source is not the supported one."""
    if is_installed(layer):
        return True
    if not _supported(layer):
        return False
    object.__setattr__(layer, _PLAN, layer_plan(type(layer)))
    layer.forward = types.MethodType(_forward, layer)
    object.__setattr__(layer, _MARK, True)
    return True


def uninstall(layer: nn.Module) -> None:
    """Back to the class's own forward."""
    if is_installed(layer):
        del layer.forward
        object.__delattr__(layer, _MARK)
        object.__delattr__(layer, _PLAN)


def is_installed(layer: nn.Module) -> bool:
    return bool(getattr(layer, _MARK, False))
