"""Host (CPU) time of the eager path, where eager FP8 training loses its speed.

* checks: kernels launched through fp8train's fast launcher (``fp8train.kernels.launch``) give the same bits as
  through Triton's own path, and repeat launches do not compile again;
* launch overhead: microseconds per launch of a small quantize kernel, Triton's path vs the fast launcher, and
  of ``torch._scaled_mm`` (host time only: the GPU finishes each tiny kernel before the next is launched);
* an eager training step at a tiny sequence length (``HOST_SEQ``, default 128; the 953M model's widths), where
  the GPU waits for the host: wall time per step = host time per step.  bf16 eager, fp8train coat-lean with the
  fast launcher, and without it;
* a cProfile of that step (``HOST_PROFILE=0`` skips it), printed to the log.

Environment: ``HOST_MODEL`` (1b), ``HOST_BATCH`` (1), ``HOST_SEQ`` (128), ``HOST_STEPS`` (10).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import time

import torch


def _per_call_us(fn, calls: int = 2000) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * elapsed / calls


def _check_same_bits(report) -> None:
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import launch
    from fp8train.kernels.quantize import _quantize_tensorwise_kernel, quantize_groups, quantize_tensorwise

    x = torch.randn(1000, 768, device="cuda", dtype=torch.bfloat16) * 3
    results = {}
    for on in (False, True):
        launch.set_enabled(on)
        for _ in range(2):  # the second launch of a specialization is the fast one
            q, data_t = quantize_tensorwise(x, E5M2, with_transpose=True)
            g = quantize_groups(x, E4M3)
        results[on] = (q.data.view(torch.uint8).clone(), data_t.view(torch.uint8).clone(), q.amax.clone(),
                       g.data.view(torch.uint8).clone(), g.amax.clone())
    same = all(torch.equal(a, b) for a, b in zip(results[False], results[True]))
    compiled = sum(len(c[0]) for c in _quantize_tensorwise_kernel.device_caches.values())
    before = compiled
    for rows in (1000, 1003, 64):  # new row counts: no new specialization (M is not specialized)
        quantize_tensorwise(torch.randn(rows, 768, device="cuda", dtype=torch.bfloat16), E5M2, with_transpose=True)
    compiled = sum(len(c[0]) for c in _quantize_tensorwise_kernel.device_caches.values())
    report.check("host/fast-launch-same-bits", same and isinstance(_quantize_tensorwise_kernel, launch.FastKernel),
                 fast_kernel=type(_quantize_tensorwise_kernel).__name__)
    report.check("host/fast-launch-no-recompiles", compiled == before, compiled_before=before, compiled_after=compiled)


def _launch_overhead(report) -> None:
    from fp8train.formats import E4M3
    from fp8train.kernels import launch
    from fp8train.kernels.quantize import quantize_tensorwise
    from fp8train.nn.linear import _scaled_mm_tensorwise

    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    amax = x.abs().amax().float().reshape(1)
    timings = {}
    for on in (False, True):
        launch.set_enabled(on)
        timings["fast" if on else "triton"] = _per_call_us(lambda: quantize_tensorwise(x, E4M3, amax=amax))
    a = torch.randn(16, 64, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(16, 64, device="cuda").to(torch.float8_e4m3fn).t()
    one = torch.ones((), device="cuda")
    timings["scaled_mm"] = _per_call_us(lambda: _scaled_mm_tensorwise(a, one, b, one, torch.bfloat16, False))
    timings["empty"] = _per_call_us(lambda: torch.empty(4096, device="cuda"))
    report.add_bench("host/us-per-call", quantize_triton_path=round(timings["triton"], 1),
                     quantize_fast_launch=round(timings["fast"], 1), scaled_mm=round(timings["scaled_mm"], 1),
                     torch_empty=round(timings["empty"], 1),
                     note="one quantize_tensorwise call (given amax: one Triton launch + host work), host time")


def _step_host_time(report) -> None:
    from fp8train import bench
    from fp8train.kernels import launch

    model, batch = os.environ.get("HOST_MODEL", "1b"), int(os.environ.get("HOST_BATCH", 1))
    seq, steps = int(os.environ.get("HOST_SEQ", 128)), int(os.environ.get("HOST_STEPS", 10))
    for config, fast in (("bf16_eager", True), ("fp8train_coat_lean", True), ("fp8train_coat_lean", False),
                         ("fp8train_coat_lean", True)):
        launch.set_enabled(fast)
        step, _ = bench.make_step(config, model, batch, seq)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        ms = 1000 * (time.perf_counter() - start) / steps
        report.add_bench(f"host/step-ms/{config}{'' if fast else '/triton-launch'}", ms_per_step=round(ms, 1),
                         model=model, batch=batch, seq=seq)
        if config == "fp8train_coat_lean" and fast and os.environ.get("HOST_PROFILE", "1") != "0" \
                and not getattr(report, "_host_profiled", False):
            report._host_profiled = True
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            profiler.disable()
            for key, rows in (("tottime", 70), ("cumtime", 60)):
                out = io.StringIO()
                pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(rows)
                print(f"== host profile of {config} (3 steps, {model} batch {batch} seq {seq}), by {key}\n"
                      + out.getvalue()[-16000:], flush=True)
        del step
        torch.cuda.empty_cache()
    launch.set_enabled(True)


def run(report):
    _check_same_bits(report)
    _launch_overhead(report)
    _step_host_time(report)
