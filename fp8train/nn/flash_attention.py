"""FlashAttention-4 for the attention core of Hugging Face models, where it is installed (``Recipe.flash_attention``).

FlashAttention-4 (PyPI ``flash-attn-4``, ``flash_attn.cute``) writes its kernels in NVIDIA's CuTe DSL and
compiles them on first use; on Hopper (sm90) its causal forward + backward ran 1.11x faster than torch SDPA's
cuDNN kernels on the 953M model's attention (16 heads of 128, sequence 2048; H200, errors against fp32 as
cuDNN's: benchmarks/debug/fa4_attention.py, benchmarks/results/2026-11-28-h200-session15-fa4-attention.txt).
It is exact attention, like SDPA's fused kernels: only the order of float sums differs.

How it plugs in, without forked classes: like :mod:`fp8train.nn.fp8_saved_attention`, the function below is
registered in transformers' attention registry as ``"fp8train_flash4"`` (with SDPA's mask function, so masks
are built as for ``"sdpa"``), the model config's ``_attn_implementation`` is set to that name and each
converted attention module is marked.  A call runs FlashAttention-4 when

* the module is marked and FlashAttention-4 imports, on a CUDA GPU of compute capability 9.x or 10.x;
* the attention is plain causal self-attention: no mask (fp8train's plain causal batches pass none), no dropout,
  no softcapping / sinks / position bias, query length == key length;
* q/k/v are bf16 or fp16 with a head dim FlashAttention-4 takes (a multiple of 8, at most 256) and the query
  heads a multiple of the key/value heads (grouped-query attention runs natively);
* and torch.compile is not tracing (its graphs keep SDPA, which dynamo knows);

everything else runs Hugging Face's own SDPA function.  ``Recipe.flash_attention``: None (default) -- use it
where installed, quietly; True -- the same, with a one-time warning naming why a call could not use it; False
-- never.

The output comes back in the projections' layout (batch, sequence, heads, head_dim), as HF's SDPA function
returns it, so o_proj reads it without a copy -- and, since FlashAttention keeps its output for backward, o_proj
keeps a reference instead of an FP8 copy (``fp8train.nn.linear.kept_by_attention``).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..kernels import warn_once
from .attention_registry import hf_sdpa, is_llama_style_attention, plain_causal_fallback

__all__ = ["ATTENTION_NAME", "available", "flash4_attention_forward", "install_on_model", "remove_flash_attention",
           "uses_flash_attention"]

ATTENTION_NAME = "fp8train_flash4"
_MARK = "_fp8train_flash_attention"  # on a converted attention module: True (warn when unusable) or None (quiet)


@functools.lru_cache(maxsize=1)
def _flash_attn_func() -> Optional[Callable]:
    """FlashAttention-4's ``flash_attn_func``, or None when it is not installed (imported once: ~6 s)."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception:  # noqa: BLE001 - not installed, or its CUDA libraries do not load here
        return None
    return flash_attn_func


