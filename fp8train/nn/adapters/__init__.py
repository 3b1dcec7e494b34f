"""Per-family adapters: how :func:`fp8train.convert` rewires a model family's blocks for the fast path.

An adapter is thin: it recognizes a block *structurally* (child names and types, never a class name list) and
replaces submodules of HF's own modules with fp8train ones that keep the same parameter names.  No forked
model classes.  Blocks no adapter claims go through the generic path (swap linears, norms, activations).

    adapter = find_adapter(module)      # or None
    adapter.convert(module, converter)  # converter: fp8train.convert's walker (linear swaps, exclusions)

Add a family by writing an object with ``name``, ``matches(module)`` and ``convert(module, converter)`` and
appending it to :data:`ADAPTERS`.
"""

from __future__ import annotations

from typing import Optional, Protocol

from torch import nn

from .common import is_activation, is_layernorm, is_rmsnorm_like
from .llama import LlamaStyleBlock

__all__ = ["Adapter", "ADAPTERS", "find_adapter", "is_rmsnorm_like", "is_layernorm", "is_activation"]


class Adapter(Protocol):
    name: str

    def matches(self, module: nn.Module) -> bool: ...

    def convert(self, module: nn.Module, converter) -> None: ...


ADAPTERS: list = [LlamaStyleBlock()]


def find_adapter(module: nn.Module) -> Optional[Adapter]:
    for adapter in ADAPTERS:
        if adapter.matches(module):
            return adapter
    return None
