"""Count what autograd keeps for backward: unique storages packed by saved-tensor hooks, parameters excluded."""

from __future__ import annotations

import torch


def saved_bytes(fn, *inputs, params=()) -> int:
    """Bytes of the distinct non-parameter storages that autograd saves while running ``fn(*inputs)``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    del out
    return sum(storages.values())
