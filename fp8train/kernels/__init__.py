"""Triton kernels, one file per op.  Each op's public function lives in ``fp8train.nn.<op>`` (or
``fp8train.mixed_granularity``) next to its plain-torch reference and dispatches here when its inputs are CUDA
tensors and Triton imports.

Triton is imported lazily: ``import fp8train.kernels`` does not import it; :func:`triton_available` does, once.
Set ``FP8TRAIN_DISABLE_TRITON=1`` to force the torch references everywhere (debugging, A/B checks).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

__all__ = ["triton_available", "use_triton", "kernels_enabled", "warn_once", "force_reference"]

_forced_reference = False


@contextlib.contextmanager
def force_reference():
    """Run the torch references even on CUDA inside this block (GPU checks compare kernels against them)."""
    global _forced_reference
    previous, _forced_reference = _forced_reference, True
    try:
        yield
    finally:
        _forced_reference = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can drive a CUDA device (cached after the first call)."""
    if os.environ.get("FP8TRAIN_DISABLE_TRITON", "0") not in ("", "0"):
        return False
    try:
        import torch
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no Triton"
        return False
    return bool(torch.cuda.is_available())


def kernels_enabled() -> bool:
    """Triton kernels may run (Triton present, a CUDA device, not inside :func:`force_reference`)."""
    return not _forced_reference and triton_available()


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Emit ``message`` as a UserWarning the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


_KERNEL_DTYPES = ("float32", "bfloat16", "float16")
_kernel_dtypes: frozenset = frozenset()  # _KERNEL_DTYPES as torch dtypes, filled on first use (torch is lazy)


def use_triton(op: str, *tensors, group: int = 16) -> bool:
    """Whether ``op`` should run its Triton kernel on ``tensors`` (all CUDA, float32/bf16/fp16, last dim a
    multiple of ``group``).  CUDA inputs that the kernels do not cover fall back to the torch reference with
    a one-time warning that says why."""
    # asked for every op on the hot path: plain loops, no generator expressions
    global _kernel_dtypes
    if _forced_reference:
        return False
    first = None
    for t in tensors:
        if t is not None:
            if not t.is_cuda or t.numel() == 0:
                return False
            if first is None:
                first = t
    if first is None or not triton_available():
        return False
    if not _kernel_dtypes:
        import torch

        _kernel_dtypes = frozenset(getattr(torch, name) for name in _KERNEL_DTYPES)
    for t in tensors:
        if t is not None and t.dtype not in _kernel_dtypes:
            warn_once(f"{op}-dtype-{t.dtype}", f"fp8train {op}: no Triton kernel for {t.dtype} inputs; "
                      "using the (slower) torch reference. Cast to bfloat16/float16/float32 to use the kernel.")
            return False
    hidden = first.shape[-1] if first.dim() else 1
    if hidden % group != 0:
        warn_once(f"{op}-hidden-{hidden}", f"fp8train {op}: last dimension {hidden} is not a multiple of {group}; "
                  "using the (slower) torch reference. Pad the hidden size to a multiple of 16 to use the kernel.")
        return False
    return True
