"""GPU checks and benchmarks of the fused non-linear op kernels against their torch references.

    python benchmarks/gpu_suite.py --only ops

For RMSNorm, LayerNorm, SiLU / GELU-tanh, the gated product and the residual add, on random bf16 inputs with odd
row counts:
* forward outputs within one rounding of the output dtype of the reference, FP8 1x16 copies with the reference's
  amax and data (at most one FP8 step apart), per-tensor FP8 outputs within two FP8 steps (their y may differ by
  one bf16 rounding from a different reduction order, which can move the amax);
* backward outputs (from the same saved FP8 copies) within 2^-7 of the reference's largest value;
* the autograd path (CUDA dispatch) against the same path with the references forced;
* no recompiles for new row counts; CUDA-graph capture of the fused forward paths.
Benchmarks: median time and effective TB/s = (bytes read once + written once) / time vs a device copy measured in
the same run, next to the torch reference and the plain bf16 op (no FP8 saving) for context.
"""

from __future__ import annotations

import torch

from gpu.quant import bench_ms, bf16_input, compiled_variants, copy_tbps, fp8_steps, max_rel, tbps, ulp_ok


def _row(report, name, ms, nbytes, copy, ref_ms=None, plain_ms=None, **extra):
    values = dict(ms=round(ms, 4), tbps=round(tbps(nbytes, ms), 3), copy_tbps=round(copy, 3),
                  of_copy=round(tbps(nbytes, ms) / copy, 3), **extra)
    if ref_ms is not None:
        values.update(torch_ref_ms=round(ref_ms, 4), speedup=round(ref_ms / ms, 2))
    if plain_ms is not None:
        values.update(plain_bf16_op_ms=round(plain_ms, 4))
    report.add_bench(name, **values)


def _check_copy(report, name, got, ref):
    from fp8train.formats import E4M3

    same, steps = fp8_steps(got.data, ref.data, E4M3)
    amax_equal = torch.equal(got.amax, ref.amax)
    report.check(name, amax_equal and steps <= 1, amax_equal=amax_equal, data_identical=round(same, 6),
                 max_steps=steps)


def _check_tensorwise(report, name, got, ref):
    from fp8train.formats import E4M3

    (q, t), (qr, tr) = got, ref
    same, steps = fp8_steps(q.data, qr.data, E4M3)
    same_t, steps_t = fp8_steps(t, tr, E4M3)
    amax_rel = max_rel(q.amax, qr.amax)
    hint_ok = _scale_hint_ok(q)
    report.check(name, amax_rel <= 2**-7 and steps <= 2 and steps_t <= 2 and hint_ok, amax_rel=amax_rel,
                 data_identical=round(same, 6), max_steps=steps, transposed_max_steps=steps_t, scale_hint_ok=hint_ok)


def _scale_hint_ok(q) -> bool:
    """A kernel-stored GEMM scale equals torch's amax / fmt.max bit for bit (or there is none)."""
    return q.scale_hint is None or torch.equal(q.scale_hint, q.amax.float() / q.fmt.max)


def _check_tensorwise_grads(report, name, got, ref):
    """Per-tensor E5M2 gradients: dequantized values within two FP8 steps, or within 2^-18 of the amax (float32
    tails of act' cancel to ~1e-7 and land many E5M2 subnormal steps apart)."""
    from fp8train.formats import E5M2

    worst, amax_rel = 0.0, 0.0
    for (q, t), (qr, tr) in zip(got, ref):
        amax_rel = max(amax_rel, max_rel(q.amax, qr.amax))
        if not _scale_hint_ok(q):
            amax_rel = float("inf")  # fails the check below
        for a, b in ((q.data, qr.data), (t, tr)):
            a, b = a.float(), b.float()
            excess = ((a - b).abs() - E5M2.max * 2**-18) / E5M2.quantum(b).float()
            worst = max(worst, float(excess.max()))
    report.check(name, amax_rel <= 2**-7 and worst <= 2, amax_rel=amax_rel, worst_steps_beyond_floor=worst)


def _check_close(report, name, got, ref, tol=2**-7):
    rel = max_rel(got, ref)
    report.check(name, rel <= tol, max_rel=rel)


def _check_ulp(report, name, got, ref):
    # Llama-style norms round twice (x * rstd to the input dtype, then times the weight): a different fp32
    # reduction order for rstd can move the first rounding by one ulp and the output by up to two.
    ok, worst = ulp_ok(got, ref, ulps=2.0)
    report.check(name, ok and got.dtype == ref.dtype, worst_ulps=round(worst, 3), dtype=str(got.dtype))


