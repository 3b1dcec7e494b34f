"""Number formats: any ExMy minifloat (FP8 E4M3/E5M2 and friends) and symmetric integers.

``Minifloat.round(x)`` is the reference rounding: it maps every element of ``x`` onto the nearest value
of the format (round-to-nearest, ties-to-even) and returns it in ``x``'s dtype.  It is written with exact
float64 arithmetic (``frexp`` + ``round`` on a power-of-two quantum), so it doubles as the oracle that the
tests check torch's own float8 casts against, and it simulates formats the hardware does not have
(E3M4, E2M1, E8M3, ...) for the stability lab.

Variants (how the top of the code space is spent):

* ``"ieee"``  -- the largest exponent code is reserved for inf/NaN (E5M2, fp16-like formats).
* ``"fn"``    -- "finite + NaN": no infinities, only the all-ones code is NaN (E4M3FN: max 448).
* ``"fnuz"``  -- "finite, NaN = negative zero": every code except 0x80 is finite; default bias is 2^(e-1).
* ``"finite"``-- every code is a number (MX-style E2M1 / E3M2: no inf, no NaN).

Out of range and non-finite inputs (documented behaviour of ``round``):

* finite values beyond ``max``: ``overflow="saturate"`` clamps to +-max; ``overflow="inf"`` (IEEE formats
  only) follows IEEE round-to-nearest, so values at or above ``max + ulp(max)/2`` become +-inf.
* values below ``min_subnormal / 2`` round to (signed) zero; with ``subnormals=False`` everything below
  ``min_normal`` is flushed towards 0 or ``min_normal`` by round-to-nearest on the ``min_normal`` grid.
* NaN stays NaN.  +-inf stays +-inf for IEEE formats; for formats without infinities it becomes
  ``+-max`` under saturation (what the hardware's saturating conversion does) and NaN otherwise.

``E4M3`` uses ``overflow="saturate"`` (what FP8 training wants; torch >= 2.9 casts saturate too) and
``E5M2`` uses ``overflow="inf"`` (the IEEE behaviour of ``torch.float8_e5m2`` casts).  Use
:meth:`Minifloat.saturate` before a cast when a finite result is required.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = [
    "Minifloat",
    "IntFormat",
    "E4M3",
    "E5M2",
    "E4M3FNUZ",
    "E5M2FNUZ",
    "E3M4",
    "E2M1",
    "E3M2",
    "E2M3",
    "E8M3",
    "BF16",
    "FP16",
    "INT8",
    "INT4",
    "parse_format",
]

_VARIANTS = ("ieee", "fn", "fnuz", "finite")


@dataclasses.dataclass(frozen=True)
class Minifloat:
    """A binary floating-point format with ``exp_bits`` exponent and ``man_bits`` mantissa bits.

    ``bias`` defaults to ``2**(exp_bits-1) - 1`` (``2**(exp_bits-1)`` for ``fnuz``).  ``torch_dtype`` names
    the torch dtype with the same value set, when one exists; quantized data is stored in it.
    """

    exp_bits: int
    man_bits: int
    variant: str = "ieee"
    bias: Optional[int] = None
    subnormals: bool = True
    overflow: Optional[str] = None  # "saturate" | "inf"; default: "inf" for ieee, else "saturate"
    name: Optional[str] = None
    torch_dtype: Optional[torch.dtype] = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        if self.exp_bits < 1 or self.man_bits < 0 or self.exp_bits + self.man_bits > 15:
            raise ValueError(
                f"unsupported minifloat E{self.exp_bits}M{self.man_bits}: need exp_bits >= 1, "
                "man_bits >= 0 and at most 15 bits besides the sign"
            )
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant must be one of {_VARIANTS}, got {self.variant!r}")
        if self.bias is None:
            default = 2 ** (self.exp_bits - 1) - (0 if self.variant == "fnuz" else 1)
            object.__setattr__(self, "bias", default)
        if self.overflow is None:
            object.__setattr__(self, "overflow", "inf" if self.variant == "ieee" else "saturate")
        if self.overflow not in ("saturate", "inf"):
            raise ValueError(f"overflow must be 'saturate' or 'inf', got {self.overflow!r}")
        if self.overflow == "inf" and not self.has_inf:
            raise ValueError(f"{self.variant!r} formats have no infinities; use overflow='saturate'")
        if self.variant == "ieee" and self.exp_bits < 2:
            raise ValueError("an IEEE-like format needs at least 2 exponent bits (one code is inf/NaN)")
        if self.variant == "fn" and self.exp_bits + self.man_bits < 2:
            raise ValueError("an FN format needs at least 2 bits besides the sign")
        if self.name is None:
            suffix = {"ieee": "", "fn": "FN", "fnuz": "FNUZ", "finite": ""}[self.variant]
            object.__setattr__(self, "name", f"E{self.exp_bits}M{self.man_bits}{suffix}")
        # read on every quantization and GEMM: computed once here.  (Not functools.cached_property: on Python
        # 3.11 its first read takes a lock, which torch.compile cannot trace -- a graph break.)
        top_mantissa = 2**self.man_bits - 1 - (1 if self.variant == "fn" else 0)  # fn: all-ones is NaN
        object.__setattr__(self, "_max", math.ldexp(1.0 + top_mantissa / 2**self.man_bits, self.emax))

    # -- value set ------------------------------------------------------------------------------
    @property
    def has_inf(self) -> bool:
        return self.variant == "ieee"

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top_code = 2**self.exp_bits - 1
        if self.variant == "ieee":
            top_code -= 1  # all-ones exponent is inf/NaN
        return top_code - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        return self._max

    @property
    def min_normal(self) -> float:
        return math.ldexp(1.0, self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (``min_normal`` when subnormals are disabled)."""
        if not self.subnormals:
            return self.min_normal
        return math.ldexp(1.0, self.emin - self.man_bits)

    @property
    def dynamic_range(self) -> float:
        return self.max / self.min_subnormal

    @property
    def storage_dtype(self) -> torch.dtype:
        """dtype that quantized data is stored in: the native float8 dtype, else float32 (simulated)."""
        return self.torch_dtype if self.torch_dtype is not None else torch.float32

    # -- rounding -------------------------------------------------------------------------------
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round every element of ``x`` to the nearest value of this format (ties to even).

        Returns a tensor of ``x``'s dtype (computed in float64, so it is exact for float32/float64
        inputs).  See the module docstring for out-of-range, inf and NaN behaviour.
        """
        if not torch.is_floating_point(x):
            raise TypeError(f"{self.name}.round expects a floating-point tensor, got {x.dtype}")
        if x.dtype.itemsize == 1:
            x = x.float()  # float8 inputs: work on their values
        a = x.detach().to(torch.float64)
        mag = a.abs()
        # exponent of each element, floored at emin so that small values share the subnormal quantum
        _, exp = torch.frexp(mag)
        exp = (exp - 1).clamp(min=self.emin)
        quantum = torch.ldexp(torch.ones_like(mag), exp - self.man_bits)
        rounded = torch.round(mag / quantum) * quantum  # exact: quantum is a power of two
        if not self.subnormals:
            # Without subnormals the grid below min_normal is {0, min_normal}; a tie goes to 0.
            tiny = mag < self.min_normal
            rounded = torch.where(tiny, torch.where(mag > self.min_normal / 2, self.min_normal, 0.0), rounded)
        over = rounded > self.max
        if self.overflow == "inf":
            rounded = torch.where(over, math.inf, rounded)
        else:
            rounded = torch.where(over, self.max, rounded)
        rounded = torch.copysign(rounded, a)
        if self.variant == "fnuz":
            rounded = rounded + 0.0  # no negative zero: that code is NaN (-0.0 + 0.0 == +0.0)
        if torch.isinf(a).any():
            # inf input: kept for IEEE formats; saturates to max otherwise (hardware SATFINITE behaviour)
            inf_value = math.inf if self.has_inf else self.max
            rounded = torch.where(torch.isinf(a), torch.copysign(torch.full_like(a, inf_value), a), rounded)
        rounded = torch.where(torch.isnan(a), a, rounded)
        return rounded.to(x.dtype)

    def saturate(self, x: torch.Tensor) -> torch.Tensor:
        """Clamp finite values into [-max, max] (NaN stays NaN)."""
        return x.clamp(-self.max, self.max)

    def to_storage(self, x: torch.Tensor) -> torch.Tensor:
        """Round an already-scaled tensor into this format's storage dtype, saturating at +-max.

        Native float8 dtypes use torch's cast (round-to-nearest-even, the same values as :meth:`round`);
        simulated formats store their rounded values in float32.
        """
        if self.torch_dtype is not None:
            return self.saturate(x.float()).to(self.torch_dtype)
        return self.round(self.saturate(x.float()))

    def quantum(self, x: torch.Tensor) -> torch.Tensor:
        """Distance between the format's representable values around |x| (one 'step')."""
        _, exp = torch.frexp(x.detach().abs().to(torch.float64))
        exp = (exp - 1).clamp(min=self.emin, max=self.emax)
        return torch.ldexp(torch.ones_like(exp, dtype=torch.float64), exp - self.man_bits)

    def values(self) -> torch.Tensor:
        """All finite non-negative values of the format, ascending (float64)."""
        vals = [0.0]
        for e_code in range(0, 2**self.exp_bits):
            for m_code in range(0, 2**self.man_bits):
                if e_code == 0:
                    if not self.subnormals:
                        continue
                    v = math.ldexp(m_code / 2**self.man_bits, self.emin)
                else:
                    v = math.ldexp(1.0 + m_code / 2**self.man_bits, e_code - self.bias)
                if 0 < v <= self.max:
                    vals.append(v)
        return torch.tensor(sorted(set(vals)), dtype=torch.float64)

    def __repr__(self) -> str:
        return f"Minifloat({self.name}, max={self.max:g}, min_subnormal={self.min_subnormal:g})"


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """Symmetric signed integer format: values -qmax..qmax with qmax = 2**(bits-1) - 1.

    The most negative code (-2**(bits-1)) is not used, so quantization is symmetric around zero.
    INT4 values are stored one per int8 element (packing is the export's business).
    """

    bits: int
    name: Optional[str] = None

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise ValueError(f"IntFormat supports 2..8 bits, got {self.bits}")
        if self.name is None:
            object.__setattr__(self, "name", f"INT{self.bits}")

    @property
    def max(self) -> float:
        return float(2 ** (self.bits - 1) - 1)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round to the nearest integer (ties to even) and clamp to [-qmax, qmax]; NaN stays NaN."""
        return torch.round(x).clamp(-self.max, self.max)

    def saturate(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(-self.max, self.max)

    def to_storage(self, x: torch.Tensor) -> torch.Tensor:
        return self.round(x.float()).to(torch.int8)

    def __repr__(self) -> str:
        return f"IntFormat({self.name})"


E4M3 = Minifloat(4, 3, variant="fn", name="E4M3", torch_dtype=torch.float8_e4m3fn)
E5M2 = Minifloat(5, 2, variant="ieee", name="E5M2", torch_dtype=torch.float8_e5m2)
E4M3FNUZ = Minifloat(4, 3, variant="fnuz", torch_dtype=torch.float8_e4m3fnuz)
E5M2FNUZ = Minifloat(5, 2, variant="fnuz", torch_dtype=torch.float8_e5m2fnuz)
E3M4 = Minifloat(3, 4, variant="fn", name="E3M4")
E2M1 = Minifloat(2, 1, variant="finite", name="E2M1")  # FP4 of the OCP MX spec: max 6
E3M2 = Minifloat(3, 2, variant="finite", name="E3M2")  # FP6
E2M3 = Minifloat(2, 3, variant="finite", name="E2M3")  # FP6
E8M3 = Minifloat(8, 3, variant="ieee", name="E8M3")  # bf16's range, 3 mantissa bits
BF16 = Minifloat(8, 7, variant="ieee", name="BF16", torch_dtype=torch.bfloat16)
FP16 = Minifloat(5, 10, variant="ieee", name="FP16", torch_dtype=torch.float16)
INT8 = IntFormat(8)
INT4 = IntFormat(4)

_NAMED = {f.name.lower(): f for f in (E4M3, E5M2, E4M3FNUZ, E5M2FNUZ, E3M4, E2M1, E3M2, E2M3, E8M3, BF16, FP16, INT8, INT4)}


def parse_format(spec) -> "Minifloat | IntFormat":
    """``"e4m3"`` / ``"E5M2"`` / ``"int8"`` / any ``"eXmY"`` (IEEE-like unless named) -> a format."""
    if isinstance(spec, (Minifloat, IntFormat)):
        return spec
    key = str(spec).strip().lower()
    if key in _NAMED:
        return _NAMED[key]
    import re

    match = re.fullmatch(r"e(\d+)m(\d+)(fn|fnuz)?", key)
    if match:
        variant = match.group(3) or "ieee"
        exp_bits, man_bits = int(match.group(1)), int(match.group(2))
        if variant == "ieee" and exp_bits < 2:
            variant = "finite"
        return Minifloat(exp_bits, man_bits, variant=variant)
    raise ValueError(
        f"unknown number format {spec!r}: use e4m3, e5m2, int8, int4 or any eXmY such as e3m4, e2m1, e8m3"
    )
