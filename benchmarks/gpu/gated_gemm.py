"""GPU area "gated_gemm": the FP8 GEMMs with the gated product in their epilogue (fp8train.kernels.gated_projection).

    python benchmarks/gpu_suite.py --only gated_gemm

Checks, against the separate ops the MLP runs without them (two _scaled_mm + the one-pass gated-product kernels
forward; _scaled_mm + the gated backward kernel backward), over calls that take every branch of the
predicted-scale repair (first call, kept, 4x overflow, 1/64 collapse, NaN prediction):
* h (per-tensor E4M3, row-major and transposed) within two FP8 steps, its amax within 2^-7; the gate/up 1x16
  copies within two steps (the GEMMs sum in another order, which can move a bf16 rounding); the predictions;
* dgate / dup (per-tensor E5M2 + transposes) as the ops' own checks (benchmarks/gpu/ops.py);
* a 2-layer Llama trained 30 steps with coat-lean, fused vs not, from the same weights and batches: losses agree.
Benchmarks: the fused ops against the separate ones at the 953M (8192 and 32768 tokens) and 7B (4096 tokens)
shapes, with TFLOP/s; with ``GATED_GEMM_SWEEP=1`` first a sweep of tiles (GemmTile) for both kernels on the 953M
model's MLP shapes (~40 s), whose fastest then run the benchmarks (session 10's sweeps: results/*-session10-*).
"""

from __future__ import annotations

import os

import torch

from gpu.ops import _check_tensorwise, _check_tensorwise_grads
from gpu.quant import bench_ms, bf16_input, fp8_steps, max_rel, tiny_llama

# (block_m, block_n, block_k, stages, warps, persistent, warp_specialize); group_m 8 throughout
FORWARD_CANDIDATES = [(128, 128, 128, 3, 8, True, False), (128, 64, 128, 3, 8, False, False),
                      (128, 64, 128, 4, 8, False, False), (128, 64, 128, 4, 8, True, False),
                      (64, 64, 128, 4, 4, False, False), (128, 128, 128, 3, 8, False, False)]
BACKWARD_CANDIDATES = [(128, 64, 128, 4, 4, False, False), (64, 128, 128, 4, 4, False, False),
                       (128, 64, 128, 4, 8, False, False), (64, 64, 128, 4, 4, False, False),
                       (64, 128, 128, 3, 4, False, False), (128, 128, 128, 4, 8, False, False)]


def _setup(M, K, N, seed=0):
    """(recipe without the fused GEMMs, x, W_gate, W_up, W_down, dout): bf16 operands at the given shape."""
    recipe = _recipe(False)
    x = bf16_input((M, K), seed=seed)
    w_gate = (bf16_input((N, K), seed=seed + 1).float() * 0.02).to(torch.bfloat16)
    w_up = (bf16_input((N, K), seed=seed + 2).float() * 0.02).to(torch.bfloat16)
    w_down = (bf16_input((K, N), seed=seed + 3).float() * 0.02).to(torch.bfloat16)
    dout = bf16_input((M, K), seed=seed + 4)
    return recipe, x, w_gate, w_up, w_down, dout


def _recipe(fused: bool):
    from fp8train.recipes import Recipe

    return Recipe.named("coat-lean").replace(gated_gemm=fused)


def _forward(recipe, x_in, w_gate, w_up, prediction):
    from fp8train.nn.gated_projection import gated_projection_forward

    return gated_projection_forward(x_in, w_gate, w_up, "silu", recipe=recipe, out_dtype=torch.bfloat16,
                                    prediction=prediction, output_transpose=True)


def _backward(recipe, dout, saved_down, w_down, gated, prediction, needs_weight_grad=True):
    from fp8train.nn.gated_projection import gated_projection_backward

    return gated_projection_backward(dout, saved_down, w_down, gated, recipe=recipe, quantize_grads=True,
                                     output_transpose=True, prediction=prediction,
                                     needs_weight_grad=needs_weight_grad)


def _check_copies(report, name, got, ref):
    from fp8train.formats import E4M3

    worst_steps, worst_amax = 0.0, 0.0
    for a, b in ((got.gate, ref.gate), (got.up, ref.up)):
        worst_steps = max(worst_steps, fp8_steps(a.data, b.data, E4M3)[1])
        worst_amax = max(worst_amax, max_rel(a.amax.float(), b.amax.float()))
    report.check(name, worst_steps <= 2 and worst_amax <= 2**-7, max_steps=worst_steps, amax_rel=worst_amax)


