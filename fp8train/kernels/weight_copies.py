"""Every FP8 linear weight of a step quantized in one or two launches: per-tensor E4M3, row-major and transposed.

The per-weight path runs an amax pass and a scale pass per weight in forward, and another scale pass in
backward for the transposed copy: three launches per weight per micro-batch, each too small to fill the GPU
(~12 us for a 2048 x 2048 weight, a third of copy bandwidth).  Here one launch folds every weight's amax
(tiles of all weights side by side, ``atomic_max`` into one int32 slot per weight), and one launch writes
every weight's two FP8 copies (the amax launch is skipped when the optimizer published the amaxes, see
:mod:`fp8train.nn.weight_amax`).  Same numbers as :func:`.quantize.quantize_tensorwise` bit for bit: the amax is
a max (any order), the scale and the saturating cast are the shared helpers.

Inputs must be bf16 or fp16 (float32 tiles hit Triton's transposed-store bug noted in :mod:`.quantize`; the
caller quantizes float32 weights one by one), contiguous, 2-D.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .quantize import SLOT, dequant_scale, encode_multiplier, loop_tile, store_tensorwise, tile_amax_bits
from .launch import cdiv, fast_launch

__all__ = ["quantize_weights", "WeightBuffers"]

# per weight: x, rows, cols, row-major out, transposed out, amax/scale buffer, given amax (0: none)
_TABLE_COLUMNS = tl.constexpr(7)
# (rows, cols, warps) of a program's tile: 1.41 ms for the 953M model's 112 weights on an H200, the best of
# seven candidates (benchmarks/results/2026-11-27-h200-session5-quant-ops.json; (64, 128, 8): 1.60 ms)
DEFAULT_TILE = (128, 64, 4)


@triton.jit
def _tile_of(work_ptr, table_ptr, BM: tl.constexpr, BN: tl.constexpr, X_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's weight index, its tile's (rows, cols, mask), the weight's shape and its tile's values."""
    pid = tl.program_id(0)
    t = tl.load(work_ptr + 2 * pid).to(tl.int64)
    tile = tl.load(work_ptr + 2 * pid + 1)
    row = table_ptr + t * _TABLE_COLUMNS
    if X_BF16:
        x_ptr = tl.load(row).to(tl.pointer_type(tl.bfloat16))
    else:
        x_ptr = tl.load(row).to(tl.pointer_type(tl.float16))
    M = tl.load(row + 1).to(tl.int32)
    N = tl.load(row + 2).to(tl.int32)
    if ALIGNED:  # host checked: 16-byte aligned pointers, both dims multiples of 16 -- vector loads and stores
        x_ptr = tl.multiple_of(x_ptr, 16)
        M = tl.multiple_of(M, 16)
        N = tl.multiple_of(N, 16)
    rows, cols, mask = loop_tile(tile, M, N, BM, BN)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return t, tile, row, rows, cols, M, N, x


@fast_launch
@triton.jit
def _amax_many_kernel(work_ptr, table_ptr, slots_ptr, BM: tl.constexpr, BN: tl.constexpr, X_BF16: tl.constexpr,
                      ALIGNED: tl.constexpr):
    t, tile, row, rows, cols, M, N, x = _tile_of(work_ptr, table_ptr, BM, BN, X_BF16, ALIGNED)
    tl.atomic_max(slots_ptr + t, tile_amax_bits(x))  # |x| bits order like the values; NaN above inf


@fast_launch
@triton.jit
def _quantize_many_kernel(work_ptr, table_ptr, slots_ptr, BM: tl.constexpr, BN: tl.constexpr,
                          X_BF16: tl.constexpr, FMAX: tl.constexpr, ALIGNED: tl.constexpr, GIVEN_AMAX: tl.constexpr):
    t, tile, row, rows, cols, M, N, x = _tile_of(work_ptr, table_ptr, BM, BN, X_BF16, ALIGNED)
    if GIVEN_AMAX:  # the optimizer published it (fp8train.nn.weight_amax): no amax pass
        amax = tl.load(tl.load(row + 6).to(tl.pointer_type(tl.float32)))
    else:
        amax = tl.load(slots_ptr + t).to(tl.float32, bitcast=True)
    if tile == 0:  # the GEMM reads amax / FMAX beside the amax, like every per-tensor kernel stores it
        scales_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
        tl.store(scales_ptr, amax)
        tl.store(scales_ptr + SLOT, dequant_scale(amax, FMAX))
    q_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float8e4nv))
    q_t_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float8e4nv))
    if ALIGNED:
        q_ptr = tl.multiple_of(q_ptr, 16)
        q_t_ptr = tl.multiple_of(q_t_ptr, 16)
    store_tensorwise(x, encode_multiplier(amax, FMAX), rows, cols, M, N, q_ptr, N, q_t_ptr, True, True, FMAX)


