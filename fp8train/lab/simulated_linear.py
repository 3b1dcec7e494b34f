"""Simulated number formats in linear layers: fake-quantize the GEMM inputs to any ExMy minifloat.

    recipe = fp8train.Recipe(simulate=SimulatedFormats(activations="e3m4", weights="e3m4", gradients="e5m2",
                                                       scaling="tensor"))
    fp8train.convert(model, recipe=recipe)       # every converted nn.Linear -> SimulatedLinear
    fp8train.convert(model, recipe=fp8train.Recipe(simulate="e2m1"))   # the same format for all three

A :class:`SimulatedLinear` computes

    forward:   Y  = q_a(X) q_w(W)^T + b
    backward:  dX = q_g(dY) q_w(W)        dW = q_g(dY)^T q_a(X)        db = sum q_g(dY)

where ``q_a``, ``q_w``, ``q_g`` round their operand onto the grid of the chosen format (round-to-nearest-even,
exact: :meth:`fp8train.formats.Minifloat.round`) and return it in the compute dtype.  The GEMMs are torch's own
(``F.linear`` and its autograd), in the compute dtype: bf16 under autocast, else the tensors' dtype.  The
rounding functions are straight-through: forward rounds, backward passes the gradient unchanged (``q_g`` is the
mirror image: identity forward, rounds the gradient in backward).  So a format equal to the compute dtype with
no scaling -- ``Minifloat(8, 7)`` = bf16 on bf16 tensors -- reproduces ``nn.Linear`` bit for bit.

Scaling (one setting for the three operands):

* ``"none"`` -- the values are rounded as they are (what "To FP8 and Back Again" simulates: fewer exponent bits
  clip the range, and nothing rescales the tensor into it);
* ``"tensor"`` -- one absmax scale per tensor: ``x * fmt.max / amax`` is rounded, then scaled back (the usual
  FP8 recipe), ``"row"``, ``"1x16"``, ``"1x128"`` (``"1xG"``: groups of G along the last dim) or ``"128x128"``
  blocks, exactly as :func:`fp8train.quant.quantize`.  Groups run along each operand's last dimension (the
  reduction dimension of the forward GEMM for X and W, and of dX = dY W for dY); the same rounded copy feeds
  both GEMMs an operand appears in, so dW's reduction over tokens sees groups across it.

Out of range: finite values saturate to +-max of the format (the hardware's saturating conversion); NaN and
inf pass through unchanged, so a diverging run still shows up as a non-finite loss.

Formats: anything :func:`fp8train.formats.parse_format` knows (``e4m3``, ``e5m2``, ``e3m4``, ``e2m1``,
``e8m3``, ``bf16``, any ``eXmY`` -- IEEE-like unless named), optionally with an exponent bias suffix:
``e7m7b127`` keeps bf16's bias (127) with 7 exponent bits, which cuts the top of the range instead of both
ends; integer formats (``int8``, ``int4``) work with a scaling other than ``"none"``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..formats import IntFormat, Minifloat, parse_format
from ..quant import Granularity, expand_to, group_amax, quantize

__all__ = ["SimulatedFormats", "SimulatedLinear", "simulate_quantize", "saturating_round", "fake_quantized_linear",
           "parse_simulated_format"]

OPERANDS = ("activations", "weights", "gradients")
_OPERAND_KEYS = {"a": "activations", "act": "activations", "x": "activations", "activations": "activations",
                 "w": "weights", "weight": "weights", "weights": "weights",
                 "g": "gradients", "grad": "gradients", "dy": "gradients", "gradients": "gradients"}
_NONE = ("none", "-", "")

Format = Union[Minifloat, IntFormat]


@functools.lru_cache(maxsize=None)
def _parse_spec(spec: str) -> Format:
    key = spec.strip().lower()
    match = re.fullmatch(r"(.+?)b(\d+)", key)
    if match and not key.startswith(("bf", "fp")):
        base = parse_format(match.group(1))
        if not isinstance(base, Minifloat):
            raise ValueError(f"a bias suffix needs a minifloat format, got {spec!r}")
        bias = int(match.group(2))
        return dataclasses.replace(base, bias=bias, name=f"{base.name}B{bias}", torch_dtype=None)
    return parse_format(key)


def parse_simulated_format(spec) -> Format:
    """``"e3m4"`` / ``"E5M2"`` / ``"e7m7b127"`` (exponent bias 127) / ``"int8"`` / a format object -> a format."""
    if isinstance(spec, (Minifloat, IntFormat)):
        return spec
    try:
        return _parse_spec(str(spec))
    except ValueError as exc:
        raise ValueError(f"{exc} (a bias can be given as a suffix: e7m7b127)") from None


def _canonical_scaling(scaling) -> str:
    s = str(scaling).strip().lower()
    if s in ("none", "no", "off", "unscaled"):
        return "none"
    try:
        return str(Granularity.parse(s))
    except ValueError:
        raise ValueError(f"unknown scaling {scaling!r}: use 'none', 'tensor', 'row', '1x16', '1x128' (any 1xG) "
                         "or '128x128'") from None


@dataclasses.dataclass(frozen=True)
class SimulatedFormats:
    """Which GEMM operands of the converted linears are rounded, to which formats, with which scaling.

    ``activations`` (the layer input X), ``weights`` (W) and ``gradients`` (the output gradient dY): a format
    name (``"e3m4"``), a :class:`~fp8train.formats.Minifloat`, or ``None`` to leave that operand alone.
    ``scaling``: ``"none"``, ``"tensor"`` (default), ``"row"``, ``"1xG"`` or ``"BxB"``.  Frozen and hashable
    (it is part of a :class:`~fp8train.recipes.Recipe`).
    """

    activations: Optional[Union[str, Format]] = None
    weights: Optional[Union[str, Format]] = None
    gradients: Optional[Union[str, Format]] = None
    scaling: str = "tensor"

    def __post_init__(self):
        for op in OPERANDS:
            spec = getattr(self, op)
            if isinstance(spec, str) and spec.strip().lower() in _NONE:
                object.__setattr__(self, op, None)
            elif spec is not None:
                parse_simulated_format(spec)  # raises a clear ValueError for unknown names
                if isinstance(spec, str):
                    object.__setattr__(self, op, spec.strip().lower())
        object.__setattr__(self, "scaling", _canonical_scaling(self.scaling))
        if self.scaling == "none":
            ints = [op for op in OPERANDS if isinstance(self.format_of(op), IntFormat)]
            if ints:
                raise ValueError(f"integer formats need a scale; {', '.join(ints)} use one with scaling='none' -- "
                                 "use scaling='tensor' (or a group size) or a minifloat format")

    @classmethod
    def uniform(cls, fmt, scaling: str = "tensor") -> "SimulatedFormats":
        """The same format for activations, weights and gradients."""
        return cls(fmt, fmt, fmt, scaling)

    @classmethod
    def parse(cls, spec: Union[str, "SimulatedFormats"], scaling: Optional[str] = None) -> "SimulatedFormats":
        """``"e3m4"`` (all three operands) or ``"a=e3m4,w=e3m4,g=e5m2[,scaling=1x16]"`` -> SimulatedFormats.

        Operands left out of the keyed form are not rounded (``g=none`` says so explicitly).  A ``scaling=``
        key wins over the ``scaling`` argument (default ``"tensor"``).
        """
        if isinstance(spec, SimulatedFormats):
            return spec
        text = str(spec).strip()
        if not text:
            raise ValueError("empty simulated-format spec: use e.g. 'e3m4' or 'a=e3m4,w=e3m4,g=e5m2'")
        if "=" not in text:
            return cls.uniform(text, scaling or "tensor")
        fields = {"scaling": scaling or "tensor"}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip().lower()
            if not sep or (key not in _OPERAND_KEYS and key != "scaling"):
                raise ValueError(f"cannot read {part!r} in simulated-format spec {spec!r}: use keys a (activations), "
                                 "w (weights), g (gradients) and scaling, e.g. 'a=e3m4,w=e3m4,g=e5m2,scaling=tensor'")
            fields[_OPERAND_KEYS.get(key, key)] = value.strip()
        return cls(**fields)

    def format_of(self, operand: str) -> Optional[Format]:
        spec = getattr(self, operand)
        return None if spec is None else parse_simulated_format(spec)

    def describe(self) -> str:
        """A spec that :meth:`parse` reads back, e.g. ``a=E3M4,w=E3M4,g=E5M2,scaling=tensor``."""
        parts = [f"{op[0]}={self.format_of(op).name if getattr(self, op) is not None else 'none'}" for op in OPERANDS]
        return ",".join(parts + [f"scaling={self.scaling}"])

    @property
    def is_identity(self) -> bool:
        return all(getattr(self, op) is None for op in OPERANDS)


# -- the rounding op ------------------------------------------------------------------------------------------

def _fits_float32(fmt) -> bool:
    """Whether every value and every rounding step (quantum) of ``fmt`` is a float32 number."""
    # normal numbers of the format must be normal float32 numbers (the bit path below relies on it)
    return (isinstance(fmt, Minifloat) and fmt.subnormals and fmt.man_bits <= 23 and fmt.emax <= 127
            and fmt.emin >= -126 and fmt.emin - fmt.man_bits >= -149)


def saturating_round(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """``fmt.round(fmt.saturate(x))``: finite values clamped to +-max, then rounded to nearest-even.

    Float32 inputs of formats whose grid fits float32 take a float32 path (several times faster than the
    float64 reference, on any device); the tests check it against :meth:`Minifloat.round`.
    """
    x = fmt.saturate(x)
    if x.dtype != torch.float32 or not _fits_float32(fmt):
        return fmt.round(x)
    return torch.where(torch.isnan(x), x, _round_float32(x, fmt))


def _round_float32(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """Round-to-nearest-even of saturated float32 ``x`` onto ``fmt``'s grid (NaN not handled).

    Normal range of the format: drop the low 23 - man_bits bits of the float32 encoding with round-to-nearest-
    even on the integer bits (a carry into the exponent is the correct rounding up to the next binade).
    Subnormal range (|x| < min_normal): one fixed quantum q = 2^(emin - man_bits), ``round(|x| / q) * q``, exact
    because q is a power of two.
    """
    mag = x.abs()
    shift = 23 - fmt.man_bits
    if shift > 0:
        bits = mag.view(torch.int32)
        lsb = torch.bitwise_right_shift(bits, shift) & 1
        bits = (bits + ((1 << (shift - 1)) - 1) + lsb) & ~((1 << shift) - 1)
        normal = bits.view(torch.float32)
    else:
        normal = mag
    # round(|x| / q) * q with q = 2^(emin - man_bits) as two exact power-of-two scalings each way: 1/q can
    # overflow float32 (E8M3: 2^129), and CUDA divides by a scalar as a multiply by its reciprocal
    exponent = fmt.emin - fmt.man_bits
    half = exponent // 2
    subnormal = torch.round(mag * 2.0 ** -half * 2.0 ** -(exponent - half)) * 2.0 ** half * 2.0 ** (exponent - half)
    rounded = torch.copysign(torch.where(mag < fmt.min_normal, subnormal, normal), x)
    if fmt.variant == "fnuz":
        rounded = rounded + 0.0  # no negative zero in fnuz formats
    return rounded


def _saturating_round_fast(x: torch.Tensor, fmt: Minifloat) -> torch.Tensor:
    """saturating_round without its NaN pass (simulate_quantize restores non-finite inputs itself)."""
    if x.dtype != torch.float32 or not _fits_float32(fmt):
        return fmt.round(fmt.saturate(x))
    return _round_float32(fmt.saturate(x), fmt)


def _triton_simulate(x: torch.Tensor, fmt, scaling: str) -> Optional[torch.Tensor]:
    """The one-pass CUDA kernel (fp8train.kernels.simulate) for scaling none / tensor / 1xG; None elsewhere."""
    if not x.is_cuda or not _fits_float32(fmt):
        return None
    g = None if scaling == "none" else Granularity.parse(scaling)
    if g is not None and g.kind not in ("tensor", "group"):
        return None
    from ..kernels import use_triton

    if not use_triton("simulate", x, group=1):
        return None
    from ..kernels.simulate import simulate_round

    amax = None if g is None else group_amax(x, g)
    return simulate_round(x, fmt, amax, group=g.size if g is not None and g.kind == "group" else 0)


def simulate_quantize(x: torch.Tensor, fmt, scaling: str = "tensor") -> torch.Tensor:
    """``x`` rounded through ``fmt`` with ``scaling`` (see the module docstring), in x's dtype and shape.

    Finite values saturate to +-max (of the format, times the scale); NaN and inf come back unchanged.  With a
    scale the result equals ``fp8train.quant.fake_quantize(x, fmt, scaling)`` (same amax, same scale
    arithmetic); native float8 and integer formats go through :func:`fp8train.quant.quantize` itself.  CUDA
    tensors take the one-pass Triton kernel :mod:`fp8train.kernels.simulate` (same arithmetic) for minifloats
    whose grid fits float32 with scaling none, tensor or 1xG.
    """
    fmt = parse_simulated_format(fmt)
    scaling = _canonical_scaling(scaling)
    with torch.autocast(x.device.type, enabled=False):
        fast = _triton_simulate(x, fmt, scaling)
        if fast is not None:
            return fast
        if scaling == "none":
            if isinstance(fmt, IntFormat):
                raise ValueError(f"{fmt.name} needs a scale: use scaling='tensor' or a group size")
            if x.dtype in (torch.bfloat16, torch.float16):
                rounded = _saturating_round_fast(x.float(), fmt).to(x.dtype)  # exact: x is a float32 value
            else:
                rounded = _saturating_round_fast(x, fmt)
            return torch.where(torch.isfinite(x), rounded, x)
        if isinstance(fmt, IntFormat) or fmt.torch_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            # "propagate": a NaN/inf input turns its scale group non-finite instead of raising (no host sync)
            out = quantize(x, fmt, scaling, nonfinite="propagate").dequantize()
        else:
            # quant.quantize's arithmetic (amax per group, x * (max / amax), round, / max * amax) with the
            # float32 rounding path
            g = Granularity.parse(scaling)
            amax = group_amax(x, g).float()
            inv = torch.where(amax > 0, fmt.max / amax, torch.zeros_like(amax))
            data = _saturating_round_fast(x.detach().float() * expand_to(inv, g, x.shape), fmt)
            out = (data / fmt.max * expand_to(amax, g, x.shape)).to(x.dtype)
        return torch.where(torch.isfinite(x), out, x)


class _RoundInput(torch.autograd.Function):
    """Forward: the operand rounded onto the format's grid.  Backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx, x, fmt, scaling):
        return simulate_quantize(x, fmt, scaling)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _RoundGradient(torch.autograd.Function):
    """Forward: identity.  Backward: the incoming gradient (a linear's dY) rounded onto the format's grid."""

    @staticmethod
    def forward(ctx, y, fmt, scaling):
        ctx.fmt, ctx.scaling = fmt, scaling
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return simulate_quantize(grad, ctx.fmt, ctx.scaling), None, None


