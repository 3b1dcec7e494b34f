"""GPU checks and benchmark of fp8train.AdamW's fused Triton kernel (run by benchmarks/gpu_suite.py, ~60 s).

Checks (kernel ``fused=True`` against the torch reference ``fused=False``, both on the GPU, same gradients):
  * free-running 100 steps on odd shapes: decoded moments within 5 % (L2), parameters within 1e-6 (fp32 states),
    1e-4 (plain) or 1e-3 (dre: the kernel's exp2/log2 flip ~1e-4 of the codes per step to a neighbour, and
    trajectories drift apart from there);
  * 100 steps with the moments re-synced from the reference after each step: fp32 parameters within 1e-6
    relative (L2) -- the parameter update itself;
  * one step from identical state: every FP8 code equal or one FP8 step apart where the group's k agrees, amax
    within 1e-6, k equal for >= 99 % of groups;
  for dre/plain x E4M3/E5M2 x fp32/bf16 parameters, plus fp32 states, mixed formats and bf16 stochastic rounding;
  * NaN/inf gradients: the same elements are skipped, states stay finite;
  * stochastic rounding: unbiased mean on a bf16 parameter that round-to-nearest could not move.
Benchmark: optimizer step on the 953M Llama's parameters (fp32 params and grads) against
torch.optim.AdamW(fused=True) with fp32 states: median ms, ratio, bytes/param of the state.
Tile sweep (``AdamW.kernel_tile``: elements per program x warps) for DRE with fp32 and with bf16 + stochastic
rounding parameters: ms per tile, and a check that every tile gives the default tile's bits.
Published weight amax (fp8train/nn/weight_amax.py; checks ``optim/published-weight-amax ...``): the kernel's amax
equals max |p| of the written parameters exactly (bf16 + stochastic rounding and fp32 parameters in one optimizer);
a converted tiny Llama trains with the same losses, gradients and parameters with publishing on and off (eager and
as a CUDA graph captured before the first step), and its forwards then run no weight amax pass; the 953M step is
timed with publishing on and off (GPU ms with the host run ahead, and host us per step).
"""

from __future__ import annotations

import math
import time

import torch

from fp8train.formats import E4M3, E5M2
from fp8train.optim import AdamW
from fp8train.optim import moment_storage as storage
from gpu.quant import back_to_back_ms

DEVICE = "cuda"  # a CPU dry run of the checks: DEVICE = "cpu" with TRITON_INTERPRET=1 (tiny shapes, few steps)
CHECK_STEPS = 100
CHECK_SHAPES = [(3, 200), (300,), (), (2, 3, 130), (256, 512), (1,), (17, 1000), (64, 128), (5, 2048)]


def _params(shapes, dtype, seed):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, device=DEVICE).to(dtype)) for s in shapes]


