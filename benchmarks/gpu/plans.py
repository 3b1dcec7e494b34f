"""Sweep the element-wise kernels' launch plans (fp8train.kernels.plans) on the 953M model's shapes.

For each kernel family, the calls a coat / coat-lean training step makes (8192 tokens: hidden 2048, ffn 5632)
are timed under the shipped plan, then one plan field at a time is varied, keeping the best value before the
next field (coordinate descent; each candidate timed alternately with the current best).  Every candidate must
give the shipped plan's exact bits (a check per family), so only speed is being chosen.  The best plan per
family is printed as a ``plans.set_plan`` line and written with every timing to ``$OUT/plans-sweep.json`` after
each family (a run cut short keeps what it measured); at the end all of them as one ``FP8TRAIN_PLANS=...`` line
(also the json's ``fp8train_plans``), which an end-to-end A/B run can take as it is:

    FP8TRAIN_PLANS=<that text> python -m fp8train bench --configs fp8train_coat_lean_graphed --batch 32

    python benchmarks/gpu_suite.py --out $OUT --only plans
    PLANS_FAMILIES=gated_forward_predicted,gated_backward_predicted python benchmarks/gpu_suite.py --out $OUT --only plans
    PLANS_TOKENS=65536 python benchmarks/gpu_suite.py --out $OUT --only plans    # batch 32 x 2048's shapes
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time

import torch

from gpu.quant import bench_ms, bf16_input, copy_tbps

CANDIDATES = {
    "tile_elements": (2048, 4096, 8192, 16384, 32768),
    "max_cols": (128, 256, 1024, 2048),
    "warps": (2, 4, 16),
    "programs_per_sm": (2, 8, 16, 32),
    # (rows, cols): a transposed store writes runs of `rows` bytes, `cols` of them M bytes apart
    "transposed_tile": ((32, 128), (128, 64), (64, 64), (128, 128), (32, 64), (64, 256), (64, 128), (128, 32),
                        (256, 32), (256, 64)),
    "transposed_warps": (2, 4, 16),
    "gather_scales": (True,),
    "max_registers": (64, 80, 96, 128),
    "joint_amax": (True,),
}

# the fields each family's kernels read (others would only re-time the same launch)
FIELDS = {
    "quantize": ("tile_elements", "max_cols", "warps", "programs_per_sm", "transposed_tile", "transposed_warps"),
    "gated_backward": ("gather_scales", "tile_elements", "max_cols", "warps", "programs_per_sm", "transposed_tile",
                       "transposed_warps"),
    "product_from_copies": ("gather_scales", "tile_elements", "max_cols", "warps", "programs_per_sm",
                            "transposed_tile", "transposed_warps"),
    "norm": ("gather_scales", "tile_elements", "max_cols", "programs_per_sm", "transposed_tile",
             "transposed_warps"),
    "residual": ("tile_elements", "max_cols", "warps"),
    "dequantize": ("tile_elements", "warps"),
    "gated_forward": ("tile_elements", "max_cols", "warps", "programs_per_sm", "transposed_tile",
                      "transposed_warps"),
    "gated_forward_predicted": ("transposed_tile", "transposed_warps", "max_registers"),
    "gated_backward_predicted": ("gather_scales", "transposed_tile", "transposed_warps", "max_registers",
                                 "joint_amax"),
}


def _cases(M=8192, H=2048, F=5632, device="cuda"):
    """{family: [(name, bytes moved at least once, callable)]} -- the step's calls, on fresh inputs."""
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import gated_from_copies, gated_product, quantize, residual, rmsnorm

    x = bf16_input((M, H), device=device)
    r = bf16_input((M, H), seed=1, device=device)
    dy, dy2 = bf16_input((M, H), seed=2, device=device), bf16_input((M, H), seed=3, device=device)
    w = torch.ones(H, dtype=torch.bfloat16, device=device)
    gate, up, dh = (bf16_input((M, F), seed=s, device=device) for s in (4, 5, 6))
    weight = torch.randn(F, H, device=device) * 0.02
    gcopy, ucopy = (quantize.quantize_groups(t, E4M3) for t in (gate, up))
    y_q = quantize.quantize_tensorwise(x, E4M3)
    _, _, rstd, hcopy = rmsnorm.rmsnorm_forward(x, w, 1e-5, "llama", residual=r)
    nh, nf = M * H, M * F
    copy_h, copy_f = nh + nh // 8, nf + nf // 8  # an E4M3 1x16 copy: data + bf16 group maxima
    prediction = torch.zeros(3, device=device)
    for _ in range(2):  # the first call repairs; from the second on the predictions hold (same bits every call)
        gated_product.gated_product_forward(gate, up, "silu", quantize_output=True, output_transpose=True,
                                            prediction=prediction[:1])
        gated_product.gated_product_backward(dh, gcopy, ucopy, "silu", quantize_output=True, output_transpose=True,
                                             prediction=prediction[1:])
    return {
        "quantize": [
            (f"dy E5M2 per-tensor + transpose {M}x{H}", 2 * nh + 2 * nh,
             lambda: quantize.quantize_tensorwise(dy, E5M2, with_transpose=True)),
            (f"x E4M3 per-tensor {M}x{H}", 2 * nh + nh, lambda: quantize.quantize_tensorwise(x, E4M3)),
            (f"gate 1x16 copy {M}x{F}", 2 * nf + copy_f, lambda: quantize.quantize_groups(gate, E4M3)),
            (f"weight fp32 E4M3 + transpose {F}x{H}", 4 * F * H + 2 * F * H,
             lambda: quantize.quantize_tensorwise(weight, E4M3, with_transpose=True)),
        ],
        "gated_backward": [
            (f"gated bwd E5M2 dgate/dup + transposes {M}x{F}", 2 * nf + 2 * copy_f + 4 * nf,
             lambda: gated_product.gated_product_backward(dh, gcopy, ucopy, "silu", quantize_output=True,
                                                          output_transpose=True)),
        ],
        "product_from_copies": [
            (f"product fwd (row-major + transpose) {M}x{F}", 2 * copy_f + 2 * nf,
             lambda: gated_from_copies.product_from_copies(gcopy, ucopy, "silu", torch.bfloat16,
                                                           with_transpose=True)),
            (f"product bwd (transpose only) {M}x{F}", 2 * copy_f + nf,
             lambda: gated_from_copies.product_from_copies(gcopy, ucopy, "silu", torch.bfloat16,
                                                           write_rowmajor=False, with_transpose=True)),
        ],
        "norm": [
            (f"residual + rmsnorm fwd, E4M3 y + transpose {M}x{H}", 4 * nh + 2 * nh + copy_h + 2 * nh,
             lambda: rmsnorm.rmsnorm_forward(x, w, 1e-5, "llama", residual=r, quantize_output=True,
                                             output_transpose=True)),
            (f"rmsnorm bwd + second dy + residual grad {M}x{H}", 8 * nh + copy_h,
             lambda: rmsnorm.rmsnorm_backward(dy, hcopy, rstd, w, "llama", residual_grad=r, second_dy=dy2)),
        ],
        "dequantize": [
            (f"flow norm output E4M3 -> bf16 {M}x{H}", nh + 2 * nh,
             lambda: quantize.dequantize_tensorwise(y_q.data, y_q.amax, 448.0, torch.bfloat16)),
        ],
        "residual": [
            (f"residual add + FP8 copy {M}x{H}", 6 * nh + copy_h,
             lambda: residual.residual_add(r, x, emit_fp8_copy=True)),
        ],
        "gated_forward": [
            (f"gated fwd E4M3 h + transpose + copies {M}x{F}", 4 * nf + 2 * copy_f + 2 * nf,
             lambda: gated_product.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                         output_transpose=True)),
        ],
        # steady state of delayed scaling: predictions that hold (the repair passes exit at once)
        "gated_forward_predicted": [
            (f"gated fwd, predicted scale, E4M3 h + transpose + copies {M}x{F}", 4 * nf + 2 * copy_f + 2 * nf,
             lambda: gated_product.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                         output_transpose=True, prediction=prediction[:1])),
        ],
        "gated_backward_predicted": [
            (f"gated bwd, predicted scales, E5M2 dgate/dup + transposes {M}x{F}", 2 * nf + 2 * copy_f + 4 * nf,
             lambda: gated_product.gated_product_backward(dh, gcopy, ucopy, "silu", quantize_output=True,
                                                          output_transpose=True, prediction=prediction[1:])),
        ],
    }


