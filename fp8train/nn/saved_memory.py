"""Count the bytes autograd keeps for backward (saved activations), the way the memory claims are measured.

    with SavedTensorCounter(model) as counter:
        loss = model(ids, labels=ids).loss
    counter.total_bytes, counter.by_dtype

Rules: every tensor that reaches ``ctx.save_for_backward`` (or an op's own save) passes through
``torch.autograd.graph.saved_tensors_hooks``; each underlying storage is counted once (q/k/v sharing one FP8
input count it once; a view counts its whole storage); parameters, views of parameters and autocast's dtype
casts of parameters are excluded -- they are weights, not activations.
"""

from __future__ import annotations

import collections
from typing import Iterable, Optional

import torch

__all__ = ["SavedTensorCounter"]

# single-input autograd nodes that only cast or re-view a tensor: a saved tensor reached from a parameter
# through these alone is a copy of that parameter (autocast's bf16 weight cast, W^T views), not an activation
_CAST_OR_VIEW = {"ToCopyBackward0", "_ToCopyBackward0", "TBackward0", "TransposeBackward0", "PermuteBackward0",
                 "ViewBackward0", "UnsafeViewBackward0", "ExpandBackward0", "AliasBackward0", "CloneBackward0"}


class SavedTensorCounter:
    def __init__(self, parameters: Optional[Iterable[torch.Tensor]] = None):
        if isinstance(parameters, torch.nn.Module):
            parameters = parameters.parameters()
        self.parameters = list(parameters or [])
        self._param_storages = {p.untyped_storage().data_ptr() for p in self.parameters}
        self._param_ids = {id(p) for p in self.parameters}
        self._seen: dict[tuple, tuple[int, torch.dtype]] = {}
        self._hooks = None

    def _is_weight(self, t: torch.Tensor) -> bool:
        if id(t) in self._param_ids or t.untyped_storage().data_ptr() in self._param_storages:
            return True
        node = t.grad_fn
        while node is not None and type(node).__name__ in _CAST_OR_VIEW:
            nexts = [n for n, _ in node.next_functions if n is not None]
            if len(nexts) != 1:
                return False
            node = nexts[0]
            if type(node).__name__ == "AccumulateGrad":
                return id(node.variable) in self._param_ids
        return False

    def _pack(self, t: torch.Tensor):
        if not self._is_weight(t):
            storage = t.untyped_storage()
            key = (t.device.type, t.device.index, storage.data_ptr())
            if key not in self._seen:
                self._seen[key] = (storage.nbytes(), t.dtype)
        return t

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def total_bytes(self) -> int:
        return sum(n for n, _ in self._seen.values())

    @property
    def by_dtype(self) -> dict:
        out = collections.Counter()
        for n, dtype in self._seen.values():
            out[str(dtype).replace("torch.", "")] += n
        return dict(out)