def check_rmsnorm(report, shapes):
    from fp8train.kernels import force_reference
    from fp8train.nn import rmsnorm as op

    for i, shape in enumerate(shapes):
        x = bf16_input(shape)
        w = (1 + 0.2 * bf16_input(shape[-1:], seed=1).float().clamp(-3, 3)).to(torch.bfloat16)
        dy = bf16_input(shape, seed=2)
        # every style on the first shape; the hidden size is a compile-time constant, so later shapes (new
        # compiles) check the Llama style only, to keep the area's GPU time down
        for style in op.STYLES if i == 0 else ("llama",):
            y, saved = op.rmsnorm_forward(x, w, 1e-5, style=style)
            with force_reference():
                yr, sr = op.rmsnorm_forward(x, w, 1e-5, style=style)
            _check_ulp(report, f"ops: rmsnorm[{style}] y {shape}", y, yr)
            _check_close(report, f"ops: rmsnorm[{style}] rstd {shape}", saved.rstd, sr.rstd, 1e-5)
            _check_copy(report, f"ops: rmsnorm[{style}] saved copy {shape}", saved.x, sr.x)
            got = op.rmsnorm_forward(x, w, 1e-5, style=style, quantize_output=True, output_transpose=True)[0]
            with force_reference():
                ref = op.rmsnorm_forward(x, w, 1e-5, style=style, quantize_output=True, output_transpose=True)[0]
            _check_tensorwise(report, f"ops: rmsnorm[{style}] per-tensor E4M3 y {shape}", got, ref)
            # the flow norm's output tensor: the FP8 y's values written by the same pass
            (q, _), _, values = op.rmsnorm_forward(x, w, 1e-5, style=style, quantize_output=True,
                                                   output_transpose=True, dequantized_dtype=torch.bfloat16)
            with force_reference():
                want = q.dequantize(torch.bfloat16)
            report.check(f"ops: rmsnorm[{style}] dequantized output == q.dequantize (torch) {shape}",
                         torch.equal(values, want) and torch.equal(values, q.dequantize(torch.bfloat16)))
            dx, dw = op.rmsnorm_backward(dy, sr, w)
            with force_reference():
                dxr, dwr = op.rmsnorm_backward(dy, sr, w)
            _check_close(report, f"ops: rmsnorm[{style}] dx {shape}", dx, dxr)
            _check_close(report, f"ops: rmsnorm[{style}] dweight {shape}", dw, dwr)
        # fused residual add + norm
        r = bf16_input(shape, seed=5)
        h, y, saved = op.add_rmsnorm_forward(r, x, w, 1e-5)
        with force_reference():
            hr, yr, sr2 = op.add_rmsnorm_forward(r, x, w, 1e-5)
        report.check(f"ops: add_rmsnorm h == residual + x {shape}", torch.equal(h, hr) and torch.equal(h, r + x))
        _check_ulp(report, f"ops: add_rmsnorm y {shape}", y, yr)
        _check_copy(report, f"ops: add_rmsnorm saved copy of h {shape}", saved.x, sr2.x)
        got = op.add_rmsnorm_forward(r, x, w, 1e-5, quantize_output=True, output_transpose=True)[1]
        with force_reference():
            ref = op.add_rmsnorm_forward(r, x, w, 1e-5, quantize_output=True, output_transpose=True)[1]
        _check_tensorwise(report, f"ops: add_rmsnorm per-tensor E4M3 y {shape}", got, ref)
        dres = bf16_input(shape, seed=4)
        slot = torch.zeros(1, dtype=torch.int32, device="cuda")
        dx, _ = op.rmsnorm_backward(dy, sr, w, residual_grad=dres, amax_slot=slot)
        with force_reference():
            dxr, _ = op.rmsnorm_backward(dy, sr, w, residual_grad=dres)
        _check_close(report, f"ops: rmsnorm dx + residual grad {shape}", dx, dxr)
        amax = slot.view(torch.float32)
        report.check(f"ops: rmsnorm backward publishes max|dx| {shape}", bool(amax.eq(dx.abs().max().float()).all()),
                     published=float(amax), actual=float(dx.abs().max()))
        dy_b = bf16_input(shape, seed=6)
        dx, dw = op.rmsnorm_backward(dy, sr, w, second_dy=dy_b)
        with force_reference():
            dxr, dwr = op.rmsnorm_backward(dy, sr, w, second_dy=dy_b)
        _check_close(report, f"ops: rmsnorm dx with a second output grad {shape}", dx, dxr)
        _check_close(report, f"ops: rmsnorm dweight with a second output grad {shape}", dw, dwr)
        dy_c = bf16_input(shape, seed=7)
        dx, dw = op.rmsnorm_backward(dy, sr, w, second_dy=dy_b, third_dy=dy_c)
        with force_reference():
            dxr, dwr = op.rmsnorm_backward(dy, sr, w, second_dy=dy_b, third_dy=dy_c)
        _check_close(report, f"ops: rmsnorm dx with three output grads (q/k/v) {shape}", dx, dxr)
        _check_close(report, f"ops: rmsnorm dweight with three output grads (q/k/v) {shape}", dw, dwr)
        # autograd path, no weight
        a = x.clone().requires_grad_(True)
        op.rms_norm(a, None, 1e-6).backward(dy)
        b = x.clone().requires_grad_(True)
        with force_reference():
            op.rms_norm(b, None, 1e-6).backward(dy)
        _check_close(report, f"ops: rms_norm autograd dx, no weight {shape}", a.grad, b.grad)


