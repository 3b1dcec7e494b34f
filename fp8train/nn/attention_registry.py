"""Switching Hugging Face attention modules to an fp8train attention function through transformers' registries.

The FP8-saved attention (:mod:`fp8train.nn.fp8_saved_attention`) and FlashAttention-4
(:mod:`fp8train.nn.flash_attention`) plug in the same way: their function is registered under its own name in
``ALL_ATTENTION_FUNCTIONS``, with SDPA's mask function under the same name (a name without a mask function would
get *no* mask at all), the model config's ``_attn_implementation`` is set to that name, and each converted module
carries a mark -- unmarked modules reading the same config run HF's SDPA.  Both take the same calls (plain
causal self-attention of Llama-style modules) and hand every other call to HF's SDPA function.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

__all__ = ["register", "unmark_all", "hf_sdpa", "plain_causal_fallback", "is_llama_style_attention"]


def hf_sdpa() -> Callable:
    """Hugging Face's own SDPA attention function: where every call an fp8train one does not cover goes."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def plain_causal_fallback(module, query, key, attention_mask, dropout, is_causal, kwargs) -> Optional[str]:
    """Why a call is not plain causal self-attention without extras (so runs HF's SDPA), or None."""
    if attention_mask is not None:
        return "an attention mask (padding, packed sequences, sliding window) was given"
    if dropout:
        return "attention dropout > 0"
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        return "non-causal attention"
    for name in ("position_bias", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            return f"'{name}' is not supported"
    if kwargs.get("output_attentions"):
        return "output_attentions=True"
    return None


def is_llama_style_attention(module: nn.Module) -> bool:
    """Linear q/k/v/o projections and a Hugging Face config that picks the attention function."""
    from .adapters.llama import ATTENTION_PROJECTIONS

    return (all(isinstance(getattr(module, n, None), nn.Module) for n in ATTENTION_PROJECTIONS)
            and hasattr(getattr(module, "config", None), "_attn_implementation"))


def register(name: str, fn: Callable) -> bool:
    """Register ``fn`` as attention implementation ``name`` (and SDPA's mask function under it); False when this
    transformers has no mask registry (< 4.53)."""
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
    except ImportError:
        return False
    if ALL_ATTENTION_FUNCTIONS.get(name) is not fn:
        AttentionInterface.register(name, fn)
    if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def unmark_all(model: nn.Module, mark: str, name: str) -> int:
    """Remove ``mark`` from every module of ``model`` and set configs using ``name`` back to ``"sdpa"``; returns
    how many modules were marked."""
    count = 0
    for module in model.modules():
        if mark in vars(module):
            delattr(module, mark)
            count += 1
            config = getattr(module, "config", None)
            if getattr(config, "_attn_implementation", None) == name:
                config._attn_implementation = "sdpa"
    return count