@functools.lru_cache(maxsize=64)
def _work_list(shapes: tuple, bm: int, bn: int, device: torch.device) -> torch.Tensor:
    """int32 (weight index, tile index) pairs covering every tile of every weight."""
    tiles = torch.tensor([cdiv(m, bm) * cdiv(n, bn) for m, n in shapes], dtype=torch.int64)
    weight_index = torch.repeat_interleave(torch.arange(len(shapes)), tiles)
    first = torch.cumsum(tiles, 0) - tiles
    tile_index = torch.arange(int(tiles.sum())) - first[weight_index]
    return torch.stack([weight_index, tile_index], dim=1).to(torch.int32).contiguous().to(device)


class WeightBuffers:
    """The persistent outputs for one weight: ``data`` (M, N) and ``data_t`` (N, M) E4M3, and ``scales`` -- the
    float32 buffer holding the amax at 0 and the GEMM scale amax / 448 at ``SLOT`` (see quantize.amax_and_scale).
    Written in place on every refresh, so a CUDA graph that captured them reads the newest copies."""

    def __init__(self, shape: torch.Size, device: torch.device):
        from .quantize import amax_and_scale

        m, n = shape
        self.data = torch.empty(m, n, dtype=torch.float8_e4m3fn, device=device)
        self.data_t = torch.empty(n, m, dtype=torch.float8_e4m3fn, device=device)
        self.scales, (self.amax,), (self.scale,) = amax_and_scale(device)


class _Launch:
    """Device tables of one set of weights, built once (the host-to-device copies cannot run inside a graph
    capture, and building them costs host time every step)."""

    def __init__(self, weights: list, buffers: list, amaxes: Optional[list], bm: int, bn: int):
        device = weights[0].device
        amaxes = amaxes or [None] * len(weights)
        rows = [[w.data_ptr(), w.shape[0], w.shape[1], b.data.data_ptr(), b.data_t.data_ptr(), b.scales.data_ptr(),
                 a.data_ptr() if a is not None else 0] for w, b, a in zip(weights, buffers, amaxes)]
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.work = _work_list(tuple(tuple(w.shape) for w in weights), bm, bn, device)
        self.slots = torch.zeros(len(weights), dtype=torch.int32, device=device)
        # vector loads and stores need 16-byte aligned rows in every weight and both outputs
        self.aligned = all(w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0 and
                           all(t.data_ptr() % 16 == 0 for t in (w, b.data, b.data_t)) for w, b in zip(weights, buffers))


_launches: dict = {}  # insertion-ordered: the oldest table goes first
_MAX_LAUNCHES = 32


def quantize_weights(weights: list, buffers: list, tile: Optional[tuple] = None,
                     amaxes: Optional[list] = None) -> None:
    """Quantize every weight (2-D, contiguous, all bf16 or all fp16, one CUDA device) to E4M3 with its own
    per-tensor scale, writing ``buffers[i]`` (:class:`WeightBuffers`) in place: three launches in all, one
    with ``amaxes`` (each weight's max |w| as a 0-d float32 device tensor, e.g. published by the optimizer).
    ``tile``: (rows, cols, warps) of a program (default :data:`DEFAULT_TILE`); any tile gives the same bits
    (benchmarks/gpu/quant.py times candidates)."""
    if not weights:
        return
    dtype = weights[0].dtype
    if dtype not in (torch.bfloat16, torch.float16) or any(w.dtype != dtype for w in weights):
        raise TypeError(f"quantize_weights takes bf16 or fp16 weights of one dtype, got {sorted({str(w.dtype) for w in weights})}")
    if any(w.dim() != 2 or not w.is_contiguous() for w in weights):
        raise ValueError("quantize_weights takes contiguous 2-D weights")
    if amaxes is not None and (len(amaxes) != len(weights) or any(a is None for a in amaxes)):
        raise ValueError("quantize_weights: give an amax for every weight, or none")
    bm, bn, warps = tile or DEFAULT_TILE
    key = tuple((w.data_ptr(), tuple(w.shape), b.data.data_ptr(), b.data_t.data_ptr(), b.scales.data_ptr(),
                 amaxes[i].data_ptr() if amaxes is not None else 0)
                for i, (w, b) in enumerate(zip(weights, buffers))) + ((bm, bn),)
    launch = _launches.get(key)
    if launch is None:
        if weights[0].is_cuda and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("quantize_weights: first call for these weights inside a CUDA graph capture; "
                               "call it once before capturing")
        while len(_launches) >= _MAX_LAUNCHES:  # weights that moved to new storage leave stale tables behind
            _launches.pop(next(iter(_launches)))
        launch = _launches[key] = _Launch(weights, buffers, amaxes, bm, bn)
    grid = (launch.work.shape[0],)
    x_bf16 = dtype == torch.bfloat16
    if amaxes is None:
        launch.slots.zero_()
        _amax_many_kernel[grid](launch.work, launch.table, launch.slots, BM=bm, BN=bn, X_BF16=x_bf16,
                                ALIGNED=launch.aligned, num_warps=warps)
    _quantize_many_kernel[grid](launch.work, launch.table, launch.slots, BM=bm, BN=bn, X_BF16=x_bf16, FMAX=448.0,
                                ALIGNED=launch.aligned, GIVEN_AMAX=amaxes is not None, num_warps=warps)


def forget_launches() -> None:
    """Drop the cached device tables (they hold no tensor memory beyond a few bytes per weight)."""
    _launches.clear()