def check_layernorm(report, shapes):
    from fp8train.kernels import force_reference
    from fp8train.nn import layernorm as op

    for shape in shapes:
        x = bf16_input(shape) + 1.0
        w = (1 + 0.2 * bf16_input(shape[-1:], seed=1).float().clamp(-3, 3)).to(torch.bfloat16)
        b = bf16_input(shape[-1:], seed=3)
        dy = bf16_input(shape, seed=2)
        for weight, bias in ((w, b), (None, None)):
            tag = "affine" if weight is not None else "plain"
            y, saved = op.layernorm_forward(x, weight, bias, 1e-5)
            with force_reference():
                yr, sr = op.layernorm_forward(x, weight, bias, 1e-5)
            _check_ulp(report, f"ops: layernorm[{tag}] y {shape}", y, yr)
            _check_close(report, f"ops: layernorm[{tag}] rstd {shape}", saved.rstd, sr.rstd, 1e-5)
            # the centred values differ by float32 reduction order; compare dequantized copies
            _check_close(report, f"ops: layernorm[{tag}] saved centred copy {shape}", saved.centered.dequantize(),
                         sr.centered.dequantize(), 2**-3)
            got = op.layernorm_forward(x, weight, bias, 1e-5, quantize_output=True, output_transpose=True)[0]
            with force_reference():
                ref = op.layernorm_forward(x, weight, bias, 1e-5, quantize_output=True, output_transpose=True)[0]
            _check_tensorwise(report, f"ops: layernorm[{tag}] per-tensor E4M3 y {shape}", got, ref)
            grads = op.layernorm_backward(dy, sr, weight, bias is not None)
            with force_reference():
                grads_r = op.layernorm_backward(dy, sr, weight, bias is not None)
            for gname, g, gr in zip(("dx", "dweight", "dbias"), grads, grads_r):
                if gr is not None:
                    _check_close(report, f"ops: layernorm[{tag}] {gname} {shape}", g, gr)


def check_activation(report, shapes):
    from fp8train.kernels import force_reference
    from fp8train.nn import activation as op

    for shape in shapes:
        x = bf16_input(shape)
        dy = bf16_input(shape, seed=2)
        for name in ("silu", "gelu_tanh"):
            y, saved = op.activation_forward(x, name)
            with force_reference():
                yr, sr = op.activation_forward(x, name)
            _check_ulp(report, f"ops: {name} y {shape}", y, yr)
            _check_copy(report, f"ops: {name} saved copy {shape}", saved.x, sr.x)
            got = op.activation_forward(x, name, quantize_output=True, output_transpose=True)[0]
            with force_reference():
                ref = op.activation_forward(x, name, quantize_output=True, output_transpose=True)[0]
            _check_tensorwise(report, f"ops: {name} per-tensor E4M3 y {shape}", got, ref)
            dx = op.activation_backward(dy, sr)
            with force_reference():
                dxr = op.activation_backward(dy, sr)
            _check_close(report, f"ops: {name} dx {shape}", dx, dxr)


def check_gated(report, shapes):
    from fp8train.kernels import force_reference
    from fp8train.nn import gated_mlp as op

    for shape in shapes:
        fused = bf16_input((*shape[:-1], 2 * shape[-1]))
        gate, up = fused.chunk(2, dim=-1)  # strided halves of a fused gate_up output
        dh = bf16_input(shape, seed=2)
        for name in ("silu", "gelu_tanh"):
            h, saved = op.gated_product_forward(gate, up, name)
            with force_reference():
                hr, sr = op.gated_product_forward(gate, up, name)
            _check_ulp(report, f"ops: gated[{name}] h {shape}", h, hr)
            _check_copy(report, f"ops: gated[{name}] saved gate {shape}", saved.gate, sr.gate)
            _check_copy(report, f"ops: gated[{name}] saved up {shape}", saved.up, sr.up)
            got = op.gated_product_forward(gate, up, name, quantize_output=True, output_transpose=True)[0]
            with force_reference():
                ref = op.gated_product_forward(gate, up, name, quantize_output=True, output_transpose=True)[0]
            _check_tensorwise(report, f"ops: gated[{name}] per-tensor E4M3 h {shape}", got, ref)
            dg, du = op.gated_product_backward(dh, sr)
            with force_reference():
                dgr, dur = op.gated_product_backward(dh, sr)
            _check_close(report, f"ops: gated[{name}] dgate {shape}", dg, dgr)
            _check_close(report, f"ops: gated[{name}] dup {shape}", du, dur)
            got = op.gated_product_backward(dh, sr, quantize_output=True, output_transpose=True)
            with force_reference():
                ref = op.gated_product_backward(dh, sr, quantize_output=True, output_transpose=True)
            _check_tensorwise_grads(report, f"ops: gated[{name}] per-tensor E5M2 dgate, dup {shape}", got, ref)


