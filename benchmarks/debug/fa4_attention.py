"""FlashAttention-4's CuTe-DSL kernels (PyPI ``flash-attn-4``, its sm90 path) against torch SDPA's cuDNN backend on
the 953M model's attention -- causal, 16 heads of 128, sequence 2048 -- forward, forward + backward, errors against
an fp32 reference, and a CUDA-graph replay (GPU aid: the wheels travel with the device call, see
docs/performance.md "Session 15").

    python benchmarks/debug/fa4_attention.py --batch 8
"""

import argparse
import pathlib
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/: the shared GPU helpers
from gpu.quant import back_to_back_ms  # noqa: E402


def ms_per_call(fn, repeats: int = 20) -> float:
    for _ in range(3):  # warm-up (first calls compile)
        fn()
    return back_to_back_ms(fn, repeats)


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return float((got - ref).abs().max() / ref.abs().max())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=2048)
    a = p.parse_args()
    torch.manual_seed(0)
    shape = (a.batch, a.seq, a.heads, a.dim)  # (batch, sequence, heads, dim): the projections' layout
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def sdpa(q, k, v):  # Hugging Face's call: (batch, heads, sequence, dim) views
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              is_causal=True).transpose(1, 2)

    # fp32 reference on the first sequence
    q1, k1, v1 = (t[:1].detach().float().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        ref_out = sdpa(q1, k1, v1)
    ref_grads = torch.autograd.grad(ref_out, (q1, k1, v1), dout[:1].float())

    t0 = time.perf_counter()
    from flash_attn.cute import flash_attn_func
    print(f"import flash_attn.cute: {time.perf_counter() - t0:.1f} s", flush=True)

    def fa4(q, k, v):
        return flash_attn_func(q, k, v, causal=True)[0]

    t0 = time.perf_counter()
    out = fa4(q, k, v)
    torch.cuda.synchronize()
    print(f"first forward (compile): {time.perf_counter() - t0:.1f} s", flush=True)
    t0 = time.perf_counter()
    grads = torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.synchronize()
    print(f"first backward (compile): {time.perf_counter() - t0:.1f} s", flush=True)

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn_out = sdpa(q, k, v)
        cudnn_grads = torch.autograd.grad(cudnn_out, (q, k, v), dout)
    for name, got_o, got_g in (("cudnn", cudnn_out, cudnn_grads), ("fa4", out, grads)):
        errors = [rel(got_o[:1], ref_out)] + [rel(g[:1], r) for g, r in zip(got_g, ref_grads)]
        print(f"{name}: error vs fp32 (out, dq, dk, dv): " + ", ".join(f"{e:.2e}" for e in errors), flush=True)

    flops = 4 * a.batch * a.heads * a.seq * a.seq * a.dim / 2  # causal forward
    results = {}
    for name, fn, backend in (("cudnn", sdpa, SDPBackend.CUDNN_ATTENTION), ("fa4", fa4, None)):
        def forward():
            with torch.no_grad():
                return fn(q, k, v)

        def forward_backward():
            o = fn(q, k, v)
            return torch.autograd.grad(o, (q, k, v), dout)

        if backend is not None:
            with sdpa_kernel(backend):
                fwd_ms, step_ms = ms_per_call(forward), ms_per_call(forward_backward)
        else:
            fwd_ms, step_ms = ms_per_call(forward), ms_per_call(forward_backward)
        results[name] = (fwd_ms, step_ms)
        print(f"{name}: forward {fwd_ms:.3f} ms ({flops / fwd_ms / 1e9:.0f} TFLOP/s), forward+backward "
              f"{step_ms:.3f} ms ({3.5 * flops / step_ms / 1e9:.0f} TFLOP/s)", flush=True)
    print(f"fa4 / cudnn speed: forward {results['cudnn'][0] / results['fa4'][0]:.3f}x, forward+backward "
          f"{results['cudnn'][1] / results['fa4'][1]:.3f}x", flush=True)

    # CUDA graph capture of forward + backward (the training step is replayed as one graph), with fresh leaves
    # first used on the side stream (leaves used on the default stream make autograd sync it inside the capture)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        for _ in range(2):
            torch.autograd.grad(fa4(qg, kg, vg), (qg, kg, vg), dout)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_out = fa4(qg, kg, vg)
        g_grads = torch.autograd.grad(g_out, (qg, kg, vg), dout)
    graph.replay()
    torch.cuda.synchronize()
    same = torch.equal(g_out, out) and all(torch.equal(x, y) for x, y in zip(g_grads, grads))
    print(f"cuda graph replay: same bits as eager: {same}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
