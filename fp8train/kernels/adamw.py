"""Fused FP8 AdamW step in Triton: dequantize -> AdamW in fp32 -> requantize, for many tensors per launch.

The torch reference is ``fp8train.optim.AdamW(fused=False)`` (fp8train/optim/adamw.py + moment_storage.py +
dynamic_range_expansion.py); this kernel computes the same thing and is checked against it on the GPU by
benchmarks/gpu/optim.py (moments within one FP8 step, parameters within 1e-6 relative after 100 steps).

Launch layout.  Every scaling group (1 x GROUP elements of one row of one parameter) lies entirely inside one
program, so a group's new maximum/minimum -- and so its new metadata -- are reduced in registers: one read and one
write of every byte, no second pass.  A flat *work list* of ``(tensor index, first group)`` pairs (built once per
set of shapes and cached) covers all tensors of a step; the program looks up its tensor's pointers and sizes in a
small *tensor table* (int64: pointers of p, grad, m, v, m_amax, m_k, v_amax, v_k, then last-dim size, groups per
row, groups, then the tensor's published-amax slot or 0) and its per-tensor AdamW scalars in a float32 table.  So
one launch updates the whole model, whatever the mix of shapes, and shapes never become compile-time constants (no
recompiles).

Traffic per parameter (fp32 params and grads, DRE moments): read 4 + 4 + 1 + 1, write 4 + 1 + 1 = 16 bytes, plus
5 bytes of metadata (float32 amax, uint8 k) per 128-element group per moment -- against 28 bytes for fused fp32
AdamW.

Published weight amax (fp8train/nn/weight_amax.py): for a tensor with a slot, each program also reduces max |p| of
the values it stored (after bf16 rounding, stochastic or not) and folds it into the slot with one 64-bit
``atomic_max`` of ``(epoch << 32) | float32 bits`` (skipped when a read of the slot shows it holds as much already):
the newer epoch wins over last step's value, so the slot needs no zeroing launch, and the forward's quantizer reads
the amax instead of running its own amax pass.

Vectorisation: pointers loaded from a table carry no alignment information, so when every tensor of the launch is
16-byte aligned and its last dim a multiple of 16 (true for transformer weights), ``ALIGNED`` adds the hints that
let Triton emit 128-bit loads and stores; otherwise it falls back to element-wise (still coalesced) accesses.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..dynamic_range_expansion import exponent_numerator
from .launch import fast_launch

__all__ = ["fused_adamw_step", "TABLE_COLUMNS", "SCALAR_COLUMNS"]

TABLE_COLUMNS = 12  # p, grad, m, v, m_amax, m_k, v_amax, v_k pointers; last-dim size, groups per row, groups;
#                    published-amax slot pointer (0: none)
SCALAR_COLUMNS = 7  # decay, lerp weight, beta2, 1 - beta2, -step size, sqrt(bias correction 2), eps
_OVERFLOW_LIMIT = tl.constexpr(3.0e38)  # fp8train.optim.adamw.OVERFLOW_LIMIT
_FLOAT32_MAX = tl.constexpr(3.4028234663852886e38)
_FORMAT_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
_MODES = {"fp32": 0, "plain": 1, "dre": 2}
_GRAD_KINDS = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2 on the MUFU unit (lg2.approx, ~2**-22 relative; subnormal inputs flush to -inf) when FAST, else
    tl.log2 (a ~20-instruction polynomial, and the only one the Triton CPU interpreter knows)."""
    if FAST:
        y = libdevice.fast_log2f(x)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _hash32(x):
    """A bijective 32-bit integer hash (Wellons' "lowbias32"): pseudo-random bits for stochastic rounding from
    two multiplies, where Philox (tl.randint) costs ten rounds per element -- the step was compute-bound on it.
    Rounding only needs bits uncorrelated with the values; a fresh seed per step and tensor keeps them so."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _decode(q, amax, k_code, MODE: tl.constexpr, FMAX: tl.constexpr, FAST: tl.constexpr):
    """FP8 values q [BLOCK_G, GROUP] (as float32) + per-group amax, k code [BLOCK_G] -> float32 moments.

    Divisions are per group, never per element (this kernel must stay memory-bound).
    """
    if MODE == 1:  # plain absmax: q * amax / fmax
        x = q * (amax / FMAX)[:, None]
    else:  # DRE: sign(q) * amax * (|q| / fmax) ** (16 / k_code), as exp2 of a log2 difference
        inv_k = 16.0 / k_code
        mag = amax[:, None] * tl.exp2((_log2(tl.abs(q), FAST) - tl.log2(FMAX)) * inv_k[:, None])
        x = tl.where(q < 0, -mag, mag)
    return x


@triton.jit
def _encode(x, mask, MODE: tl.constexpr, FMAX: tl.constexpr, K_NUM: tl.constexpr, FAST: tl.constexpr):
    """float32 moments x [BLOCK_G, GROUP] -> (FP8-ready values, float32 amax, k code) per group."""
    a = tl.where(mask, tl.abs(x), 0.0)
    amax = tl.max(a, axis=1)
    safe_amax = tl.where(amax > 0, amax, 1.0)
    if MODE == 1:
        inv = tl.where(amax > 0, tl.div_rn(tl.full(amax.shape, FMAX, tl.float32), safe_amax), 0.0)
        q = tl.minimum(tl.maximum(x * inv[:, None], -FMAX), FMAX)
        code = amax  # unused
    else:
        # zeros must not enter the minimum (COAT's first-lane bug); all-zero groups give +inf
        amin = tl.min(tl.where(a > 0, a, float("inf")), axis=1)
        log_amax = _log2(safe_amax, FAST)
        log_range = log_amax - _log2(amin, FAST)
        code = tl.where(log_range > 0, tl.floor(K_NUM / log_range), 255.0)
        code = tl.minimum(tl.maximum(code, 1.0), 255.0)
        # fmax * (|x| / amax) ** k; log2(0) = -inf gives exact zeros
        y = tl.exp2((_log2(a, FAST) - log_amax[:, None]) * (code * 0.0625)[:, None] + tl.log2(FMAX))
        y = tl.minimum(y, FMAX)
        q = tl.where(x < 0, -y, y)
    return q, amax, code


@fast_launch
@triton.jit(do_not_specialize=["seed", "amax_epoch"])  # new values every step must not recompile
def _fused_adamw_kernel(
    work_ptr, table_ptr, scalar_ptr, nonfinite_ptr, seed, amax_epoch,
    MODE: tl.constexpr, M_E5M2: tl.constexpr, V_E5M2: tl.constexpr,
    M_FMAX: tl.constexpr, V_FMAX: tl.constexpr, M_K_NUM: tl.constexpr, V_K_NUM: tl.constexpr,
    PARAM_BF16: tl.constexpr, GRAD_KIND: tl.constexpr, STOCHASTIC: tl.constexpr, MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr, FAST_MATH: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    PUBLISH_AMAX: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(work_ptr + 2 * pid).to(tl.int64)
    first_group = tl.load(work_ptr + 2 * pid + 1)
    row = table_ptr + t * 12
    cols = tl.load(row + 8)
    groups_per_row = tl.load(row + 9).to(tl.int32)
    n_groups = tl.load(row + 10).to(tl.int32)

    # -- pointers of this tensor, typed ------------------------------------------------------------------------
    if PARAM_BF16:
        p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.bfloat16))
    else:
        p_ptr = tl.load(row + 0).to(tl.pointer_type(tl.float32))
    if GRAD_KIND == 0:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    elif GRAD_KIND == 1:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.bfloat16))
    else:
        g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float16))
    if MODE == 0:
        m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    else:
        if M_E5M2:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float8e5))
        else:
            m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float8e4nv))
        if V_E5M2:
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float8e5))
        else:
            v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float8e4nv))
    if ALIGNED:  # host checked: 16-byte aligned bases, last dim a multiple of 16
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        cols = tl.multiple_of(cols, 16)

    # -- the tile: BLOCK_G groups x GROUP elements --------------------------------------------------------------
    g_idx = first_group + tl.arange(0, BLOCK_G)  # int32: a tensor has < 2**31 groups
    valid_g = g_idx < n_groups
    row_idx = g_idx // groups_per_row
    group_col = g_idx - row_idx * groups_per_row
    row_start = row_idx.to(tl.int64) * cols
    if ALIGNED:
        row_start = tl.multiple_of(row_start, 16)
    col = group_col[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = valid_g[:, None] & (col < cols)
    offs = row_start[:, None] + col

    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MAXIMIZE:
        g = -g
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if MODE != 0:
        m_amax_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        v_amax_ptr = tl.load(row + 6).to(tl.pointer_type(tl.float32))
        m_amax = tl.load(m_amax_ptr + g_idx, mask=valid_g, other=0.0)
        v_amax = tl.load(v_amax_ptr + g_idx, mask=valid_g, other=0.0)
        if MODE == 2:
            m_k_ptr = tl.load(row + 5).to(tl.pointer_type(tl.uint8))
            v_k_ptr = tl.load(row + 7).to(tl.pointer_type(tl.uint8))
            m_k = tl.load(m_k_ptr + g_idx, mask=valid_g, other=16).to(tl.float32)
            v_k = tl.load(v_k_ptr + g_idx, mask=valid_g, other=16).to(tl.float32)
        else:
            m_k = m_amax
            v_k = v_amax
        m = _decode(m, m_amax, m_k, MODE, M_FMAX, FAST_MATH)
        v = _decode(v, v_amax, v_k, MODE, V_FMAX, FAST_MATH)

    # -- torch.optim.AdamW, in float32 ---------------------------------------------------------------------------
    s = scalar_ptr + t * 7
    decay = tl.load(s + 0)
    lerp_weight = tl.load(s + 1)
    beta2 = tl.load(s + 2)
    one_minus_beta2 = tl.load(s + 3)
    neg_step_size = tl.load(s + 4)
    bias_correction2_sqrt = tl.load(s + 5)
    eps = tl.load(s + 6)

    # Torch's roundings, operation by operation: each torch op is its own CUDA kernel, and nvcc contracts only
    # inside one expression (lerp's `self + w * (end - self)`, addcmul's `a + alpha * (b * c)`, addcdiv's
    # `a + alpha * (b / c)`).  Left to itself the compiler may fuse across them instead (e.g. p * decay into the
    # final add), which drifts parameters by an ulp now and then -- so every fused multiply-add is spelled out.
    new_p = p * decay
    new_m = tl.where(lerp_weight < 0.5, tl.fma(lerp_weight, g - m, m), tl.fma(m - g, 1.0 - lerp_weight, g))
    new_v = tl.fma(one_minus_beta2, g * g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(new_v), bias_correction2_sqrt) + eps
    new_p = tl.fma(neg_step_size, tl.div_rn(new_m, denom), new_p)

    # an element whose gradient is NaN/inf (or whose moments overflow) keeps its parameter and moments
    ok = (tl.abs(new_p) <= _FLOAT32_MAX) & (tl.abs(new_m) <= _OVERFLOW_LIMIT) & (new_v <= _OVERFLOW_LIMIT)
    new_p = tl.where(ok, new_p, p)
    new_m = tl.where(ok, new_m, m)
    new_v = tl.where(ok, new_v, v)
    skipped = tl.sum(tl.sum(tl.where(mask & (ok == 0), 1, 0), axis=1), axis=0)
    if skipped > 0:
        tl.atomic_add(nonfinite_ptr, skipped)

    # -- write the parameter from the un-requantized moments ----------------------------------------------------
    if PARAM_BF16:
        if STOCHASTIC:
            # add 16 random bits below bfloat16's last mantissa bit, then truncate: unbiased rounding
            noise = (_hash32(offs.to(tl.uint32) ^ _hash32(seed.to(tl.uint32) ^ t.to(tl.uint32))) >> 16
                     ).to(tl.int32, bitcast=True)
            bits = (new_p.to(tl.int32, bitcast=True) + noise) & -65536
            stored = bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        else:
            stored = new_p.to(tl.bfloat16)
    else:
        stored = new_p
    tl.store(p_ptr + offs, stored, mask=mask)

    # -- published weight amax: max |p| of the stored values (folded into the tensor's slot at the end) -----------
    if PUBLISH_AMAX:
        # |x| as int32 bits orders like |x| (NaN above inf, as the quantizer's own amax pass has it); masked-off
        # lanes loaded p = g = m = v = 0 and stored 0, so they need no mask
        amax_bits = tl.max(tl.max(stored.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1), axis=0)

    # -- requantize m and v --------------------------------------------------------------------------------------
    if MODE == 0:
        tl.store(m_ptr + offs, new_m, mask=mask)
        tl.store(v_ptr + offs, new_v, mask=mask)
    else:
        qm, m_amax, m_k = _encode(new_m, mask, MODE, M_FMAX, M_K_NUM, FAST_MATH)
        qv, v_amax, v_k = _encode(new_v, mask, MODE, V_FMAX, V_K_NUM, FAST_MATH)
        tl.store(m_ptr + offs, qm.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, qv.to(v_ptr.dtype.element_ty), mask=mask)
        tl.store(m_amax_ptr + g_idx, m_amax, mask=valid_g)
        tl.store(v_amax_ptr + g_idx, v_amax, mask=valid_g)
        if MODE == 2:
            tl.store(m_k_ptr + g_idx, m_k.to(tl.uint8), mask=valid_g)
            tl.store(v_k_ptr + g_idx, v_k.to(tl.uint8), mask=valid_g)

    if PUBLISH_AMAX:
        slot = tl.load(row + 11)
        if slot != 0:
            slot_ptr = slot.to(tl.pointer_type(tl.int64))
            tagged = (amax_epoch.to(tl.int64) << 32) | amax_bits.to(tl.int64)
            # a tensor's programs all fold into one address: read first and skip the atomic when the slot already
            # holds as much (slots only grow, so a stale read costs at most a redundant atomic)
            if tagged > tl.load(slot_ptr, cache_modifier=".cg"):
                tl.atomic_max(slot_ptr, tagged)


@functools.lru_cache(maxsize=16)
def _work_list(groups_per_tensor: tuple, block_g: int, device: torch.device) -> torch.Tensor:
    """int32 pairs (tensor index, first group) covering every group of every tensor, block_g groups at a time."""
    blocks = torch.tensor([-(-n // block_g) for n in groups_per_tensor], dtype=torch.int64)
    tensor_index = torch.repeat_interleave(torch.arange(len(blocks)), blocks)
    block_start = torch.cumsum(blocks, 0) - blocks
    first_group = (torch.arange(int(blocks.sum())) - block_start[tensor_index]) * block_g
    return torch.stack([tensor_index, first_group], dim=1).to(torch.int32).contiguous().to(device)


def _to_device(rows: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    table = torch.tensor(rows, dtype=dtype)
    if device.type == "cuda":
        return table.pin_memory().to(device, non_blocking=True)
    return table


# elements per program, warps: (1024, 4) measured 1.34x faster than (2048, 8) for fp32 parameters and 1.23x for
# bf16 + stochastic rounding on the 953M model (H200, benchmarks/results/2026-11-27-h200-session4-plans-sweep-suite.md)
DEFAULT_TILE = (1024, 4)
# ... launched with at most 80 registers per thread.  The compiler's own choice, 96 for bf16 parameters and for
# fp32 parameters with the published-amax reduction, leaves room for 5 programs per SM instead of 6.  GPU time of the
# 953M step, dre E4M3 (H200, kernels only -- the host ran ahead), capped / uncapped:
#   fp32 params         5.59 / 5.50 ms,  with published weight amax 5.72 / 6.39 ms
#   bf16 params + SR    5.51 / 6.10 ms,  with published weight amax 5.94 / 6.18 ms
# (plain states: fp32 4.84 / 4.84, published 5.06 / 5.60; bf16 4.55 / 4.97, published 4.94 / 5.41); at most a few
# registers spill.  Same bits either way.  Other tiles keep the compiler's choice (as the tile sweep measured them).
DEFAULT_TILE_MAX_REGISTERS = 80


def fused_adamw_step(params: list, grads: list, states: list, scalars: list, *, mode: str, m_format: str,
                     v_format: str, group_size: int, stochastic_rounding: bool, maximize: bool, seed: int,
                     tile: tuple = DEFAULT_TILE, amax_slots: Optional[list] = None,
                     amax_epoch: int = 0) -> torch.Tensor:
    """Update every (param, grad, state) in one launch; returns the device count of skipped (non-finite) elements.

    All params share dtype, device and storage options; params and grads must be contiguous.  ``scalars`` holds one
    tuple per tensor (see ``fp8train.optim.adamw.kernel_scalars``).  ``tile`` = (elements per program, warps):
    whole scaling groups per program, so the results do not depend on it (benchmarks/gpu/optim.py sweeps it).
    ``amax_slots``: per tensor the int64 word of a published-amax slot (``fp8train.nn.weight_amax.Slot.word``, on
    the params' device) or None; each ends up holding max |new p| tagged with ``amax_epoch`` (0 < epoch < 2**31,
    larger than the slot's current tag).
    """
    device = params[0].device
    tile_elements, warps = tile
    block_g = max(1, tile_elements // group_size)
    rows, groups, pointers, last_dims = [], [], [], []
    amax_slots = amax_slots or [None] * len(params)
    publish = any(slot is not None for slot in amax_slots)
    if publish and not 0 < amax_epoch < 2**31:
        raise ValueError(f"amax_epoch must be in (0, 2**31), got {amax_epoch}")
    for p, g, st, slot in zip(params, grads, states, amax_slots):
        cols = p.shape[-1] if p.dim() else 1
        per_row = -(-cols // group_size)
        n_groups = (p.numel() // cols) * per_row
        ptrs = [p.data_ptr(), g.data_ptr(), st["exp_avg"].data_ptr(), st["exp_avg_sq"].data_ptr()]
        ptrs += [st[k].data_ptr() if k in st else 0
                 for k in ("exp_avg_amax", "exp_avg_k", "exp_avg_sq_amax", "exp_avg_sq_k")]
        rows.append(ptrs + [cols, per_row, n_groups, slot.data_ptr() if slot is not None else 0])
        groups.append(n_groups)
        pointers += ptrs[:4]
        last_dims.append(cols)
    aligned = all(ptr % 16 == 0 for ptr in pointers) and all(c % 16 == 0 for c in last_dims)
    table = _to_device(rows, torch.int64, device)
    scalar_table = _to_device([list(s) for s in scalars], torch.float32, device)
    work = _work_list(tuple(groups), block_g, device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    launch_options = {"maxnreg": DEFAULT_TILE_MAX_REGISTERS} if (device.type == "cuda" and tile == DEFAULT_TILE
                                                                  and DEFAULT_TILE_MAX_REGISTERS) else {}
    _fused_adamw_kernel[(work.shape[0],)](
        work, table, scalar_table, counter, seed, amax_epoch,
        MODE=_MODES[mode], M_E5M2=m_format == "e5m2", V_E5M2=v_format == "e5m2",
        M_FMAX=_FORMAT_MAX[m_format], V_FMAX=_FORMAT_MAX[v_format],
        M_K_NUM=exponent_numerator(m_format), V_K_NUM=exponent_numerator(v_format),
        PARAM_BF16=params[0].dtype == torch.bfloat16, GRAD_KIND=_GRAD_KINDS[grads[0].dtype],
        STOCHASTIC=stochastic_rounding, MAXIMIZE=maximize, ALIGNED=aligned, FAST_MATH=device.type == "cuda",
        GROUP=group_size, BLOCK_G=block_g, PUBLISH_AMAX=publish,
        num_warps=warps, **launch_options,
    )
    return counter
