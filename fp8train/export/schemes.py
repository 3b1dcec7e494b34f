"""The four export formats and how each is written in the compressed-tensors checkpoint format.

=============  ==========================================  ==============================  =======================
format         weights                                     input activations               compressed-tensors
=============  ==========================================  ==============================  =======================
fp8-dynamic    E4M3, one scale per output channel           E4M3, dynamic per token         ``float-quantized``
w8a8-int8      INT8 symmetric, per output channel           INT8, dynamic per token         ``int-quantized``
w4a16          INT4 symmetric, groups of 128 input columns  bf16 (not quantized)            ``pack-quantized``
w4a8-fp        FP4 E2M1, groups of 32, power-of-two scales  E4M3, dynamic per token         ``mxfp4-pack-quantized``
=============  ==========================================  ==============================  =======================

Scales are stored in bfloat16 (what llm-compressor writes for a bf16 model and what every reader loads
without loss), rounded *up* from ``amax / format_max`` so that no weight is clipped.  The weight codes are
computed with the stored scale, so ``codes * scale`` is exactly what a reader decompresses.

``w4a8-fp`` is ZeroQuant-FP's W4A8 with its power-of-two scale constraint (method M1: each group scale is
rounded up to a power of two, so casting an FP4 weight to FP8 is an exponent add).  Power-of-two scales on
groups of 32 are exactly the OCP MX layout (an E8M0 exponent per 32 values), which compressed-tensors reads
as ``mxfp4-pack-quantized``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

from ..formats import E2M1, E4M3, INT4, INT8, IntFormat, Minifloat

Format = Union[Minifloat, IntFormat]

__all__ = ["Scheme", "SCHEMES", "FORMAT_NAMES", "SCALE_RULES", "get_scheme"]

SCALE_RULES = ("amax", "pow2", "pow2-shared-max")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """One export format: how weights and activations are quantized and how the checkpoint stores them."""

    name: str
    weight_format: Format
    group_size: Optional[int]  # None: one scale per output channel; G: one per G input columns of a row
    activation_format: Optional[Format]  # None: activations stay in bf16 (weight-only quantization)
    compressed_format: str  # compressed-tensors "format" of the config group
    default_method: str  # "rtn" or "gptq" when calibration data is given
    scale_rule: str = "amax"  # "amax" | "pow2" (ZeroQuant-FP M1) | "pow2-shared-max" (M2, simulation only)
    description: str = ""

    def __post_init__(self):
        if self.scale_rule not in SCALE_RULES:
            raise ValueError(f"unknown scale rule {self.scale_rule!r}: use one of {SCALE_RULES}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group size must be positive, got {self.group_size}")

    @property
    def power_of_two_scales(self) -> bool:
        return self.scale_rule.startswith("pow2")

    @property
    def exportable(self) -> str:
        """Empty if compressed-tensors can hold this scheme exactly, else the reason why not."""
        if self.compressed_format == "mxfp4-pack-quantized":
            if self.scale_rule != "pow2":
                return (f"FP4 scale rule {self.scale_rule!r} has no compressed-tensors layout (the MX layout holds "
                        "pure powers of two); it is available in evaluate() for comparison only")
            if self.group_size != 32:
                return "FP4 weights with power-of-two scales are stored in the MX layout, which needs group size 32"
        return ""

    def with_options(self, *, group_size: "int | None | str" = "keep", scale_rule: "str | None" = None) -> "Scheme":
        """A variant of this scheme (e.g. w4a16 with groups of 64, or w4a8-fp with M2 scales)."""
        changes = {}
        if group_size != "keep":
            if self.group_size is None and group_size is not None:
                raise ValueError(f"{self.name} uses one scale per output channel; it has no group size to change")
            changes["group_size"] = group_size
        if scale_rule is not None:
            if not isinstance(self.weight_format, Minifloat) or self.weight_format.bits != 4:
                raise ValueError("scale rules other than 'amax' apply to FP4 weights (w4a8-fp) only")
            changes["scale_rule"] = scale_rule
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def weight_bits(self) -> int:
        return self.weight_format.bits

    @property
    def is_float(self) -> bool:
        return isinstance(self.weight_format, Minifloat)

    def weight_args(self) -> dict:
        """The ``weights`` QuantizationArgs of the config group, as JSON."""
        args = {
            "num_bits": self.weight_bits,
            "type": "float" if self.is_float else "int",
            "symmetric": True,
            "strategy": "channel" if self.group_size is None else "group",
            "group_size": self.group_size,
            "dynamic": False,
        }
        if self.power_of_two_scales and self.group_size == 32:
            # E8M0 exponents in uint8: what compressed-tensors calls MX scales
            args["scale_dtype"] = "torch.uint8"
            args["zp_dtype"] = "torch.uint8"
        return args

    def activation_args(self) -> Optional[dict]:
        """The ``input_activations`` QuantizationArgs (dynamic per-token), or None for weight-only formats."""
        if self.activation_format is None:
            return None
        return {
            "num_bits": 8,
            "type": "float" if isinstance(self.activation_format, Minifloat) else "int",
            "symmetric": True,
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
        }


SCHEMES = {
    s.name: s
    for s in (
        Scheme("fp8-dynamic", E4M3, None, E4M3, "float-quantized", "rtn",
               description="W8A8-FP: E4M3 per-channel weights, dynamic per-token E4M3 activations"),
        Scheme("w8a8-int8", INT8, None, INT8, "int-quantized", "rtn",
               description="W8A8-INT: INT8 per-channel weights, dynamic per-token INT8 activations"),
        Scheme("w4a16", INT4, 128, None, "pack-quantized", "gptq",
               description="W4A16-INT: INT4 symmetric weights in groups of 128, bf16 activations"),
        Scheme("w4a8-fp", E2M1, 32, E4M3, "mxfp4-pack-quantized", "gptq", scale_rule="pow2",
               description="W4A8-FP (ZeroQuant-FP): E2M1 weights in groups of 32 with power-of-two scales, "
                           "dynamic per-token E4M3 activations"),
    )
}
FORMAT_NAMES = tuple(SCHEMES)


def get_scheme(name: Union[str, Scheme]) -> Scheme:
    if isinstance(name, Scheme):
        return name
    key = str(name).strip().lower().replace("_", "-")
    if key not in SCHEMES:
        raise ValueError(f"unknown export format {name!r}: choose one of {', '.join(FORMAT_NAMES)}")
    return SCHEMES[key]
