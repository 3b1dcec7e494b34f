"""GPU checks and timings for fp8train.export (run by benchmarks/gpu_suite.py --only export).

Export is plain torch (no Triton kernels), so the checks are that CUDA gives the same checkpoint as the CPU
reference: round-to-nearest codes and scales bit for bit (torch's CUDA float8 cast vs the CPU one, float64
rounding of E2M1), GPTQ within float tolerance, and a CUDA-written checkpoint read back exactly by
compressed-tensors.  Timings: RTN export (every format) and GPTQ export (4-bit formats) of a 4-layer slice of a Llama-1B-shaped
model with 64 x 512 calibration tokens.
"""

from __future__ import annotations

import tempfile
import time
import warnings

import torch


def _model(layers: int, hidden: int = 2048, intermediate: int = 5632, vocab: int = 32000):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(config).eval()


def run(report) -> None:
    from fp8train.export import export, quantize_model
    from fp8train.export.gptq import HessianAccumulator, gptq_quantize
    from fp8train.export.schemes import FORMAT_NAMES, get_scheme
    from fp8train.export.weights import quantize_weight

    warnings.simplefilter("ignore")
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=gen) * 0.02
    w[7, 9] = 1.0
    for name in FORMAT_NAMES:
        scheme = get_scheme(name)
        cpu = quantize_weight(w, scheme)
        gpu = quantize_weight(w.cuda(), scheme)
        same = torch.equal(cpu.scale, gpu.scale.cpu()) and torch.equal(cpu.codes.float(), gpu.codes.cpu().float())
        report.check(f"export rtn cuda == cpu [{name}]", same)

    x = torch.randn(4096, 2048, generator=gen) @ (torch.eye(2048) + torch.randn(2048, 2048, generator=gen) / 45)
    for name in ("w4a16", "w4a8-fp"):
        scheme = get_scheme(name)
        hessians = []
        for device in ("cpu", "cuda"):
            acc = HessianAccumulator(2048, device=device)
            acc.add(x.to(device))
            hessians.append(acc.hessian)
        q_cpu = gptq_quantize(w, hessians[0], scheme)
        torch.cuda.synchronize()
        start = time.time()
        q_gpu = gptq_quantize(w.cuda(), hessians[1], scheme)
        torch.cuda.synchronize()
        seconds = time.time() - start
        rtn = quantize_weight(w, scheme)
        err = {k: float((x @ (w - q.dequantize().cpu()).T).norm() / (x @ w.T).norm())
               for k, q in (("cpu", q_cpu), ("cuda", q_gpu), ("rtn", rtn))}
        agree = float((q_cpu.codes.float() != q_gpu.codes.cpu().float()).float().mean())
        report.check(f"export gptq cuda ~ cpu [{name}]", err["cuda"] < 0.95 * err["rtn"] and
                     abs(err["cuda"] / err["cpu"] - 1) < 0.02, output_err=err, codes_differing=agree)
        report.add_bench(f"export gptq 1024x2048 [{name}]", seconds=round(seconds, 3))

    model = _model(layers=4)
    calibration = torch.randint(0, 32000, (64, 512), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        for name in FORMAT_NAMES:
            for method in (("rtn", "gptq") if "4" in name else ("rtn",)):
                torch.cuda.synchronize()
                start = time.time()
                info = export(model, f"{tmp}/{name}-{method}", name, method=method,
                              calibration=calibration if method == "gptq" else None)
                torch.cuda.synchronize()
                report.add_bench(f"export llama-1b-shape 4 layers [{name} {method}]",
                                 seconds=round(time.time() - start, 2), layers=info["quantized_layers"],
                                 calibration_tokens=calibration.numel() if method == "gptq" else 0)
        # the checkpoint written from CUDA, read by compressed-tensors (model-free dequantizer) on the CPU
        try:
            from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
        except ImportError:  # not in the GPU image; the CPU tests read every format with it
            report.add_bench("export: compressed-tensors reader check skipped (package not installed here)")
            return
        from safetensors.torch import load_file

        qmodel = quantize_model(model, "w4a16", method="rtn")
        export(model, f"{tmp}/check", "w4a16", method="rtn")
        tensors = load_file(f"{tmp}/check/model.safetensors")
        dense = CompressedTensorsDequantizer(f"{tmp}/check", dtype=torch.float32).process(dict(tensors))
        ok = all(torch.equal(dense[f"{n}.weight"], q.dequantize(torch.bfloat16).float().cpu())
                 for n, q in qmodel.weights.items())
        report.check("export from cuda read exactly by compressed-tensors [w4a16]", ok)