def check_gated_predicted(report, shapes):
    """Delayed scaling (fp8train.delayed_scaling): the one-pass kernels + repair pass against the reference, over
    calls that take each branch -- first call (prediction 0: repaired), same input (prediction kept), 4x larger
    (overflow: repaired), 1/64 (collapse: repaired), garbage NaN prediction (repaired) -- outputs and the
    prediction buffers both."""
    from fp8train.delayed_scaling import every_branch, new_prediction
    from fp8train.kernels import force_reference
    from fp8train.nn import gated_mlp as op

    for shape in shapes:
        fused = bf16_input((*shape[:-1], 2 * shape[-1]))
        dh0 = bf16_input(shape, seed=2)
        pred, pred_r = new_prediction(3, "cuda"), new_prediction(3, "cuda")
        for step, factor in every_branch(pred, pred_r):
            gate, up = (fused * factor).chunk(2, dim=-1)
            dh = dh0 * factor
            got, saved = op.gated_product_forward(gate, up, "silu", quantize_output=True, output_transpose=True,
                                                  prediction=pred[0:1])
            with force_reference():
                ref, saved_r = op.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                        output_transpose=True, prediction=pred_r[0:1])
            _check_tensorwise(report, f"ops: gated predicted E4M3 h {shape} call {step}", got, ref)
            got = op.gated_product_backward(dh, saved_r, quantize_output=True, output_transpose=True,
                                            prediction=pred[1:3])
            with force_reference():
                ref = op.gated_product_backward(dh, saved_r, quantize_output=True, output_transpose=True,
                                                prediction=pred_r[1:3])
            _check_tensorwise_grads(report, f"ops: gated predicted E5M2 dgate, dup {shape} call {step}", got, ref)
            rel = max_rel(pred, pred_r)
            report.check(f"ops: gated predictions {shape} after call {step}", rel <= 2**-7, max_rel=rel,
                         kernel=pred.tolist(), reference=pred_r.tolist())


def check_quantize_predicted(report, shapes):
    """FP8 linears' inputs / gradients under delayed scaling: the one-pass per-tensor quantizer + its repair pass
    against the torch reference on every branch of the rule (bits and next prediction equal), then its speed
    against the two-pass quantizer (amax pass + encoding pass) on the 953M model's shapes at batch 4 and 32."""
    from fp8train import mixed_granularity as mg
    from fp8train.delayed_scaling import every_branch, new_prediction
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import force_reference
    from fp8train.kernels.quantize import quantize_tensorwise

    for shape in shapes:
        base = bf16_input(shape)
        for fmt, reference in ((E4M3, mg.quantize_for_linear), (E5M2, mg.quantize_grad_for_linear)):
            pred, pred_r = new_prediction(1, "cuda"), new_prediction(1, "cuda")
            for step, factor in every_branch(pred, pred_r):
                x = base * factor
                q, t = quantize_tensorwise(x, fmt, with_transpose=True, prediction=pred)
                with force_reference():
                    r, tr = reference(x, with_transpose=True, prediction=pred_r)
                same, steps = fp8_steps(q.data, r.data, fmt)
                same_t, steps_t = fp8_steps(t, tr, fmt)
                ok = (torch.equal(q.amax, r.amax) and torch.equal(pred, pred_r) and steps == 0 and steps_t == 0
                      and _scale_hint_ok(q))
                report.check(f"ops: predicted per-tensor {fmt.name} {shape} call {step}", ok,
                             amax=float(q.amax), amax_reference=float(r.amax), data_identical=round(same, 6),
                             transposed_identical=round(same_t, 6), prediction=pred.tolist(),
                             prediction_reference=pred_r.tolist())
    for rows in (8192, 65536):
        x = bf16_input((rows, 2048))
        pred = new_prediction(1, "cuda")
        quantize_tensorwise(x, E5M2, with_transpose=True, prediction=pred)  # learn the prediction
        predicted = bench_ms(lambda: quantize_tensorwise(x, E5M2, with_transpose=True, prediction=pred))
        two_pass = bench_ms(lambda: quantize_tensorwise(x, E5M2, with_transpose=True))
        report.add_bench(f"ops: per-tensor E5M2 + transpose {rows}x2048, predicted vs amax pass",
                         predicted_ms=round(predicted, 4), two_pass_ms=round(two_pass, 4),
                         speedup=round(two_pass / predicted, 3))


