"""Quantize / dequantize at every granularity fp8train uses (the plain-torch reference).

    q = quantize(x, E4M3, "1x16")      # per 1x16 group along the last dim
    x_hat = q.dequantize()              # back to x's dtype and shape

Granularities (``Granularity.parse`` accepts the strings in brackets):

* per-tensor ["tensor"]: one scale, from the two-stage *group scaling* amax (maxima per 1x16 group,
  then the max of those -- the reduction COAT's kernels do inside the producer op);
* per-row ["row"]: one scale per row (token) over the last dim;
* 1xG groups ["1x16", "1x128", "group:G"]: one scale per G consecutive elements of the last dim;
* BxB blocks ["128x128", "block:B"]: one scale per BxB tile of the tensor viewed as 2-D
  (leading dims flattened into rows).

Shapes that are not multiples of G or B are padded with zeros internally; the data keeps the input's shape.

Scaling convention: each group stores its absolute maximum ``amax`` (float32 by default).  Quantized
values are ``round(x * fmt.max / amax)`` and dequantized values ``q / fmt.max * amax``.  Storing amax
instead of amax / fmt.max makes the largest element of every group, and so every constant group, round-trip
exactly; all-zero groups store amax = 0 and come back as zeros.  ``QuantizedTensor.scale`` gives the usual
multiplier amax / fmt.max for scaled matmuls.

Non-finite input: by default (``nonfinite="raise"``) a NaN or inf raises ``ValueError`` (this costs a host
sync on GPU).  ``nonfinite="propagate"`` skips the check for hot paths: the group's amax becomes NaN/inf and
every element of that group dequantizes to NaN or inf -- never to a finite wrong value -- so a training loop's
loss check catches it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .formats import IntFormat, Minifloat, parse_format

__all__ = [
    "Granularity",
    "PER_TENSOR",
    "PER_ROW",
    "GROUP16",
    "GROUP128",
    "BLOCK128",
    "QuantizedTensor",
    "quantize",
    "fake_quantize",
    "group_amax",
    "group_scaling_amax",
    "expand_to",
    "round_up_to_bf16",
]

Format = Union[Minifloat, IntFormat]


@dataclasses.dataclass(frozen=True)
class Granularity:
    """How a tensor is cut into groups that share one scale."""

    kind: str  # "tensor" | "row" | "group" | "block"
    size: int = 0  # G for "group", B for "block"

    def __post_init__(self):
        if self.kind not in ("tensor", "row", "group", "block"):
            raise ValueError(f"unknown granularity kind {self.kind!r}")
        if self.kind in ("group", "block") and self.size < 1:
            raise ValueError(f"{self.kind} granularity needs a positive size, got {self.size}")

    @classmethod
    def parse(cls, spec: Union["Granularity", str]) -> "Granularity":
        if isinstance(spec, Granularity):
            return spec
        s = str(spec).strip().lower().replace("_", "-")
        if s in ("tensor", "per-tensor", "pertensor"):
            return cls("tensor")
        if s in ("row", "per-row", "token", "per-token"):
            return cls("row")
        if s.startswith("1x") and s[2:].isdigit():
            return cls("group", int(s[2:]))
        if s.startswith("group:") and s[6:].isdigit():
            return cls("group", int(s[6:]))
        if s.startswith("block:") and s[6:].isdigit():
            return cls("block", int(s[6:]))
        parts = s.split("x")
        if len(parts) == 2 and parts[0].isdigit() and parts[0] == parts[1]:
            return cls("block", int(parts[0]))
        raise ValueError(
            f"unknown granularity {spec!r}: use 'tensor', 'row', '1x16', '1x128', 'group:G', '128x128' or 'block:B'"
        )

    def __str__(self) -> str:
        return {"tensor": "tensor", "row": "row"}.get(self.kind) or (
            f"1x{self.size}" if self.kind == "group" else f"{self.size}x{self.size}"
        )


PER_TENSOR = Granularity("tensor")
PER_ROW = Granularity("row")
GROUP16 = Granularity("group", 16)
GROUP128 = Granularity("group", 128)
BLOCK128 = Granularity("block", 128)


def _as_2d_shape(shape: torch.Size) -> tuple[int, int]:
    """Rows x columns of a tensor seen as a matrix: leading dims flattened, last dim kept."""
    if len(shape) == 0:
        return 1, 1
    cols = shape[-1]
    return math.prod(shape[:-1]), cols


def group_amax(x: torch.Tensor, granularity: Union[Granularity, str]) -> torch.Tensor:
    """Absolute maximum of every group (float32).  Shapes of the result:

    tensor -> ``()``; row -> ``(*lead, 1)``; group G -> ``(*lead, ceil(K/G))``;
    block B -> ``(ceil(M/B), ceil(K/B))`` for the 2-D view (M, K) of ``x``.
    """
    g = Granularity.parse(granularity)
    a = x.detach().abs().float()
    if g.kind == "tensor":
        return group_scaling_amax(x)
    if x.dim() == 0:
        a = a.reshape(1)
    if g.kind == "row":
        if a.shape[-1] == 0:
            return a.new_zeros(*a.shape[:-1], 1)
        return a.amax(dim=-1, keepdim=True)
    if g.kind == "group":
        cols = a.shape[-1]
        n_groups = -(-cols // g.size)
        if a.numel() == 0:
            return a.new_zeros(*a.shape[:-1], n_groups)
        a = F.pad(a, (0, n_groups * g.size - cols))
        return a.reshape(*a.shape[:-1], n_groups, g.size).amax(dim=-1)
    rows, cols = _as_2d_shape(x.shape)
    nb_r, nb_c = -(-rows // g.size), -(-cols // g.size)
    if a.numel() == 0:
        return a.new_zeros(nb_r, nb_c)
    a = F.pad(a.reshape(rows, cols), (0, nb_c * g.size - cols, 0, nb_r * g.size - rows))
    return a.reshape(nb_r, g.size, nb_c, g.size).amax(dim=(1, 3))


def group_scaling_amax(x: torch.Tensor, group_size: int = 16) -> torch.Tensor:
    """Per-tensor amax the way COAT's "group scaling" computes it: maxima of 1xG groups, then their max.

    The GPU producers (norm, gated product, residual add) write the 1xG maxima as a by-product, so the
    per-tensor scale needs only a reduction over a G-times smaller tensor.  Returns a 0-d float32 tensor.
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return group_amax(x, Granularity("group", group_size)).amax()