def _set_grads(pairs, step, dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(1000 + step)
    for p, q in pairs:
        scale = 10.0 ** torch.randint(-3, 2, p.shape, generator=gen, device=DEVICE)
        g = (torch.randn(p.shape, generator=gen, device=DEVICE) * scale).to(dtype)
        p.grad, q.grad = g, g.clone()


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _sync_moments(kernel, ref, pairs):
    for p, q in pairs:
        for key, value in ref.state[q].items():
            if key != "step":
                kernel.state[p][key].copy_(value)


def _check_config(report, states, m_format, v_format, dtype, master):
    steps = CHECK_STEPS
    name = f"optim/{states}-{m_format}-{v_format}-{str(dtype).split('.')[-1]}" + (f"-{master}" if master else "")
    options = dict(lr=1e-3, weight_decay=0.01, states=states, m_format=m_format, v_format=v_format,
                   master_weights=master)
    moments = (("exp_avg", m_format), ("exp_avg_sq", v_format))

    # A. free-running trajectories.  The kernel's exp2/log2 differ from torch's pow by ~1e-6 relative, which moves
    # ~1e-4 of the DRE codes per step to the neighbouring FP8 value; such a flip changes that element's later
    # updates by a few per cent, so DRE trajectories drift apart by ~1e-4 (measured on CPU with a 5e-6 perturbation
    # of pow).  Plain scaling has no transcendental math and stays much closer.
    kernel_params, ref_params = _params(CHECK_SHAPES, dtype, 0), _params(CHECK_SHAPES, dtype, 0)
    kernel, ref = AdamW(kernel_params, fused=True, **options), AdamW(ref_params, fused=False, **options)
    pairs = list(zip(kernel_params, ref_params))
    for step in range(steps):
        _set_grads(pairs, step, dtype)
        kernel.step()
        ref.step()
    param_err = max(_rel(p, q) for p, q in pairs)
    moment_err = max(_rel(storage.decode(kernel.state[p], n, states, f, 128), storage.decode(ref.state[q], n, states, f, 128))
                     for p, q in pairs for n, f in moments)
    if master:  # independent random streams: each element's stochastic rounding differs
        param_tol = 0.05
    elif dtype == torch.bfloat16:
        param_tol = 2.0**-7
    else:
        param_tol = {"fp32": 1e-6, "plain": 1e-4, "dre": 1e-3}[states]
    moment_tol = 1e-5 if states == "fp32" else 0.05
    report.check(f"{name} free-running ({steps} steps)", param_err <= param_tol and moment_err <= moment_tol,
                 param_rel_err=param_err, param_tol=param_tol, moment_rel_err=moment_err, moment_tol=moment_tol)

    # B. the parameter update itself: moments re-synced from the reference after every step, parameters run free
    if not master:
        kernel_params, ref_params = _params(CHECK_SHAPES, dtype, 0), _params(CHECK_SHAPES, dtype, 0)
        kernel, ref = AdamW(kernel_params, fused=True, **options), AdamW(ref_params, fused=False, **options)
        pairs = list(zip(kernel_params, ref_params))
        for step in range(steps):
            _set_grads(pairs, step, dtype)
            kernel.step()
            ref.step()
            _sync_moments(kernel, ref, pairs)
        # relative error of the whole parameter vector; the worst single tensor is reported beside it (a
        # one-element tensor shows a few float32 ulps of FMA-contraction difference as a large relative error)
        param_err = _rel(torch.cat([p.detach().reshape(-1) for p, _ in pairs]),
                         torch.cat([q.detach().reshape(-1) for _, q in pairs]))
        worst_tensor = max(_rel(p, q) for p, q in pairs)
        tol = 1e-6 if dtype == torch.float32 else 2.0**-8
        report.check(f"{name} params after {steps} steps (moments synced)", param_err <= tol, param_rel_err=param_err,
                     worst_tensor_rel_err=worst_tensor, tol=tol)

    # C. one step from identical state: codes at most one FP8 step apart
    for p, q in pairs:
        p.data.copy_(q.data)
    _sync_moments(kernel, ref, pairs)
    _set_grads(pairs, steps, dtype)
    kernel.step()
    ref.step()
    worst_steps, amax_err, k_mismatch, k_total = 0.0, 0.0, 0, 0
    for p, q in pairs:
        for moment, fmt_name in (("exp_avg", m_format), ("exp_avg_sq", v_format)):
            mine, theirs = kernel.state[p], ref.state[q]
            if states == "fp32":
                worst_steps = max(worst_steps, _rel(mine[moment], theirs[moment]))
                continue
            amax_err = max(amax_err, _rel(mine[f"{moment}_amax"], theirs[f"{moment}_amax"]))
            same_k = torch.ones_like(mine[f"{moment}_amax"], dtype=torch.bool)
            if states == "dre":
                same_k = mine[f"{moment}_k"] == theirs[f"{moment}_k"]
                k_mismatch += int((~same_k).sum())
                k_total += same_k.numel()
            fmt = E4M3 if fmt_name == "e4m3" else E5M2
            x, y = mine[moment].double(), theirs[moment].double()
            steps_apart = (x - y).abs() / fmt.quantum(y)
            cols = p.shape[-1] if p.dim() else 1
            group_ok = same_k.repeat_interleave(128, dim=-1)[..., :cols].reshape(p.shape)
            worst_steps = max(worst_steps, float(torch.where(group_ok, steps_apart, 0.0).max()))
    ok = worst_steps <= 1.0 + 1e-9 if states != "fp32" else worst_steps <= 1e-6
    ok = ok and amax_err <= 1e-6 and k_mismatch <= 0.01 * max(k_total, 1)
    report.check(f"{name} one step: codes within one FP8 step", ok, max_fp8_steps_apart=worst_steps,
                 amax_rel_err=amax_err, k_mismatch=k_mismatch, k_groups=k_total)


def _check_nonfinite(report):
    kernel_params, ref_params = _params([(64, 512), (300,)], torch.float32, 1), _params([(64, 512), (300,)], torch.float32, 1)
    kernel, ref = AdamW(kernel_params, fused=True), AdamW(ref_params, fused=False)
    pairs = list(zip(kernel_params, ref_params))
    _set_grads(pairs, 0, torch.float32)
    kernel.step()
    ref.step()
    _set_grads(pairs, 1, torch.float32)
    for p, q in pairs:
        for g in (p.grad, q.grad):
            g.view(-1)[::97] = float("nan")
            g.view(-1)[5] = float("inf")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        kernel.step()
        ref.step()
        n_kernel, n_ref = kernel.nonfinite_skipped(), ref.nonfinite_skipped()
    finite = all(torch.isfinite(storage.decode(kernel.state[p], n, "dre", "e4m3", 128)).all()
                 for p, _ in pairs for n in ("exp_avg", "exp_avg_sq"))
    param_err = max(_rel(p, q) for p, q in pairs)
    report.check("optim/nonfinite grads skipped per element", n_kernel == n_ref > 0 and finite and param_err < 1e-4,
                 skipped_kernel=n_kernel, skipped_ref=n_ref, states_finite=finite, param_rel_err=param_err)


def _check_stochastic_rounding(report):
    p = torch.nn.Parameter(torch.ones(1 << 20, dtype=torch.bfloat16, device=DEVICE))
    opt = AdamW([p], lr=1e-4, weight_decay=0.0, master_weights="bf16_stochastic", fused=True)
    p.grad = torch.ones_like(p)
    opt.step()  # exact fp32 result 1 - 1e-4; bf16 neighbours 1 - 2**-8 and 1
    values = set(p.float().unique().tolist())
    mean = p.float().mean().item()
    # std of the mean: ulp * sqrt(f(1-f)) / sqrt(n), f = 1e-4 / 2**-8
    f = 1e-4 / 2.0**-8
    tol = 5 * 2.0**-8 * math.sqrt(f * (1 - f) / p.numel())
    report.check("optim/bf16 stochastic rounding unbiased", values <= {1.0, 1.0 - 2.0**-8} and
                 abs(mean - (1 - 1e-4)) < tol, mean=mean, expected=1 - 1e-4, tol=tol)


def llama_953m_shapes(hidden=2048, layers=16, ffn=5632, vocab=32000):
    shapes = [(vocab, hidden)]  # embed_tokens
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)] + [(hidden,)] * 2
    shapes += [(hidden,), (vocab, hidden)]  # final norm, untied lm_head
    return shapes


