"""GPU checks and benchmark of the fused rotary embedding against Hugging Face's eager apply_rotary_pos_emb.

    python benchmarks/gpu_suite.py --only rotary

Checks (all bit for bit, torch.equal on the raw bits, so -0/+0 count too): forward outputs, their dtype and
strides, and the q/k gradients (and the strides those gradients reach q/k with) of the Triton path against
autograd of HF's function, for bf16 q + bf16 cos, bf16 q + fp32 cos (autocast with fp32 master weights) and
fp32; B=2, S=2048 and 1000, 16 q heads / 4 kv heads, head_dim 128 and 64, HF's transposed-view inputs; plus the
(B, S, H, D) layout (unsqueeze_dim=2) with cos broadcast over the batch.  Also: the kernel path is taken, no
recompiles for new sequence lengths, CUDA-graph capture, and the wrapper installed by fp8train.convert.
Benchmark: fwd+bwd (and fwd) median time, fused vs HF eager, B=4, S=2048, H=16, D=128.
"""

from __future__ import annotations

import torch

from gpu.quant import bench_ms, compiled_variants


def _hf_rotary():
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        return getattr(apply_rotary_pos_emb, "__wrapped__", apply_rotary_pos_emb)
    except Exception:  # noqa: BLE001 - transformers missing: the reference is HF's math op for op
        from fp8train.nn.rotary import rotary_embedding_reference

        return rotary_embedding_reference


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _inputs(batch, seq, heads, kv_heads, dim, q_dtype, cos_dtype, unsqueeze_dim=1, cos_batch=None, seed=0):
    """HF's q/k: projections (batch, seq, heads * dim) viewed as heads, transposed for unsqueeze_dim=1."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(batch, seq, heads * dim, generator=gen, device="cuda").to(q_dtype).requires_grad_(True)
    xk = torch.randn(batch, seq, kv_heads * dim, generator=gen, device="cuda").to(q_dtype).requires_grad_(True)
    # a real rotary table (cos(pos * inv_freq) duplicated) with the halves made to differ a little, so a kernel
    # that mixed up c1 and c2 would be caught
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device="cuda", dtype=torch.float32) / dim))
    angles = torch.arange(seq, device="cuda", dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles * 1.01), dim=-1).expand(cos_batch or batch, seq, dim)
    cos, sin = emb.cos().to(cos_dtype).contiguous(), emb.sin().to(cos_dtype).contiguous()
    return x, xk, cos, sin


def _views(x, xk, dim, unsqueeze_dim):
    q = x.view(*x.shape[:2], -1, dim)
    k = xk.view(*xk.shape[:2], -1, dim)
    return (q.transpose(1, 2), k.transpose(1, 2)) if unsqueeze_dim == 1 else (q, k)


def _run(fn, x, xk, cos, sin, dim, unsqueeze_dim, grads):
    q, k = _views(x, xk, dim, unsqueeze_dim)
    layouts = []
    q.register_hook(lambda g: layouts.append(("q", g.stride())))
    k.register_hook(lambda g: layouts.append(("k", g.stride())))
    out_q, out_k = fn(q, k, cos, sin, unsqueeze_dim)
    dq, dk = grads(out_q, out_k)
    gx, gxk = torch.autograd.grad((out_q, out_k), (x, xk), (dq, dk))
    return out_q, out_k, gx, gxk, sorted(layouts)


def check_bits(report):
    from fp8train.nn.rotary import fused_rotary_embedding, kernel_supports

    hf = _hf_rotary()
    cases = []
    for q_dtype, cos_dtype in ((torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                               (torch.float32, torch.float32)):
        for seq in (2048, 1000):
            for dim in (128, 64):
                cases.append((2, seq, 16, 4, dim, q_dtype, cos_dtype, 1, None))
    cases.append((2, 1000, 16, 4, 128, torch.bfloat16, torch.float32, 2, 1))  # (B, S, H, D), cos batch 1
    cases.append((3, 333, 8, 8, 256, torch.bfloat16, torch.float32, 1, 1))  # widest head_dim, odd sizes

    for batch, seq, heads, kv_heads, dim, q_dtype, cos_dtype, unsqueeze_dim, cos_batch in cases:
        tag = (f"B={batch} S={seq} H={heads}/{kv_heads} D={dim} q={str(q_dtype)[6:]} cos={str(cos_dtype)[6:]}"
               f" unsqueeze_dim={unsqueeze_dim}{' cos batch 1' if cos_batch else ''}")
        x, xk, cos, sin = _inputs(batch, seq, heads, kv_heads, dim, q_dtype, cos_dtype, unsqueeze_dim, cos_batch)
        q, k = _views(x, xk, dim, unsqueeze_dim)
        if not kernel_supports(q, k, cos, sin, unsqueeze_dim):
            report.check(f"rotary: kernel path taken {tag}", False)
            continue
        gen = torch.Generator(device="cuda").manual_seed(1)

        def grads(out_q, out_k):
            dq = torch.randn(out_q.shape, generator=gen, device="cuda").to(out_q.dtype)
            dk = torch.randn(out_k.shape, generator=gen, device="cuda").to(out_k.dtype)
            # SDPA's backward hands over gradients in q's layout; zeros check autograd's +0 sums
            dq = dq.transpose(1, 2).contiguous().transpose(1, 2) if unsqueeze_dim == 1 else dq
            dq[..., :1] = 0
            return dq, dk

        got = _run(fused_rotary_embedding, x, xk, cos, sin, dim, unsqueeze_dim, grads)
        gen.manual_seed(1)
        ref = _run(hf, x, xk, cos, sin, dim, unsqueeze_dim, grads)
        detail = {name: _same(a, b) for name, a, b in zip(("q_embed", "k_embed", "grad_q", "grad_k"), got, ref)}
        detail["out_strides"] = got[0].stride() == ref[0].stride() and got[1].stride() == ref[1].stride()
        # the kernel hands gradients back in q's / k's own layout (free transpose + view backward), HF's
        # autograd contiguously: compare with the inputs' layouts
        detail["grad_layouts"] = got[4] == sorted([("q", q.stride()), ("k", k.stride())])
        detail["dtype"] = str(got[0].dtype)
        if not detail["q_embed"]:
            detail["q_embed_max_abs_diff"] = float((got[0].float() - ref[0].float()).abs().max())
        if not detail["grad_q"]:
            detail["grad_q_max_abs_diff"] = float((got[2].float() - ref[2].float()).abs().max())
        report.check(f"rotary: bit-identical to HF fwd+bwd {tag}",
                     all(v for k, v in detail.items() if isinstance(v, bool)), **detail)


def check_no_recompiles(report):
    from fp8train.kernels import rotary as kernel
    from fp8train.nn.rotary import fused_rotary_embedding

    def run_once(seq, batch=2):
        x, xk, cos, sin = _inputs(batch, seq, 16, 4, 128, torch.bfloat16, torch.float32, seed=seq)
        q, k = _views(x, xk, 128, 1)
        out_q, out_k = fused_rotary_embedding(q, k, cos, sin)
        torch.autograd.grad((out_q, out_k), (x, xk), (torch.ones_like(out_q), torch.ones_like(out_k)))

    run_once(2048)
    before = compiled_variants(kernel._rotary_kernel)
    for seq in (1, 17, 1000, 2047, 4096):
        run_once(seq, batch=1 + seq % 3)
    after = compiled_variants(kernel._rotary_kernel)
    report.check("rotary: no recompiles for new sequence lengths / batch sizes", after == before,
                 variants_before=before, variants_after=after)


def check_cuda_graph(report):
    from fp8train.nn.rotary import fused_rotary_embedding

    x, xk, cos, sin = _inputs(2, 1000, 16, 4, 128, torch.bfloat16, torch.float32)
    q, k = _views(x.detach(), xk.detach(), 128, 1)
    eager = fused_rotary_embedding(q, k, cos, sin)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fused_rotary_embedding(q, k, cos, sin)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fused_rotary_embedding(q, k, cos, sin)
        graph.replay()
        torch.cuda.synchronize()
        report.check("rotary: CUDA-graph capture", all(_same(a, b) for a, b in zip(eager, captured)))
    except Exception as exc:  # noqa: BLE001 - report, don't abort the area
        report.check("rotary: CUDA-graph capture", False, error=repr(exc)[:300])


def check_installed_in_llama(report):
    """A converted tiny Llama on CUDA calls the fused kernel through the installed wrapper; loss and gradients are
    the same bits as with fused_rotary=False."""
    import transformers

    import fp8train
    from fp8train.kernels import rotary as kernel

    # eager attention: FlashAttention's backward accumulates dq with atomics, which would make the bits differ
    # between any two runs, fused rotary or not
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      attn_implementation="eager")
    ids = torch.randint(0, 512, (2, 200), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    results = []
    launches = []
    original = kernel.rotary_apply
    kernel.rotary_apply = lambda *a, **kw: launches.append(kw["backward"]) or original(*a, **kw)
    try:
        for fused in (False, True):
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(config).cuda()
            fp8train.convert(model, fp8train.Recipe(fused_rotary=fused))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            results.append([loss.detach()] + [p.grad for p in model.parameters()])
            if not fused:
                launches.clear()  # only the fused model's launches count
    finally:
        kernel.rotary_apply = original
        from transformers.models.llama import modeling_llama

        wrapped = getattr(modeling_llama.apply_rotary_pos_emb, "__wrapped__", None)
        if wrapped is not None:
            modeling_llama.apply_rotary_pos_emb = wrapped
    same = all(_same(a, b) for a, b in zip(*results))
    report.check("rotary: converted Llama uses the kernel (2 layers: 2 fwd + 2 bwd launches), same loss and grads",
                 same and sorted(launches) == [False, False, True, True], launches=len(launches), same_bits=same)


def bench(report):
    from fp8train.nn.rotary import fused_rotary_embedding

    hf = _hf_rotary()
    batch, seq, heads, dim = 4, 2048, 16, 128
    for cos_dtype in (torch.bfloat16, torch.float32):
        for kv_heads in (16, 4):
            x, xk, cos, sin = _inputs(batch, seq, heads, kv_heads, dim, torch.bfloat16, cos_dtype)
            out_dtype = torch.promote_types(torch.bfloat16, cos_dtype)
            dq = torch.randn(batch, heads, seq, dim, device="cuda").to(out_dtype)
            dk = torch.randn(batch, kv_heads, seq, dim, device="cuda").to(out_dtype)
            times = {}
            for name, fn in (("fused", fused_rotary_embedding), ("hf", hf)):
                def forward(fn=fn):
                    q, k = _views(x, xk, dim, 1)
                    return fn(q, k, cos, sin)

                def step(fn=fn):
                    out_q, out_k = forward(fn)
                    torch.autograd.grad((out_q, out_k), (x, xk), (dq, dk))

                times[name] = (bench_ms(step), bench_ms(lambda: forward()))
            report.add_bench(f"rotary: fwd+bwd B={batch} S={seq} H={heads}/{kv_heads} D={dim} bf16 q, "
                             f"{str(cos_dtype)[6:]} cos", fused_ms=round(times["fused"][0], 4),
                             hf_eager_ms=round(times["hf"][0], 4), speedup=round(times["hf"][0] / times["fused"][0], 2),
                             fused_fwd_ms=round(times["fused"][1], 4), hf_eager_fwd_ms=round(times["hf"][1], 4),
                             note="fwd+bwd includes autograd's transpose/view backward (HF: a copy into the "
                                  "projection's layout; fused: none, gradients come in that layout)")


def run(report) -> None:
    if not torch.cuda.is_available():
        report.check("rotary: CUDA available", False, detail="no GPU")
        return
    check_bits(report)
    check_no_recompiles(report)
    check_cuda_graph(report)
    check_installed_in_llama(report)
    bench(report)
