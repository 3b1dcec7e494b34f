"""Dynamic Range Expansion (DRE): COAT's FP8 code for Adam moments (plain-torch reference).

A group of 128 Adam moment values typically spans far less than the dynamic range of FP8 (E4M3 covers
~2e5 within a group, a group of moments often only 1e1..1e3), so plain absmax scaling wastes most of the
format.  DRE raises every value to a power ``k`` before rounding, stretching the group's range until it fills
the format, and takes the k-th root when decoding.  Per group (COAT, arXiv 2410.19313, Sec. 4):

* ``M = max |x|`` and ``m = min |x|`` over the **non-zero** elements; centre ``c = sqrt(M) * sqrt(m)``;
* ``k = floor(16 * log2(R) / log2(M / m)) / 16`` with the target range ``R = fmax**2 / 2`` (100352 for E4M3):
  the largest multiple of 1/16 for which ``(M / m)**k <= R``;
* encode ``q = fp8(sign(x) * (|x| / c)**k / s)`` with ``s = (M / c)**k / fmax`` (the group max maps to fmax),
  decode ``x = sign(q) * c * (|q| * s)**(1/k)``.

The centre and the scale cancel: ``(|x| / c)**k / s = fmax * (|x| / M)**k``.  So a group is fully described by
``M`` and ``k``, which is all that is stored -- COAT keeps (s, k, c) in fp32 for each moment (0.19 B/param for m
and v); here ``M`` is one float32 and ``k`` one uint8 code ``16 * k``: 5 bytes per group, 0.078 B/param for both
moments.  ``(|x| / M)**k`` lies in ``[1/R, 1]`` for every non-zero element, so float32 neither overflows nor
underflows -- the job COAT's centre did.

``amax_dtype=torch.bfloat16`` stores ``M`` rounded *up* to bfloat16 instead (3 bytes per group).  It costs little
accuracy in one round trip, but an optimizer requantizes every step, and then the group maximum decodes to the
rounded-up value and ratchets upwards: with zero gradients m grows ~10 % over 50 steps instead of decaying
(measured in benchmarks/optimizer_quality.py).  The optimizer therefore keeps M in float32, which decodes the
group maximum exactly.

What COAT's kernel gets wrong and this module handles explicitly:

* all-zero groups: ``M = 0``, every code 0, decode gives exact zeros (no 0/0);
* constant groups (``M == m``): ``log2(M/m) = 0`` would make k infinite; k takes its upper bound instead, and with
  float32 metadata the group round-trips exactly (every code is fmax);
* a zero first element: COAT's warp reduction lets the lane-0 zero into the minimum, so ``m`` becomes 1e-30 and k
  collapses; here zeros are excluded from the minimum by construction;
* k bounds: ``1/16 <= k <= 255/16`` (the uint8 code range).  The upper bound is harmless: once k ~ 16 the decoded
  relative error (about ``2**-(mantissa bits + 1) / k``) is already at bfloat16's rounding level, so a larger k
  buys nothing, while flat groups (``M/m -> 1``) would ask for k -> infinity and amplify the float32 rounding of
  ``|x| / M`` by k.  The lower bound keeps k invertible: a group spanning more than ``R**16`` (possible only
  with float32 subnormals) is compressed by k = 1/16 and its smallest elements may flush to zero.

Groups are 1 x ``group_size`` slices of the **last dim** (a last dim that is not a multiple is zero-padded per row;
groups never straddle rows), so metadata is shaped ``(*x.shape[:-1], ceil(x.shape[-1] / group_size))`` and a
row-sharded tensor keeps its groups whole.  0-d tensors are one group of one element (metadata shape ``(1,)``).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F

from .formats import Minifloat, parse_format
from .quant import round_up_to_bf16

__all__ = [
    "EXPONENT_STEPS",
    "K_CODE_MIN",
    "K_CODE_MAX",
    "DREQuantized",
    "target_range",
    "exponent_numerator",
    "metadata_shape",
    "expansion_exponent",
    "dre_quantize",
    "dre_dequantize",
]

EXPONENT_STEPS = 16  # k lives on a 1/16 grid and is stored as the integer code 16*k
K_CODE_MIN = 1  # k >= 1/16: k must stay positive to be invertible
K_CODE_MAX = 255  # k <= 255/16 ~ 15.9: one uint8; beyond ~16 the decoded error is at bf16 level anyway
AMAX_DTYPES = (torch.bfloat16, torch.float32)

Format = Union[Minifloat, str]


class DREQuantized(NamedTuple):
    """DRE-coded tensor: ``data`` (FP8, shaped like x), per-group ``amax`` and ``k_code`` (= 16*k, uint8)."""

    data: torch.Tensor
    amax: torch.Tensor
    k_code: torch.Tensor


def _fp8(fmt: Format) -> Minifloat:
    fmt = parse_format(fmt)
    if not isinstance(fmt, Minifloat) or fmt.torch_dtype is None or fmt.bits != 8:
        raise ValueError(f"DRE stores values in a native FP8 dtype: use 'e4m3' or 'e5m2', got {fmt!r}")
    return fmt


def target_range(fmt: Format) -> float:
    """The dynamic range R that a group is expanded to: ``fmax**2 / 2`` (COAT's choice).

    The group minimum then maps to ``2 / fmax`` -- about 2.3 subnormal steps of E4M3 (and of E5M2), so even the
    smallest element of a group keeps a non-zero code.
    """
    return _fp8(fmt).max ** 2 / 2


def exponent_numerator(fmt: Format) -> float:
    """``16 * log2(R)`` as float32: the k code is ``floor(exponent_numerator / log2(M/m))``."""
    return float(torch.tensor(EXPONENT_STEPS * math.log2(target_range(fmt)), dtype=torch.float32))


def metadata_shape(shape: torch.Size, group_size: int = 128) -> torch.Size:
    """Shape of the per-group metadata of a tensor of ``shape``: ``(*shape[:-1], ceil(shape[-1]/group_size))``."""
    if len(shape) == 0:
        return torch.Size((1,))
    return torch.Size((*shape[:-1], -(-shape[-1] // group_size)))


def _to_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` as float32 groups ``(*lead, n_groups, group_size)``, the last dim zero-padded per row."""
    x = x.float()
    if x.dim() == 0:
        x = x.reshape(1)
    cols = x.shape[-1]
    n_groups = -(-cols // group_size)
    x = F.pad(x, (0, n_groups * group_size - cols))
    return x.reshape(*x.shape[:-1], n_groups, group_size)


def _from_groups(groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    cols = shape[-1] if len(shape) else 1
    flat = groups.reshape(*groups.shape[:-2], groups.shape[-2] * groups.shape[-1])[..., :cols]
    return flat.reshape(shape)


def expansion_exponent(amax: torch.Tensor, amin: torch.Tensor, fmt: Format = "e4m3") -> torch.Tensor:
    """k code (``16*k``, uint8) for groups with maximum ``amax`` and smallest non-zero magnitude ``amin``.

    ``k = floor(16 * log2(R) / log2(amax / amin)) / 16``, clamped to ``[1/16, 255/16]``.  The log of the ratio is
    taken as a difference of logs so that ``amax / amin`` cannot overflow float32.  Constant groups (ratio 1) and
    all-zero groups (``amax == 0``, ``amin == inf``) get the upper bound.
    """
    log_range = torch.log2(amax.float()) - torch.log2(amin.float())
    numerator = exponent_numerator(fmt)
    code = torch.where(log_range > 0, torch.floor(numerator / log_range), torch.full_like(log_range, K_CODE_MAX))
    return code.clamp(K_CODE_MIN, K_CODE_MAX).to(torch.uint8)


def dre_quantize(
    x: torch.Tensor,
    fmt: Format = "e4m3",
    group_size: int = 128,
    *,
    amax_dtype: torch.dtype = torch.float32,
    check_finite: bool = True,
) -> DREQuantized:
    """Encode ``x`` with Dynamic Range Expansion, one (amax, k) pair per 1 x ``group_size`` group of the last dim.

    ``amax_dtype=torch.float32`` (default) stores the exact group maximum; ``torch.bfloat16`` stores it rounded up
    to bfloat16 and encodes with that stored value, so encoder and decoder agree (2 bytes less per group).
    Non-finite input raises ``ValueError`` (``check_finite=False`` skips the check, which syncs on GPU; the caller
    must then guarantee finite input).
    """
    fmt = _fp8(fmt)
    if not torch.is_floating_point(x):
        raise TypeError(f"dre_quantize expects a floating-point tensor, got {x.dtype}")
    if amax_dtype not in AMAX_DTYPES:
        raise ValueError(f"amax_dtype must be torch.bfloat16 or torch.float32, got {amax_dtype}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    if check_finite and x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"cannot DRE-encode a tensor of shape {tuple(x.shape)} that holds NaN or inf values; "
            "find where they come from (a diverged loss, a too-high learning rate)"
        )
    groups = _to_groups(x.detach(), group_size)
    magnitude = groups.abs()
    amax = magnitude.amax(dim=-1) if magnitude.numel() else magnitude.new_zeros(magnitude.shape[:-1])
    if amax_dtype == torch.bfloat16:
        # round up so that |x| / amax <= 1; a maximum beyond bfloat16's range keeps its largest finite value
        # (its elements then saturate at fmax instead of the metadata becoming inf)
        stored = round_up_to_bf16(amax)
        stored = torch.where(torch.isinf(stored), torch.finfo(torch.bfloat16).max, stored)
    else:
        stored = amax.clone()
    amax = stored.float()
    # smallest non-zero magnitude: zeros must not enter the minimum (COAT's lane-0 bug)
    nonzero = torch.where(magnitude > 0, magnitude, torch.full_like(magnitude, math.inf))
    amin = nonzero.amin(dim=-1) if nonzero.numel() else amax.new_full(amax.shape, math.inf)
    k_code = expansion_exponent(amax, amin, fmt)
    k = k_code.float().unsqueeze(-1) / EXPONENT_STEPS
    denom = amax.unsqueeze(-1)
    ratio = torch.where(denom > 0, magnitude / torch.where(denom > 0, denom, 1.0), torch.zeros_like(magnitude))
    expanded = torch.pow(ratio, k) * fmt.max  # in [fmax / R, fmax] for non-zero elements, 0 for zeros
    data = fmt.to_storage(torch.copysign(expanded, groups))
    return DREQuantized(_from_groups(data.float(), x.shape).to(fmt.torch_dtype), stored, k_code)


def dre_dequantize(
    data: torch.Tensor,
    amax: torch.Tensor,
    k_code: torch.Tensor,
    fmt: Format = "e4m3",
    group_size: int = 128,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode: ``x = sign(q) * amax * (|q| / fmax) ** (1/k)`` per group; returns ``dtype``, shaped like ``data``."""
    fmt = _fp8(fmt)
    expected = metadata_shape(data.shape, group_size)
    if amax.shape != expected or k_code.shape != expected:
        raise ValueError(
            f"DRE metadata of shape {tuple(amax.shape)} / {tuple(k_code.shape)} does not match data of shape "
            f"{tuple(data.shape)} with group_size {group_size} (expected {tuple(expected)})"
        )
    groups = _to_groups(data, group_size)
    inv_k = EXPONENT_STEPS / k_code.float().unsqueeze(-1)
    values = torch.pow(groups.abs() / fmt.max, inv_k) * amax.float().unsqueeze(-1)
    return _from_groups(torch.copysign(values, groups), data.shape).to(dtype)