def expand_to(meta: torch.Tensor, granularity: Granularity, shape: torch.Size) -> torch.Tensor:
    """Broadcast per-group metadata back to element shape ``shape`` (reference, not memory-efficient)."""
    g = granularity
    if g.kind == "tensor":
        return meta.reshape(())
    if g.kind == "row":
        return meta.reshape(*shape[:-1], 1) if len(shape) else meta.reshape(())
    if g.kind == "group":
        cols = shape[-1] if len(shape) else 1
        full = meta.repeat_interleave(g.size, dim=-1)[..., :cols]
        return full.reshape(shape)
    rows, cols = _as_2d_shape(shape)
    full = meta.repeat_interleave(g.size, dim=0).repeat_interleave(g.size, dim=1)[:rows, :cols]
    return full.reshape(shape)


def round_up_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 values up to the next bfloat16 (so a stored amax never undershoots)."""
    bits = x.float().contiguous().view(torch.int32)
    finite = torch.isfinite(x)
    up = ((bits + 0xFFFF) & ~0xFFFF).view(torch.float32)
    return torch.where(finite, up, x.float()).to(torch.bfloat16)


@dataclasses.dataclass
class QuantizedTensor:
    """Quantized values plus per-group absolute maxima; ``dequantize()`` undoes ``quantize``."""

    data: torch.Tensor  # fmt.storage_dtype, same shape as the original tensor
    amax: torch.Tensor  # per-group absmax (float32 or bfloat16), shape from group_amax
    fmt: Format
    granularity: Granularity
    shape: torch.Size
    dtype: torch.dtype
    # amax / fmt.max as the producer already computed it (the Triton per-tensor quantizers store it beside the
    # amax: no division kernel and no host round per GEMM operand); None: computed on demand
    scale_hint: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def scale(self) -> torch.Tensor:
        """Per-group multiplier (amax / fmt.max, float32): x ~= data * scale."""
        if self.scale_hint is not None:
            return self.scale_hint
        return self.amax.float() / self.fmt.max

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.amax.numel() * self.amax.element_size()

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        if (self.granularity.kind == "tensor" and self.data.is_cuda and self.amax.numel() == 1
                and self.data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
                and (dtype or self.dtype) in (torch.float32, torch.bfloat16, torch.float16)):
            from .kernels import kernels_enabled

            if kernels_enabled():  # same values, one pass (see kernels.quantize.dequantize_tensorwise)
                from .kernels.quantize import dequantize_tensorwise

                return dequantize_tensorwise(self.data, self.amax, float(self.fmt.max), dtype or self.dtype)
        amax = expand_to(self.amax.float(), self.granularity, self.shape)
        values = self.data.float() / self.fmt.max * amax
        return values.to(dtype or self.dtype)


def quantize(
    x: torch.Tensor,
    fmt: Union[Format, str],
    granularity: Union[Granularity, str] = PER_TENSOR,
    *,
    amax: Optional[torch.Tensor] = None,
    scale_dtype: torch.dtype = torch.float32,
    nonfinite: str = "raise",
) -> QuantizedTensor:
    """Quantize ``x`` to ``fmt`` with one scale per group of ``granularity``.

    ``amax`` may be passed in when the producer already computed it (e.g. a just-in-time per-tensor amax).
    ``scale_dtype=torch.bfloat16`` stores the group maxima in bf16 (rounded up, and used as stored for
    encoding, so encode and decode agree); constant groups are then exact only up to bf16 rounding.
    """
    fmt = parse_format(fmt)
    g = Granularity.parse(granularity)
    if not torch.is_floating_point(x):
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if nonfinite not in ("raise", "propagate"):
        raise ValueError("nonfinite must be 'raise' or 'propagate'")
    if scale_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError("scale_dtype must be torch.float32 or torch.bfloat16")
    fast = _triton_quantize(x, fmt, g, amax, scale_dtype, nonfinite)
    if fast is not None:
        return fast
    if amax is None:
        amax = group_amax(x, g)
    amax = amax.float()
    if nonfinite == "raise" and x.numel() and not bool(torch.isfinite(amax).all()):
        raise ValueError(
            f"cannot quantize a tensor of shape {tuple(x.shape)} that holds NaN or inf values; "
            "find where they come from (a diverged loss, a too-high learning rate) or pass nonfinite='propagate'"
        )
    if scale_dtype == torch.bfloat16:
        stored = round_up_to_bf16(amax)
        amax = stored.float()
    else:
        stored = amax
    inv = torch.where(amax > 0, fmt.max / amax, torch.zeros_like(amax))
    scaled = x.detach().float() * expand_to(inv, g, x.shape)
    data = fmt.to_storage(scaled)
    return QuantizedTensor(data=data, amax=stored, fmt=fmt, granularity=g, shape=x.shape, dtype=x.dtype)


def _triton_quantize(x, fmt, g, amax, scale_dtype, nonfinite) -> Optional[QuantizedTensor]:
    """CUDA fast path (fp8train.kernels.quantize) for float8 formats at per-tensor or power-of-two 1xG
    granularity on the hot path (``nonfinite="propagate"``); None when the reference must run."""
    if nonfinite != "propagate" or not x.is_cuda or getattr(fmt, "torch_dtype", None) not in (
            torch.float8_e4m3fn, torch.float8_e5m2):
        return None
    if g.kind == "tensor" and scale_dtype == torch.float32:
        from .kernels import use_triton

        if use_triton("quantize", x, group=1):
            from .kernels.quantize import quantize_tensorwise

            return quantize_tensorwise(x, fmt, amax=amax)
    elif g.kind == "group" and amax is None and g.size & (g.size - 1) == 0 and x.dim() > 0:
        from .kernels import use_triton

        if use_triton("quantize", x, group=g.size):
            from .kernels.quantize import quantize_groups

            return quantize_groups(x, fmt, group_size=g.size, scale_dtype=scale_dtype)
    return None


def fake_quantize(x: torch.Tensor, fmt: Union[Format, str], granularity: Union[Granularity, str] = PER_TENSOR,
                  **kwargs) -> torch.Tensor:
    """``quantize(x, ...).dequantize()``: x rounded through the format, in x's dtype and shape."""
    return quantize(x, fmt, granularity, **kwargs).dequantize()
