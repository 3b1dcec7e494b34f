"""Offline SASS census of fp8train's memory-bound Triton kernels -- no GPU needed.

    python benchmarks/debug/sass_census.py [--kernels gated_fwd,gated_bwd,...] [--dump DIR]

Compiles each kernel for an H100 (sm_90a) with the tile, warps and specialisations it runs with at the 953M
model's batch-32 shapes (integer arguments and pointers divisible by 16, as Triton's launcher specialises them;
not the row count M, which the kernels do not specialise on),
disassembles it with the nvdisasm that ships with Triton, and prints per kernel: SASS instructions per thread,
*warp instructions issued per tensor element* (instructions x warps / tile elements: the number that decides
whether a one-pass kernel can keep up with HBM), registers per thread, shared memory, and the largest instruction
classes.

Why: at batch 32 the gated product's kernels ran at 0.53-0.64 of copy bandwidth on the H100 (session 11's
profile); this census showed them issuing ~2.2 warp instructions per element, of which the clamps before FP8 casts
(the cast saturates by itself) and tl.sigmoid's exact-range exp and division were a quarter.  An H100 issues
~0.9 T warp instructions/s in all, a one-pass kernel moving 8.25 bytes per element at 2.7 TB/s needs ~330 G
elements/s: above ~2 instructions per element it is issue-bound, not memory-bound.

An instruction count is a hint, not a timing: the transposed FP8 stores (one byte per thread, since M is not
known to be a multiple of 16) are many instructions, but 8/16-byte stores that a run-time alignment branch
allowed ran slower on an H200 (gated backward 0.41 vs 0.53 of copy; 2026-11-28-h200-session13-*) -- a warp
storing one 32-byte run of a transposed row writes whole sectors already.  Time what the census suggests.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fp8train.kernels import gated_product, plans, predicted_scale, quantize, rmsnorm

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
HOPPER = GPUTarget("cuda", 90, 32)
M_ROWS, HIDDEN, FFN = 65536, 2048, 5632  # batch 32 x 2048 tokens of the 953M Llama


def compile_for_hopper(kernel, types: dict, constexprs: dict, num_warps: int, unspecialized=("M",),
                       max_registers: int = 0):
    """Compile a @triton.jit kernel (or fp8train's FastKernel wrapper) for sm_90a.  ``types``: Triton type
    strings of the runtime arguments ('*bf16', 'i32', 'fp32', ...); every argument not in ``unspecialized`` is
    marked divisible by 16, as the launcher does for aligned pointers and such integers; ``max_registers``: a
    plan's register cap (Triton's ``maxnreg``, 0: none)."""
    fn = kernel.fn if type(kernel).__name__ == "FastKernel" else kernel
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            raise KeyError(f"{fn.__name__}: no type given for argument {name!r}")
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and name not in unspecialized and not signature[name].startswith("fp")}
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, **({"maxnreg": max_registers} if max_registers else {})}
    return triton.compile(source, target=HOPPER, options=options)


def census(compiled) -> tuple[collections.Counter, int]:
    """(instruction classes -> count, registers per thread) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m and not m.group(1).startswith("NOP"):
            ops[m.group(1).split(".")[0]] += 1
    return ops, int(re.search(r"REG:(\d+)", usage).group(1)), sass


def _gated_types(grad: bool):
    e = "*fp8e5" if grad else "*fp8e4nv"
    return dict(g_ptr="*bf16", stride_g="i32", u_ptr="*bf16", stride_u="i32", h_dtype_ptr="*bf16",
                dh_ptr="*bf16", stride_dh="i32", gq_ptr="*fp8e4nv", gamax_ptr="*bf16", uq_ptr="*fp8e4nv",
                uamax_ptr="*bf16", dg_dtype_ptr="*bf16", du_dtype_ptr="*bf16", prediction_ptr="*fp32",
                seen_ptr="*i32", q_ptr="*fp8e4nv", q_t_ptr="*fp8e4nv", qg_ptr=e, qg_t_ptr=e, qu_ptr=e, qu_t_ptr=e,
                M="i32", N="i32")


# census rows launched with a plan that may cap registers
REGISTER_CAPS = {"gated_fwd": "gated_forward_predicted", "gated_bwd": "gated_backward_predicted"}


