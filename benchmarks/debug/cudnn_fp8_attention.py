"""Is cuDNN's FP8 attention worth it?  A probe for issue 6's last 10 % (docs/performance.md, "What is left of the
step"): at 953M the attention core is ~10 ms of the ~66 ms per 8,192 tokens (cuDNN's bf16 flash kernels, forward
~2.3 ms, backward ~7.5 ms).  cuDNN also has FP8 flash-attention graphs (``sdpa_fp8`` / ``sdpa_fp8_backward``)
that torch 2.11 does not expose; PyPI's ``nvidia-cudnn-frontend`` (1.8 MB wheel, version 1.14.1 has no
dependencies) does.

    pip install --no-deps nvidia_cudnn_frontend-1.14.1-cp312-*.whl
    python benchmarks/debug/cudnn_fp8_attention.py [--batch 4] [--heads 16] [--seq 2048] [--head-dim 128]

``--bf16-plans``: instead, build cuDNN's bf16 SDPA forward and backward graphs for the same layout and time
*every* execution plan cuDNN offers (heuristics A + fallback, all engines) against torch's SDPA -- is torch's
choice the fastest cuDNN engine for this shape?

Times, per causal attention call, torch's SDPA (bf16; whatever backend torch picks) forward and backward against
the FP8 graphs, and reports the FP8 results' errors against float32 math on the same (bf16) inputs next to bf16
SDPA's own.  Scales as a training step would set them: q, k, v, dO from their amax; P with 448 (it is <= 1);
O from amax(v) (O is a convex combination of v's rows); dP, dQ, dK, dV from the amax cuDNN reported on a first
call (delayed scaling).  Also checks what an FP8 output does when its scale is too large (saturate or inf).
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # benchmarks/: the shared GPU helpers
from gpu.quant import back_to_back_ms  # noqa: E402
import torch.nn.functional as F

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LARGEST = {E4M3: 448.0, E5M2: 57344.0}


def elapsed_ms(fn, repeat=20):
    fn()
    torch.cuda.synchronize()
    return back_to_back_ms(fn, repeat)


def scalar(value):
    return torch.tensor([value], device="cuda", dtype=torch.float32).reshape(1, 1, 1, 1)


def relative_error(x, ref):
    return float((x.float() - ref).norm() / ref.norm())


class FP8Attention:
    """The two cuDNN graphs for one shape: q/k/v/o (batch, heads, seq, head_dim) views with the given strides."""

    def __init__(self, cudnn, handle, shape, stride, attn_scale, fmt, grad_fmt):
        self.cudnn, self.handle = cudnn, handle
        dtype = {E4M3: cudnn.data_type.FP8_E4M3, E5M2: cudnn.data_type.FP8_E5M2}
        self.fmt, self.grad_fmt = fmt, grad_fmt
        b, h, s, d = shape

        def graph():
            return cudnn.pygraph(io_data_type=dtype[fmt], intermediate_data_type=cudnn.data_type.FLOAT,
                                 compute_data_type=cudnn.data_type.FLOAT, handle=handle)

        def one(g, name):
            return g.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)

        def build(g):
            g.validate()
            g.build_operation_graph()
            g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
            g.check_support()
            g.build_plans()
            return torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)

        # forward
        g = graph()
        t = {n: g.tensor(name=n, dim=list(shape), stride=list(stride), data_type=dtype[fmt]) for n in "qkv"}
        for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[n] = one(g, n)
        o, stats, amax_s, amax_o = g.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            is_inference=False, attn_scale=attn_scale, use_causal_mask=True)
        o.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(dtype[fmt])
        stats.set_output(True).set_dim([b, h, s, 1]).set_stride([h * s, s, 1, 1]).set_data_type(
            cudnn.data_type.FLOAT)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        t.update(o=o, stats=stats, amax_s=amax_s, amax_o=amax_o)
        self.fwd, self.fwd_t, self.fwd_ws = g, t, build(g)

        # backward
        g = graph()
        t = {n: g.tensor(name=n, dim=list(shape), stride=list(stride), data_type=dtype[fmt]) for n in "qkvo"}
        t["dO"] = g.tensor(name="dO", dim=list(shape), stride=list(stride), data_type=dtype[grad_fmt])
        t["stats"] = g.tensor(name="stats", dim=[b, h, s, 1], stride=[h * s, s, 1, 1],
                              data_type=cudnn.data_type.FLOAT)
        names = ("descale_q", "descale_k", "descale_v", "descale_o", "descale_dO", "descale_s", "descale_dP",
                 "scale_s", "scale_dQ", "scale_dK", "scale_dV", "scale_dP")
        for n in names:
            t[n] = one(g, n)
        outs = g.sdpa_fp8_backward(q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
                                   **{n: t[n] for n in names}, attn_scale=attn_scale, use_causal_mask=True)
        for n, out in zip(("dQ", "dK", "dV"), outs[:3]):
            out.set_output(True).set_dim(list(shape)).set_stride(list(stride)).set_data_type(dtype[grad_fmt])
            t[n] = out
        for n, out in zip(("amax_dQ", "amax_dK", "amax_dV", "amax_dP"), outs[3:]):
            out.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(
                cudnn.data_type.FLOAT)
            t[n] = out
        self.bwd, self.bwd_t, self.bwd_ws = g, t, build(g)

    def run_forward(self, pack):
        self.fwd.execute({self.fwd_t[n]: v for n, v in pack.items()}, self.fwd_ws, handle=self.handle)

    def run_backward(self, pack):
        self.bwd.execute({self.bwd_t[n]: v for n, v in pack.items()}, self.bwd_ws, handle=self.handle)


def time_every_plan(cudnn, handle, graph, pack, label):
    """Build every plan of ``graph`` and time each one with ``pack``; prints and returns {name: ms}."""
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    graph.build_plans(cudnn.build_plan_policy.ALL)
    times = {}
    for index in range(graph.get_execution_plan_count()):
        name = graph.get_plan_name_at_index(index)
        try:
            workspace = torch.empty(graph.get_workspace_size_plan_at_index(index), device="cuda", dtype=torch.uint8)
            times[name] = elapsed_ms(lambda: graph.execute_plan_at_index(pack, workspace, index, handle=handle))
        except Exception as exc:  # noqa: BLE001 -- a probe: report and go on
            print(f"  {label} plan {index} {name}: failed: {str(exc)[:200]}", flush=True)
            continue
        print(f"  {label} plan {index} {name}: {times[name]:.3f} ms", flush=True)
    return times


def bf16_plans(cudnn, handle, q, k, v, do, attn_scale, t_fwd16, t_bwd16):
    """cuDNN's own bf16 SDPA graphs, every plan timed (see the module docstring)."""
    b, h, s, d = q.shape
    bf16 = cudnn.data_type.BFLOAT16

    def graph():
        return cudnn.pygraph(io_data_type=bf16, intermediate_data_type=cudnn.data_type.FLOAT,
                             compute_data_type=cudnn.data_type.FLOAT, handle=handle)

    g = graph()
    t = {n: g.tensor(name=n, dim=list(x.shape), stride=list(x.stride()), data_type=bf16)
         for n, x in (("q", q), ("k", k), ("v", v))}
    o_t, stats_t = g.sdpa(q=t["q"], k=t["k"], v=t["v"], is_inference=False, attn_scale=attn_scale,
                          use_causal_mask=True)
    o = torch.empty_like(q)
    stats = torch.empty(b, h, s, 1, device="cuda")
    o_t.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(bf16)
    stats_t.set_output(True).set_dim(list(stats.shape)).set_stride(list(stats.stride())).set_data_type(
        cudnn.data_type.FLOAT)
    fwd = time_every_plan(cudnn, handle, g, {t["q"]: q, t["k"]: k, t["v"]: v, o_t: o, stats_t: stats}, "forward")

    g = graph()
    t = {n: g.tensor(name=n, dim=list(x.shape), stride=list(x.stride()), data_type=bf16)
         for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("dO", do))}
    t["stats"] = g.tensor(name="stats", dim=list(stats.shape), stride=list(stats.stride()),
                          data_type=cudnn.data_type.FLOAT)
    dq_t, dk_t, dv_t = g.sdpa_backward(q=t["q"], k=t["k"], v=t["v"], o=t["o"], dO=t["dO"], stats=t["stats"],
                                       attn_scale=attn_scale, use_causal_mask=True)
    grads = [torch.empty_like(x) for x in (q, k, v)]
    for tensor, ref in zip((dq_t, dk_t, dv_t), grads):
        tensor.set_output(True).set_dim(list(ref.shape)).set_stride(list(ref.stride())).set_data_type(bf16)
    pack = {t[n]: x for n, x in (("q", q), ("k", k), ("v", v), ("o", o), ("dO", do), ("stats", stats))}
    pack.update({dq_t: grads[0], dk_t: grads[1], dv_t: grads[2]})
    bwd = time_every_plan(cudnn, handle, g, pack, "backward")
    best_f, best_b = min(fwd.values(), default=float("nan")), min(bwd.values(), default=float("nan"))
    print(f"bf16 plans: best forward {best_f:.3f} ms (torch SDPA {t_fwd16:.3f}), best backward {best_b:.3f} ms "
          f"(torch SDPA {t_bwd16:.3f})", flush=True)