def check_residual(report, shapes):
    from fp8train.kernels import force_reference
    from fp8train.nn import residual as op

    for shape in shapes:
        r, x = bf16_input(shape), bf16_input(shape, seed=1)
        total, copy = op.residual_add_forward(r, x, emit_fp8_copy=True)
        with force_reference():
            total_r, copy_r = op.residual_add_forward(r, x, emit_fp8_copy=True)
        report.check(f"ops: residual sum {shape}", torch.equal(total, total_r) and torch.equal(total, r + x))
        _check_copy(report, f"ops: residual FP8 copy {shape}", copy, copy_r)


def check_no_recompiles(report):
    from fp8train.kernels import activation as ka, gated_product as kg, residual as kr, rmsnorm as kn
    from fp8train.nn.activation import activation_backward, activation_forward
    from fp8train.nn.gated_mlp import gated_product_backward, gated_product_forward
    from fp8train.nn.residual import residual_add_forward
    from fp8train.nn.rmsnorm import add_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward

    kernels = [kn._rmsnorm_fwd_kernel, kn._rmsnorm_apply_kernel, kn._rmsnorm_bwd_kernel, ka._activation_fwd_kernel,
               ka._activation_apply_kernel, ka._activation_bwd_kernel, kg._gated_fwd_kernel, kg._gated_apply_kernel,
               kg._gated_bwd_kernel, kg._gated_bwd_apply_kernel, kg._gated_fwd_predicted_kernel,
               kg._gated_fwd_repair_kernel, kg._gated_bwd_predicted_kernel, kg._gated_bwd_repair_kernel,
               kr._residual_add_kernel]
    w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")  # the hidden size the checks compiled for

    def run_all(rows):
        x = bf16_input((rows, 4096), seed=rows)
        for quantized in (False, True):
            y, s = rmsnorm_forward(x, w, 1e-5, quantize_output=quantized, output_transpose=quantized)
            add_rmsnorm_forward(x, x, w, 1e-5, quantize_output=quantized, output_transpose=quantized)
            _, sa = activation_forward(x, "silu", quantize_output=quantized, output_transpose=quantized)
            _, sg = gated_product_forward(x, x, "silu", quantize_output=quantized, output_transpose=quantized)
        rmsnorm_backward(x, s, w, residual_grad=x)
        activation_backward(x, sa)
        gated_product_backward(x, sg)
        gated_product_backward(x, sg, quantize_output=True, output_transpose=True)
        prediction = torch.zeros(3, device="cuda")
        gated_product_forward(x, x, "silu", quantize_output=True, output_transpose=True, prediction=prediction[:1])
        gated_product_backward(x, sg, quantize_output=True, output_transpose=True, prediction=prediction[1:])
        residual_add_forward(x, x, emit_fp8_copy=True)

    # the kernels writing transposed copies compile once for row counts that are a multiple of 16 and once for
    # the rest (T_ALIGNED, kernels/quantize.py transposes_aligned); after one of each, nothing new compiles
    run_all(4095)
    run_all(4096)
    before = [compiled_variants(k) for k in kernels]
    for rows in (1, 2, 17, 1000, 4097, 6144, 8192):
        run_all(rows)
    after = [compiled_variants(k) for k in kernels]
    grew = {k.fn.__name__: a - b for k, a, b in zip(kernels, after, before) if a != b}
    report.check("ops: no recompiles for new row counts (1..8192)", not grew, new_variants=grew)


def check_cuda_graph(report):
    from fp8train.nn.gated_mlp import gated_product_forward
    from fp8train.nn.rmsnorm import rmsnorm_forward

    x = bf16_input((2047, 4096))
    w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    g, u = bf16_input((2047, 11008), seed=1), bf16_input((2047, 11008), seed=2)

    def step():
        (qn, tn), sn = rmsnorm_forward(x, w, 1e-5, quantize_output=True, output_transpose=True)
        (qg, tg), sg = gated_product_forward(g, u, "silu", quantize_output=True, output_transpose=True)
        return qn.data, tn, qn.amax, sn.x.data, qg.data, tg, qg.amax, sg.gate.data

    eager = step()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up on a side stream, as CUDA graphs want
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        graph.replay()
        torch.cuda.synchronize()
        same = all(torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b) for a, b in zip(eager, captured))
        report.check("ops: CUDA-graph capture of fused rmsnorm + gated forward (per-tensor FP8 out)", same)
    except Exception as exc:  # noqa: BLE001 - report, don't abort the area
        report.check("ops: CUDA-graph capture of fused rmsnorm + gated forward (per-tensor FP8 out)", False,
                     error=repr(exc)[:300])


NORM_BACKWARD_PLANS = ((1, 4, 8), (1, 8, 4), (2, 4, 8), (2, 8, 8), (4, 8, 4), (4, 16, 2), (8, 16, 2), (1, 4, 16))