# -- published weight amax ---------------------------------------------------------------------------------------

def _check_published_amax_kernel(report):
    """(a) one optimizer, bf16 params with stochastic rounding and fp32 params (two launches): after each step every
    marked parameter's published amax is exactly max |p| of what the kernel wrote; unmarked ones publish nothing."""
    from fp8train.nn import weight_amax

    shapes = [(2048, 2048), (5632, 2048), (2048, 5632), (512, 2048), (3, 200), (2, 3, 130), (300,), (1,)]
    bf16, fp32 = _params(shapes, torch.bfloat16, 11), _params(shapes, torch.float32, 12)
    marked = bf16[:-1] + fp32[:-1]  # the last of each stays unmarked
    for p in marked:
        weight_amax.want(p)
    opt = AdamW([{"params": bf16, "master_weights": "bf16_stochastic"}, {"params": fp32}], lr=1e-2, fused=True)
    def exact(p):
        got = weight_amax.published_amax(p)
        return got is not None and torch.equal(got, p.detach().abs().amax().float())

    at_construction = all(exact(p) for p in marked)
    mismatches, missing = [], 0
    for step in range(3):
        gen = torch.Generator(device=DEVICE).manual_seed(50 + step)
        for p in bf16 + fp32:
            p.grad = (torch.randn(p.shape, generator=gen, device=DEVICE) * 10.0 ** (step - 2)).to(p.dtype)
        opt.step()
        for p in marked:
            got = weight_amax.published_amax(p)
            if got is None:
                missing += 1
            elif not exact(p):
                mismatches.append((tuple(p.shape), str(p.dtype), float(got), float(p.detach().abs().amax())))
    unmarked_quiet = weight_amax.published_amax(bf16[-1]) is None and weight_amax.published_amax(fp32[-1]) is None
    report.check("optim/published-weight-amax kernel amax exact", at_construction and not mismatches and not missing
                 and unmarked_quiet, at_construction=at_construction, mismatches=mismatches[:5], missing=missing,
                 unmarked_quiet=unmarked_quiet)