def kernels():
    """name -> (kernel, types, constexprs, warps, tile elements): the hot element-wise kernels of a coat-lean
    step at batch 32, with the plans they launch with."""
    out = {}
    p = plans.plan("gated_forward_predicted")
    bm, bn = p.transposed_tile
    out["gated_fwd"] = (gated_product._gated_fwd_predicted_kernel, _gated_types(False),
                        dict(BM=bm, BN=bn, ACT=0, WRITE_T=True, T_ALIGNED=True), p.transposed_warps, bm * bn)
    p = plans.plan("gated_backward_predicted")
    bm, bn = p.transposed_tile
    out["gated_bwd"] = (gated_product._gated_bwd_predicted_kernel, _gated_types(True),
                        dict(BM=bm, BN=bn, ACT=0, FMAX=57344.0, WRITE_T=True, GATHER=p.gather_scales, T_ALIGNED=True,
                             JOINT_AMAX=p.joint_amax),
                        p.transposed_warps, bm * bn)
    block_n, bm, warps = rmsnorm._row_plan(M_ROWS, HIDDEN)
    norm_types = dict(x_ptr="*bf16", stride_x="i32", w_ptr="*bf16", y_ptr="*bf16", rstd_ptr="*fp32",
                      q_ptr="*fp8e4nv", qamax_ptr="*bf16", partials_ptr="*i32", r_ptr="*bf16", stride_r="i32",
                      h_ptr="*bf16", M="i32", num_programs="i32", iters="i32", eps="fp32")
    out["norm_fwd"] = (rmsnorm._rmsnorm_fwd_kernel, norm_types,
                       dict(N=HIDDEN, BLOCK_N=block_n, BM=bm, STYLE=0, HAS_W=True, WRITE_Y=False, WRITE_COPY=True,
                            WRITE_AMAX=True, ADD_RESIDUAL=False), warps, bm * block_n)
    bm, bn = plans.elementwise_tile(HIDDEN, "norm", True)
    out["norm_apply"] = (rmsnorm._rmsnorm_apply_kernel,
                         dict(x_ptr="*bf16", stride_x="i32", w_ptr="*bf16", rstd_ptr="*fp32", y_dtype_ptr="*bf16",
                              partials_ptr="*i32", num_partials="i32", amax_out_ptr="*fp32", q_ptr="*fp8e4nv",
                              q_t_ptr="*fp8e4nv", deq_ptr="*bf16", M="i32", N="i32"),
                         dict(BM=bm, BN=bn, BLOCK_P=512, STYLE=0, HAS_W=True, WRITE_ROW=True, WRITE_T=True,
                              WRITE_DEQ=False, T_ALIGNED=True), plans.warps("norm", True), bm * bn)
    block_n, bm, warps = rmsnorm.next_power_of_2(HIDDEN), 1, 4
    out["norm_bwd"] = (rmsnorm._rmsnorm_bwd_kernel,
                       dict(dy_ptr="*bf16", stride_dy="i32", dy2_ptr="*bf16", stride_dy2="i32", dy3_ptr="*bf16",
                            stride_dy3="i32", q_ptr="*fp8e4nv", qamax_ptr="*bf16", rstd_ptr="*fp32", w_ptr="*bf16",
                            dx_ptr="*bf16", dw_partial_ptr="*fp32", dres_ptr="*bf16", stride_dres="i32",
                            amax_ptr="*i32", M="i32", num_programs="i32", iters="i32"),
                       dict(N=HIDDEN, BLOCK_N=block_n, BM=bm, STYLE=0, HAS_W=True, HAS_RES=True, HAS_DY2=True,
                            HAS_DY3=True, GATHER=plans.plan("norm").gather_scales, AMAX=True), warps, bm * block_n)
    bm, bn = plans.elementwise_tile(HIDDEN, "quantize", True)
    out["quantize_tensorwise"] = (quantize._quantize_tensorwise_kernel,
                                  dict(x_ptr="*bf16", stride_x="i32", partials_ptr="*i32", num_partials="i32",
                                       amax_out_ptr="*fp32", q_ptr="*fp8e5", q_t_ptr="*fp8e5", M="i32", N="i32"),
                                  dict(BM=bm, BN=bn, BLOCK_P=512, FMAX=57344.0, WRITE_ROW=True, WRITE_T=True,
                                       T_ALIGNED=True),
                                  plans.warps("quantize", True), bm * bn)
    out["quantize_predicted"] = (predicted_scale._quantize_predicted_kernel,
                                 dict(x_ptr="*bf16", stride_x="i32", prediction_ptr="*fp32", seen_ptr="*i32",
                                      q_ptr="*fp8e5", q_t_ptr="*fp8e5", M="i32", N="i32"),
                                 dict(BM=bm, BN=bn, FMAX=57344.0, WRITE_ROW=True, WRITE_T=True, T_ALIGNED=True),
                                 plans.warps("quantize", True), bm * bn)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=None, help="comma-separated subset of the names printed by default")
    parser.add_argument("--dump", default=None, help="write each kernel's SASS to DIR/<name>.sass")
    args = parser.parse_args()
    table = kernels()
    names = args.kernels.split(",") if args.kernels else list(table)
    header = ("kernel", "instr/thread", "warp instr/element", "regs", "smem")
    print(f"{header[0]:20s} {header[1]:>12s} {header[2]:>19s} {header[3]:>5s} {header[4]:>6s}  largest classes")
    for name in names:
        kernel, types, constexprs, warps, elements = table[name]
        cap = plans.plan(REGISTER_CAPS[name]).max_registers if name in REGISTER_CAPS else 0
        compiled = compile_for_hopper(kernel, types, constexprs, warps,
                                      unspecialized=("M", "num_programs", "iters", "num_partials"), max_registers=cap)
        ops, regs, sass = census(compiled)
        total = sum(ops.values())
        top = ", ".join(f"{k} {v}" for k, v in ops.most_common(8))
        print(f"{name:20s} {total:12d} {total * warps / elements:19.2f} {regs:5d} {compiled.metadata.shared:6d}  {top}")
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"{name}.sass"), "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
