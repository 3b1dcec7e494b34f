"""Hand a tensor's FP8 form from the op that made it to the ops that consume it.

A bf16 tensor often has several consumers that each want the same FP8 copy: q/k/v projections read one
normed hidden state, gate/up projections another.  Quantizing it in every consumer costs time, and -- worse --
each consumer would save its own FP8 copy for backward, so three 1-byte copies would cost more than the one
2-byte tensor they replace.  Instead the first consumer (or the producer, which can quantize in the same
pass that computes the tensor) attaches the quantized form to the tensor, and later consumers pick it up:

    attach(y, "linear_input", y_fp8)
    y_fp8 = attached(y, "linear_input")     # None if not attached, if y changed since, or y is gone

Entries are keyed by the tensor's identity and checked against its version counter (an in-place update
invalidates them); they disappear when the tensor is garbage collected, so nothing outlives its tensor.
The table is per thread.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Hashable, Optional

import torch

__all__ = ["attach", "attached", "detach_all", "GRAD_FANOUT", "grad_input"]


class _Table(threading.local):
    def __init__(self):
        self.entries: dict[int, tuple[weakref.ref, int, dict]] = {}


_table = _Table()


def _forget(key: int, ref: weakref.ref, entries: dict) -> None:
    entry = entries.get(key)
    if entry is not None and entry[0] is ref:
        del entries[key]


def attach(tensor: torch.Tensor, kind: Hashable, value: Any) -> None:
    """Remember ``value`` as the ``kind`` form of ``tensor`` (until the tensor changes or dies)."""
    entries = _table.entries
    key = id(tensor)
    entry = entries.get(key)
    if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
        ref = weakref.ref(tensor, lambda r, key=key, entries=entries: _forget(key, r, entries))
        entry = (ref, tensor._version, {})
        entries[key] = entry
    entry[2][kind] = value


def attached(tensor: torch.Tensor, kind: Hashable) -> Optional[Any]:
    """The ``kind`` form attached to ``tensor``, or None."""
    entry = _table.entries.get(id(tensor))
    if entry is None or entry[0]() is not tensor or entry[1] != tensor._version:
        return None
    return entry[2].get(kind)


GRAD_FANOUT = "grad_fanout"


def grad_input(tensor: torch.Tensor) -> torch.Tensor:
    """What a consumer of ``tensor`` should hand to autograd as its input: one of the spare aliases its producer
    attached under :data:`GRAD_FANOUT` (each a separate output of the producer's autograd Function, so its
    gradient reaches the producer's backward on its own), else ``tensor`` itself.

    A tensor read by several ops (q/k/v reading one norm output) otherwise gets its gradients summed by
    autograd's engine -- one bf16 add per extra consumer; the producer's backward kernel sums them in fp32 as
    it reads them instead.  The aliases hold the same values, so a consumer's result does not change.
    """
    spare = attached(tensor, GRAD_FANOUT)
    if spare and torch.is_grad_enabled():
        return spare.pop()
    return tensor


def detach_all() -> None:
    """Drop every attachment of this thread (tests; never needed in normal use)."""
    _table.entries.clear()
