"""GPU checks and numbers for the stability lab (fp8train.lab), ~30-60 s on an H100.

    python benchmarks/gpu_suite.py --only lab

Checks:
  * lab/round-<fmt>: the float32 rounding path (``saturating_round``) on CUDA gives exactly the float64 CPU
    reference (``Minifloat.round``) for values spread over 2^-150..2^127, for E3M4, E2M1, E5M7, E8M3, BF16;
  * lab/scaled-<fmt>-<scaling>: ``simulate_quantize`` on CUDA equals the CPU result for simulated formats
    (same arithmetic: bit-identical required) and, for E4M3/E5M2 (the Triton quantizers of quant.quantize on
    CUDA), agrees on >= 99.9 % of elements and elsewhere by at most one step of the format;
  * lab/kernel-<fmt>-<scaling>-<dtype>: the one-pass Triton kernel (fp8train.kernels.simulate, what
    simulate_quantize runs on CUDA) against the torch path on the same CUDA tensor (``force_reference``): bit-identical
    without scaling; with a scale at most one format step apart (torch on CUDA divides by the scalar max as a
    multiply by its reciprocal, the kernel divides), with the identical fraction reported;
  * lab/bf16-identity-cuda: a micro Llama (eager attention, so that backward has no atomics) trained 5 steps under
    bf16 autocast gives bit-identical losses with the bf16 recipe and with SimulatedFormats(BF16, scaling="none");
  * lab/sharpness-cuda: model_sharpness on CUDA matches last_token_sharpness of the CPU logits to 1e-4.
Benchmarks: rounding throughput (GB/s read+write) of the torch path and of the kernel (per-tensor scale; the
kernel's time includes the torch amax) next to a device copy; training-step time of the "small" preset (34M,
batch 8 x 512, bf16 autocast) for the bf16 recipe and three simulated recipes (kernel on, then off).

Runs on CPU too (smaller sizes, no timing), which is how it was checked before reaching a GPU.
"""

from __future__ import annotations

import time

import torch

FORMATS = ("e3m4", "e2m1", "e5m7", "e8m3", "bf16")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_rounding(report, device, n: int) -> None:
    from fp8train.lab.simulated_linear import parse_simulated_format, saturating_round

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-150, 128, (n,), generator=g).float())
    for spec in FORMATS:
        fmt = parse_simulated_format(spec)
        got = saturating_round(x.to(device), fmt).cpu()
        want = fmt.round(fmt.saturate(x.double())).float()
        same = (got == want) | (torch.isnan(got) & torch.isnan(want))
        report.check(f"lab/round-{spec}", bool(same.all()), mismatches=int((~same).sum()), n=n)


def check_scaled(report, device, shape) -> None:
    from fp8train.lab.simulated_linear import parse_simulated_format, simulate_quantize
    from fp8train.quant import Granularity, expand_to, group_amax

    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape, generator=g))
    for spec in ("e3m4", "e2m1", "e4m3", "e5m2"):
        fmt = parse_simulated_format(spec)
        for scaling in ("tensor", "1x16", "none"):
            for dtype in (torch.float32, torch.bfloat16):
                xd = x.to(dtype)
                got = simulate_quantize(xd.to(device), fmt, scaling).cpu().float()
                want = simulate_quantize(xd, fmt, scaling).float()
                same = got == want
                name = f"lab/scaled-{spec}-{scaling}-{str(dtype)[6:]}"
                if scaling == "none":
                    report.check(name, bool(same.all()), mismatches=int((~same).sum()))
                else:
                    # CUDA divides by a scalar as a multiply by its reciprocal (and the Triton quantizer may
                    # round the scale differently), so x / scale can land on the other side of a rounding tie
                    # than on the CPU: allow one format step, never more
                    g_ = Granularity.parse(scaling)
                    scale = (expand_to(group_amax(want, g_), g_, want.shape) / fmt.max).clamp_min(1e-30)
                    step = fmt.quantum(want / scale).float() * scale
                    worst = float(((got - want).abs() / step).max())
                    frac = float(same.float().mean())
                    report.check(name, worst <= 1.0 + 1e-6, identical=frac, worst_steps=worst)


def check_kernel(report, device, shape) -> None:
    from fp8train.kernels import force_reference
    from fp8train.lab.simulated_linear import parse_simulated_format, simulate_quantize
    from fp8train.quant import Granularity, expand_to, group_amax

    g = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=g) * torch.exp(2 * torch.randn(*shape, generator=g))).to(device)
    x.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), 0.0, -0.0])
    # without a scale: values over every float32 binade, subnormals included (a flush-to-zero would show here)
    wide = torch.randn(*shape, generator=g) * torch.exp2(torch.randint(-150, 128, shape, generator=g).float())
    wide = wide.to(device)
    for spec in ("e3m4", "e2m1", "e4m3", "e5m2", "e8m3", "bf16"):
        fmt = parse_simulated_format(spec)
        for scaling in ("none", "tensor", "1x16", "1x128"):
            for dtype in (torch.float32, torch.bfloat16):
                xd = (wide if scaling == "none" else x).to(dtype)
                got = simulate_quantize(xd, fmt, scaling).float()
                with force_reference():
                    want = simulate_quantize(xd, fmt, scaling).float()
                same = (got == want) | (got.isnan() & want.isnan())
                name = f"lab/kernel-{spec}-{scaling}-{str(dtype)[6:]}"
                if scaling == "none":
                    report.check(name, bool(same.all()), mismatches=int((~same).sum()))
                    continue
                g_ = Granularity.parse(scaling)
                finite = torch.where(want.isfinite(), want, torch.zeros_like(want))
                scale = (expand_to(group_amax(finite, g_), g_, want.shape) / fmt.max).clamp_min(1e-30)
                step = fmt.quantum(finite / scale).float() * scale
                worst = float(torch.where(same, torch.zeros_like(step), (got - want).abs() / step).max())
                report.check(name, worst <= 1.0 + 1e-6, identical=float(same.float().mean()), worst_steps=worst)