def available(device: Optional[torch.device] = None) -> bool:
    """Whether FlashAttention-4 is installed and ``device`` (default: the current CUDA device) can run it."""
    if not torch.cuda.is_available():
        return False
    return _capable(device.index if device is not None and device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capable(index: int) -> bool:  # asked on every attention call: answered once per GPU
    return torch.cuda.get_device_capability(index)[0] in (9, 10) and _flash_attn_func() is not None


def _unsupported(module, query, key, value, attention_mask, dropout, is_causal, kwargs) -> Optional[str]:
    """Why this call cannot run FlashAttention-4, or None."""
    why = plain_causal_fallback(module, query, key, attention_mask, dropout, is_causal, kwargs)
    if why is not None:
        return why
    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if query.dtype not in (torch.bfloat16, torch.float16) or key.dtype != query.dtype or value.dtype != query.dtype:
        return f"dtype {query.dtype} (bf16 or fp16 needed)"
    head_dim = query.shape[-1]
    if head_dim % 8 or head_dim > 256 or value.shape[-1] != head_dim:
        return f"head dim {head_dim} (a multiple of 8 up to 256, equal for q/k/v)"
    if query.shape[-2] != key.shape[-2]:
        return "query and key lengths differ (a KV cache)"
    if query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key/value heads"
    if not _runs_on(query.device):
        return _NOT_HERE
    return None


_NOT_HERE = "FlashAttention-4 (pip install flash-attn-4) is not installed, or this is not an sm90/sm100 CUDA GPU"


def _runs_on(device: torch.device) -> bool:
    return device.type == "cuda" and available(device)


def flash4_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None, **kwargs):
    """Hugging Face attention function (the ``"fp8train_flash4"`` entry of ``ALL_ATTENTION_FUNCTIONS``): q/k/v
    (batch, heads, sequence, head_dim) in, ``(attn_output (batch, sequence, heads, head_dim), None)`` out."""
    setting = getattr(module, _MARK, False)
    why = "not converted" if setting is False else _unsupported(module, query, key, value, attention_mask, dropout,
                                                                is_causal, kwargs)
    if why is not None:
        if setting is True:
            warn_once(f"flash-attention-{why}", f"fp8train flash attention: {why}; this call runs SDPA instead")
        return hf_sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                          is_causal=is_causal, **kwargs)
    # HF's (batch, heads, sequence, dim) tensors are transposed views of the projections' (batch, sequence,
    # heads, dim) outputs: transposing back is free
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = _flash_attn_func()(q, k, v, softmax_scale=scaling, causal=True)[0]
    return out, None


def register_attention_function() -> bool:
    """Register :func:`flash4_attention_forward` (and SDPA's mask function) under ``"fp8train_flash4"``; False
    when this transformers has no mask registry (< 4.53)."""
    from .attention_registry import register

    return register(ATTENTION_NAME, flash4_attention_forward)


def uses_flash_attention(module: nn.Module) -> bool:
    """Whether ``module`` (an attention module) is switched to :func:`flash4_attention_forward`."""
    config = getattr(module, "config", None)
    return hasattr(module, _MARK) and getattr(config, "_attn_implementation", None) == ATTENTION_NAME


def install_on_model(model: nn.Module, is_excluded=None, warn: bool = False) -> dict:
    """What ``fp8train.convert`` does for ``Recipe.flash_attention``: mark every Llama-style attention module of
    ``model`` that ``is_excluded(name, module)`` does not exclude and whose config uses ``"sdpa"``, and switch the
    config.  ``warn``: warn once per reason when a call has to fall back to SDPA.  Returns
    ``{"installed": [names], "skipped": {name: why}}``; installs nothing (quietly) where FlashAttention-4 cannot
    run, unless ``warn``."""
    installed, skipped = [], {}
    usable = available()  # the current CUDA device: where the model trains
    for name, module in model.named_modules():
        if not is_llama_style_attention(module) or (is_excluded is not None and is_excluded(name, module)):
            continue
        current = getattr(module.config, "_attn_implementation", None)
        if not usable:
            skipped[name] = _NOT_HERE
        elif current not in ("sdpa", ATTENTION_NAME):
            skipped[name] = f"attn_implementation={current!r} (only 'sdpa' models are switched)"
        elif not register_attention_function():
            skipped[name] = "this transformers has no attention-mask registry (transformers >= 4.53 is needed)"
        else:
            module.config._attn_implementation = ATTENTION_NAME
            setattr(module, _MARK, True if warn else None)
            installed.append(name)
    if skipped and warn:
        warn_once("flash-attention-install", f"fp8train.convert: flash_attention left {len(skipped)} attention "
                                             f"module(s) on SDPA: {'; '.join(sorted(set(skipped.values())))}")
    return {"installed": installed, "skipped": skipped}


def remove_flash_attention(model: nn.Module) -> int:
    """Unmark every attention module of ``model`` and set their configs back to ``"sdpa"``; returns how many."""
    from .attention_registry import unmark_all

    return unmark_all(model, _MARK, ATTENTION_NAME)
