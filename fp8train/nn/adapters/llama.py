"""Llama-style decoder blocks: Llama, Mistral, Qwen2/Qwen3, Gemma and others built the same way.

Recognized by structure: ``self_attn`` with linear ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``mlp`` with
linear ``gate_proj``/``up_proj``/``down_proj`` and a supported ``act_fn``, and exactly two RMSNorm-like norms
named ``input_layernorm`` and ``post_attention_layernorm`` (blocks with more norms, such as Gemma-2's
sandwich norms, feed a norm's output to the residual stream and take the generic path instead).

What changes (parameter names and state_dict keys stay the same):

* ``input_layernorm`` / ``post_attention_layernorm`` -> :class:`~fp8train.nn.precision_flow.FlowRMSNorm`
* the seven projections -> :class:`~fp8train.nn.linear.FP8Linear` (unless excluded or of unsupported shape)
* ``mlp`` -> :class:`~fp8train.nn.precision_flow.FlowMLP` holding the same projection modules
Norms and MLP are rewired only on the fast path (recipe "coat"); with FP8 linears alone ("fp8") the
adapter converts the projections, and everything else is left to the generic path.  (``o_proj`` keeps a
reference to its input instead of an FP8 copy by itself when that input is a view of an SDPA/FlashAttention
output: see ``FP8Linear.save_input``.)
* with ``Recipe.fused_qkv``, q/k/v run as one FP8 GEMM (:mod:`fp8train.nn.fused_projections`).
* with ``Recipe.fused_residual`` (the default, fast path), the block's forward owns its two residual adds so the
  norms' backward kernels sum the residual gradients (:mod:`fp8train.nn.residual_stream`; only when the block's
  forward source is Hugging Face's plain Llama listing).
* with ``Recipe.fused_rotary`` (the default), the family's ``apply_rotary_pos_emb`` is swapped for the fused,
  bit-identical rotary kernel (:func:`fp8train.nn.rotary.install_fused_rotary`), on both paths.
* anything else inside the block (Qwen3's q_norm/k_norm, the attention core) is left to the generic path: norms
  become FP8RMSNorm, the attention core stays bf16.
"""

from __future__ import annotations

from torch import nn

from .. import residual_stream
from ..fused_projections import fuse_projections
from ..precision_flow import FlowMLP, FlowRMSNorm
from ..rotary import install_fused_rotary
from .common import is_activation, is_rmsnorm_like

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")


class LlamaStyleBlock:
    name = "llama-style decoder block"

    def matches(self, module: nn.Module) -> bool:
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if not isinstance(attn, nn.Module) or not isinstance(mlp, nn.Module):
            return False
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in ATTENTION_PROJECTIONS):
            return False
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in MLP_PROJECTIONS):
            return False
        act = getattr(mlp, "act_fn", None)
        if not isinstance(act, nn.Module) or not is_activation(act):
            return False
        norms = {name for name, child in module.named_children() if "norm" in name.lower()}
        return norms == set(NORMS) and all(is_rmsnorm_like(getattr(module, n)) for n in NORMS)

    def convert(self, module: nn.Module, converter) -> None:
        recipe = converter.recipe
        prefix = converter.name_of(module)
        for name in ATTENTION_PROJECTIONS:
            converter.convert_linear(module.self_attn, name)
        if recipe.fused_qkv and fuse_projections(module.self_attn, ATTENTION_PROJECTIONS[:3]) is not None:
            converter.report["fused_qkv"] = converter.report.get("fused_qkv", 0) + 1
        if recipe.fused_rotary:
            patched = install_fused_rotary(module.self_attn)
            if patched is not None and patched not in converter.report["fused_rotary"]:
                converter.report["fused_rotary"].append(patched)
        if not converter.fast_path:
            return
        for name in NORMS:
            if not converter.is_excluded(f"{prefix}{name}", getattr(module, name)):
                converter.replace(module, name, FlowRMSNorm.from_module(getattr(module, name), recipe=recipe))
        for name in MLP_PROJECTIONS:
            converter.convert_linear(module.mlp, name)
        if not converter.is_excluded(f"{prefix}mlp", module.mlp):
            converter.replace(module, "mlp", FlowMLP.from_module(module.mlp, recipe=recipe))
        if recipe.fused_residual and residual_stream.install(module):
            converter.report["fused_residual"] = converter.report.get("fused_residual", 0) + 1
