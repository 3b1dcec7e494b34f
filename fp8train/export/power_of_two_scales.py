"""ZeroQuant-FP's scale constraints for FP4 weights that are cast up to FP8 (arXiv 2307.09782).

On an FP8 GEMM an E2M1 weight must be cast to E4M3 first.  If every scale folded into the weight is a power
of two, the cast is an exponent add (exact, no multiply): E4M3 has at least E2M1's mantissa bits.

* M1 (:func:`power_of_two_ceil`): each group scale is rounded *up* to the next power of two, so nothing clips.
  This is what ``w4a8-fp`` exports: on groups of 32 it is exactly the OCP MX layout (E8M0 exponents).
* M2 (:func:`shared_max_scales`): a row keeps one real scale ``S_max`` (the largest of its group scales,
  applied in the GEMM epilogue) and each group uses ``S_max / 2**k`` with the smallest ``k`` that does not
  shrink the group's scale below its own -- again rounding up.  The paper finds M2 more accurate than M1.
  compressed-tensors has no layout with a real per-row factor on top of power-of-two group scales, so M2 is
  available for simulation (``evaluate``) only; see docs/export.md.
"""

from __future__ import annotations

import torch

__all__ = ["power_of_two_ceil", "shared_max_scales", "e8m0_encode", "e8m0_decode"]

E8M0_BIAS = 127


def power_of_two_ceil(scale: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= ``scale`` (elementwise, scale > 0), computed exactly with ``frexp``.

    Returns float32; exponents are clamped to E8M0's range [-127, 127].
    """
    s = scale.detach().to(torch.float64)
    mantissa, exponent = torch.frexp(s)  # s = mantissa * 2**exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)  # already a power of two
    exponent = exponent.clamp(-E8M0_BIAS, E8M0_BIAS)
    return torch.ldexp(torch.ones_like(s), exponent).to(torch.float32)


def shared_max_scales(group_scales: torch.Tensor, row_scale: "torch.Tensor | None" = None) -> torch.Tensor:
    """M2: per row, ``S_max / 2**floor(log2(S_max / S_i))`` for group scales ``S_i`` (shape [rows, groups]).

    ``S_max`` is the row's largest group scale, or ``row_scale`` [rows, 1] (>= every S_i of its row) when given,
    e.g. the maximum rounded up to bf16 so that every result is exact in bf16.  Every result is >= its
    ``S_i`` (so nothing clips) and less than twice it.
    """
    s = group_scales.detach().to(torch.float64)
    s_max = s.amax(dim=-1, keepdim=True) if row_scale is None else row_scale.detach().to(torch.float64)
    ratio = torch.where(s > 0, s_max / s, torch.ones_like(s))
    _, exponent = torch.frexp(ratio)  # ratio in [2**(e-1), 2**e)  ->  floor(log2 ratio) = e - 1
    shift = exponent - 1
    return torch.ldexp(s_max.expand_as(s), -shift).to(torch.float32)


def e8m0_encode(power_of_two: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales -> biased exponents in uint8 (the MX "E8M0" scale format)."""
    _, exponent = torch.frexp(power_of_two.detach().to(torch.float64))
    return (exponent - 1 + E8M0_BIAS).clamp(0, 254).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor) -> torch.Tensor:
    """uint8 biased exponents -> float32 powers of two."""
    exponent = codes.to(torch.int32) - E8M0_BIAS
    return torch.ldexp(torch.ones(codes.shape, dtype=torch.float64, device=codes.device), exponent).float()