def fake_quantized_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          formats: SimulatedFormats) -> torch.Tensor:
    """``F.linear`` with its GEMM inputs rounded as ``formats`` says (differentiable; see the module docstring).

    Under autocast the operands are first cast to the autocast dtype (what autocast does for ``F.linear``), so
    rounding happens in the dtype the GEMM sees.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    a_fmt, w_fmt, g_fmt = (formats.format_of(op) for op in OPERANDS)
    if a_fmt is not None:
        x = _RoundInput.apply(x, a_fmt, formats.scaling)
    if w_fmt is not None:
        weight = _RoundInput.apply(weight, w_fmt, formats.scaling)
    y = F.linear(x, weight, bias)
    if g_fmt is not None:
        y = _RoundGradient.apply(y, g_fmt, formats.scaling)
    return y


class SimulatedLinear(nn.Linear):
    """``nn.Linear`` whose GEMM inputs are rounded to simulated formats (same ``weight``/``bias`` parameters).

    Build one from a layer with :meth:`from_linear` (shares its Parameters), or let :func:`fp8train.convert`
    do it with ``Recipe(simulate=...)``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 formats: Union[SimulatedFormats, str]):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.formats = SimulatedFormats.parse(formats)

    @classmethod
    def from_linear(cls, linear: nn.Linear, formats: Union[SimulatedFormats, str]) -> "SimulatedLinear":
        """A SimulatedLinear sharing ``linear``'s weight and bias Parameters (no copy)."""
        from ..nn.linear import linear_sharing_parameters

        return linear_sharing_parameters(linear, cls, formats=formats)

    @torch.compiler.disable  # eager rounding ops (float64 reference); torch.compile compiles around them
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantized_linear(x, self.weight, self.bias, self.formats)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, simulate={self.formats.describe()}"

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear sharing this layer's Parameters (to undo a conversion)."""
        from ..nn.linear import linear_sharing_parameters

        return linear_sharing_parameters(self, nn.Linear)
