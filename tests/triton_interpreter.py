"""Run Triton kernels on CPU with TRITON_INTERPRET=1 (kernel indexing/masking checks on tiny inputs).

Import this module before triton: it sets TRITON_INTERPRET=1 when ``FP8TRAIN_INTERPRET`` asks for it, and works
around an interpreter incompatibility with numpy >= 2.3 (``int()`` of a 1-element array, used by ``range`` over a
runtime bound).  The interpreter also mis-rounds float8 casts (ties go up; a carry into the exponent can drop a
whole binade), so FP8 data is compared with :func:`fp8_equal_modulo_interpreter`.
"""

from __future__ import annotations

import contextlib

import torch


def run_under_interpreter(script: str, *args: str, marker: str, timeout: int = 900) -> None:
    """Run ``script`` (with ``args``) in a fresh Python with TRITON_INTERPRET=1 -- it must be set before triton
    loads -- and assert that it succeeded and printed ``marker``."""
    import os
    import pathlib
    import subprocess
    import sys

    here = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, script, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert marker in proc.stdout, proc.stdout[-3000:]


def patch_interpreter() -> None:
    from triton.runtime import interpreter

    if getattr(interpreter, "_fp8train_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._fp8train_patched = True


def patch_bf16_rounding() -> None:
    """Make the interpreter round float32 -> bfloat16 casts to nearest-even, as the GPU does (it truncates), so
    kernels whose point is to round exactly like torch can be compared bit for bit."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    if getattr(interpreter, "_fp8train_bf16_patched", False):
        return
    original = interpreter._convert_float

    def convert(input, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype == tl.bfloat16 and "RTZ" not in str(rounding_mode).upper():
            values = torch.from_numpy(np.ascontiguousarray(input, dtype=np.float32))
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return original(input, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert
    interpreter._fp8train_bf16_patched = True


def fp8_mismatches(got: torch.Tensor, ref: torch.Tensor, fmt, steps: int = 1, floor: float = 0.0) -> int:
    """Elements where FP8 ``got`` differs from ``ref`` by more than ``steps`` steps, except the interpreter's broken
    carry: a value that should round up to a power of two comes out as half of it."""
    a, b = got.float(), ref.float()
    both_nan = torch.isnan(a) & torch.isnan(b)
    step = fmt.quantum(b).float()
    within = (a - b).abs() <= step * steps * 1.01 + floor
    carry = (torch.frexp(b.abs())[0] == 0.5) | ((torch.frexp(a.abs())[0] == 0.5) & ((2 * a - b).abs() <= step * steps * 1.01))
    return int(((a != b) & ~within & ~carry & ~both_nan).sum())


# ------------------------------------------------------------------------------------------------------------
# kernel checks against the torch references (run as ``python tests/triton_interpreter.py <op>``)
# ------------------------------------------------------------------------------------------------------------

# float32 / float16 inputs: numpy rounds these exactly; the interpreter truncates float32 -> bfloat16 casts, so
# bfloat16 outputs are compared to within one bf16 step.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (2, 16, 96): 32 rows, a multiple of 16 -- the transposed stores' aligned variant (T_ALIGNED); the others are not
SHAPES = ((5, 48), (3, 3, 64), (33, 160), (2, 16, 96))


def close(got, ref, dtype, scale=1.0):
    rtol = {torch.float32: 2e-6, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype] * scale
    err = (got.double() - ref.double()).abs()
    tol = rtol * ref.double().abs().amax().clamp_min(1e-30)
    assert bool((err <= tol).all()), f"max error {float(err.max()):.3g} > {float(tol):.3g}"


def same_fp8(got, ref, fmt=None, steps=1, floor=0.0):
    from fp8train.formats import E4M3

    bad = fp8_mismatches(got, ref, fmt or E4M3, steps, floor)
    assert bad == 0, f"{bad} FP8 elements off by more than {steps} step(s)"


def same_tensorwise(q, t, qr, tr, dtype):
    """Per-tensor FP8 outputs of the fused producers: their y may differ from the reference's by a rounding of
    y's dtype (reduction order), which moves the amax; allow two steps on the data."""
    close(q.amax, qr.amax, dtype, scale=2)
    same_fp8(q.data, qr.data, steps=2)
    same_fp8(t, tr, steps=2)


def same_copy(got, ref):
    same_fp8(got.data, ref.data)
    assert torch.equal(got.amax, ref.amax)


def _inputs(shape, dtype, seed=0, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = offset + torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen))
    return x.to(dtype)


