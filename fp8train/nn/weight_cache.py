"""FP8 weights made once per optimizer step (``Recipe.cache_fp8_weights``).

Without the cache every micro-batch quantizes each weight twice (forward: row-major; backward: transposed),
each in launches of its own.  With it, every weight's two FP8 copies are made once after each optimizer step
and reused by every forward and backward until the next one.  On CUDA, bf16/fp16 weights are refreshed all at
once -- one amax launch and one quantize launch for every stale weight (:mod:`fp8train.kernels.weight_copies`)
-- into buffers that stay at the same addresses, so a CUDA graph captured once keeps reading the newest
copies; other weights (float32 master weights, CPU) are quantized one by one.  Same bits as the uncached path.

A copy is valid while three things are unchanged: the weight's storage (``data_ptr``), its version counter
(in-place writes: ``load_state_dict``, torch optimizers; fp8train.AdamW's kernel bumps it too) and the
optimizer-step generation (every torch.optim optimizer's step ends with a global hook; an optimizer writing
through ``.data`` changes no version counter, and the generation covers that).  The first FP8 linear that
finds its copy stale refreshes every stale copy of its model at once: :func:`fp8train.convert` groups a
model's FP8 linear weights with :func:`group_weights`, and only grouped weights are cached -- FSDP2's gathered
(unsharded) weights are other tensors, so the cache never holds copies of them.
:class:`fp8train.cuda_graphs.GraphedStep` calls :func:`refresh_stale` before each replay (a graph replays no
Python); if you capture CUDA graphs yourself, call it before each replay too.  Weights with an amax published
by fp8train.AdamW (:mod:`fp8train.nn.weight_amax`) skip the amax pass.

Cost: 2 bytes per linear weight parameter, kept between steps.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from . import weight_amax
from .identity_map import WeakIdentityMap

__all__ = ["cached_weight", "refresh_stale", "group_weights", "drop_cached_weights"]


class _Entry:
    """One weight's cached copies: ``value`` (a LinearInput) and what it was made from."""

    def __init__(self, fmt, granularity, transpose: bool):
        self.fmt, self.granularity, self.transpose = fmt, granularity, transpose
        self.key = None  # (data_ptr, version, generation) of the weight the copies were made from
        self.value = None
        self.buffers = None  # kernels.weight_copies.WeightBuffers on the batched path


_entries = WeakIdentityMap()
_groups = WeakIdentityMap()  # weight -> the list of weakrefs of its model's FP8 weights
_generation = 0
_hook = None


def _next_generation(optimizer, args, kwargs) -> None:
    global _generation
    _generation += 1


def _key(weight: torch.Tensor) -> tuple:
    return weight.data_ptr(), weight._version, _generation


def _capturing(weight: torch.Tensor) -> bool:
    return weight.is_cuda and torch.cuda.is_current_stream_capturing()


def group_weights(weights) -> None:
    """Refresh these weights together (one model's FP8 linear weights): a stale copy of one remakes all."""
    members = [weakref.ref(w) for w in weights]
    for w in weights:
        _groups[w] = members


def _group_of(weight: torch.Tensor) -> list:
    members = _groups.get(weight)
    if members is None:
        return [weight]
    return [w for w in (ref() for ref in members) if w is not None]


def _same_formats(entry: _Entry, fmt, granularity, transpose: bool) -> bool:
    if entry.transpose != transpose:
        return False
    # a recipe hands out the same parsed format objects every call: identity first, equality only otherwise
    return ((entry.fmt is fmt or entry.fmt == fmt)
            and (entry.granularity is granularity or entry.granularity == granularity))


def cached_weight(weight: torch.Tensor, fmt, granularity, transpose: bool):
    """The weight's FP8 copies as a LinearInput (with the transposed copy when ``transpose``), refreshed if
    stale; None where the cache does not apply: a weight no :func:`group_weights` call named (e.g. FSDP2's
    gathered weights, new tensors every step), or a stale copy inside a CUDA-graph capture (the caller then
    quantizes as without the cache, and the graph records that)."""
    global _hook
    if weight not in _groups:
        return None
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_next_generation)
    entry = _entries.get(weight)
    if entry is None or not _same_formats(entry, fmt, granularity, transpose):
        entry = _entries[weight] = _Entry(fmt, granularity, transpose)
    if entry.key != _key(weight):
        if _capturing(weight):
            return None
        group = _group_of(weight)
        for member in group:  # members not used yet take the caller's formats
            if member not in _entries:
                _entries[member] = _Entry(fmt, granularity, transpose)
        refresh_stale(group)
    return entry.value