def _micro_llama(device, seed=0):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                   tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(device)


def _losses(model, device, steps=5):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(steps):
        ids = torch.randint(0, 256, (8, 129), generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def check_bf16_identity(report, device) -> None:
    import fp8train
    from fp8train import formats
    from fp8train.lab import SimulatedFormats

    plain = _losses(_micro_llama(device), device)
    model = fp8train.convert(_micro_llama(device), recipe=fp8train.Recipe(
        simulate=SimulatedFormats.uniform(formats.BF16, scaling="none")))
    simulated = _losses(model, device)
    report.check(f"lab/bf16-identity-{device.type}", plain == simulated, plain=plain, simulated=simulated)


def check_sharpness(report, device) -> None:
    from fp8train.lab.sharpness import last_token_sharpness, model_sharpness

    model = _micro_llama(device).eval()
    batch = torch.randint(0, 256, (16, 65), generator=torch.Generator().manual_seed(3))
    s = model_sharpness(model, batch, eps=1e-3)
    with torch.no_grad():
        logits = model(input_ids=batch[:, :-1].to(device)).logits[:, -1].float().cpu()
    ref = float(last_token_sharpness(logits, batch[:, -1], 1e-3))
    report.check(f"lab/sharpness-{device.type}", abs(s - ref) <= 1e-4 * max(1.0, abs(ref)), got=s, ref=ref)


def bench_rounding(report, device) -> None:
    from fp8train.lab.simulated_linear import parse_simulated_format, saturating_round
    from gpu.quant import bench_ms, copy_tbps

    x = torch.randn(64 * 2**20, device=device)
    copy = copy_tbps(x)
    for spec in ("e3m4", "e2m1"):
        fmt = parse_simulated_format(spec)
        ms = bench_ms(lambda: saturating_round(x, fmt))
        report.add_bench(f"lab/round-{spec}-64M-fp32", ms=round(ms, 3), gbps=round(8 * x.numel() / ms / 1e6, 1),
                         device_copy_gbps=round(copy * 1e3, 1))
    from fp8train.kernels import force_reference
    from fp8train.lab.simulated_linear import simulate_quantize

    xb = x.bfloat16()
    for spec in ("e3m4", "e2m1"):
        for scaling in ("none", "tensor"):
            ms = bench_ms(lambda: simulate_quantize(xb, spec, scaling))
            with force_reference():
                ms_ref = bench_ms(lambda: simulate_quantize(xb, spec, scaling))
            report.add_bench(f"lab/simulate-{spec}-{scaling}-64M-bf16", kernel_ms=round(ms, 3),
                             torch_ms=round(ms_ref, 3), kernel_gbps=round(4 * xb.numel() / ms / 1e6, 1))


def bench_step(report, device) -> None:
    import fp8train
    from fp8train.train.models import PRESETS
    from transformers import LlamaForCausalLM

    recipes = {"bf16": "bf16", "sim-e4m3-tensor": fp8train.Recipe(simulate="e4m3"),
               "sim-e3m4-tensor": fp8train.Recipe(simulate="e3m4"),
               "sim-e2m1-1x16": fp8train.Recipe(simulate="a=e2m1,w=e2m1,g=e5m2,scaling=1x16")}
    from fp8train.kernels import force_reference

    ids = torch.randint(0, 8192, (8, 513), device=device)
    runs = [(name, recipe, False) for name, recipe in recipes.items()]
    runs += [(f"{name}-torch-path", recipe, True) for name, recipe in recipes.items() if name != "bf16"]
    for name, recipe, reference in runs:
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(PRESETS["small"].llama_config())
        fp8train.convert(model, recipe=recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        times = []
        for _ in range(6):
            _sync(device)
            t0 = time.perf_counter()
            with (force_reference() if reference else _nothing()):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    logits = model(input_ids=ids[:, :-1]).logits
                loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            times.append(time.perf_counter() - t0)
        step = sorted(times[1:])[len(times[1:]) // 2]
        report.add_bench(f"lab/step-small-b8x512-{name}", ms=round(1e3 * step, 2),
                         tokens_per_s=round(8 * 512 / step), loss=round(loss.item(), 4))
        del model, opt


def _nothing():
    import contextlib

    return contextlib.nullcontext()


def run(report) -> None:
    device = _device()
    start = time.time()
    check_rounding(report, device, 4_000_000 if device.type == "cuda" else 200_000)
    check_scaled(report, device, (4096, 4096) if device.type == "cuda" else (256, 512))
    if device.type == "cuda":
        check_kernel(report, device, (4096, 4096))
    check_bf16_identity(report, device)
    check_sharpness(report, device)
    if device.type == "cuda":
        bench_rounding(report, device)
        bench_step(report, device)
    report.add_bench("lab: area seconds", seconds=round(time.time() - start, 1))