def check_quantize():
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels.quantize import dequantize_tensorwise, quantize_groups, quantize_tensorwise
    from fp8train.quant import quantize

    # one-pass per-tensor dequantization: torch's CUDA arithmetic exactly (a product with the float32 reciprocal
    # of fmax, then amax; float32 out; the interpreter's float8 -> float32 upcast is exact)
    for fmt in (E4M3, E5M2):
        q = quantize(_inputs((33, 160), torch.float32), fmt, "tensor")
        got = dequantize_tensorwise(q.data, q.amax, float(fmt.max), torch.float32)
        inverse = torch.tensor(1.0 / fmt.max, dtype=torch.float32)
        assert torch.equal(got, q.data.float() * inverse * q.amax.float()), fmt.name
        # and within one float32 ulp of the CPU reference, which divides
        close(got, q.dequantize(torch.float32), torch.float32, scale=1)

    for shape in SHAPES + ((1, 16),):
        for dtype in DTYPES:
            x = _inputs(shape, dtype)
            for scale_dtype in (torch.bfloat16, torch.float32):
                for g in (16, 32):
                    if shape[-1] % g:
                        continue
                    q = quantize_groups(x, E4M3, g, scale_dtype)
                    r = quantize(x, E4M3, f"1x{g}", scale_dtype=scale_dtype)
                    same_copy(q, r)
            for fmt in (E4M3, E5M2):
                q, t = quantize_tensorwise(x, fmt, with_transpose=True)
                r = quantize(x, fmt, "tensor")
                assert torch.equal(q.amax, r.amax)
                same_fp8(q.data, r.data, fmt)
                same_fp8(t, r.data.reshape(-1, shape[-1]).t(), fmt)
                given = quantize_tensorwise(x, fmt, amax=r.amax * 4)
                same_fp8(given.data, quantize(x, fmt, "tensor", amax=r.amax * 4).data, fmt)
    check_quantize_predicted()
    # NaN with every payload bit set (CUDA's canonical float32 NaN) and inf poison exactly their own group
    x = _inputs((4, 64), torch.float32)
    x.view(torch.int32)[1, 20] = 0x7FFFFFFF
    x[2, 40] = float("-inf")
    for scale_dtype in (torch.bfloat16, torch.float32):
        out = quantize_groups(x, E4M3, 16, scale_dtype).dequantize()
        bad = ~out.isfinite()
        assert bool(bad[1, 16:32].all()) and bool(bad[2, 32:48].all()) and int(bad.sum()) == 32, scale_dtype
    assert bool(quantize_tensorwise(x, E4M3).amax.isnan())


def check_quantize_predicted():
    """Per-tensor quantization with predicted amaxes (FP8 linears' inputs and gradients under delayed scaling):
    each branch of the repair rule gives the reference's bits (row-major and transposed) and the reference's next
    prediction -- on odd calls with two persistent repair programs looping over every tile."""
    from unittest import mock

    from fp8train import mixed_granularity as mg
    from fp8train.delayed_scaling import every_branch
    from fp8train.formats import E4M3, E5M2
    from fp8train.kernels import plans
    from fp8train.kernels.quantize import quantize_tensorwise

    two_programs = mock.patch.object(plans, "partials_capacity", lambda x, family: 2)
    for shape in ((3, 37, 96), (130, 272), (4, 16, 96)):  # ragged tiles along both dims; 64 rows: aligned transposes
        for dtype in DTYPES:
            base = _inputs(shape, dtype)
            for fmt, reference in ((E4M3, mg.quantize_for_linear), (E5M2, mg.quantize_grad_for_linear)):
                pred, pred_r = torch.zeros(1), torch.zeros(1)
                for call, factor in every_branch(pred, pred_r):
                    x = (base * factor).to(dtype)
                    with two_programs if call % 2 else contextlib.nullcontext():
                        q, t = quantize_tensorwise(x, fmt, with_transpose=True, prediction=pred)
                    with mock.patch.object(mg, "use_triton", lambda *args: False):  # the torch reference
                        r, tr = reference(x, with_transpose=True, prediction=pred_r)
                    assert torch.equal(q.amax, r.amax), (shape, dtype, fmt.name, call)
                    assert torch.equal(pred, pred_r), (shape, dtype, fmt.name, call)
                    same_fp8(q.data, r.data, fmt)
                    same_fp8(t, tr, fmt)


