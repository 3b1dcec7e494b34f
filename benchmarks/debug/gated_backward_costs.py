"""Where the gated backward's time goes: the one-pass kernel with its parts switched on one at a time.

    python benchmarks/debug/gated_backward_costs.py [--rows 65536] [--cols 5632] [--tiles 32x64x8,...]

The predicted-scale gated backward (``_gated_bwd_predicted_kernel``: dgate and dup from dh and the two E4M3 1x16
copies, written per-tensor E5M2 row-major and transposed) ran at 0.56 of copy bandwidth on an H200 in session 13,
the same pass with bf16 outputs at 0.93 -- the same bytes written.  This probe runs the production helpers
(``_gated_grads``, ``store_tensorwise``, ``fold_amax_bits``) in one kernel whose outputs are chosen by a constexpr:

* ``bf16``      -- dgate, dup in bf16, row-major (4 B/element written, like the bf16 backward);
* ``fp8``       -- per-tensor E5M2, row-major only (2 B);
* ``fp8+t``     -- E5M2 row-major and transposed (4 B: the production pass, without its amax);
* ``fp8+tv``    -- as ``fp8+t`` with the transposed row stride provably 16-byte aligned (vector stores);
* ``none``      -- nothing stored (reads and arithmetic only; the compiler keeps them through the amax);

each with and without the two tile-amax folds (``+amax``), for a few (rows, cols, warps) tiles; then ``fp8+tv+amax``
and ``fp8+t+amax`` with persistent programs that keep element-wise running maxima over their tiles and reduce once
at the end.
``--amax-tiles`` (``--skip-parts``: only that) times the ways to get the tensor's amax with vector transposed
stores: one program per tile with a tile reduction and a load-guarded fold (what production does since session
14), a plain atomic, a per-tile partial store, a cap on registers (``maxnreg``), and persistent programs with
element-wise or per-row running maxima.
Prints ms and the bytes moved as a fraction of a device copy.  Timing only: the values are not checked (the
production kernels are, in gpu_suite --only ops).  Results: benchmarks/results/2026-11-28-h200-session13-gated-*,
-session14-gated-backward-costs-{1,2}.txt.
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
import triton.testing

from fp8train.kernels.gated_product import _gated_grads
from fp8train.kernels.quantize import fold_amax_bits, store_tensorwise, tile_amax_bits, tile_amax_bits_pair

OUTPUTS = {"none": 0, "bf16": 1, "fp8": 2, "fp8+t": 3, "fp8+tv": 4}


@triton.jit(do_not_specialize=["M"])
def _probe_kernel(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, dg_ptr, du_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr,
                  seen_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr, OUT: tl.constexpr, AMAX: tl.constexpr):
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    gcols = tl.program_id(1) * (BN // 16) + tl.arange(0, BN // 16)
    dg, du, mask = _gated_grads(dh_ptr, N, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN, 0,
                                False)
    dg = dg.to(tl.bfloat16)
    du = du.to(tl.bfloat16)
    if OUT == 1:
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(dg_ptr + offs, dg, mask=mask)
        tl.store(du_ptr + offs, du, mask=mask)
    dg = dg.to(tl.float32)
    du = du.to(tl.float32)
    if AMAX or OUT == 0:
        fold_amax_bits(seen_ptr, tile_amax_bits(tl.where(mask, dg, 0.0)))
        fold_amax_bits(seen_ptr + 1, tile_amax_bits(tl.where(mask, du, 0.0)))
    if OUT >= 2:  # OUT == 4: transposes the compiler can prove 16-byte aligned (M % 16 == 0 here, T_ALIGNED)
        store_tensorwise(dg, 1.0, rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, OUT >= 3, 57344.0, OUT == 4)
        store_tensorwise(du, 1.0, rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, OUT >= 3, 57344.0, OUT == 4)


@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _persistent_probe_kernel(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr,
                             seen_ptr, M, N, num_programs, iters, BM: tl.constexpr, BN: tl.constexpr,
                             ALIGNED_T: tl.constexpr):
    """fp8+tv+amax (ALIGNED_T) or fp8+t+amax with programs that loop over tiles and keep element-wise running
    maxima, reduced once per program at the end (no reduction per tile)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BN)
    run_g = tl.zeros((BM, BN), dtype=tl.int32)
    run_u = tl.zeros((BM, BN), dtype=tl.int32)
    for i in range(0, iters):
        t = pid + i * num_programs
        rows = (t // tiles_n) * BM + tl.arange(0, BM)
        cols = (t % tiles_n) * BN + tl.arange(0, BN)
        gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
        dg, du, mask = _gated_grads(dh_ptr, N, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN,
                                    0, False)
        dg = dg.to(tl.bfloat16).to(tl.float32)
        du = du.to(tl.bfloat16).to(tl.float32)
        run_g = tl.maximum(run_g, tl.where(mask, tl.abs(dg), 0.0).to(tl.int32, bitcast=True))
        run_u = tl.maximum(run_u, tl.where(mask, tl.abs(du), 0.0).to(tl.int32, bitcast=True))
        # without ALIGNED_T, session 13's stores: one byte per transposed element
        store_tensorwise(dg, 1.0, rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, True, 57344.0, ALIGNED_T)
        store_tensorwise(du, 1.0, rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, True, 57344.0, ALIGNED_T)
    fold_amax_bits(seen_ptr, tl.max(tl.max(run_g, axis=1), axis=0))
    fold_amax_bits(seen_ptr + 1, tl.max(tl.max(run_u, axis=1), axis=0))


AMAX_MODES = {"none": 0, "tile+fold": 1, "tile+atomic": 2, "tile+store": 3, "elementwise-run": 4,
              "row-run": 5, "joint+fold": 6}


@triton.jit
def _aligned_tile(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, t, M, N,
                  BM: tl.constexpr, BN: tl.constexpr):
    """One tile of the backward with E5M2 row-major and provably aligned transposed stores; returns |dg|, |du|
    bits (int32, masked to 0 outside) for the amax variants."""
    tiles_n = tl.cdiv(N, BN)
    rows = (t // tiles_n) * BM + tl.arange(0, BM)
    cols = (t % tiles_n) * BN + tl.arange(0, BN)
    gcols = (t % tiles_n) * (BN // 16) + tl.arange(0, BN // 16)
    dg, du, mask = _gated_grads(dh_ptr, N, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, rows, cols, gcols, M, N, BM, BN, 0,
                                False)
    dg = dg.to(tl.bfloat16).to(tl.float32)
    du = du.to(tl.bfloat16).to(tl.float32)
    store_tensorwise(dg, 1.0, rows, cols, M, N, qg_ptr, N, qg_t_ptr, True, True, 57344.0, True)
    store_tensorwise(du, 1.0, rows, cols, M, N, qu_ptr, N, qu_t_ptr, True, True, 57344.0, True)
    return (tl.where(mask, tl.abs(dg), 0.0).to(tl.int32, bitcast=True),
            tl.where(mask, tl.abs(du), 0.0).to(tl.int32, bitcast=True))


@triton.jit(do_not_specialize=["M"])
def _amax_tile_kernel(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, seen_ptr,
                      partials_ptr, M, N, BM: tl.constexpr, BN: tl.constexpr, MODE: tl.constexpr):
    """One program per tile; MODE: 0 no amax, 1 tile reduction + load-guarded atomic (shipped), 2 tile reduction +
    plain atomic, 3 tile reduction stored to a per-tile partial (no atomic), 6 both maxima in one reduction (one
    round through shared memory instead of two) + load-guarded atomics."""
    t = tl.program_id(0)
    bits_g, bits_u = _aligned_tile(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr, t,
                                   M, N, BM, BN)
    if MODE == 6:
        # bits_* are already |x| bit patterns: reading them back as floats gives the same maxima
        g, u = tile_amax_bits_pair(bits_g.to(tl.float32, bitcast=True), bits_u.to(tl.float32, bitcast=True))
        fold_amax_bits(seen_ptr, g)
        fold_amax_bits(seen_ptr + 1, u)
    elif MODE >= 1:
        g = tl.max(tl.max(bits_g, axis=1), axis=0)
        u = tl.max(tl.max(bits_u, axis=1), axis=0)
        if MODE == 1:
            fold_amax_bits(seen_ptr, g)
            fold_amax_bits(seen_ptr + 1, u)
        elif MODE == 2:
            tl.atomic_max(seen_ptr, g)
            tl.atomic_max(seen_ptr + 1, u)
        else:
            tl.store(partials_ptr + 2 * t, g)
            tl.store(partials_ptr + 2 * t + 1, u)


@triton.jit(do_not_specialize=["M", "num_programs", "iters"])
def _amax_persistent_kernel(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr, qu_t_ptr,
                            seen_ptr, M, N, num_programs, iters, BM: tl.constexpr, BN: tl.constexpr,
                            MODE: tl.constexpr):
    """Programs loop over tiles; MODE: 0 no amax, 4 element-wise running maxima, 5 running maxima per row (a
    reduction along the tile's columns each tile: warp shuffles, no shared memory); one fold per program."""
    pid = tl.program_id(0)
    run_g = tl.zeros((BM, BN), dtype=tl.int32)
    run_u = tl.zeros((BM, BN), dtype=tl.int32)
    row_g = tl.zeros((BM,), dtype=tl.int32)
    row_u = tl.zeros((BM,), dtype=tl.int32)
    for i in range(0, iters):
        bits_g, bits_u = _aligned_tile(dh_ptr, gq_ptr, gamax_ptr, uq_ptr, uamax_ptr, qg_ptr, qg_t_ptr, qu_ptr,
                                       qu_t_ptr, pid + i * num_programs, M, N, BM, BN)
        if MODE == 4:
            run_g = tl.maximum(run_g, bits_g)
            run_u = tl.maximum(run_u, bits_u)
        if MODE == 5:
            row_g = tl.maximum(row_g, tl.max(bits_g, axis=1))
            row_u = tl.maximum(row_u, tl.max(bits_u, axis=1))
    if MODE == 4:
        fold_amax_bits(seen_ptr, tl.max(tl.max(run_g, axis=1), axis=0))
        fold_amax_bits(seen_ptr + 1, tl.max(tl.max(run_u, axis=1), axis=0))
    if MODE == 5:
        fold_amax_bits(seen_ptr, tl.max(row_g, axis=0))
        fold_amax_bits(seen_ptr + 1, tl.max(row_u, axis=0))


def amax_variants(args):
    """Time the amax strategies with aligned transposed stores (M % 16 == 0)."""
    M, N = args.rows, args.cols
    dh = (torch.randn(M, N, device="cuda") * 1e-3).to(torch.bfloat16)
    gq = torch.randn(M, N, device="cuda").clamp(-400, 400).to(torch.float8_e4m3fn)
    uq = torch.randn(M, N, device="cuda").clamp(-400, 400).to(torch.float8_e4m3fn)
    gamax = torch.rand(M, N // 16, device="cuda").to(torch.bfloat16) + 1
    uamax = torch.rand(M, N // 16, device="cuda").to(torch.bfloat16) + 1
    qg, qu = (torch.empty(M, N, device="cuda", dtype=torch.float8_e5m2) for _ in range(2))
    qg_t, qu_t = (torch.empty(N, M, device="cuda", dtype=torch.float8_e5m2) for _ in range(2))
    seen = torch.zeros(2, dtype=torch.int32, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for tile in args.amax_tiles.split(","):
        bm, bn, warps = (int(v) for v in tile.split("x"))
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        partials = torch.zeros(2 * tiles, dtype=torch.int32, device="cuda")
        for name, mode in AMAX_MODES.items():
            runs = []
            for maxnreg in ((None, 80, 64) if mode in (1, 3, 6) else (None,)) if mode <= 3 or mode == 6 else ():
                def call(maxnreg=maxnreg):
                    extra = {} if maxnreg is None else {"maxnreg": maxnreg}
                    _amax_tile_kernel[(tiles,)](dh, gq, gamax, uq, uamax, qg, qg_t, qu, qu_t, seen, partials, M, N,
                                                BM=bm, BN=bn, MODE=mode, num_warps=warps, **extra)
                runs.append((f"per tile{'' if maxnreg is None else f' maxnreg {maxnreg}'}", call))
            if mode in (0, 4, 5):
                for per_sm in (2, 4, 8):
                    nprog = min(tiles, per_sm * sms)

                    def persistent(nprog=nprog):
                        _amax_persistent_kernel[(nprog,)](dh, gq, gamax, uq, uamax, qg, qg_t, qu, qu_t, seen, M, N,
                                                          nprog, triton.cdiv(tiles, nprog), BM=bm, BN=bn, MODE=mode,
                                                          num_warps=warps)
                    runs.append((f"persistent {per_sm}/SM", persistent))
            for label, fn in runs:
                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=10, rep=50)
                print(f"aligned tile {tile:9s} amax {name:15s} {label:22s} {ms:.3f} ms", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--cols", type=int, default=5632)
    parser.add_argument("--tiles", default="32x64x8,32x128x8,64x64x4,8x256x4")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--amax-tiles", default="",  # e.g. 32x64x8,32x128x8,32x128x4,64x128x8,64x64x4
                        help="also time the amax strategies (with aligned transposes) in these tiles, GPU only")
    parser.add_argument("--skip-parts", action="store_true", help="skip the parts sweep (only --amax-tiles)")
    args = parser.parse_args()
    if args.amax_tiles:
        amax_variants(args)
    if args.skip_parts:
        return
    M, N, dev = args.rows, args.cols, args.device
    if dev == "cuda":
        print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, f"M={M} N={N}", flush=True)
    dh = (torch.randn(M, N, device=dev) * 1e-3).to(torch.bfloat16)
    gq = torch.randn(M, N, device=dev).clamp(-400, 400).to(torch.float8_e4m3fn)
    uq = torch.randn(M, N, device=dev).clamp(-400, 400).to(torch.float8_e4m3fn)
    gamax = torch.rand(M, N // 16, device=dev).to(torch.bfloat16) + 1
    uamax = torch.rand(M, N // 16, device=dev).to(torch.bfloat16) + 1
    dg, du = torch.empty_like(dh), torch.empty_like(dh)
    qg, qu = (torch.empty(M, N, device=dev, dtype=torch.float8_e5m2) for _ in range(2))
    qg_t, qu_t = (torch.empty(N, M, device=dev, dtype=torch.float8_e5m2) for _ in range(2))
    seen = torch.zeros(2, dtype=torch.int32, device=dev)
    copy_dst = torch.empty_like(dh)
    copy_ms = triton.testing.do_bench(lambda: copy_dst.copy_(dh), warmup=10, rep=50) if dev == "cuda" else 1.0
    copy_tbps = 2 * dh.numel() * 2 / copy_ms / 1e9
    print(f"device copy {copy_tbps:.2f} TB/s", flush=True)
    read_bytes = 2 + 2 * (1 + 2 / 16)  # dh bf16 + two E4M3 copies with bf16 group maxima
    written = {"none": 0, "bf16": 4, "fp8": 2, "fp8+t": 4, "fp8+tv": 4}
    assert M % 16 == 0, "fp8+tv assumes a row count divisible by 16"
    for tile in args.tiles.split(","):
        bm, bn, warps = (int(v) for v in tile.split("x"))
        for out, code in OUTPUTS.items():
            for amax in (False, True):
                if out == "none" and amax:
                    continue  # "none" always folds the amax (or nothing would be kept)

                def call():
                    _probe_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                        dh, gq, gamax, uq, uamax, dg, du, qg, qg_t, qu, qu_t, seen, M, N, BM=bm, BN=bn, OUT=code,
                        AMAX=amax, num_warps=warps)

                call()
                if dev != "cuda":
                    print(f"tile {tile} {out}{'+amax' if amax else ''}: ran", flush=True)
                    continue
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(call, warmup=10, rep=50)
                nbytes = M * N * (read_bytes + written[out])
                print(f"tile {tile:9s} {out + ('+amax' if amax else ''):11s} {ms:.3f} ms  "
                      f"{nbytes / ms / 1e9 / copy_tbps:.2f} of copy", flush=True)
        if dev != "cuda":
            continue  # the interpreter cannot loop over a runtime bound without tests/triton_interpreter.py's patch
        tiles = triton.cdiv(M, bm) * triton.cdiv(N, bn)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for aligned in (True, False):
            for per_sm in (2, 4, 8):
                nprog = min(tiles, per_sm * sms)

                def persistent():
                    _persistent_probe_kernel[(nprog,)](dh, gq, gamax, uq, uamax, qg, qg_t, qu, qu_t, seen, M, N,
                                                       nprog, triton.cdiv(tiles, nprog), BM=bm, BN=bn,
                                                       ALIGNED_T=aligned, num_warps=warps)

                persistent()
                ms = triton.testing.do_bench(persistent, warmup=10, rep=50)
                nbytes = M * N * (read_bytes + 4)
                print(f"tile {tile:9s} {'fp8+tv' if aligned else 'fp8+t'}+amax, persistent {per_sm}/SM, one "
                      f"reduction per program {ms:.3f} ms  {nbytes / ms / 1e9 / copy_tbps:.2f} of copy", flush=True)


if __name__ == "__main__":
    main()
