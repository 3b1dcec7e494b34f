"""How fp8train.AdamW stores one Adam moment: layout, encode, decode and byte count (plain-torch reference).

Every moment of a parameter ``p`` is one tensor shaped like ``p`` plus per-group metadata shaped
``(*p.shape[:-1], ceil(p.shape[-1] / group_size))`` (groups run along the last dim and never straddle rows; a 0-d
parameter has metadata of shape ``(1,)``).  The state dict keys, for the moment named ``exp_avg`` (m) or
``exp_avg_sq`` (v):

=========  =============================  ==============================  ===========================
mode       ``<name>``                     ``<name>_amax``                 ``<name>_k``
=========  =============================  ==============================  ===========================
``fp32``   float32                        --                              --
``plain``  FP8 values ``x * fmax/amax``   float32 group absmax            --
``dre``    FP8 codes (see                 float32 group absmax            uint8 ``16*k``
           dynamic_range_expansion)
=========  =============================  ==============================  ===========================

Bytes per parameter for m and v together with groups of 128: dre 2 + 10/128 = 2.078, plain 2.0625, fp32 8.
The group maximum is float32, not bfloat16: requantized every step, a rounded-up bf16 maximum ratchets the whole
group upwards (see dynamic_range_expansion).
All entries are plain tensors, so a state dict loads with ``torch.load(weights_only=True)`` and a sharded
checkpoint can split metadata along the same leading dims as the parameter.
"""

from __future__ import annotations

import math

import torch

from ..dynamic_range_expansion import dre_dequantize, dre_quantize, metadata_shape
from ..formats import E4M3, E5M2, Minifloat, parse_format
from ..quant import Granularity, QuantizedTensor, quantize

__all__ = ["STATE_MODES", "MOMENT_NAMES", "parse_moment_format", "expected_entries", "allocate", "decode",
           "encode_into", "state_nbytes"]

STATE_MODES = ("dre", "plain", "fp32")
MOMENT_NAMES = ("exp_avg", "exp_avg_sq")
_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
AMAX_DTYPE = torch.float32


def parse_moment_format(spec) -> str:
    """Normalise a moment format to ``"e4m3"`` or ``"e5m2"`` (the only FP8 storage dtypes torch has)."""
    fmt = parse_format(spec)
    for name, known in _FORMATS.items():
        if fmt == known:
            return name
    raise ValueError(f"moment format must be 'e4m3' or 'e5m2' (native FP8 storage), got {spec!r}")


def _fmt(name: str) -> Minifloat:
    return _FORMATS[name]


def expected_entries(name: str, shape: torch.Size, mode: str, fmt: str, group_size: int) -> dict:
    """``{state key: (shape, dtype)}`` of one moment of a parameter of ``shape``."""
    shape = torch.Size(shape)
    if mode == "fp32":
        return {name: (shape, torch.float32)}
    entries = {name: (shape, _fmt(fmt).torch_dtype),
               f"{name}_amax": (metadata_shape(shape, group_size), AMAX_DTYPE)}
    if mode == "dre":
        entries[f"{name}_k"] = (metadata_shape(shape, group_size), torch.uint8)
    return entries


def allocate(name: str, param: torch.Tensor, mode: str, fmt: str, group_size: int) -> dict:
    """Zero state for one moment (zero codes and zero amax decode to exact zeros in every mode)."""
    entries = expected_entries(name, param.shape, mode, fmt, group_size)
    out = {key: torch.zeros(shape, dtype=dtype, device=param.device) for key, (shape, dtype) in entries.items()}
    if mode == "dre":
        out[f"{name}_k"].fill_(16)  # k = 1 for the (all-zero) initial groups
    return out


def decode(state: dict, name: str, mode: str, fmt: str, group_size: int) -> torch.Tensor:
    """The moment as float32 (in fp32 mode: the stored tensor itself, so updates can stay in place)."""
    data = state[name]
    if mode == "fp32":
        return data
    if mode == "plain":
        q = QuantizedTensor(data, state[f"{name}_amax"], _fmt(fmt), Granularity("group", group_size), data.shape,
                            torch.float32)
        return q.dequantize()
    return dre_dequantize(data, state[f"{name}_amax"], state[f"{name}_k"], _fmt(fmt), group_size)


def encode_into(state: dict, name: str, values: torch.Tensor, mode: str, fmt: str, group_size: int) -> None:
    """Quantize float32 ``values`` (finite, |x| <= 3e38) into the existing state tensors of one moment."""
    if mode == "fp32":
        if values is not state[name]:
            state[name].copy_(values)
        return
    if mode == "plain":
        q = quantize(values, _fmt(fmt), Granularity("group", group_size), scale_dtype=AMAX_DTYPE,
                     nonfinite="propagate")
        state[name].copy_(q.data)
        state[f"{name}_amax"].copy_(q.amax)
        return
    q = dre_quantize(values, _fmt(fmt), group_size, amax_dtype=AMAX_DTYPE, check_finite=False)
    state[name].copy_(q.data)
    state[f"{name}_amax"].copy_(q.amax)
    state[f"{name}_k"].copy_(q.k_code)


def state_nbytes(shape: torch.Size, mode: str, m_format: str, v_format: str, group_size: int) -> int:
    """Bytes of m and v (data + metadata) for a parameter of ``shape``; the 4-byte step counter is not counted."""
    total = 0
    for name, fmt in zip(MOMENT_NAMES, (m_format, v_format)):
        for shp, dtype in expected_entries(name, shape, mode, fmt, group_size).values():
            total += math.prod(shp) * dtype.itemsize
    return total