def _published_amax_run(enabled: bool, graphed: bool, master: bool):
    """A converted (coat) tiny Llama, 3 optimizer steps: losses, gradients of each step, final parameters and how
    many weight quantizations in forwards ran their own amax pass after the optimizer was built (eager: the 3
    steps; graphed: the warm-up and the capture, the only Python forwards)."""
    import fp8train
    from fp8train.cuda_graphs import GraphedStep
    from fp8train.nn import linear as linear_mod
    from fp8train.nn import weight_amax
    from gpu.quant import tiny_llama

    previous = weight_amax.set_enabled(enabled)
    own_amax = []
    original = linear_mod._quantize

    def spying(x, fmt, granularity, amax=None, transpose=False):
        if isinstance(x, torch.nn.Parameter) and amax is None:
            own_amax.append(1)
        return original(x, fmt, granularity, amax=amax, transpose=transpose)

    linear_mod._quantize = spying
    try:
        model = tiny_llama()
        if master:
            model = model.to(torch.bfloat16)
        model = fp8train.convert(model, recipe="coat")
        opt = AdamW(model.parameters(), lr=3e-3, master_weights="bf16_stochastic" if master else None)
        gen = torch.Generator(device="cuda").manual_seed(5)
        batches = [torch.randint(0, model.config.vocab_size, (2, 128), generator=gen, device="cuda") for _ in range(3)]
        own_amax.clear()
        if graphed:  # captured before the first step: the graph must read the published slots
            step = GraphedStep(model, lambda m, b: m(**b, use_cache=False).loss,
                               {"input_ids": batches[0], "labels": batches[0]})
            for p in model.parameters():  # the capture's gradients are not a training step
                p.grad = None
        losses, grads = [], []
        for ids in batches:
            if graphed:
                loss = step({"input_ids": ids, "labels": ids})
            else:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            losses.append(loss.detach().clone())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad(set_to_none=True)
        return losses, grads, [p.detach().clone() for p in model.parameters()], len(own_amax)
    finally:
        linear_mod._quantize = original
        weight_amax.set_enabled(previous)


def _check_published_amax_training(report):
    """(b) same losses, gradients and parameters with publishing off and on; with it on, forwards compute no weight
    amax (a graph captured before the first step neither: it reads the slots on every replay)."""
    for graphed, master in ((False, False), (False, True), (True, True)):
        off, on = _published_amax_run(False, graphed, master), _published_amax_run(True, graphed, master)
        losses_equal = all(torch.equal(a, b) for a, b in zip(off[0], on[0]))
        grads_equal = all(torch.equal(a, b) for ga, gb in zip(off[1], on[1]) for a, b in zip(ga, gb))
        params_equal = all(torch.equal(a, b) for a, b in zip(off[2], on[2]))
        amax_skipped = on[3] == 0 and off[3] > 0
        label = ("graphed" if graphed else "eager") + (", bf16 params + stochastic rounding" if master else
                                                       ", fp32 params")
        report.check(f"optim/published-weight-amax tiny llama coat same bits ({label})",
                     losses_equal and grads_equal and params_equal and amax_skipped, losses_equal=losses_equal,
                     grads_equal=grads_equal, params_equal=params_equal, own_amax_passes_off=off[3],
                     own_amax_passes_on=on[3], losses=[round(float(x), 6) for x in on[0]])


