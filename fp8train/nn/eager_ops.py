"""Two wrappers every FP8 op uses, made cheap: eager FP8 training is host-bound, and these ran ~200 times a step.

* :func:`eager_op` -- ``torch.compiler.disable`` for the modules' forward methods (torch.compile compiles the
  model around the FP8 ops, which run eagerly).  The plain decorator switches the frame-evaluation hook on
  every call, compiling or not; this one asks :func:`torch.compiler.is_compiling` first and calls the method
  directly in eager mode.
* :class:`autocast_off` -- ``torch.autocast(device, enabled=False)`` for the bodies of the autograd Functions
  (their GEMMs pick their own dtypes).  ``torch.autocast`` validates its arguments and keeps nesting counts on
  every entry; this only switches the flag off (and back) when it is on -- in backward it usually is not.
"""

from __future__ import annotations

import functools

import torch

__all__ = ["eager_op", "autocast_off"]


def eager_op(method):
    """Run ``method`` eagerly under torch.compile (a graph break around it), and at no extra cost outside it."""
    disabled = torch.compiler.disable(method)

    @functools.wraps(method)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return disabled(*args, **kwargs)
        return method(*args, **kwargs)

    return run


class autocast_off:
    """``with autocast_off(device_type):`` -- autocast disabled inside the block for that device type."""

    __slots__ = ("device_type", "was_enabled")

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        self.was_enabled = torch.is_autocast_enabled(self.device_type)
        if self.was_enabled:
            torch.set_autocast_enabled(self.device_type, False)

    def __exit__(self, *exc):
        if self.was_enabled:
            torch.set_autocast_enabled(self.device_type, True)
        return False