def check_rmsnorm():
    from fp8train.kernels import rmsnorm as kernel
    from fp8train.kernels.quantize import dequantize_tensorwise
    from fp8train.nn import rmsnorm as ref

    for shape in SHAPES:
        for dtype in DTYPES:
            x = _inputs(shape, dtype)
            dy = _inputs(shape, dtype, seed=1)
            for style in ref.STYLES:
                for w in (None, (1 + 0.3 * _inputs(shape[-1:], torch.float32, seed=2)).to(dtype)):
                    y, rstd, copy = kernel.rmsnorm_forward(x, w, 1e-5, style)
                    yr, sr = ref.rmsnorm_forward(x, w, 1e-5, style=style)
                    assert y.dtype == yr.dtype and y.shape == yr.shape
                    close(y, yr, dtype)
                    close(rstd, sr.rstd, torch.float32)
                    same_copy(copy, sr.x)
                    (q, t), _, _ = kernel.rmsnorm_forward(x, w, 1e-5, style, quantize_output=True,
                                                          output_transpose=True)
                    (qr, tr), _ = ref.rmsnorm_forward(x, w, 1e-5, style=style, quantize_output=True,
                                                      output_transpose=True)
                    same_tensorwise(q, t, qr, tr, dtype)
                    # the FP8 output's values, written by the same pass: dequantize_tensorwise's bits
                    for out_dtype in (torch.bfloat16, torch.float32):
                        (q2, _), _, _, values = kernel.rmsnorm_forward(x, w, 1e-5, style, quantize_output=True,
                                                                      output_transpose=True,
                                                                      dequantized_dtype=out_dtype)
                        want = dequantize_tensorwise(q2.data, q2.amax, 448.0, out_dtype)
                        assert values.dtype == out_dtype and torch.equal(values, want)
                    dx, dw = kernel.rmsnorm_backward(dy.to(yr.dtype), sr.x, sr.rstd, w, style)
                    dxr, dwr = ref.rmsnorm_backward(dy.to(yr.dtype), sr, w)
                    close(dx, dxr, dtype, scale=4)
                    # a tuning plan (rows per block, warps, programs per SM) changes the launch, not dx
                    dxp, dwp = kernel.rmsnorm_backward(dy.to(yr.dtype), sr.x, sr.rstd, w, style, plan=(1, 4, 1))
                    assert torch.equal(dxp, dx)
                    if w is not None:
                        close(dwp, dw, torch.float32, scale=4)
                    # fused residual add + norm (h = r + x is the norm's input)
                    r = _inputs(shape, dtype, seed=5)
                    h, y2, rstd2, copy2 = kernel.rmsnorm_forward(x, w, 1e-5, style, residual=r)
                    hr, y2r, sr2 = ref.add_rmsnorm_forward(r, x, w, 1e-5, style=style)
                    close(h, hr, dtype)
                    close(y2, y2r, dtype, scale=2)
                    close(rstd2, sr2.rstd, dtype, scale=2)  # h carries a rounding of its dtype
                    close(copy2.amax.float(), sr2.x.amax.float(), torch.bfloat16)
                    same_fp8(copy2.data, sr2.x.data, steps=2)
                    h, (q, t), _, _ = kernel.rmsnorm_forward(x, w, 1e-5, style, residual=r, quantize_output=True,
                                                             output_transpose=True)
                    _, (qr, tr), _ = ref.add_rmsnorm_forward(r, x, w, 1e-5, style=style, quantize_output=True,
                                                             output_transpose=True)
                    close(h, hr, dtype)
                    same_tensorwise(q, t, qr, tr, dtype)
                    dres = _inputs(shape, dtype, seed=4)
                    slot = torch.zeros(1, dtype=torch.int32)
                    dx2, _ = kernel.rmsnorm_backward(dy.to(yr.dtype), sr.x, sr.rstd, w, style, residual_grad=dres,
                                                     amax_slot=slot)
                    close(dx2, ref.rmsnorm_backward(dy.to(yr.dtype), sr, w, residual_grad=dres)[0], dtype, scale=4)
                    # max|dx| of the stored values, for the next FP8 linear's quantizer (fp8train.nn.grad_amax)
                    assert slot.view(torch.float32).item() == dx2.abs().max().float().item()
                    # two output gradients summed in the kernel (a norm feeding gate and up)
                    dy_b = _inputs(shape, yr.dtype, seed=6)
                    dx3, dw3 = kernel.rmsnorm_backward(dy.to(yr.dtype), sr.x, sr.rstd, w, style, second_dy=dy_b)
                    dx3r, dw3r = ref.rmsnorm_backward(dy.to(yr.dtype), sr, w, second_dy=dy_b)
                    close(dx3, dx3r, dtype, scale=4)
                    if w is not None:
                        close(dw3, dw3r, dtype, scale=4)
                    # three (q/k/v reading one norm output)
                    dy_c = _inputs(shape, yr.dtype, seed=7)
                    dx4, dw4 = kernel.rmsnorm_backward(dy.to(yr.dtype), sr.x, sr.rstd, w, style, second_dy=dy_b,
                                                       third_dy=dy_c)
                    dx4r, dw4r = ref.rmsnorm_backward(dy.to(yr.dtype), sr, w, second_dy=dy_b, third_dy=dy_c)
                    close(dx4, dx4r, dtype, scale=4)
                    if w is not None:
                        close(dw4, dw4r, dtype, scale=4)
                    if w is not None:
                        close(dw, dwr, dtype, scale=4)


