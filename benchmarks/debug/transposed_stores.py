"""How fast can a Triton pass write an FP8 tensor *and* its transpose?  A probe for the element-wise kernels that
write transposed FP8 copies for the weight-gradient GEMMs (quantizers, norm, gated product: 57-68 % of copy
bandwidth at batch 32, benchmarks/results/2026-11-28-h100-session11-*).

    python benchmarks/debug/transposed_stores.py [--rows 65536] [--cols 5632]

Reads a bf16 (M, N) tensor, writes E4M3 row-major, and the (N, M) transpose three ways: not at all (mode 0),
``tl.store`` of ``tl.trans(tile)`` one byte per element (mode 1, what ``store_tensorwise`` does), and the
transposed tile packed into 32-bit words (4 consecutive rows per word) before the store (mode 2).  Then what the
real kernels add to mode 1: mode 3 reduces 512 int32 partial maxima per program first (``global_amax`` with
``BLOCK_P`` = 512, as every per-tensor quantizer does even for a published amax), mode 4 also writes an E4M3 1x16
group copy (data + bf16 group maxima, as the gated and norm kernels do), mode 5 folds the tile's amax into a
slot with one atomic (as the predicted-scale kernels do).  Modes 6 and 7 do mode 4's work on a 3-D tile
[rows, groups, 16] loaded as such (no ``tl.reshape`` for the group maxima): mode 6 with the transposed store
(one reshape to 2-D for ``tl.trans``), mode 7 without it.  Modes 8 and 9 read such a group copy instead (as the
backward kernels do) and write its values per-tensor E4M3 + transposed: mode 8 through ``load_group_copy`` (2-D
tile, group maxima broadcast through a reshape), mode 9 from a 3-D tile.  Modes 10 and 11 are mode 4 with the group
copy written differently: 10 stores the encoded copy from the 3-D [rows, groups, 16] view the group maxima were
taken in (no reshape back to 2-D), 11 stores the group maxima first and reads each element's back (one load per
element, served by the cache, after a barrier) instead of broadcasting them through a reshape.  Also times
fp8train's own quantize_tensorwise on the same tensor.  Prints GB/s against a device copy.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing

from fp8train.kernels.quantize import (fold_amax_bits, global_amax, load_group_copy, quantize_group_tile,
                                      tile_amax_bits)


@triton.jit
def _probe_kernel(x_ptr, q_ptr, qt_ptr, qt_words_ptr, partials_ptr, copy_ptr, copy_amax_ptr, slot_ptr, M, N,
                  BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    if MODE == 6 or MODE == 7:
        _group_copy_3d(x_ptr, q_ptr, qt_ptr, copy_ptr, copy_amax_ptr, M, N, BM, BN, MODE == 6)
        return
    if MODE == 10 or MODE == 11:
        _group_copy_variant(x_ptr, q_ptr, qt_ptr, copy_ptr, copy_amax_ptr, M, N, BM, BN, MODE == 11)
        return
    if MODE == 8 or MODE == 9:
        _read_group_copy(copy_ptr, copy_amax_ptr, q_ptr, qt_ptr, M, N, BM, BN, MODE == 9)
        return
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    inv = 64.0
    if MODE == 3:
        inv = 448.0 / global_amax(partials_ptr, 512, 512)
    q = tl.minimum(tl.maximum(x * inv, -448.0), 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    if MODE >= 3:
        tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    if MODE == 4:
        c, amax = quantize_group_tile(x, BM, BN, 16, 448.0, True)
        tl.store(copy_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], c.to(tl.float8e4nv), mask=mask)
        gcols = tl.program_id(1) * (BN // 16) + tl.arange(0, BN // 16)
        gmask = (rows < M)[:, None] & (gcols < N // 16)[None, :]
        tl.store(copy_amax_ptr + rows[:, None].to(tl.int64) * (N // 16) + gcols[None, :], amax.to(tl.bfloat16),
                 mask=gmask)
    if MODE == 5:
        fold_amax_bits(slot_ptr, tile_amax_bits(tl.where(mask, x, 0.0)))
    if MODE == 1:
        tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    if MODE == 2:
        # bytes of 4 consecutive rows -> one little-endian word of the transposed row (M % 4 == 0)
        b = tl.trans(q).to(tl.uint8, bitcast=True).to(tl.uint32)
        b = tl.reshape(b, [BN, BM // 4, 4])
        shifts = (tl.arange(0, 4) * 8).to(tl.uint32)
        words = tl.sum(b << shifts[None, None, :], axis=2)
        wrows = tl.program_id(0) * (BM // 4) + tl.arange(0, BM // 4)
        wmask = (cols < N)[:, None] & (wrows < M // 4)[None, :]
        tl.store(qt_words_ptr + cols[:, None].to(tl.int64) * (M // 4) + wrows[None, :], words, mask=wmask)


@triton.jit
def _group_copy_3d(x_ptr, q_ptr, qt_ptr, copy_ptr, copy_amax_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                   WRITE_T: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    groups = tl.program_id(1) * (BN // 16) + tl.arange(0, BN // 16)
    lanes = tl.arange(0, 16)
    offs = rows[:, None, None].to(tl.int64) * N + groups[None, :, None] * 16 + lanes[None, None, :]
    mask = (rows < M)[:, None, None] & (groups < N // 16)[None, :, None]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(x * 64.0, -448.0), 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + offs, q, mask=mask)
    bits = tl.max(tl.abs(x).to(tl.int32, bitcast=True), axis=2)
    bits = tl.where(bits < 0x7F800000, (bits + 0xFFFF) & -65536, bits)
    amax = bits.to(tl.float32, bitcast=True)
    inv = tl.where(amax > 0, tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax) * 448.0, 0.0)
    c = tl.minimum(tl.maximum(x * inv[:, :, None], -448.0), 448.0)
    tl.store(copy_ptr + offs, c.to(tl.float8e4nv), mask=mask)
    tl.store(copy_amax_ptr + rows[:, None].to(tl.int64) * (N // 16) + groups[None, :], amax.to(tl.bfloat16),
             mask=(rows < M)[:, None] & (groups < N // 16)[None, :])
    if WRITE_T:
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        q2 = tl.reshape(q, (BM, BN))
        tmask = (cols < N)[:, None] & (rows < M)[None, :]
        tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q2), mask=tmask)


@triton.jit
def _group_copy_variant(x_ptr, q_ptr, qt_ptr, copy_ptr, copy_amax_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                        GATHER: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    groups = tl.program_id(1) * (BN // 16) + tl.arange(0, BN // 16)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    q = tl.minimum(tl.maximum(x * 64.0, -448.0), 448.0).to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))
    xg = tl.reshape(x, (BM, BN // 16, 16))
    bits = tl.max(tl.abs(xg).to(tl.int32, bitcast=True), axis=2)
    bits = tl.where(bits < 0x7F800000, (bits + 0xFFFF) & -65536, bits)
    amax = bits.to(tl.float32, bitcast=True)
    amax_offs = rows[:, None].to(tl.int64) * (N // 16) + groups[None, :]
    tl.store(copy_amax_ptr + amax_offs, amax.to(tl.bfloat16), mask=(rows < M)[:, None] & (groups < N // 16)[None, :])
    if GATHER:
        tl.debug_barrier()
        element_amax = tl.load(copy_amax_ptr + rows[:, None].to(tl.int64) * (N // 16) + (cols // 16)[None, :],
                               mask=mask, other=0.0).to(tl.float32)
        inv = tl.where(element_amax > 0, tl.div_rn(tl.full((BM, BN), 1.0, tl.float32), element_amax) * 448.0, 0.0)
        c = tl.minimum(tl.maximum(x * inv, -448.0), 448.0)
        tl.store(copy_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], c.to(tl.float8e4nv), mask=mask)
    else:
        inv = tl.where(amax > 0, tl.div_rn(tl.full(amax.shape, 1.0, tl.float32), amax) * 448.0, 0.0)
        c = tl.minimum(tl.maximum(xg * inv[:, :, None], -448.0), 448.0)
        lanes = tl.arange(0, 16)
        offs = rows[:, None, None].to(tl.int64) * N + groups[None, :, None] * 16 + lanes[None, None, :]
        mask3 = (rows < M)[:, None, None] & (groups < N // 16)[None, :, None]
        tl.store(copy_ptr + offs, c.to(tl.float8e4nv), mask=mask3)


@triton.jit
def _read_group_copy(copy_ptr, copy_amax_ptr, q_ptr, qt_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr,
                     THREE_D: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    groups = tl.program_id(1) * (BN // 16) + tl.arange(0, BN // 16)
    if THREE_D:
        lanes = tl.arange(0, 16)
        offs = rows[:, None, None].to(tl.int64) * N + groups[None, :, None] * 16 + lanes[None, None, :]
        mask3 = (rows < M)[:, None, None] & (groups < N // 16)[None, :, None]
        c = tl.load(copy_ptr + offs, mask=mask3, other=0.0).to(tl.float32)
        amax = tl.load(copy_amax_ptr + rows[:, None].to(tl.int64) * (N // 16) + groups[None, :],
                       mask=(rows < M)[:, None] & (groups < N // 16)[None, :], other=0.0).to(tl.float32)
        x = tl.reshape(c * tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32))[:, :, None], (BM, BN))
    else:
        x = load_group_copy(copy_ptr, copy_amax_ptr, rows, cols, groups, M, N, BM, BN, False)
    q = tl.minimum(tl.maximum(x * 1024.0, -448.0), 448.0).to(q_ptr.dtype.element_ty)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(q_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)
    tl.store(qt_ptr + cols[:, None].to(tl.int64) * M + rows[None, :], tl.trans(q), mask=tl.trans(mask))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--cols", type=int, default=5632)
    parser.add_argument("--modes", default="0,1,2,3,4,5,6,7,8,9,10,11")
    parser.add_argument("--tiles", default="32x128,64x128,64x64")
    args = parser.parse_args()
    M, N = args.rows, args.cols
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, f"M={M} N={N}", flush=True)
    x = torch.randn(M, N, device="cuda", dtype=torch.bfloat16) * 3
    q = torch.empty(M, N, device="cuda", dtype=torch.float8_e4m3fn)
    qt = torch.empty(N, M, device="cuda", dtype=torch.float8_e4m3fn)
    qt_words = torch.empty(N, M // 4, device="cuda", dtype=torch.int32)
    partials = (torch.rand(512, device="cuda") * 3).view(torch.int32)
    group_copy = torch.empty(M, N, device="cuda", dtype=torch.float8_e4m3fn)
    group_amax = torch.empty(M, N // 16, device="cuda", dtype=torch.bfloat16)
    slot = torch.zeros(1, device="cuda", dtype=torch.int32)
    copy_dst = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(x), warmup=25, rep=100)
    copy_tbps = 2 * x.numel() * 2 / copy_ms / 1e9
    print(f"device copy {copy_tbps:.2f} TB/s", flush=True)
    from fp8train.formats import E4M3
    from fp8train.kernels.quantize import quantize_tensorwise

    amax = x.abs().amax().float().reshape(1)
    for given in (amax, None):
        ms = triton.testing.do_bench(lambda: quantize_tensorwise(x, E4M3, amax=given, with_transpose=True),
                                     warmup=10, rep=60)
        print(f"fp8train quantize_tensorwise + transpose ({'published amax' if given is not None else 'amax pass'}):"
              f" {ms:.3f} ms, {x.numel() * 4 / ms / 1e9 / copy_tbps:.2f} of copy", flush=True)
    reference = copy_reference = None
    for BM, BN in (tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",")):
        for warps in (4, 8):
            for mode in (int(m) for m in args.modes.split(",")):
                def call():
                    _probe_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
                        x, q, qt, qt_words, partials, group_copy, group_amax, slot, M, N, BM=BM, BN=BN, MODE=mode,
                        num_warps=warps)
                try:
                    call()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(call, warmup=10, rep=60)
                except Exception as exc:  # noqa: BLE001 -- a probe: report and go on
                    print(f"tile {BM}x{BN} warps {warps} mode {mode}: failed {str(exc).splitlines()[-1][:160]}",
                          flush=True)
                    continue
                # bytes per element: bf16 read, FP8 row-major, FP8 transposed, 1x16 copy (data + bf16 maxima)
                per_element = {0: 3, 7: 3 + 1.125, 8: 1.125 + 2, 9: 1.125 + 2}.get(mode, 4)
                per_element += 1.125 if mode in (4, 6, 10, 11) else 0
                nbytes = x.numel() * per_element
                same = ""
                if mode == 1 and reference is None:
                    reference = qt.clone()
                if mode == 2:
                    words = qt_words.view(torch.float8_e4m3fn).view(torch.uint8)
                    same = f" same bytes as mode 1: {torch.equal(words, reference.view(torch.uint8))}"
                if mode == 4:
                    copy_reference = (group_copy.clone(), group_amax.clone())
                if mode in (10, 11) and copy_reference is not None:
                    equal = (torch.equal(group_copy.view(torch.uint8), copy_reference[0].view(torch.uint8))
                             and torch.equal(group_amax, copy_reference[1]))
                    same = f" group copy same bytes as mode 4: {equal}"
                print(f"tile {BM}x{BN} warps {warps} mode {mode}: {ms:.3f} ms, {nbytes / ms / 1e9:.2f} TB/s "
                      f"({nbytes / ms / 1e9 / copy_tbps:.2f} of copy){same}", flush=True)


if __name__ == "__main__":
    main()