def check_against_separate_ops(report, shapes):
    from fp8train.delayed_scaling import every_branch, new_prediction
    from fp8train.nn.linear import fp8_linear_forward, quantize_linear_input

    for M, K, N in shapes:
        recipe, x, w_gate, w_up, w_down, dout0 = _setup(M, K, N)
        pred, pred_r = new_prediction(3, "cuda"), new_prediction(3, "cuda")
        for step, factor in every_branch(pred, pred_r):
            x_in = quantize_linear_input((x.float() * factor).to(torch.bfloat16), recipe)
            got = _forward(_recipe(True), x_in, w_gate, w_up, pred[0:1])
            ref = _forward(_recipe(False), x_in, w_gate, w_up, pred_r[0:1])
            tag = f"{M}x{K}->{N} call {step}"
            _check_tensorwise(report, f"gated_gemm: fwd E4M3 h {tag}", (got[0].q, got[0].data_t),
                              (ref[0].q, ref[0].data_t))
            _check_copies(report, f"gated_gemm: fwd gate/up 1x16 copies {tag}", got[1], ref[1])
            same_x = got[2].x.data.data_ptr() == ref[2].x.data.data_ptr() and torch.equal(got[3], ref[3])
            report.check(f"gated_gemm: fwd saves what the separate ops save {tag}", same_x)
            _, saved_down = fp8_linear_forward(ref[0], w_down, recipe=recipe, out_dtype=torch.bfloat16)
            dout = (dout0.float() * factor).to(torch.bfloat16)
            got = _backward(_recipe(True), dout, saved_down, w_down, ref[1], pred[1:3])
            ref_b = _backward(_recipe(False), dout, saved_down, w_down, ref[1], pred_r[1:3])
            _check_tensorwise_grads(report, f"gated_gemm: bwd E5M2 dgate, dup {tag}",
                                    [(g.q, g.data_t) for g in got[:2]], [(g.q, g.data_t) for g in ref_b[:2]])
            rel = max_rel(got[2], ref_b[2])
            report.check(f"gated_gemm: bwd down_proj weight gradient {tag}", rel == 0.0, max_rel=rel)
            rel = max_rel(pred, pred_r)
            report.check(f"gated_gemm: predictions after call {tag}", rel <= 2**-7, max_rel=rel,
                         fused=pred.tolist(), separate=pred_r.tolist())