def _sweep_norm_backward(report, copy):
    """The norm backward's launch plan (rows per block, warps, programs per SM) on the 953M model's case: hidden
    2048, 8192 tokens, residual gradient and a second output gradient (the norm feeding gate and up).  In the
    model it ran at ~4x its traffic time; dx must not change with the plan."""
    from fp8train.kernels import rmsnorm as kernel
    from fp8train.nn import rmsnorm as rms_op

    x = bf16_input((8192, 2048))
    w = torch.ones(2048, dtype=torch.bfloat16, device="cuda")
    dy, dy2, dres = (bf16_input((8192, 2048), seed=s) for s in (2, 3, 4))
    _, saved = rms_op.rmsnorm_forward(x, w, 1e-5)
    n = x.numel()
    nbytes = 4 * 2 * n + n + n // 16 * 2  # dy, dy2, dres read, dx written; FP8 copy + bf16 amax read

    def run(plan):
        return kernel.rmsnorm_backward(dy, saved.x, saved.rstd, w, saved.style, residual_grad=dres, second_dy=dy2,
                                       plan=plan)

    reference = run(None)[0]
    for plan in (None, *NORM_BACKWARD_PLANS):
        ms = bench_ms(lambda: run(plan))
        dx = run(plan)[0]
        # the row sums' order follows the warp layout: dx may move by a bf16 rounding, no more
        err = max_rel(dx, reference)
        _row(report, f"ops: rmsnorm bwd 8192x2048 + residual + second dy, plan {plan or 'default'}", ms, nbytes, copy,
             same_dx=torch.equal(dx, reference), max_rel_dx=err)
        if err > 2.0**-7:
            report.check(f"ops: rmsnorm bwd plan {plan}: dx within a bf16 rounding of the default plan's", False,
                         max_rel=err)