def _bits(result):
    from fp8train.quant import QuantizedTensor

    if isinstance(result, torch.Tensor):
        return [result.detach().contiguous().reshape(-1).view(torch.uint8)]
    if isinstance(result, QuantizedTensor):
        return [b for t in (result.data, result.amax) if t is not None for b in _bits(t)]
    if isinstance(result, (tuple, list)):
        return [b for item in result for b in _bits(item)]
    return []


def _time_family(cases) -> tuple[float, list]:
    times = [bench_ms(call) for _, _, call in cases]
    return sum(times), times


def _compare(family, cases, current, candidate) -> tuple[float, float]:
    """(ms under ``current``, ms under ``candidate``), each the best of two runs timed alternately -- the GPU's
    clock moved between areas of one call by 2x on small kernels, so a single early baseline misleads."""
    from fp8train.kernels import plans

    times = {0: [], 1: []}
    for _ in range(2):
        for key, p in ((0, current), (1, candidate)):
            plans.set_plan(family, p)
            times[key].append(_time_family(cases)[0])
    return min(times[0]), min(times[1])


def _same(cases, references) -> bool:
    for (_, _, call), ref in zip(cases, references):
        got = _bits(call())
        if len(got) != len(ref) or not all(torch.equal(g, r) for g, r in zip(got, ref)):
            return False
    return True