def check_training(report, steps: int = 30):
    """coat-lean on a 2-layer Llama: the same 30 steps with and without the fused GEMMs."""
    import copy

    import fp8train

    template = tiny_llama().to(torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batches = [torch.randint(0, 512, (4, 256), device="cuda", generator=gen) for _ in range(steps)]
    from fp8train.kernels import gated_projection as kernel

    losses, calls = {}, {True: [0, 0], False: [0, 0]}
    originals = kernel.gated_projection_forward, kernel.gated_projection_backward

    def counted(index, fn):
        def wrapper(*args, **kwargs):
            calls[current][index] += 1
            return fn(*args, **kwargs)
        return wrapper

    kernel.gated_projection_forward, kernel.gated_projection_backward = (counted(i, f) for i, f in enumerate(originals))
    try:
        for current in (True, False):
            model = fp8train.convert(copy.deepcopy(template), _recipe(current))
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
            losses[current] = []
            for ids in batches:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses[current].append(float(loss.detach()))
    finally:
        kernel.gated_projection_forward, kernel.gated_projection_backward = originals
    report.check("gated_gemm: the MLPs ran the fused kernels (and only with Recipe.gated_gemm)",
                 calls[True] == [2 * steps, 2 * steps] and calls[False] == [0, 0], calls_fused=calls[True],
                 calls_separate=calls[False])
    first, last = losses[True][0], losses[True][-1]
    gap = abs(losses[True][-1] - losses[False][-1]) / losses[False][-1]
    report.check("gated_gemm: 2-layer Llama, 30 coat-lean steps, fused vs separate ops",
                 gap <= 0.01 and last < first, final_loss_fused=round(losses[True][-1], 5),
                 final_loss_separate=round(losses[False][-1], 5), rel_gap=round(gap, 6), first_loss=round(first, 5))


def _tflops(flops, ms):
    return round(flops / ms / 1e9, 1)


def sweep(report, M=8192, K=2048, N=5632):
    """Time each candidate tile of both kernels (kernel calls only); keep the fastest for the benchmarks."""
    from fp8train.formats import E5M2
    from fp8train.kernels import gated_projection as kernel
    from fp8train.nn.linear import fp8_weight, quantize_linear_input, quantize_output_grad

    recipe, x, w_gate, w_up, w_down, dout = _setup(M, K, N)
    x_in = quantize_linear_input(x, recipe)
    wg, wu, wd = (fp8_weight(w, recipe, transpose=True) for w in (w_gate, w_up, w_down))
    scales = torch.ones(3, device="cuda")
    pred = torch.zeros(3, device="cuda")
    _, gated, _, _ = _forward(recipe, x_in, w_gate, w_up, torch.zeros(1, device="cuda"))
    dy = quantize_output_grad(dout, recipe, transpose=False).q
    w_t = wd.data_t if wd.data_t is not None else wd.q.data.t().contiguous()
    copies = ((gated.gate.data, gated.gate.amax), (gated.up.data, gated.up.amax))
    best = {}
    for direction, candidates in (("forward", FORWARD_CANDIDATES), ("backward", BACKWARD_CANDIDATES)):
        flops = 2 * M * K * N * (2 if direction == "forward" else 1)
        results = []
        for choice in candidates:
            t = kernel.GemmTile(*choice[:5], persistent=choice[5], warp_specialize=choice[6])
            kernel.set_tile(direction, t)
            name = (f"gated_gemm: sweep {direction} {M}x{K}->{N} tile {t.block_m}x{t.block_n}x{t.block_k} "
                    f"s{t.stages} w{t.warps}{' persistent' if t.persistent else ''}"
                    f"{' warp-specialized' if t.warp_specialize else ''}")
            pred.fill_(0.0)
            if direction == "forward":
                def call(fast=False):
                    return kernel.gated_projection_forward(x_in.q.data, wg.q.data, wu.q.data, scales, torch.bfloat16,
                                                           "silu", pred[0:1], True, fast)
            else:
                def call(fast=False):
                    return kernel.gated_projection_backward(dy.data, w_t, scales, copies[0], copies[1],
                                                            torch.bfloat16, "silu", E5M2, pred[1:3], True, fast)
            try:
                call()
                call()  # the second call sets a prediction that then holds
                ms = bench_ms(call)
                call(True)
                fast_ms = bench_ms(lambda: call(True))
            except Exception as error:  # noqa: BLE001 - a tile that does not fit (shared memory) is a result
                report.add_bench(name, error=str(error)[:200])
                continue
            results.append((ms, t))
            report.add_bench(name, ms=round(ms, 4), tflops=_tflops(flops, ms), fast_accumulation_ms=round(fast_ms, 4))
        kernel.set_tile(direction, None)
        if results:
            ms, t = min(results, key=lambda r: r[0])
            best[direction] = t
            report.add_bench(f"gated_gemm: sweep {direction} best", tile=str(t), ms=round(ms, 4),
                             shipped=str(kernel.TILES[direction]))
    return best


def bench(report, best):
    """The fused ops (best tiles of the sweep) against the separate ops, at the nn level (what FlowMLP calls)."""
    from fp8train.kernels import gated_projection as kernel
    from fp8train.nn.linear import fp8_linear_forward, quantize_linear_input

    for direction, t in best.items():
        kernel.set_tile(direction, t)
    for M, K, N, label in ((8192, 2048, 5632, "953M b4"), (32768, 2048, 5632, "953M b16"),
                           (4096, 4096, 11008, "7B b2")):
        recipe, x, w_gate, w_up, w_down, dout = _setup(M, K, N)
        x_in = quantize_linear_input(x, recipe)
        pred = torch.zeros(3, device="cuda")
        for fused in (True, False):  # warm-up: the second call's prediction holds
            for _ in range(2):
                out = _forward(_recipe(fused), x_in, w_gate, w_up, pred[0:1])
        fwd = {f: bench_ms(lambda: _forward(_recipe(f), x_in, w_gate, w_up, pred[0:1]))
               for f in (True, False)}
        gemms = bench_ms(lambda: [fp8_linear_forward(x_in, w, recipe=recipe, out_dtype=torch.bfloat16)
                                  for w in (w_gate, w_up)])
        report.add_bench(f"gated_gemm: fwd gate/up GEMMs + gated product {label} ({M}x{K}->2x{N})",
                         fused_ms=round(fwd[True], 4), separate_ms=round(fwd[False], 4),
                         separate_gemms_only_ms=round(gemms, 4), gemms_only_tflops=_tflops(4 * M * K * N, gemms),
                         speedup=round(fwd[False] / fwd[True], 3),
                         fused_tflops=_tflops(4 * M * K * N, fwd[True]),
                         separate_tflops=_tflops(4 * M * K * N, fwd[False]))
        _, saved_down = fp8_linear_forward(out[0], w_down, recipe=recipe, out_dtype=torch.bfloat16)
        for fused in (True, False):
            for _ in range(2):
                _backward(_recipe(fused), dout, saved_down, w_down, out[1], pred[1:3], False)
        bwd = {f: bench_ms(lambda: _backward(_recipe(f), dout, saved_down, w_down, out[1], pred[1:3], False))
               for f in (True, False)}
        report.add_bench(f"gated_gemm: bwd dh GEMM + gated backward {label} ({M}x{K}->{N}, no wgrad)",
                         fused_ms=round(bwd[True], 4), separate_ms=round(bwd[False], 4),
                         speedup=round(bwd[False] / bwd[True], 3),
                         fused_tflops=_tflops(2 * M * K * N, bwd[True]),
                         separate_tflops=_tflops(2 * M * K * N, bwd[False]))
    for direction in best:
        kernel.set_tile(direction, None)


def run(report) -> None:
    if not torch.cuda.is_available():
        report.check("gated_gemm: CUDA available", False, detail="no GPU")
        return
    check_against_separate_ops(report, [(8192, 2048, 5632), (1000, 272, 176)])
    check_training(report)
    best = sweep(report) if os.environ.get("GATED_GEMM_SWEEP") == "1" else {}
    bench(report, best)