def quantize(x, fmt, margin=1.0):
    scale = LARGEST[fmt] / (float(x.abs().amax()) * margin)
    return (x.float() * scale).to(fmt), scale


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--logit-std", type=float, default=3.0, help="spread of the attention logits")
    parser.add_argument("--bf16-plans", action="store_true", help="time every plan of cuDNN's bf16 graphs instead")
    args = parser.parse_args()
    import cudnn

    print(torch.cuda.get_device_name(), torch.__version__, "cuDNN", torch.backends.cudnn.version(),
          "frontend", cudnn.__version__, "backend", cudnn.backend_version(), flush=True)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    b, h, s, d = args.batch, args.heads, args.seq, args.head_dim
    attn_scale = 1 / math.sqrt(d)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def bshd():  # (b, h, s, d) view of a (b, s, h, d) buffer: the layout q/k/v come in from the projections
        return torch.empty(b, s, h, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2)

    q, k, v, do = bshd(), bshd(), bshd(), bshd()
    # logits q.k/sqrt(d) with std ~logit_std: q, k ~ N(0, sqrt(logit_std)) per channel
    for x, std in ((q, args.logit_std ** 0.5), (k, args.logit_std ** 0.5), (v, 1.0), (do, 1e-3)):
        x.copy_(torch.randn(x.shape, device="cuda", generator=gen) * std)
    shape, stride = tuple(q.shape), tuple(q.stride())
    print(f"shape {shape} stride {stride}, logits std ~{args.logit_std}", flush=True)

    # float32 reference on the bf16 inputs
    qr, kr, vr = (x.float().requires_grad_() for x in (q, k, v))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        o_ref = F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, scale=attn_scale)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.float())
    o_ref = o_ref.detach()

    # bf16 SDPA (torch's choice of backend)
    qb, kb, vb = (x.detach().clone().requires_grad_() for x in (q, k, v))
    o_bf16 = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=attn_scale)
    dq_bf16, dk_bf16, dv_bf16 = torch.autograd.grad(o_bf16, (qb, kb, vb), do)
    t_fwd16 = elapsed_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn_scale))
    o_keep = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=attn_scale)
    t_bwd16 = elapsed_ms(lambda: torch.autograd.grad(o_keep, (qb, kb, vb), do, retain_graph=True))
    print(f"bf16 SDPA: forward {t_fwd16:.3f} ms, backward {t_bwd16:.3f} ms; errors o {relative_error(o_bf16, o_ref):.4f}"
          f" dq {relative_error(dq_bf16, dq_ref):.4f} dk {relative_error(dk_bf16, dk_ref):.4f}"
          f" dv {relative_error(dv_bf16, dv_ref):.4f}", flush=True)

    if args.bf16_plans:
        bf16_plans(cudnn, handle, q, k, v, do, attn_scale, t_fwd16, t_bwd16)
        return
    flops = 4 * b * h * s * s * d / 2  # causal forward
    for fmt, grad_fmt in ((E4M3, E4M3), (E4M3, E5M2)):
        name = f"fp8 {str(fmt)[-6:]} / grads {str(grad_fmt)[-6:]}"
        try:
            att = FP8Attention(cudnn, handle, shape, stride, attn_scale, fmt, grad_fmt)
        except Exception as exc:  # noqa: BLE001 -- a probe: report and go on
            print(f"{name}: not built: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue

        def fp8_like(x, dtype):
            return torch.empty_strided(x.shape, x.stride(), device="cuda", dtype=dtype)

        (q8, sq), (k8, sk), (v8, sv) = (quantize(x, fmt) for x in (q, k, v))
        q8, k8, v8 = (x.as_strided(shape, stride) if x.stride() == stride else
                      fp8_like(q, fmt).copy_(x) for x in (q8, k8, v8))
        scale_s = 448.0 if fmt == E4M3 else 32768.0
        scale_o = LARGEST[fmt] / (float(v.abs().amax()) * 1.0625)
        o8, stats = fp8_like(q, fmt), torch.empty(b, h, s, 1, device="cuda")
        amax_s, amax_o = scalar(0), scalar(0)
        fwd = dict(q=q8, k=k8, v=v8, descale_q=scalar(1 / sq), descale_k=scalar(1 / sk), descale_v=scalar(1 / sv),
                   descale_s=scalar(1 / scale_s), scale_s=scalar(scale_s), scale_o=scalar(scale_o), o=o8,
                   stats=stats, amax_s=amax_s, amax_o=amax_o)
        att.run_forward(fwd)
        torch.cuda.synchronize()
        o_fp8 = o8.float() / scale_o
        t_fwd8 = elapsed_ms(lambda: att.run_forward(fwd))

        do8, sdo = quantize(do, grad_fmt)
        do8 = fp8_like(q, grad_fmt).copy_(do8)
        grads = {n: fp8_like(q, grad_fmt) for n in ("dQ", "dK", "dV")}
        amaxes = {n: scalar(0) for n in ("amax_dQ", "amax_dK", "amax_dV", "amax_dP")}
        guess = {"scale_dQ": 1.0, "scale_dK": 1.0, "scale_dV": 1.0, "scale_dP": 1.0}
        bwd = dict(q=q8, k=k8, v=v8, o=o8, dO=do8, stats=stats, descale_q=scalar(1 / sq), descale_k=scalar(1 / sk),
                   descale_v=scalar(1 / sv), descale_o=scalar(1 / scale_o), descale_dO=scalar(1 / sdo),
                   descale_s=scalar(1 / scale_s), scale_s=scalar(scale_s), **grads, **amaxes)

        def set_scales(scales):
            for n, value in scales.items():
                bwd[n] = scalar(value)
            bwd["descale_dP"] = scalar(1 / scales["scale_dP"])

        set_scales(guess)
        att.run_backward(bwd)  # first call: learn the amaxes (delayed scaling)
        torch.cuda.synchronize()
        largest = LARGEST[grad_fmt]
        learned = {f"scale_{n}": largest / float(amaxes[f"amax_{n}"]) for n in ("dQ", "dK", "dV", "dP")}
        set_scales(learned)
        att.run_backward(bwd)
        torch.cuda.synchronize()
        dq8, dk8, dv8 = (grads[n].float() / learned[f"scale_{n}"] for n in ("dQ", "dK", "dV"))
        t_bwd8 = elapsed_ms(lambda: att.run_backward(bwd))
        print(f"{name}: forward {t_fwd8:.3f} ms ({t_fwd16 / t_fwd8:.2f}x bf16, {flops / t_fwd8 / 1e9:.0f} TFLOP/s),"
              f" backward {t_bwd8:.3f} ms ({t_bwd16 / t_bwd8:.2f}x); errors o {relative_error(o_fp8, o_ref):.4f}"
              f" dq {relative_error(dq8, dq_ref):.4f} dk {relative_error(dk8, dk_ref):.4f}"
              f" dv {relative_error(dv8, dv_ref):.4f}; amax s {float(amax_s):.3g} o {float(amax_o):.3g}"
              f" (bound {float(v.abs().amax()):.3g}), dP {float(amaxes['amax_dP']):.3g}", flush=True)

        # an output scale 4x too large: does cuDNN saturate (finite) or overflow (inf/nan)?
        fwd_over = dict(fwd, scale_o=scalar(scale_o * 4), o=fp8_like(q, fmt))
        att.run_forward(fwd_over)
        torch.cuda.synchronize()
        bad = fwd_over["o"].float()
        print(f"{name}: scale_o 4x too large -> max |o8| {float(bad.abs().nan_to_num(0, 0, 0).amax()):.4g},"
              f" non-finite {int((~bad.isfinite()).sum())}", flush=True)


if __name__ == "__main__":
    main()
