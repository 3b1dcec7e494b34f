"""GPU area "layer": one Llama-2-7B-shaped decoder layer, fwd+bwd time and memory per recipe.

Shapes: hidden 4096, ffn 11008, 32 heads, batch 8 x 2048 tokens, bf16 weights and activations (no autocast,
as COAT's own per-layer benchmark), SDPA attention -- HF's ``LlamaDecoderLayer`` built from a LlamaConfig
plus its rotary embeddings.  Variants: bf16 (HF as is), fp8train "fp8", fp8train "coat" (and "coat" with the
gated product kept instead of recomputed), torchao float8 tensorwise (eager) when ``import torchao`` works.

Per variant: median fwd+bwd milliseconds, peak memory of one step above the layer's weights and input,
the bytes autograd saves for backward (SavedTensorCounter: parameters excluded, storages counted once) and
the memory still allocated after forward.  Also a check that coat/fp8 outputs and input gradients stay within
FP8 error of bf16.
"""

from __future__ import annotations

import copy
import gc
import statistics
import time

import torch

from gpu.quant import event_times_ms

HIDDEN, FFN, HEADS, BATCH, SEQ = 4096, 11008, 32, 8, 2048


def build_layer():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, num_hidden_layers=1, max_position_embeddings=SEQ)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        layer = LlamaDecoderLayer(config, layer_idx=0).to(torch.bfloat16)
        rotary = LlamaRotaryEmbedding(config)
    return layer, rotary


def convert(layer, variant: str):
    if variant == "bf16":
        return layer
    if variant == "torchao_float8":
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(layer)
        return layer
    import fp8train

    if variant == "coat_keep_product":
        return fp8train.convert(layer, fp8train.Recipe.named("coat").replace(recompute_gated_product=False))
    return fp8train.convert(layer, variant)


def measure(variant: str, template, rotary, x, dy, position_embeddings, report) -> dict:
    from fp8train.nn.saved_memory import SavedTensorCounter

    layer = convert(copy.deepcopy(template), variant)
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()

    def step():
        layer.zero_grad(set_to_none=True)
        inp = x.detach().requires_grad_()
        out = layer(inp, position_embeddings=position_embeddings)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(dy)
        return out, inp.grad

    times = event_times_ms(step, iters=6, warmup=2)

    layer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    inp = x.detach().requires_grad_()
    with SavedTensorCounter(layer) as counter:
        out = layer(inp, position_embeddings=position_embeddings)
    out = out[0] if isinstance(out, tuple) else out
    after_forward = torch.cuda.memory_allocated() - base
    out.backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    result = dict(ms=statistics.median(times), peak_bytes=peak, after_forward_bytes=after_forward,
                  saved_bytes=counter.total_bytes, out=out.detach(), dx=inp.grad)
    del layer, out, inp
    return result


def run(report) -> None:
    if not torch.cuda.is_available():
        report.check("layer: CUDA available", False, detail="no GPU")
        return
    start = time.time()
    template, rotary = build_layer()
    torch.manual_seed(1)
    x = torch.randn(BATCH, SEQ, HIDDEN, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn(BATCH, SEQ, HIDDEN, device="cuda", dtype=torch.bfloat16) * 1e-2
    position_ids = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, -1)
    position_embeddings = rotary(x, position_ids)

    variants = ["bf16", "fp8", "coat", "coat_keep_product"]
    try:
        import torchao  # noqa: F401

        variants.append("torchao_float8")
    except Exception:  # noqa: BLE001 - optional comparison
        report.add_bench("layer: torchao float8", skipped="torchao does not import")

    results = {}
    for variant in variants:
        try:
            results[variant] = measure(variant, template, rotary, x, dy, position_embeddings, report)
        except Exception as exc:  # noqa: BLE001 - one failing variant should not hide the others
            report.check(f"layer: {variant} runs", False, error=repr(exc)[:300])
            continue
        torch.cuda.empty_cache()

    bf16 = results.get("bf16")
    for variant, r in results.items():
        row = dict(ms=round(r["ms"], 2), peak_gb=round(r["peak_bytes"] / 1e9, 3),
                   saved_gb=round(r["saved_bytes"] / 1e9, 3), after_forward_gb=round(r["after_forward_bytes"] / 1e9, 3))
        if bf16 is not None:
            row.update(speedup=round(bf16["ms"] / r["ms"], 3), peak_ratio=round(r["peak_bytes"] / bf16["peak_bytes"], 3),
                       saved_ratio=round(r["saved_bytes"] / bf16["saved_bytes"], 3))
        report.add_bench(f"layer: llama-2-7b layer {variant} (batch {BATCH}x{SEQ})", **row)
        if bf16 is not None and variant != "bf16":
            out_err = float((r["out"].float() - bf16["out"].float()).norm() / bf16["out"].float().norm())
            dx_err = float((r["dx"].float() - bf16["dx"].float()).norm() / bf16["dx"].float().norm())
            # output: residual + FP8 sublayers (E4M3: <= 2^-4 per operand); dx: E5M2 gradients (2^-3)
            report.check(f"layer: {variant} output and input grad close to bf16", out_err < 0.05 and dx_err < 0.25,
                         out_rel_err=round(out_err, 4), dx_rel_err=round(dx_err, 4))
    if "coat" in results and bf16 is not None:
        ratio = results["coat"]["saved_bytes"] / bf16["saved_bytes"]
        report.check("layer: coat saves <= 0.65x of bf16's activation bytes", ratio <= 0.65, ratio=round(ratio, 3))
    report.add_bench("layer: area seconds", seconds=round(time.time() - start, 1))