def check_layernorm():
    from fp8train.kernels import layernorm as kernel
    from fp8train.nn import layernorm as ref

    for shape in SHAPES:
        for dtype in DTYPES:
            x = _inputs(shape, dtype, offset=2.0)
            dy = _inputs(shape, dtype, seed=1)
            w = (1 + 0.3 * _inputs(shape[-1:], torch.float32, seed=2)).to(dtype)
            b = _inputs(shape[-1:], dtype, seed=3)
            for weight, bias in ((w, b), (w, None), (None, None)):
                y, rstd, copy = kernel.layernorm_forward(x, weight, bias, 1e-5)
                yr, sr = ref.layernorm_forward(x, weight, bias, 1e-5)
                close(y, yr, dtype, scale=2)
                close(rstd, sr.rstd, torch.float32, scale=4)
                # the centred values themselves differ by float32 reduction order (and by the interpreter's
                # truncating bf16 cast), which can move a group's amax
                close(copy.amax.float(), sr.centered.amax.float(), torch.bfloat16)
                same_fp8(copy.data, sr.centered.data, steps=2)
                (q, t), _, _ = kernel.layernorm_forward(x, weight, bias, 1e-5, quantize_output=True,
                                                        output_transpose=True)
                (qr, tr), _ = ref.layernorm_forward(x, weight, bias, 1e-5, quantize_output=True,
                                                    output_transpose=True)
                same_tensorwise(q, t, qr, tr, dtype)
                dx, dw, db = kernel.layernorm_backward(dy, sr.centered, sr.rstd, weight, bias is not None)
                dxr, dwr, dbr = ref.layernorm_backward(dy, sr, weight, bias is not None)
                close(dx, dxr, dtype, scale=4)
                for got, expected in ((dw, dwr), (db, dbr)):
                    assert (got is None) == (expected is None)
                    if got is not None:
                        close(got, expected, dtype, scale=4)