def run(report, *, shapes: dict | None = None, device: str = "cuda") -> None:
    """``shapes`` (M, H, F) and ``device`` exist for a dry run of this script on CPU under the interpreter."""
    from fp8train.kernels import plans

    out = pathlib.Path(os.environ.get("OUT", "benchmarks/results"))
    copy = copy_tbps(bf16_input((8192, 5632), device=device))
    results = {"copy_tbps": copy, "families": {}}
    tokens = int(os.environ.get("PLANS_TOKENS", "0"))
    cases = _cases(**(shapes or ({"M": tokens} if tokens else {})), device=device)
    wanted = [f for f in os.environ.get("PLANS_FAMILIES", "").split(",") if f]
    for family, fields in FIELDS.items():
        if wanted and family not in wanted:
            continue
        start = time.time()
        family_cases = cases[family]
        references = [_bits(call()) for _, _, call in family_cases]
        best = plans.plan(family)
        trials = []
        all_same = True
        for field in fields:
            for value in CANDIDATES[field]:
                candidate = dataclasses.replace(best, **{field: value})
                plans.set_plan(family, candidate)
                try:
                    same = _same(family_cases, references)
                    current_ms, ms = _compare(family, family_cases, best, candidate)
                except Exception as exc:  # noqa: BLE001 - a plan the compiler refuses (registers, shared memory)
                    trials.append({"plan": dataclasses.asdict(candidate), "error": repr(exc)[:300]})
                    continue
                finally:
                    plans.set_plan(family, None)
                trials.append({"plan": dataclasses.asdict(candidate), "ms": ms, "current_ms": current_ms,
                               "same_bits": same})
                all_same &= same
                if same and ms < current_ms * 0.97:  # a 3 % margin keeps noise from picking plans
                    best = candidate
        plans.set_plan(family, best)
        best_ms, best_times = _time_family(family_cases)
        plans.set_plan(family, None)
        shipped_ms, shipped_times = _time_family(family_cases)
        report.check(f"plans: {family} -- every plan gives the shipped plan's bits", all_same)
        for (name, nbytes, _), s_ms, b_ms in zip(family_cases, shipped_times, best_times):
            report.add_bench(f"plans: {family}: {name}", shipped_ms=round(s_ms, 4), best_ms=round(b_ms, 4),
                             shipped_of_copy=round(nbytes / s_ms / 1e9 / copy, 3),
                             best_of_copy=round(nbytes / b_ms / 1e9 / copy, 3))
        changes = {k: v for k, v in dataclasses.asdict(best).items() if v != getattr(plans.DEFAULT, k)}  # vs DEFAULT
        report.add_bench(f"plans: {family} best", speedup=round(shipped_ms / best_ms, 3), changes=changes,
                         seconds=round(time.time() - start, 1))
        print(f"plans.set_plan({family!r}, plans.Plan(**{changes}))", flush=True)
        results["families"][family] = {"shipped_ms": shipped_ms, "best_ms": best_ms, "best": changes,
                                       "trials": trials}
        results["fp8train_plans"] = plans.env_spec({f: dataclasses.replace(plans.DEFAULT, **{
            k: tuple(v) if isinstance(v, list) else v for k, v in r["best"].items()})
            for f, r in results["families"].items()})
        out.mkdir(parents=True, exist_ok=True)
        (out / "plans-sweep.json").write_text(json.dumps(results, indent=1, default=str))
    if results["families"]:
        print(f"FP8TRAIN_PLANS={results['fp8train_plans']}", flush=True)  # the best plans, for an A/B run
