"""Bit packing of 4-bit weights, in the layouts compressed-tensors reads.

* INT4 (``pack-quantized``): each code c in [-8, 7] is stored as the nibble ``c + 8``; eight nibbles fill one
  int32 little end first (element ``i`` of a row at bits ``4 * (i % 8)`` of word ``i // 8``).  Rows are padded
  to a multiple of 8 elements; the true shape travels in ``weight_shape``.
* FP4 E2M1 (``mxfp4-pack-quantized`` / ``nvfp4-pack-quantized``): each value is its 4-bit code -- sign in
  bit 3, magnitude index 0..7 for {0, 0.5, 1, 1.5, 2, 3, 4, 6} in bits 0-2 -- and two values share a uint8,
  the even element in the low nibble.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["pack_int4", "unpack_int4", "pack_fp4", "unpack_fp4", "E2M1_VALUES"]

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], shape [rows, cols] -> int32 [rows, ceil(cols / 8)]."""
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise TypeError(f"pack_int4 expects a 2-D int8 tensor, got {codes.dtype} {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < -8 or int(codes.max()) > 7):
        raise ValueError("INT4 codes must lie in [-8, 7]")
    rows, cols = codes.shape
    nibbles = codes.to(torch.int64) + 8
    nibbles = F.pad(nibbles, (0, (-cols) % 8))
    nibbles = nibbles.reshape(rows, -1, 8)
    shifts = torch.arange(0, 32, 4, device=codes.device, dtype=torch.int64)
    words = (nibbles << shifts).sum(dim=-1)  # < 2**32
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as signed int32
    return words.to(torch.int32)


def unpack_int4(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int32 words -> int8 codes of ``shape`` = (rows, cols)."""
    rows, cols = int(shape[0]), int(shape[1])
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nibbles = (words.unsqueeze(-1) >> shifts) & 0xF
    return (nibbles.reshape(rows, -1)[:, :cols] - 8).to(torch.int8)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values (any float dtype, every element exactly on the grid) [rows, cols] -> uint8 [rows, cols / 2]."""
    if values.dim() != 2 or values.shape[-1] % 2:
        raise ValueError(f"pack_fp4 needs a 2-D tensor with an even number of columns, got {tuple(values.shape)}")
    v = values.float()
    grid = torch.tensor(E2M1_VALUES, device=v.device)
    magnitude = v.abs()
    index = torch.searchsorted(grid, magnitude)
    if bool((index >= len(E2M1_VALUES)).any()) or not torch.equal(grid[index.clamp(max=7)], magnitude):
        raise ValueError("pack_fp4 got values that are not on the E2M1 grid; quantize them first")
    code = index.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)
    code = code.reshape(code.shape[0], -1, 2)
    return code[..., 0] | (code[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, shape=None) -> torch.Tensor:
    """uint8 [rows, cols / 2] -> float32 E2M1 values [rows, cols]."""
    low, high = packed & 0xF, packed >> 4
    code = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)
    grid = torch.tensor(E2M1_VALUES, device=packed.device)
    values = grid[(code & 0x7).long()]
    values = torch.where((code & 0x8) > 0, -values, values)
    if shape is not None:
        values = values.reshape(shape)
    return values
