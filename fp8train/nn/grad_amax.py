"""A gradient's amax, handed from the kernel that wrote the gradient to the FP8 linear that quantizes it.

A linear layer's backward quantizes its output gradient dY to E5M2 with one per-tensor scale: a pass over dY for
its amax, then a pass to scale and cast.  Where an fp8train kernel writes that dY itself -- the rotary embedding's
backward writes the q/k projections' gradients, the flow norm's backward (with the residual gradient added) the
residual stream's gradient, which is o_proj's and down_proj's dY -- it folds max|value| of what it stored into a
4-byte slot as it goes (one atomic max per program) and publishes the slot here; the linear's backward then skips
its amax pass.  The amax is of the values exactly as stored, so the scale -- and every bit after it -- is the one
the amax pass would have found.

    slot = grad_amax.new_slot(device)            # zeroed; the kernel folds float32 amax bits into it
    kernel(..., slot)                            # writes grad
    grad_amax.publish(grad, slot)
    ...
    amax = grad_amax.lookup(dy)                  # in the consumer: a float32 view of the slot, or None

Entries are keyed by data pointer, because autograd hands the consumer a view of the producer's tensor (a
transpose, a reshape), not the same Python object; an entry counts only while the producer's tensor is alive,
unmodified (same version counter) and the consumer's tensor has as many elements.  ``FP8TRAIN_GRAD_AMAX=0`` in the
environment (or :func:`set_enabled`) turns the hand-off off, for comparisons.
"""

from __future__ import annotations

import os
import weakref
from typing import Optional

import torch

__all__ = ["new_slot", "publish", "lookup", "enabled", "set_enabled"]

_entries: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}
_enabled = os.environ.get("FP8TRAIN_GRAD_AMAX", "1") != "0"


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = bool(on)
    if not on:
        _entries.clear()


def new_slot(device: torch.device, count: int = 1):
    """A zeroed int32 slot: kernels fold the float32 bits of max|value| into it with ``atomic_max`` (non-negative
    floats order like their bit patterns).  ``count > 1``: a tuple of that many slots zeroed by one launch."""
    block = torch.zeros(count, dtype=torch.int32, device=device)
    return block if count == 1 else tuple(block[i:i + 1] for i in range(count))


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _entries.get(key)
    if entry is not None and entry[0] is ref:
        del _entries[key]


def publish(grad: torch.Tensor, slot: torch.Tensor) -> None:
    """Record that ``slot`` (from :func:`new_slot`, filled by the kernel that wrote ``grad``) holds max|grad|."""
    if not _enabled:
        return
    key = grad.data_ptr()
    ref = weakref.ref(grad, lambda r, key=key: _forget(key, r))
    _entries[key] = (ref, grad._version, grad.numel(), slot.view(torch.float32))


def lookup(grad: torch.Tensor) -> Optional[torch.Tensor]:
    """The float32 amax (shape (1,)) a kernel published for ``grad`` (or a view of all of it), else None."""
    if not _entries:
        return None
    entry = _entries.get(grad.data_ptr())
    if entry is None:
        return None
    ref, version, numel, amax = entry
    source = ref()
    if source is None or source._version != version or grad._version != version or grad.numel() != numel:
        return None
    return amax