def refresh_stale(weights=None) -> int:
    """Remake the stale cached copies of ``weights`` (default: every cached weight), all batched weights in
    one pass; returns how many were remade.  Weights with an amax published by fp8train.AdamW skip the amax
    pass (:mod:`fp8train.nn.weight_amax`)."""
    if weights is None:
        candidates = list(_entries.items())
    else:
        candidates = [(w, _entries[w]) for w in weights if w in _entries]
    stale = [(w, e) for w, e in candidates if e.key != _key(w)]
    if not stale:
        return 0
    batched = [_batchable(w, e) for w, e in stale]
    if any(batched):
        _refresh_batched([item for item, ok in zip(stale, batched) if ok])
    for (w, e), ok in zip(stale, batched):
        if not ok:
            _refresh_one(w, e, weight_amax.published_amax(w))
    return len(stale)


def _batchable(weight: torch.Tensor, entry: _Entry) -> bool:
    from .. import mixed_granularity as mg
    from ..kernels import triton_available

    return (weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2
            and weight.is_contiguous() and entry.transpose and entry.granularity.kind == "tensor"
            and entry.fmt == mg.LINEAR_FORMAT and triton_available())


def _refresh_batched(stale: list) -> None:
    from ..kernels.weight_copies import WeightBuffers, quantize_weights
    from ..quant import PER_TENSOR, QuantizedTensor
    from .linear import LinearInput

    for w, e in stale:
        if e.buffers is None or e.buffers.data.shape != w.shape or e.buffers.data.device != w.device:
            e.buffers = WeightBuffers(w.shape, w.device)
            b = e.buffers
            q = QuantizedTensor(data=b.data, amax=b.amax, fmt=e.fmt, granularity=PER_TENSOR, shape=w.shape,
                                dtype=w.dtype, scale_hint=b.scale)
            e.value = LinearInput(q, b.data_t)
    for dtype in {w.dtype for w, _ in stale}:
        group = [(w, e) for w, e in stale if w.dtype == dtype]
        # the amaxes fp8train.AdamW published with these very weight values, when every weight has one
        amaxes = [weight_amax.published_amax(w) for w, _ in group]
        quantize_weights([w for w, _ in group], [e.buffers for _, e in group],
                         amaxes=amaxes if all(a is not None for a in amaxes) else None)
    for w, e in stale:
        e.key = _key(w)


def _refresh_one(weight: torch.Tensor, entry: _Entry, amax: Optional[torch.Tensor]) -> None:
    from .linear import _quantize

    new = _quantize(weight, entry.fmt, entry.granularity, amax=amax, transpose=entry.transpose)
    old = entry.value
    if old is not None and _same_layout(old, new):
        # in place: whoever holds the old tensors (a captured graph) sees the new copies
        old.q.data.copy_(new.q.data)
        old.q.amax.copy_(new.q.amax)
        if old.q.scale_hint is not None:
            old.q.scale_hint.copy_(new.q.scale_hint)
        if old.data_t is not None:
            old.data_t.copy_(new.data_t)
    else:
        entry.value = new
    entry.key = _key(weight)


def _same_layout(old, new) -> bool:
    same = (old.q.data is not None and new.q.data is not None and old.q.data.shape == new.q.data.shape
            and old.q.data.dtype == new.q.data.dtype and old.q.dtype == new.q.dtype
            and old.q.amax.shape == new.q.amax.shape and (old.data_t is None) == (new.data_t is None)
            and (old.q.scale_hint is None) == (new.q.scale_hint is None))
    return same and (old.data_t is None or old.data_t.shape == new.data_t.shape)


def drop_cached_weights() -> None:
    """Free every cached FP8 weight copy (they are rebuilt on the next forward; a CUDA graph captured while
    they existed must be captured again)."""
    _entries.clear()
