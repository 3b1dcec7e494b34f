"""GPU checks and benchmarks of the Triton quantizers (fp8train.kernels.quantize) against the torch reference.

    python benchmarks/gpu_suite.py --only quant

Checks (random bf16 inputs, odd row counts included): 1x16 E4M3 with bf16 amax and per-tensor E4M3/E5M2 (+ the
transposed copy) give the reference's amax exactly and the same FP8 data (at most one FP8 step apart, where an
fp32 rounding of the scale could differ); no recompilation for new row counts.
Benchmarks: median time (triton.testing.do_bench) and effective TB/s = (bytes read once + bytes written once) /
time, next to a device copy (``torch.empty_like(x).copy_(x)``) measured in the same run.

The helpers here (``bench_ms``, ``copy_tbps``, ``fp8_steps``, ``compiled_variants``) are shared with ops.py.
"""

from __future__ import annotations

import torch

SHAPES = [(4095, 4096), (8192, 11008), (2, 1023, 4096)]
BENCH_SHAPES = [(4096, 4096), (8192, 11008)]


# -- shared helpers -----------------------------------------------------------------------------------------

def bench_ms(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def event_times_ms(step, iters: int, warmup: int) -> list[float]:
    """CUDA-event times of ``iters`` calls of ``step`` (each synchronized), after ``warmup`` untimed calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def back_to_back_ms(step, n: int) -> float:
    """Mean CUDA-event time of ``n`` calls of ``step`` queued back to back (one event pair around them all, one
    synchronization at the end): GPU time where the host keeps ahead of the GPU."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(n):
        step()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / n


def tiny_llama(seed: int = 0, kv_heads: int = 4):
    """A 2-layer Llama (hidden 256, 4 heads) on the GPU with SDPA attention, for training checks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    with torch.device("cuda"):
        return LlamaForCausalLM(config)


def copy_tbps(x: torch.Tensor) -> float:
    ms = bench_ms(lambda: torch.empty_like(x).copy_(x))
    return 2 * x.numel() * x.element_size() / ms / 1e9


def tbps(nbytes: float, ms: float) -> float:
    return nbytes / ms / 1e9


def fp8_steps(got: torch.Tensor, ref: torch.Tensor, fmt) -> tuple[float, float]:
    """(fraction of bit-identical elements, largest difference in FP8 steps of the reference value)."""
    a, b = got.float(), ref.float()
    same = (got.view(torch.uint8) == ref.view(torch.uint8)) | (torch.isnan(a) & torch.isnan(b))
    steps = (a - b).abs() / fmt.quantum(b).float()
    steps = torch.where(same, torch.zeros_like(steps), steps)
    return float(same.float().mean()), float(steps.max()) if steps.numel() else 0.0


def max_rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (float64)."""
    g, r = got.double(), ref.double()
    return float((g - r).abs().max() / r.abs().max().clamp_min(1e-30))


def ulp_ok(got: torch.Tensor, ref: torch.Tensor, ulps: float = 1.0) -> tuple[bool, float]:
    """Elementwise within ``ulps`` units of the output dtype's precision (relative), plus a tiny absolute floor."""
    eps = torch.finfo(ref.dtype).eps if ref.dtype.is_floating_point else 0.0
    g, r = got.double(), ref.double()
    err = (g - r).abs()
    tol = ulps * eps * r.abs() + 1e-6 * r.abs().max()
    worst = float((err / (eps * r.abs() + 1e-30)).max())
    return bool((err <= tol).all()), worst


def compiled_variants(kernel) -> int:
    """How many compiled specialisations a Triton kernel has (to detect recompiles)."""
    try:
        return sum(len(cache[0]) for cache in kernel.device_caches.values())
    except Exception:  # noqa: BLE001 - internal API; report -1 rather than fail
        return -1


def bf16_input(shape, seed=0, device="cuda") -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(shape, generator=gen, device=device) * torch.exp(torch.randn(shape, generator=gen, device=device))
    return x.to(torch.bfloat16)


# -- checks and benchmarks ----------------------------------------------------------------------------------

def run(report) -> None:
    from fp8train import mixed_granularity as mg
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import force_reference
    from fp8train.kernels import quantize as kq
    from fp8train.quant import quantize

    if not torch.cuda.is_available():
        report.check("quant: CUDA available", False, detail="no GPU")
        return
    torch.manual_seed(0)
    for fmt in (E4M3, E5M2):  # one-pass per-tensor dequantization == the torch reference, bit for bit
        q = quantize(bf16_input((4095, 4096)), fmt, "tensor")
        for dtype in (torch.bfloat16, torch.float32):
            got = q.dequantize(dtype)
            with force_reference():
                ref = q.dequantize(dtype)
            report.check(f"quant: per-tensor {fmt.name} dequantize -> {str(dtype)[6:]} kernel == reference",
                         torch.equal(got, ref))
    for shape in SHAPES:
        x = bf16_input(shape)
        # 1x16 groups, bf16 rounded-up amax (what save_for_nonlinear stores)
        q = kq.quantize_groups(x, E4M3, 16, torch.bfloat16)
        r = quantize(x, E4M3, "1x16", scale_dtype=torch.bfloat16)  # nonfinite="raise": the pure torch path
        same, steps = fp8_steps(q.data, r.data, E4M3)
        report.check(f"quant: 1x16 E4M3 bf16-amax {shape}", torch.equal(q.amax, r.amax) and steps <= 1,
                     amax_equal=torch.equal(q.amax, r.amax), data_identical=round(same, 6), max_steps=steps)
        q = kq.quantize_groups(x, E4M3, 128, torch.float32)
        r = quantize(x, E4M3, "1x128")
        same, steps = fp8_steps(q.data, r.data, E4M3)
        report.check(f"quant: 1x128 E4M3 fp32-amax {shape}", torch.equal(q.amax, r.amax) and steps <= 1,
                     data_identical=round(same, 6), max_steps=steps)
        for fmt in (E4M3, E5M2):
            q, data_t = kq.quantize_tensorwise(x, fmt, with_transpose=True)
            r = quantize(x, fmt, "tensor")
            same, steps = fp8_steps(q.data, r.data, fmt)
            same_t, steps_t = fp8_steps(data_t, r.data.reshape(-1, shape[-1]).t(), fmt)
            # the kernel's stored GEMM scale must be what torch computes from the amax, bit for bit
            report.check(f"quant: per-tensor {fmt.name} scale_hint == amax / fmt.max {shape}",
                         q.scale_hint is not None and torch.equal(q.scale_hint, q.amax.float() / fmt.max))
            report.check(f"quant: per-tensor {fmt.name} + transpose {shape}",
                         torch.equal(q.amax, r.amax) and steps <= 1 and steps_t <= 1,
                         amax_equal=torch.equal(q.amax, r.amax), data_identical=round(same, 6), max_steps=steps,
                         transposed_identical=round(same_t, 6), transposed_max_steps=steps_t)
            # float32 inputs with a given amax: the backward pass's weight re-quantization (a float32 master
            # weight's transposed copy once came out scrambled while bf16 inputs were right)
            x32 = x.float() * 0.37
            amax = x32.abs().max()
            q, data_t = kq.quantize_tensorwise(x32, fmt, amax=amax, with_transpose=True)
            r = quantize(x32, fmt, "tensor", amax=amax)
            same, steps = fp8_steps(q.data, r.data, fmt)
            same_t, steps_t = fp8_steps(data_t, r.data.reshape(-1, shape[-1]).t(), fmt)
            report.check(f"quant: per-tensor {fmt.name} float32 input, given amax, + transpose {shape}",
                         steps <= 1 and steps_t <= 1, data_identical=round(same, 6), max_steps=steps,
                         transposed_identical=round(same_t, 6), transposed_max_steps=steps_t)
        # the policy functions dispatch to the kernels on CUDA and agree with the reference
        with force_reference():
            ref_copy = mg.save_for_nonlinear(x)
        got = mg.save_for_nonlinear(x)
        same, steps = fp8_steps(got.data, ref_copy.data, E4M3)
        report.check(f"quant: save_for_nonlinear kernel == reference {shape}",
                     torch.equal(got.amax, ref_copy.amax) and steps <= 1, data_identical=round(same, 6))

    # non-finite values propagate (no exception, no finite wrong value)
    x = bf16_input((64, 256))
    x[3, 17] = float("nan")
    x[9, 200] = float("inf")
    deq = kq.quantize_groups(x, E4M3, 16, torch.bfloat16).dequantize().float()
    report.check("quant: NaN/inf poison only their 1x16 group", bool(deq[3, 16:32].isnan().all())
                 and bool((~deq[9, 192:208].isfinite()).all()) and int((~deq.isfinite()).sum()) == 32)
    report.check("quant: per-tensor amax of a NaN tensor is NaN",
                 bool(kq.quantize_tensorwise(x, E4M3).amax.isnan()))

    # new row counts do not recompile
    before = {k: compiled_variants(k) for k in (kq._quantize_groups_kernel, kq._amax_partials_kernel,
                                                 kq._quantize_tensorwise_kernel)}
    for rows in (1, 17, 1000, 4097):
        y = bf16_input((rows, 4096), seed=rows)
        kq.quantize_groups(y, E4M3, 16, torch.bfloat16)
        kq.quantize_tensorwise(y, E4M3, with_transpose=True)
    after = {k: compiled_variants(k) for k in before}
    grew = {k.fn.__name__: after[k] - before[k] for k in before if after[k] != before[k]}
    report.check("quant: no recompiles for new row counts", not grew, new_variants=grew)

    # benchmarks
    for shape in BENCH_SHAPES:
        x = bf16_input(shape)
        n = x.numel()
        copy = copy_tbps(x)
        ms = bench_ms(lambda: kq.quantize_groups(x, E4M3, 16, torch.bfloat16))
        ref_ms = bench_ms(lambda: quantize(x, E4M3, "1x16", scale_dtype=torch.bfloat16))
        nbytes = 2 * n + n + n // 16 * 2
        report.add_bench(f"quant: 1x16 E4M3 {shape}", ms=round(ms, 4), tbps=round(tbps(nbytes, ms), 3),
                         copy_tbps=round(copy, 3), of_copy=round(tbps(nbytes, ms) / copy, 3),
                         torch_ref_ms=round(ref_ms, 4), speedup=round(ref_ms / ms, 2))
        for transpose in (False, True):
            ms = bench_ms(lambda: kq.quantize_tensorwise(x, E4M3, with_transpose=transpose))
            ref_ms = bench_ms(lambda: quantize(x, E4M3, "tensor"))
            nbytes = 2 * n + n * (2 if transpose else 1)
            report.add_bench(f"quant: per-tensor E4M3{' + transpose' if transpose else ''} {shape}",
                             ms=round(ms, 4), tbps=round(tbps(nbytes, ms), 3), copy_tbps=round(copy, 3),
                             of_copy=round(tbps(nbytes, ms) / copy, 3), torch_ref_ms=round(ref_ms, 4),
                             speedup=round(ref_ms / ms, 2),
                             note="two passes over x (amax, then scale); effective bytes count x once")
        amax = x.float().abs().amax()
        ms = bench_ms(lambda: kq.quantize_tensorwise(x, E4M3, amax=amax))
        report.add_bench(f"quant: per-tensor E4M3 given amax {shape}", ms=round(ms, 4),
                         tbps=round(tbps(3 * n, ms), 3), copy_tbps=round(copy, 3),
                         of_copy=round(tbps(3 * n, ms) / copy, 3))
    _weight_copies(report)


def _weight_copies(report) -> None:
    """The batched weight quantizer (kernels/weight_copies.py) on the 953M model's 112 linear weights: same bits
    as quantize_tensorwise per weight, and its time against the per-weight launches it replaces (per
    micro-batch: amax + row-major pass in forward, transposed pass with the saved amax in backward)."""
    from fp8train.formats import E4M3
    from fp8train.kernels import quantize as kq
    from fp8train.kernels.weight_copies import WeightBuffers, quantize_weights

    hidden, ffn = 2048, 5632
    shapes = [(hidden, hidden)] * 4 + [(ffn, hidden)] * 2 + [(hidden, ffn)]
    weights = [bf16_input(s, seed=i) * 0.02 for i, s in enumerate(shapes * 16)]
    buffers = [WeightBuffers(w.shape, w.device) for w in weights]
    quantize_weights(weights, buffers)
    bad = []
    for i, (w, b) in enumerate(zip(weights, buffers)):
        q, data_t = kq.quantize_tensorwise(w, E4M3, with_transpose=True)
        same = (torch.equal(b.amax, q.amax) and torch.equal(b.scale, q.scale_hint)
                and torch.equal(b.data.view(torch.uint8), q.data.view(torch.uint8))
                and torch.equal(b.data_t.view(torch.uint8), data_t.view(torch.uint8)))
        if not same:
            bad.append(i)
    report.check("quant: batched weight copies == per-weight quantize_tensorwise (112 weights of the 953M model)",
                 not bad, mismatched=bad[:8])

    def per_weight():
        for w in weights:
            q = kq.quantize_tensorwise(w, E4M3)
            kq.quantize_tensorwise(w, E4M3, amax=q.amax, with_transpose=True, write_rowmajor=False)

    batched_ms = bench_ms(lambda: quantize_weights(weights, buffers))
    per_weight_ms = bench_ms(per_weight)
    given = [w.float().abs().amax() for w in weights]  # as fp8train.AdamW publishes them
    quantize_weights(weights, buffers, amaxes=given)
    same = all(torch.equal(b.data_t.view(torch.uint8), kq.quantize_tensorwise(w, E4M3, with_transpose=True)[1]
                           .view(torch.uint8)) for w, b in list(zip(weights, buffers))[:7])
    given_ms = bench_ms(lambda: quantize_weights(weights, buffers, amaxes=given))
    report.add_bench("quant: 112 weights, both FP8 layouts, published amaxes (no amax pass)", ms=round(given_ms, 4),
                     same_bits=same)
    # tile candidates (rows, cols, warps): same bits whatever the tile; the best one goes into the quantize plan
    for tile in ((64, 128, 8), (128, 128, 8), (128, 64, 4), (64, 64, 4), (32, 128, 4), (128, 256, 8), (32, 64, 4)):
        quantize_weights(weights, buffers, tile=tile)
        same = all(torch.equal(b.data_t.view(torch.uint8), kq.quantize_tensorwise(w, E4M3, with_transpose=True)[1]
                               .view(torch.uint8)) for w, b in list(zip(weights, buffers))[:7])
        ms = bench_ms(lambda: quantize_weights(weights, buffers, tile=tile))
        report.add_bench(f"quant: 112 weights, both FP8 layouts, tile {tile}", ms=round(ms, 4), same_bits=same)
    nbytes = sum(3 * w.numel() for w in weights) + sum(2 * w.numel() for w in weights)  # amax read + read + 2 writes
    report.add_bench("quant: 112 weights of the 953M model, both FP8 layouts", batched_ms=round(batched_ms, 4),
                     per_weight_ms=round(per_weight_ms, 4), speedup=round(per_weight_ms / batched_ms, 2),
                     batched_tbps=round(tbps(nbytes, batched_ms), 3), copy_tbps=round(copy_tbps(weights[4]), 3))
