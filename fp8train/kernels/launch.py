"""Cheaper Triton launches: eager FP8 training is host-bound, and much of the host's time is launch overhead.

An eager training step of the 953M Llama launches ~340 Triton kernels, and an eager step waits for its host.
Triton's ``kernel[grid](...)`` runs Python on each launch (binding the arguments, building its cache key as a
string, reading its knobs, checking globals, its launcher object) before the C launcher runs.  Measured without a
profiler (``gpu_suite --only host``, ``host/us-per-call``), skipping that saves ~2-3 us of a ~45-65 us small
quantize call on the lent hosts: less than cProfile suggested -- the binder and the C launcher, which stay, are
most of a launch's cost.

:func:`fast_launch` wraps a ``@triton.jit`` kernel.  The first launch of each specialization goes through
Triton's own path (which compiles it); later launches with the same specialization go straight to the
compiled kernel's launcher.  "Same specialization" is decided by Triton's own binder -- dtypes, 16-byte
pointer alignment, the integer specialisations (== 1, divisible by 16), constexpr values -- plus the launch
options (``num_warps``, ...), so a wrapped kernel compiles and runs exactly what the plain one would.

``FP8TRAIN_FAST_LAUNCH=0`` in the environment (or :func:`set_enabled`) sends every launch through Triton's
path (A/B checks).  Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) kernels are left as
they are.

Also here: :func:`cdiv` and :func:`next_power_of_2` for host code.  Triton 3.x makes its own
``triton.cdiv`` / ``triton.next_power_of_2`` constexpr functions, whose host calls unwrap every argument
(several microseconds each, dozens per layer).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.runtime.jit import JITFunction

__all__ = ["fast_launch", "cdiv", "next_power_of_2", "FastKernel", "set_enabled"]

_enabled = os.environ.get("FP8TRAIN_FAST_LAUNCH", "1") != "0"


def set_enabled(on: bool) -> bool:
    """Switch the fast path on or off for every wrapped kernel; returns the previous setting (so callers can
    restore it)."""
    global _enabled
    previous, _enabled = _enabled, bool(on)
    return previous


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ints (host side)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


class FastKernel:
    """A ``@triton.jit`` kernel whose repeat launches skip Triton's Python launch path (see the module docstring).

    ``kernel[grid](*args, **kwargs)`` as with the plain kernel; any other attribute is the wrapped
    JITFunction's.
    """

    def __init__(self, fn: JITFunction):
        self.fn = fn
        # (device, specialization, options) -> (compiled kernel, its C launcher's fixed arguments or None)
        self._compiled: dict = {}
        self.__doc__ = fn.__doc__

    def __getattr__(self, name):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **kwargs):
        fn = self.fn
        if not _enabled:
            return fn.run(*args, grid=grid, warmup=False, **kwargs)
        device = _current_device()
        params, specialization, options = fn.device_caches[device][4](*args, **kwargs)  # Triton's own binder
        key = (device, tuple(specialization), tuple(options.items()))
        entry = self._compiled.get(key)
        if entry is None:  # first launch of this specialization: Triton's path compiles (or finds) and runs it
            kernel = fn.run(*args, grid=grid, warmup=False, **kwargs)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            self._compiled[key] = (kernel, _direct_arguments(kernel))
            return kernel
        kernel, direct = entry
        if callable(grid):
            grid = grid(params)
        grid_size = len(grid)
        grid_1, grid_2 = grid[1] if grid_size > 1 else 1, grid[2] if grid_size > 2 else 1
        stream = _driver.get_current_stream(device)
        values = params.values()
        runtime = _knobs.runtime
        enter_hook, exit_hook = runtime.launch_enter_hook, runtime.launch_exit_hook
        if direct is not None and not _active(enter_hook) and not _active(exit_hook):
            # what Triton's CudaLauncher would do for a kernel without scratch memory, minus its Python frame
            c_launch, function, cooperative, pdl, packed_metadata = direct
            c_launch(grid[0], grid_1, grid_2, stream, function, cooperative, pdl, None, None, packed_metadata,
                     None, None, None, *values)
        else:
            kernel.run(grid[0], grid_1, grid_2, stream, kernel.function, kernel.packed_metadata,
                       kernel.launch_metadata(grid, stream, *values), enter_hook, exit_hook, *values)
        return kernel


def _active(hook) -> bool:
    """Whether a launch hook (a HookChain, a plain callable or None) would do anything (Proton sets them)."""
    return bool(getattr(hook, "calls", hook))


def _direct_arguments(kernel):
    """``(C launch function, function handle, cooperative grid, PDL, packed metadata)`` of a compiled kernel whose
    launcher needs no scratch memory; None otherwise (its launches then go through Triton's launcher object)."""
    launcher = kernel.run  # Triton's CudaLauncher (loads the module on first access)
    c_launch = getattr(launcher, "launch", None)
    if (c_launch is None or getattr(launcher, "global_scratch_size", 1) != 0
            or getattr(launcher, "profile_scratch_size", 1) != 0 or getattr(launcher, "num_ctas", 1) != 1):
        return None
    return (c_launch, kernel.function, launcher.launch_cooperative_grid, launcher.launch_pdl, kernel.packed_metadata)


def fast_launch(fn):
    """Wrap a ``@triton.jit`` kernel in a :class:`FastKernel` (as a decorator, above ``@triton.jit``).  Anything
    else -- the interpreter's kernels, a Triton whose launch internals this was not written against -- is
    returned unchanged."""
    if type(fn) is not JITFunction or not _KNOWN_TRITON:
        return fn
    return FastKernel(fn)


def _known_triton() -> bool:
    """The launch internals used here (``device_caches`` holding the binder, ``run``'s launcher arguments,
    ``triton.knobs``) are Triton 3.6's; other versions keep Triton's own launch path."""
    try:
        major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) == (3, 6) and hasattr(triton, "knobs")


_KNOWN_TRITON = _known_triton()


class _LazyDriver:
    """``triton.runtime.driver.active``, looked up on first use (it probes the GPU)."""

    def __getattr__(self, name):
        from triton.runtime import driver

        value = getattr(driver.active, name)
        setattr(self, name, value)
        return value


_driver = _LazyDriver()
_knobs = getattr(triton, "knobs", None)
# Triton asks torch.cuda.current_device(), which re-checks CUDA's lazy initialisation on every call
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device
