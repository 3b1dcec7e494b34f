"""Run Triton kernels on CPU with TRITON_INTERPRET=1 (kernel indexing/masking checks on tiny inputs).

Import this module before triton: it sets TRITON_INTERPRET=1 when ``FP8TRAIN_INTERPRET`` asks for it, and works
around an interpreter incompatibility with numpy >= 2.3 (``int()`` of a 1-element array, used by ``range`` over a
runtime bound).  The interpreter also mis-rounds float8 casts (ties go up; a carry into the exponent can drop a
whole binade), so FP8 data is compared with :func:`fp8_equal_modulo_interpreter`.
"""

from __future__ import annotations

import torch


def patch_interpreter() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_fp8train_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._fp8train_patched = True


def fp8_mismatches(got: torch.Tensor, ref: torch.Tensor, fmt) -> int:
    """Elements where FP8 ``got`` differs from ``ref`` by more than one step, except where ``ref`` is a power of
    two (the interpreter's broken carry)."""
    a, b = got.float(), ref.float()
    both_nan = torch.isnan(a) & torch.isnan(b)
    step = fmt.quantum(b).float()
    within = (a - b).abs() <= step * 1.01
    carry = torch.frexp(b.abs())[0] == 0.5
    return int(((a != b) & ~within & ~carry & ~both_nan).sum())