def check_activation():
    from fp8train.kernels import activation as kernel
    from fp8train.nn import activation as ref

    for shape in SHAPES:
        for dtype in DTYPES:
            x = _inputs(shape, dtype)
            dy = _inputs(shape, dtype, seed=1)
            for name in ref.ACTIVATIONS:
                y, copy = kernel.activation_forward(x, name)
                yr, sr = ref.activation_forward(x, name)
                close(y, yr, dtype, scale=2)
                same_copy(copy, sr.x)
                (q, t), _ = kernel.activation_forward(x, name, quantize_output=True, output_transpose=True)
                (qr, tr), _ = ref.activation_forward(x, name, quantize_output=True, output_transpose=True)
                same_tensorwise(q, t, qr, tr, dtype)
                close(kernel.activation_backward(dy, sr.x, name), ref.activation_backward(dy, sr), dtype, scale=4)


def check_gated_product():
    from fp8train.kernels import gated_product as kernel
    from fp8train.nn import gated_mlp as ref

    for shape in SHAPES:
        for dtype in DTYPES:
            fused = _inputs((*shape[:-1], 2 * shape[-1]), dtype)
            gate, up = fused.chunk(2, dim=-1)  # strided row views, as a fused gate_up projection gives
            dh = _inputs(shape, dtype, seed=1)
            for name in ("silu", "gelu", "gelu_tanh"):
                h, gc, uc = kernel.gated_product_forward(gate, up, name)
                hr, sr = ref.gated_product_forward(gate, up, name)
                close(h, hr, dtype, scale=2)
                same_copy(gc, sr.gate)
                same_copy(uc, sr.up)
                (q, t), _, _ = kernel.gated_product_forward(gate, up, name, quantize_output=True,
                                                            output_transpose=True)
                (qr, tr), _ = ref.gated_product_forward(gate, up, name, quantize_output=True, output_transpose=True)
                same_tensorwise(q, t, qr, tr, dtype)
                dg, du = kernel.gated_product_backward(dh, sr.gate, sr.up, name)
                dgr, dur = ref.gated_product_backward(dh, sr)
                close(dg, dgr, dtype, scale=4)
                close(du, dur, dtype, scale=4)
                from fp8train.formats import E5M2

                got = kernel.gated_product_backward(dh, sr.gate, sr.up, name, quantize_output=True,
                                                    output_transpose=True)
                expected = ref.gated_product_backward(dh, sr, quantize_output=True, output_transpose=True)
                # E5M2 spans 2^-16..57344: float32 tails of act'(x) (1 + erf(x) cancelling to ~1e-7) land many
                # subnormal steps apart while being 2^-18 of the amax or less; allow that absolute floor
                for (q, t), (qr, tr) in zip(got, expected):
                    close(q.amax, qr.amax, dtype, scale=2)
                    same_fp8(q.data, qr.data, E5M2, steps=2, floor=E5M2.max * 2**-18)
                    same_fp8(t, tr, E5M2, steps=2, floor=E5M2.max * 2**-18)
            check_gated_predicted(kernel, ref, fused, dh, dtype)


