"""FP8-linear weight amaxes published by the optimizer step, so the forward skips its amax pass.

An FP8 linear quantizes its weight per tensor with the weight's amax (max |w|).  Computed in the forward, that
is a launch of its own per weight and micro-batch (112 per step of a 953M Llama).  But the weights change only
in the optimizer step, and ``fp8train.AdamW``'s fused kernel reads and writes every weight anyway: it also
reduces max |new w| of the values it wrote (atomically, per weight) and *publishes* the result here.  The
forward (:func:`fp8train.nn.linear.fp8_linear_forward`) then passes the published amax to the quantizer and
only the quantize pass runs.  Max is exact, so the FP8 weights -- and the whole training run -- are bit for
bit those of the forward computing the amax itself.

Who takes part:

* :class:`~fp8train.nn.linear.FP8Linear` marks its ``weight`` Parameter as wanting an amax (:func:`want`)
  whenever one is assigned (construction, ``from_linear``, ``convert``);
* ``fp8train.AdamW`` gives each marked parameter a :class:`Slot` (:func:`new_slot`, one per parameter,
  allocated once and reused every step: a CUDA graph captured once keeps reading the right memory), fills it
  after every update -- in the fused kernel on CUDA, with ``p.abs().amax()`` on the torch path -- and at
  construction, and calls :func:`publish`, which records the weight's storage (``data_ptr``) and version
  counter the value belongs to;
* the forward asks :func:`published_amax`, which answers only while the weight's storage and version counter
  are still the recorded ones.  A weight changed in any other way (``load_state_dict``,
  ``with torch.no_grad(): w.mul_(2)``, another optimizer) falls back to computing its amax, as without this.

Not published: sharded parameters (FSDP2 / DTensor: a shard's amax is not the tensor's, and the forward sees
the all-gathered copy anyway), transposed-weight layers (``FP8Conv1D``) and fused q/k/v stacks (the stack is a
new tensor each forward).  They compute their amax in the forward as before.

CUDA graphs: a graph captured while a weight's published amax was valid reads the slot's memory on every
replay, so it sees each later optimizer step.  A weight changed *outside* the optimizer after capture is not
noticed by the replaying graph (the version check runs on the host, at capture) -- like any captured tensor.
After such a change call ``optimizer.publish_weight_amax()`` before the next replay.

Slot format: an int64 holding ``(epoch << 32) | float32 bits of the amax`` (little-endian, so the amax is the
word's first float32; ``Slot.amax`` is that 0-d view).  Non-negative float32 values order like their bits,
and a newer epoch outranks any value of an older one, so the kernel's programs fold their tile maxima into the
slot with an ``atomic_max`` each (skipped when the slot already holds as much) and nothing has to zero it first.

Switch it off (for comparisons) with ``FP8TRAIN_PUBLISHED_AMAX=0`` in the environment, :func:`set_enabled`
or ``with weight_amax.disabled(): ...``; the optimizer then skips the work too.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

import torch

from .identity_map import WeakIdentityMap

__all__ = ["want", "wants", "generation", "Slot", "new_slot", "write_slot", "publish", "published_amax",
           "is_enabled", "set_enabled", "disabled"]

# the slot's first float32 is its low word only on little-endian machines; elsewhere nothing is published and
# every forward computes its weight's amax itself (the rest of fp8train does not care about byte order)
_LITTLE_ENDIAN = sys.byteorder == "little"


class Slot:
    """Where an optimizer publishes one parameter's amax: ``word`` (one int64, see the module doc), ``amax`` (its
    0-d float32 view, what the forward reads) and the parameter's ``data_ptr`` / ``version`` the value belongs to
    (-1 until :func:`publish`)."""

    __slots__ = ("word", "amax", "data_ptr", "version")

    def __init__(self, device):
        self.word = torch.zeros(1, dtype=torch.int64, device=device)
        self.amax = self.word.view(torch.float32)[0]  # the low word on a little-endian machine
        self.data_ptr = self.version = -1


# parameter -> the Slot its amax is published in, or None while it wants one and has none
_entries = WeakIdentityMap()
_generation = 0  # bumped whenever a parameter is newly marked: optimizers rescan their parameters then
_enabled = _LITTLE_ENDIAN and os.environ.get("FP8TRAIN_PUBLISHED_AMAX", "1") != "0"


def want(param: torch.Tensor) -> None:
    """Mark ``param`` (an FP8 linear's weight) as wanting its amax published by the optimizer."""
    global _generation
    if param not in _entries:
        _entries[param] = None
        _generation += 1


def wants(param: torch.Tensor) -> bool:
    return param in _entries


def generation() -> int:
    """A counter that changes whenever :func:`want` marks a new parameter."""
    return _generation


def new_slot(param: torch.Tensor) -> Slot:
    """A zeroed slot on ``param``'s device, registered as where ``param``'s amax is published (replacing any
    earlier one: the latest optimizer to ask wins)."""
    slot = Slot(param.device)
    _entries[param] = slot
    return slot


def write_slot(slot: Slot, amax: torch.Tensor, epoch: int) -> None:
    """Store ``amax`` (any float dtype, converted exactly to float32) in ``slot`` with tag ``epoch`` (torch ops,
    no host sync).  The fused kernel writes slots itself."""
    words = slot.word.view(torch.int32)
    words[0].copy_(amax.detach().reshape(()).to(torch.float32).view(torch.int32))
    words[1].fill_(epoch)


def publish(param: torch.Tensor, slot: Slot) -> None:
    """Record that ``slot`` holds max |param| of ``param``'s current values.  Call it right after writing the
    values and the slot.  (Two attribute writes: this runs for every weight in every optimizer step.)"""
    slot.data_ptr = param.data_ptr()
    slot.version = param._version


def published_amax(param: torch.Tensor) -> Optional[torch.Tensor]:
    """The amax published for ``param`` (a 0-d float32 device tensor), or None when there is none, when
    ``param`` changed since (storage or version counter differ) or when publishing is switched off."""
    if not _enabled:
        return None
    slot = _entries.get(param)
    if slot is None or param._version != slot.version or param.data_ptr() != slot.data_ptr:
        return None
    return slot.amax


# -- switch -------------------------------------------------------------------------------------------------

def is_enabled() -> bool:
    return _enabled


def set_enabled(enabled: bool) -> bool:
    """Switch publishing (optimizer side) and its use (forward side) on or off; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled) and _LITTLE_ENDIAN
    return previous


@contextlib.contextmanager
def disabled():
    """Inside this block weights compute their amax in the forward and optimizers publish nothing."""
    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)