def _gpu_step_ms(step, n: int = 10) -> tuple[float, float]:
    """``(GPU ms, host us)`` per call of ``step``.  The host part of fp8train.AdamW's step (~6 ms on the H200
    machine) exceeds its kernel time, so do_bench's events would time the host too: here a sleep kernel queued
    first lets the host run ahead, and the events around ``n`` calls see only GPU work."""
    host = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        host.append(time.perf_counter() - start)
    torch.cuda.synchronize()
    host_s = sorted(host)[2]
    torch.cuda._sleep(int((2 * n * host_s + 0.02) * torch.cuda.clock_rate() * 1e6))  # clock_rate: MHz
    return back_to_back_ms(step, n), host_s * 1e6


def _bench_published_amax(report, params, label):
    """(c) the 953M step with publishing off and on for the FP8-linear weights (the 112 decoder-layer matrices):
    GPU time and host time per ``step()`` call (the host's is noisy on shared machines)."""
    from fp8train.nn import weight_amax

    for p in params:
        if p.dim() == 2 and p.shape[0] != 32000:  # not the embedding / lm_head
            weight_amax.want(p)
    master = "bf16_stochastic" if params[0].dtype == torch.bfloat16 else None
    rows = {}
    for enabled in (False, True, False, True):  # twice each, alternating: the second pair is reported
        previous = weight_amax.set_enabled(enabled)
        try:
            opt = AdamW(params, lr=1e-4, master_weights=master)
            opt.step()  # state, compile
            rows[enabled] = (*_gpu_step_ms(opt.step), len(opt._amax_slots))
            del opt
            torch.cuda.empty_cache()
        finally:
            weight_amax.set_enabled(previous)
    (ms_off, host_off, _), (ms_on, host_on, n_slots) = rows[False], rows[True]
    report.add_bench(f"optim/fp8train AdamW dre {label} (953M), published weight amax off", gpu_ms=round(ms_off, 3),
                     host_us_per_step=round(host_off, 1))
    report.add_bench(f"optim/fp8train AdamW dre {label} (953M), published weight amax on", gpu_ms=round(ms_on, 3),
                     host_us_per_step=round(host_on, 1), gpu_ms_vs_off=round(ms_on - ms_off, 3), published=n_slots)