def check_gated_predicted(kernel, ref, fused, dh, dtype):
    """Delayed scaling: each branch of the repair rule (first call, prediction kept, overflow, collapse, NaN
    prediction) gives the reference's encoding and the reference's next prediction -- with the repair passes'
    usual programs (here one per tile) and with two persistent programs looping over all tiles."""
    from unittest import mock

    from fp8train.delayed_scaling import every_branch
    from fp8train.formats import E5M2

    pred, pred_r = torch.zeros(3), torch.zeros(3)
    two_programs = mock.patch.object(kernel.plans, "partials_capacity", lambda x, family: 2)
    for call, factor in every_branch(pred, pred_r):
        with two_programs if call % 2 else contextlib.nullcontext():
            gate, up = (fused * factor).to(dtype).chunk(2, dim=-1)
            (q, t), _, _ = kernel.gated_product_forward(gate, up, "silu", quantize_output=True, output_transpose=True,
                                                        prediction=pred[0:1])
            (qr, tr), sr = ref.gated_product_forward(gate, up, "silu", quantize_output=True, output_transpose=True,
                                                     prediction=pred_r[0:1])
            same_tensorwise(q, t, qr, tr, dtype)
            close(pred[:1], pred_r[:1], dtype, scale=2)
            got = kernel.gated_product_backward((dh * factor).to(dtype), sr.gate, sr.up, "silu", quantize_output=True,
                                                output_transpose=True, prediction=pred[1:3])
            expected = ref.gated_product_backward((dh * factor).to(dtype), sr, quantize_output=True,
                                                  output_transpose=True, prediction=pred_r[1:3])
            for (q, t), (qr, tr) in zip(got, expected):
                close(q.amax, qr.amax, dtype, scale=2)
                same_fp8(q.data, qr.data, E5M2, steps=2, floor=E5M2.max * 2**-18)
                same_fp8(t, tr, E5M2, steps=2, floor=E5M2.max * 2**-18)
            close(pred, pred_r, dtype, scale=2)


def check_gated_projection():
    """The fused GEMM + gated product kernels against the composition of the separate reference ops, on tiles
    small enough for ragged edges everywhere (rows, columns, an uneven and an even K) and several tile groups.
    The GEMMs sum in another order than the reference's, which can move a rounding of the model dtype: amaxes
    and predictions are compared to within that, FP8 data to two steps.  Every branch of the predicted-scale
    repair runs (first call, kept, overflow, collapse, NaN prediction)."""
    from fp8train.delayed_scaling import every_branch
    from fp8train.formats import E5M2
    from fp8train.kernels import gated_projection as kernel
    from fp8train.nn import gated_projection as ref
    from fp8train.nn.linear import fp8_linear_forward, fp8_weight, quantize_linear_input, quantize_output_grad
    from fp8train.recipes import resolve_recipe

    patch_bf16_rounding()
    recipe = resolve_recipe("coat-lean")
    gen = torch.Generator().manual_seed(0)
    kernel.sm_count = lambda x: 2  # persistent launches: 2 programs loop over all tiles
    for (M, N, K), dtype, name, persistent in (((70, 96, 80), torch.bfloat16, "silu", False),
                                               ((70, 96, 80), torch.bfloat16, "silu", True),
                                               ((33, 64, 64), torch.float32, "gelu", False)):
        for direction in ("forward", "backward"):
            kernel.set_tile(direction, kernel.GemmTile(32, 32, 32, stages=1, warps=4, group_m=2,
                                                       persistent=persistent))
        x = torch.randn(M, K, generator=gen).to(dtype)
        w_gate, w_up = (torch.randn(N, K, generator=gen).to(dtype) / 8 for _ in range(2))
        w_down = torch.randn(K, N, generator=gen).to(dtype) / 8
        dout = torch.randn(M, K, generator=gen).to(dtype)
        pred, pred_r = torch.zeros(3), torch.zeros(3)
        for _, factor in every_branch(pred, pred_r):
            x_in = quantize_linear_input((x * factor).to(dtype), recipe)
            h_ref, gated, _, _ = ref.gated_projection_forward(x_in, w_gate, w_up, name, recipe=recipe,
                                                              out_dtype=dtype, prediction=pred_r[0:1],
                                                              output_transpose=True)
            wg, wu = fp8_weight(w_gate, recipe).q, fp8_weight(w_up, recipe).q
            scales = torch.stack([x_in.q.scale.reshape(()), wg.scale.reshape(()), wu.scale.reshape(())]).float()
            data, data_t, (amax, scale), gate_copy, up_copy = kernel.gated_projection_forward(
                x_in.q.data, wg.data, wu.data, scales, dtype, name, pred[0:1], True)
            hr = h_ref.q
            close(amax, hr.amax, dtype)
            close(scale, hr.scale, dtype)
            same_fp8(data, hr.data, steps=2)
            same_fp8(data_t, hr.data.t(), steps=2)
            for (d, a), copy in ((gate_copy, gated.gate), (up_copy, gated.up)):
                same_fp8(d, copy.data, steps=2)
                close(a, copy.amax, torch.bfloat16)
            close(pred[:1], pred_r[:1], dtype)

            _, saved_down = fp8_linear_forward(h_ref, w_down, recipe=recipe, out_dtype=dtype)
            dy = (dout * factor).to(dtype)
            expected = ref.gated_projection_backward(dy, saved_down, w_down, gated, recipe=recipe,
                                                     quantize_grads=True, output_transpose=True,
                                                     prediction=pred_r[1:3])
            dy_in = quantize_output_grad(dy, recipe, transpose=False)
            wd = fp8_weight(w_down, recipe).q
            scales = torch.stack([dy_in.q.scale.reshape(()), wd.scale.reshape(())]).float()
            got = kernel.gated_projection_backward(dy_in.q.data, wd.data.t().contiguous(), scales,
                                                   (gated.gate.data, gated.gate.amax), (gated.up.data, gated.up.amax),
                                                   dtype, name, E5M2, pred[1:3], True)
            for (d, d_t, a, s), e in zip(got, expected[:2]):
                close(a, e.q.amax, dtype)
                close(s, e.q.scale, dtype)
                same_fp8(d, e.q.data, E5M2, steps=2, floor=E5M2.max * 2**-18)
                same_fp8(d_t, e.q.data.t(), E5M2, steps=2, floor=E5M2.max * 2**-18)
            close(pred, pred_r, dtype)
    kernel.set_tile("forward", None)
    kernel.set_tile("backward", None)