def bench(report):
    import torch.nn.functional as F

    from fp8train.kernels import force_reference
    from fp8train.nn import activation as act_op, gated_mlp as gated_op, layernorm as ln_op, residual as res_op
    from fp8train.nn import rmsnorm as rms_op

    # norms: hidden 4096, 8192 tokens
    x = bf16_input((8192, 4096))
    n = x.numel()
    copy = copy_tbps(x)
    w = torch.ones(4096, dtype=torch.bfloat16, device="cuda")
    b = torch.zeros(4096, dtype=torch.bfloat16, device="cuda")
    dy = bf16_input((8192, 4096), seed=2)
    copy_bytes = n + n // 16 * 2  # E4M3 + bf16 amax

    def hf_rms(t):
        t32 = t.float()
        return w * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(t.dtype)

    plain = bench_ms(lambda: hf_rms(x))
    ms = bench_ms(lambda: rms_op.rmsnorm_forward(x, w, 1e-5))
    with force_reference():
        ref = bench_ms(lambda: rms_op.rmsnorm_forward(x, w, 1e-5))
    _row(report, "ops: rmsnorm fwd (y bf16 + FP8 copy) 8192x4096", ms, 2 * n + 2 * n + copy_bytes, copy, ref, plain)
    for transpose in (False, True):
        ms = bench_ms(lambda: rms_op.rmsnorm_forward(x, w, 1e-5, quantize_output=True, output_transpose=transpose))
        with force_reference():
            ref = bench_ms(lambda: rms_op.rmsnorm_forward(x, w, 1e-5, quantize_output=True,
                                                          output_transpose=transpose))
        _row(report, f"ops: rmsnorm fwd (per-tensor E4M3 y{' + transpose' if transpose else ''} + FP8 copy) "
             "8192x4096", ms, 2 * n + copy_bytes + n * (2 if transpose else 1), copy, ref,
             note="two passes over x (row stats + amax, then scale)")
    r = bf16_input((8192, 4096), seed=5)
    for transpose in (False, True):
        ms = bench_ms(lambda: rms_op.add_rmsnorm_forward(r, x, w, 1e-5, quantize_output=True,
                                                         output_transpose=transpose))
        with force_reference():
            ref = bench_ms(lambda: rms_op.add_rmsnorm_forward(r, x, w, 1e-5, quantize_output=True,
                                                              output_transpose=transpose))
        _row(report, f"ops: residual add + rmsnorm fwd (h bf16 + FP8 copy of h + per-tensor E4M3 y"
             f"{' + transpose' if transpose else ''}) 8192x4096",
             ms, 4 * n + 2 * n + copy_bytes + n * (2 if transpose else 1), copy, ref,
             note="pass 2 re-reads h (2 B/element) to scale y")
    _, saved = rms_op.rmsnorm_forward(x, w, 1e-5)
    ms = bench_ms(lambda: rms_op.rmsnorm_backward(dy, saved, w))
    with force_reference():
        ref = bench_ms(lambda: rms_op.rmsnorm_backward(dy, saved, w))
    _row(report, "ops: rmsnorm bwd (dx + dweight) 8192x4096", ms, 2 * n + copy_bytes + 2 * n, copy, ref)
    ms = bench_ms(lambda: rms_op.rmsnorm_backward(dy, saved, w, residual_grad=x))
    _row(report, "ops: rmsnorm bwd + residual grad add 8192x4096", ms, 4 * n + copy_bytes + 2 * n, copy)
    _sweep_norm_backward(report, copy)

    plain = bench_ms(lambda: F.layer_norm(x, (4096,), w, b, 1e-5))
    ms = bench_ms(lambda: ln_op.layernorm_forward(x, w, b, 1e-5))
    with force_reference():
        ref = bench_ms(lambda: ln_op.layernorm_forward(x, w, b, 1e-5))
    _row(report, "ops: layernorm fwd (y bf16 + FP8 centred copy) 8192x4096", ms, 4 * n + copy_bytes, copy, ref,
         plain)
    _, saved = ln_op.layernorm_forward(x, w, b, 1e-5)
    ms = bench_ms(lambda: ln_op.layernorm_backward(dy, saved, w, True))
    _row(report, "ops: layernorm bwd (dx + dweight + dbias) 8192x4096", ms, 4 * n + copy_bytes, copy)

    r = bf16_input((8192, 4096), seed=5)
    plain = bench_ms(lambda: r + x)
    ms = bench_ms(lambda: res_op.residual_add_forward(r, x))
    _row(report, "ops: residual add 8192x4096", ms, 6 * n, copy, plain_ms=plain)
    ms = bench_ms(lambda: res_op.residual_add_forward(r, x, emit_fp8_copy=True))
    with force_reference():
        ref = bench_ms(lambda: res_op.residual_add_forward(r, x, emit_fp8_copy=True))
    _row(report, "ops: residual add + FP8 1x16 copy 8192x4096", ms, 6 * n + copy_bytes, copy, ref, plain)

    # MLP-sized element-wise ops: 8192 tokens x 11008
    gu = bf16_input((8192, 2 * 11008))
    gate, up = gu.chunk(2, dim=-1)
    g = gate.contiguous()
    n = g.numel()
    copy = copy_tbps(g)
    copy_bytes = n + n // 16 * 2
    dh = bf16_input((8192, 11008), seed=3)
    for name in ("silu", "gelu_tanh"):
        plain = bench_ms(lambda: F.silu(g) if name == "silu" else F.gelu(g, approximate="tanh"))
        ms = bench_ms(lambda: act_op.activation_forward(g, name))
        with force_reference():
            ref = bench_ms(lambda: act_op.activation_forward(g, name))
        _row(report, f"ops: {name} fwd (y bf16 + FP8 copy) 8192x11008", ms, 4 * n + copy_bytes, copy, ref, plain)
        _, saved = act_op.activation_forward(g, name)
        ms = bench_ms(lambda: act_op.activation_backward(dh, saved))
        _row(report, f"ops: {name} bwd 8192x11008", ms, 4 * n + copy_bytes, copy)
    plain = bench_ms(lambda: F.silu(gate) * up)
    ms = bench_ms(lambda: gated_op.gated_product_forward(gate, up, "silu"))
    with force_reference():
        ref = bench_ms(lambda: gated_op.gated_product_forward(gate, up, "silu"))
    _row(report, "ops: gated silu fwd (h bf16 + 2 FP8 copies) 8192x11008", ms, 6 * n + 2 * copy_bytes, copy, ref,
         plain)
    for transpose in (False, True):
        ms = bench_ms(lambda: gated_op.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                             output_transpose=transpose))
        _row(report, f"ops: gated silu fwd (per-tensor E4M3 h{' + transpose' if transpose else ''} + 2 FP8 copies)"
             " 8192x11008", ms, 4 * n + 2 * copy_bytes + n * (2 if transpose else 1), copy,
             note="two passes over gate and up (amax, then scale)")
    _, saved = gated_op.gated_product_forward(gate, up, "silu")
    ms = bench_ms(lambda: gated_op.gated_product_backward(dh, saved))
    with force_reference():
        ref = bench_ms(lambda: gated_op.gated_product_backward(dh, saved))
    _row(report, "ops: gated silu bwd (dgate + dup) 8192x11008", ms, 2 * n + 2 * copy_bytes + 4 * n, copy, ref)
    for transpose in (False, True):
        ms = bench_ms(lambda: gated_op.gated_product_backward(dh, saved, quantize_output=True,
                                                              output_transpose=transpose))
        with force_reference():
            ref = bench_ms(lambda: gated_op.gated_product_backward(dh, saved, quantize_output=True,
                                                                   output_transpose=transpose))
        _row(report, f"ops: gated silu bwd (per-tensor E5M2 dgate, dup{' + transposes' if transpose else ''}) "
             "8192x11008", ms, 2 * n + 2 * copy_bytes + 2 * n * (2 if transpose else 1), copy, ref,
             note="two passes over dh and the copies (amax, then scale)")
    # delayed scaling (fp8train.delayed_scaling): one encoding pass + an empty repair pass, steady state (the
    # prediction kept), against the two-pass just-in-time kernels timed in the same loop
    prediction = torch.zeros(3, device="cuda")
    for _ in range(2):  # the first call repairs, the second sets a prediction that then holds
        gated_op.gated_product_forward(gate, up, "silu", quantize_output=True, output_transpose=True,
                                       prediction=prediction[:1])
        gated_op.gated_product_backward(dh, saved, quantize_output=True, output_transpose=True,
                                        prediction=prediction[1:])
    jit = bench_ms(lambda: gated_op.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                          output_transpose=True))
    ms = bench_ms(lambda: gated_op.gated_product_forward(gate, up, "silu", quantize_output=True,
                                                         output_transpose=True, prediction=prediction[:1]))
    _row(report, "ops: gated silu fwd, predicted scale (per-tensor E4M3 h + transpose + 2 FP8 copies) 8192x11008",
         ms, 4 * n + 2 * copy_bytes + 2 * n, copy, just_in_time_ms=round(jit, 4),
         speedup_vs_just_in_time=round(jit / ms, 3))
    jit = bench_ms(lambda: gated_op.gated_product_backward(dh, saved, quantize_output=True, output_transpose=True))
    ms = bench_ms(lambda: gated_op.gated_product_backward(dh, saved, quantize_output=True, output_transpose=True,
                                                          prediction=prediction[1:]))
    _row(report, "ops: gated silu bwd, predicted scales (per-tensor E5M2 dgate, dup + transposes) 8192x11008",
         ms, 2 * n + 2 * copy_bytes + 4 * n, copy, just_in_time_ms=round(jit, 4),
         speedup_vs_just_in_time=round(jit / ms, 3))