def _bench(report):
    import triton.testing

    shapes = llama_953m_shapes()
    n_params = sum(math.prod(s) for s in shapes)
    params = [torch.nn.Parameter(torch.randn(s, device=DEVICE) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3

    def timed(opt):
        opt.step()  # allocates state, compiles
        torch.cuda.synchronize()
        return triton.testing.do_bench(opt.step, warmup=25, rep=200, return_mode="median")

    torch_opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    baseline_ms = timed(torch_opt)
    del torch_opt
    torch.cuda.empty_cache()
    report.add_bench("optim/torch AdamW fused fp32 states (953M)", ms=round(baseline_ms, 3), bytes_per_param=8.0,
                     n_params=n_params)
    for states, m_format, v_format in (("dre", "e4m3", "e4m3"), ("plain", "e4m3", "e4m3"), ("dre", "e4m3", "e5m2")):
        opt = AdamW(params, lr=1e-4, states=states, m_format=m_format, v_format=v_format)
        ms = timed(opt)
        # bytes moved per step: read p, g, m, v and write p, m, v, plus read + write of the metadata
        traffic = n_params * (4 + 4 + 1 + 1 + 4 + 1 + 1) + 2 * (opt.state_bytes() - 2 * n_params)
        report.add_bench(f"optim/fp8train AdamW {states} {m_format}/{v_format} (953M)", ms=round(ms, 3),
                         ratio_vs_torch_fused=round(ms / baseline_ms, 3), bytes_per_param=round(opt.state_bytes_per_param(), 4),
                         effective_tb_s=round(traffic / ms / 1e9, 3), goal_ratio=1.0)
        if states == "dre" and v_format == "e4m3":
            report.check("optim/dre step time <= torch fused AdamW", ms <= baseline_ms, ms=ms, baseline_ms=baseline_ms)
            report.check("optim/dre state <= 2.1 bytes/param", opt.state_bytes_per_param() <= 2.1,
                         bytes_per_param=opt.state_bytes_per_param())
        del opt
        torch.cuda.empty_cache()
    # bf16 parameters with stochastic rounding (no fp32 master copy)
    bf16 = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in params]
    _bench_published_amax(report, params, "fp32 params")  # marks params' linear weights: after the rows above
    del params
    torch.cuda.empty_cache()
    for p in bf16:
        p.grad = torch.randn_like(p) * 1e-3
    opt = AdamW(bf16, lr=1e-4, master_weights="bf16_stochastic")
    ms = timed(opt)
    report.add_bench("optim/fp8train AdamW dre bf16 params + stochastic rounding (953M)", ms=round(ms, 3),
                     ratio_vs_torch_fused=round(ms / baseline_ms, 3))
    del opt
    torch.cuda.empty_cache()
    _bench_published_amax(report, bf16, "bf16 params + stochastic rounding")


TILES = ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16))


def _bench_tiles(report):
    """Which launch tile runs the step fastest -- the kernel is compute-bound (~3x its memory-traffic floor)."""
    import triton.testing

    shapes = llama_953m_shapes()
    for label, dtype, master in (("fp32 params", torch.float32, None),
                                 ("bf16 params + stochastic rounding", torch.bfloat16, "bf16_stochastic")):
        start = [(torch.randn(s, device=DEVICE) * 0.02).to(dtype) for s in shapes]
        grads = [(torch.randn(s, device=DEVICE) * 1e-3).to(dtype) for s in shapes]
        reference = None
        for tile in (None, *TILES):
            params = [torch.nn.Parameter(p.clone()) for p in start]
            for p, g in zip(params, grads):
                p.grad = g
            opt = AdamW(params, lr=1e-4, master_weights=master)
            opt.kernel_tile = tile
            opt.step()  # state, compile
            torch.cuda.synchronize()
            result = [p.detach().clone() for p in params[:3]]  # one step from the same start
            ms = triton.testing.do_bench(opt.step, warmup=10, rep=100, return_mode="median")
            if reference is None:
                reference = result
                report.add_bench(f"optim/tile default {label} (953M)", ms=round(ms, 3))
            else:
                same = all(torch.equal(a, b) for a, b in zip(result, reference))
                report.add_bench(f"optim/tile {tile[0]}x{tile[1]}w {label} (953M)", ms=round(ms, 3), same_bits=same)
                if not same:
                    report.check(f"optim/tile {tile} gives the default tile's bits ({label})", False)
            del opt, params
            torch.cuda.empty_cache()


def run(report):
    if not torch.cuda.is_available():
        raise RuntimeError("benchmarks/gpu/optim.py needs a CUDA device")
    configs = [(s, m, v, d, None) for s in ("dre", "plain") for m, v in (("e4m3", "e4m3"), ("e5m2", "e5m2"))
               for d in (torch.float32, torch.bfloat16)]
    configs += [("dre", "e4m3", "e5m2", torch.float32, None), ("fp32", "e4m3", "e4m3", torch.float32, None),
                ("dre", "e4m3", "e4m3", torch.bfloat16, "bf16_stochastic")]
    for states, m_format, v_format, dtype, master in configs:
        _check_config(report, states, m_format, v_format, dtype, master)
    _check_nonfinite(report)
    _check_stochastic_rounding(report)
    _check_published_amax_kernel(report)
    _check_published_amax_training(report)
    _bench(report)
    _bench_tiles(report)