def check_residual():
    from fp8train.kernels import residual as kernel
    from fp8train.nn import residual as ref

    for shape in SHAPES:
        for dtype in DTYPES:
            r, x = _inputs(shape, dtype), _inputs(shape, dtype, seed=1)
            total, copy = kernel.residual_add(r, x, emit_fp8_copy=True)
            total_r, copy_r = ref.residual_add_forward(r, x, emit_fp8_copy=True)
            close(total, total_r, dtype)
            if dtype != torch.bfloat16:  # the copy is made from the rounded sum
                same_copy(copy, copy_r)
            plain, none = kernel.residual_add(r, x)
            assert none is None
            close(plain, total_r, dtype)


def check_cross_entropy():
    from fp8train.kernels.cross_entropy import cross_entropy_rows

    for rows, vocab in ((7, 50), (4, 300)):
        for dtype in (torch.float32, torch.bfloat16):
            logits = (_inputs((rows, vocab), torch.float32) * 4).to(dtype)
            labels = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(rows))
            labels[1] = -100
            scale = torch.tensor(1 / 3.0)
            loss, grad = cross_entropy_rows(logits, labels, -100, scale)
            x = logits.double()
            ref_loss = torch.logsumexp(x, -1) - x.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
            ref_loss[1] = 0.0
            ref_grad = torch.softmax(x, -1)
            ref_grad[torch.arange(rows), labels.clamp_min(0)] -= 1.0
            ref_grad = ref_grad / 3.0
            ref_grad[1] = 0.0
            close(loss, ref_loss, torch.float32, scale=4)
            close(grad, ref_grad, dtype, scale=2)
            loss_only, none = cross_entropy_rows(logits, labels, -100, None)
            assert none is None and torch.equal(loss_only, loss)