def check_cross_entropy(report):
    """The fused loss + gradient kernel against the torch reference of the chunked linear cross-entropy, and
    both timed (fwd + bwd of the lm_head and loss; 953M shapes: 8192 tokens, hidden 2048, vocabulary 32000)."""
    from fp8train.kernels import force_reference
    from fp8train.nn.chunked_cross_entropy import chunked_linear_cross_entropy

    hidden = (bf16_input((8191, 2048)).float() * 0.05).to(torch.bfloat16)
    weight = (bf16_input((32000, 2048), seed=1).float() * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, 32000, (8191,), device="cuda")
    labels[::7] = -100

    def loss_and_grads(chunk_rows=2048):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = chunked_linear_cross_entropy(h, w, labels, chunk_rows=chunk_rows)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    got = loss_and_grads()
    with force_reference():
        ref = loss_and_grads()
    loss_rel = abs(float(got[0]) - float(ref[0])) / abs(float(ref[0]))
    report.check("ops: fused cross-entropy loss (8191x2048 @ 32000)", loss_rel <= 1e-5, rel_err=loss_rel)
    _check_close(report, "ops: fused cross-entropy grad hidden", got[1], ref[1], tol=2**-6)
    _check_close(report, "ops: fused cross-entropy grad weight", got[2], ref[2], tol=2**-6)
    ms = bench_ms(loss_and_grads)
    with force_reference():
        ref_ms = bench_ms(loss_and_grads)
    report.add_bench("ops: chunked lm_head + cross-entropy fwd+bwd 8191x2048 @ 32000", ms=round(ms, 3),
                     torch_ref_ms=round(ref_ms, 3), speedup=round(ref_ms / ms, 2))
    for rows in (4096, 8192):  # Recipe.loss_chunk_rows (default 2048)
        chunk_ms = bench_ms(lambda: loss_and_grads(rows))
        report.add_bench(f"ops: chunked lm_head + cross-entropy fwd+bwd, {rows}-token chunks", ms=round(chunk_ms, 3),
                         vs_2048_token_chunks=round(ms / chunk_ms, 3))


def run(report) -> None:
    if not torch.cuda.is_available():
        report.check("ops: CUDA available", False, detail="no GPU")
        return
    torch.manual_seed(0)
    check_rmsnorm(report, [(4095, 4096), (3, 333, 2048)])
    check_layernorm(report, [(4095, 4096)])
    check_activation(report, [(4095, 4096), (8191, 11008)])
    check_gated(report, [(4095, 11008), (1, 7, 1376)])
    check_gated_predicted(report, [(4095, 11008), (1, 7, 1376)])
    check_quantize_predicted(report, [(4095, 2048), (3, 333, 160)])
    check_residual(report, [(4095, 4096), (2, 1023, 5120)])
    check_no_recompiles(report)
    check_cuda_graph(report)
    check_cross_entropy(report)
    bench(report)
