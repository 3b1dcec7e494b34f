"""Switching Hugging Face attention modules to an fp8train attention function through transformers' registries.

The FP8-saved attention (:mod:`fp8train.nn.fp8_saved_attention`) and FlashAttention-4
(:mod:`fp8train.nn.flash_attention`) plug in the same way: their function is registered under its own name in
``ALL_ATTENTION_FUNCTIONS``, with SDPA's mask function under the same name (a name without a mask function would
get *no* mask at all), the model config's ``_attn_implementation`` is set to that name, and each converted module
carries a mark -- unmarked modules reading the same config run HF's SDPA.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

__all__ = ["register", "unmark_all"]


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