def _same_bits(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape, (got.dtype, ref.dtype, got.shape, ref.shape)
    as_int = {4: torch.int32, 2: torch.int16}[got.element_size()]
    bad = int((got.contiguous().view(as_int) != ref.contiguous().view(as_int)).sum())
    assert bad == 0, f"{bad} elements differ in their bits"


def check_rotary():
    """Bit-exact against Hugging Face's math (the torch reference and its autograd), through the autograd Function
    with the kernel path taken on CPU tensors."""
    from fp8train.nn import grad_amax, rotary

    patch_bf16_rounding()
    from fp8train.kernels import rotary as kernel

    rotary.kernel_supports = rotary._kernel_shapes  # take the kernel path on CPU tensors (the interpreter)
    launches = []
    launch = kernel.rotary_apply
    kernel.rotary_apply = lambda *args, **kwargs: launches.append(kwargs["backward"]) or launch(*args, **kwargs)
    gen = torch.Generator().manual_seed(0)
    cases = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
             (torch.float16, torch.float16), (torch.float16, torch.float32)]
    for (batch, seq, heads, kv_heads, dim), cos_batch in (((2, 5, 4, 2, 16), 2), ((1, 3, 3, 3, 6), 1),
                                                         ((2, 7, 16, 4, 64), 1)):
        for q_dtype, cos_dtype in cases:
            for unsqueeze_dim in (1, 2):
                # Hugging Face's views: projections (batch, seq, heads * dim) viewed and, for dim 1, transposed
                x = torch.randn(batch, seq, heads * dim, generator=gen).to(q_dtype).requires_grad_(True)
                xk = torch.randn(batch, seq, kv_heads * dim, generator=gen).to(q_dtype).requires_grad_(True)
                q, k = x.view(batch, seq, heads, dim), xk.view(batch, seq, kv_heads, dim)
                if unsqueeze_dim == 1:
                    q, k = q.transpose(1, 2), k.transpose(1, 2)
                # cos halves differ (not HF's cat(freqs, freqs)), zeros included: every term is exercised
                cos = torch.randn(cos_batch, seq, dim, generator=gen).to(cos_dtype)
                sin = torch.randn(cos_batch, seq, dim, generator=gen).to(cos_dtype)
                sin[:, 0] = 0
                layouts = []  # gradient strides reaching q/k: later reductions sum in this order
                q.register_hook(lambda g: layouts.append(("q", g.stride())))
                k.register_hook(lambda g: layouts.append(("k", g.stride())))
                ref_q, ref_k = rotary.rotary_embedding_reference(q, k, cos, sin, unsqueeze_dim)
                got_q, got_k = rotary.fused_rotary_embedding(q, k, cos, sin, unsqueeze_dim)
                assert got_q.grad_fn is not None and "Rotary" in type(got_q.grad_fn).__name__
                _same_bits(got_q, ref_q)
                _same_bits(got_k, ref_k)
                assert got_q.stride() == ref_q.stride(), (got_q.stride(), ref_q.stride())
                dq = torch.randn(ref_q.shape, generator=gen).to(ref_q.dtype)
                dk = torch.randn(ref_k.shape, generator=gen).to(ref_k.dtype)
                dq[..., :2] = 0  # zero gradients: autograd's sums give +0
                expected = torch.autograd.grad((ref_q, ref_k), (x, xk), (dq, dk))
                got = torch.autograd.grad((got_q, got_k), (x, xk), (dq, dk))
                for g, e in zip(got, expected):
                    _same_bits(g, e)
                    # the kernel published max|gradient| for the projections' quantizers (nn.grad_amax): found
                    # through autograd's views of its output, and exactly the amax an amax pass would find
                    amax = grad_amax.lookup(g)
                    assert amax is not None and amax.item() == g.abs().max().float().item(), (amax, g.abs().max())
                # the reference's gradients come contiguous (as autograd's of HF's ops); the kernel's in q's / k's
                # own layout, so the transpose + view backward into the projections copies nothing
                assert sorted(layouts[2:]) == sorted([("q", q.stride()), ("k", k.stride())]), layouts
                assert launches == [False, True], launches  # one launch for q and k, forward and backward
                launches.clear()


if __name__ == "__main__":
    import os
    import sys

    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    patch_interpreter()
    for op in sys.argv[1:]:
        globals()[f"check_{op}"]()
        print(f"{op}: ok")
