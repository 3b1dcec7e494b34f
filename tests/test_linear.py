"""FP8 linear layer: numerics against fp32 autograd and against the exact FP8 emulation; memory behaviour.

Tolerances are derived, not tuned.  E4M3 keeps 3 mantissa bits, so rounding to it moves a normal number by at
most u4 = 2^-4 of its magnitude; E5M2 (2 bits) by at most u5 = 2^-3.  Below the smallest normal the error is
at most half the smallest subnormal step, times the tensor's scale.  For a dot product sum_i a_i b_i of
rounded operands a_i(1+d_i), b_i(1+e_i) the error is then at most sum_i (|da_i| |b_i| + |a_i| |db_i| +
|da_i| |db_i|), which :func:`dot_error_bound` evaluates elementwise (in float64) for every output entry.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fp8train.formats import E4M3, E5M2
from fp8train.nn import handoff
from fp8train.nn.linear import (FP8Linear, _quantize, _scaled_mm_tensorwise, fp8_linear, fp8_linear_backward,
                                fp8_linear_forward, scaled_matmul)
from fp8train.quant import PER_TENSOR, Granularity, fake_quantize, group_scaling_amax
from fp8train.recipes import Recipe


def rounding_error(x: torch.Tensor, fmt) -> torch.Tensor:
    """Largest possible |round(x) - x| per element under per-tensor scaling to ``fmt`` (float64)."""
    x = x.double()
    unit = 2.0 ** -(fmt.man_bits + 1)
    scale = group_scaling_amax(x).double() / fmt.max
    return torch.maximum(unit * x.abs(), torch.full_like(x, fmt.min_subnormal / 2) * scale)


def dot_error_bound(a, a_fmt, b, b_fmt):
    """Bound on |Q(a) @ Q(b) - a @ b| for (M, K) @ (K, N) with per-tensor quantization of both."""
    ea, eb = rounding_error(a, a_fmt), rounding_error(b, b_fmt)
    return ea @ (b.double().abs() + eb) + a.double().abs() @ eb


def make_layer(in_features=96, out_features=64, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def heavy_tailed(*shape):
    """Activations with outliers (what makes per-tensor FP8 hard): Gaussian times a log-normal magnitude."""
    return torch.randn(*shape) * torch.exp(0.7 * torch.randn(*shape))


def test_forward_and_grads_within_derived_fp8_bounds():
    linear = make_layer()
    fp8 = FP8Linear.from_linear(linear)
    x = heavy_tailed(3, 40, 96).requires_grad_()
    dy = heavy_tailed(3, 40, 64)
    y = fp8(x)
    y.backward(dy)

    x64, w64, b64, dy64 = x.detach().double(), linear.weight.detach().double(), linear.bias.detach().double(), dy.double()
    y_ref = x64 @ w64.t() + b64
    fp32_slack = 1e-5 * (x64.abs() @ w64.abs().t() + b64.abs())  # fp32 accumulation + output rounding
    bound = dot_error_bound(x64.reshape(-1, 96), E4M3, w64.t(), E4M3).reshape(y_ref.shape) + fp32_slack
    err = (y.double() - y_ref).abs()
    assert (err <= bound).all(), f"forward error exceeds the E4M3 bound by {(err - bound).max():.3g}"
    # it really quantized: the error is not zero, and on average well inside the worst case
    assert err.max() > 0 and err.mean() < 0.25 * bound.mean()

    dx_ref = dy64 @ w64
    dx_bound = dot_error_bound(dy64.reshape(-1, 64), E5M2, w64, E4M3).reshape(dx_ref.shape)
    dx_err = (x.grad.double() - dx_ref).abs()
    assert (dx_err <= dx_bound + 1e-5 * (dy64.abs() @ w64.abs())).all()

    dw_ref = dy64.reshape(-1, 64).t() @ x64.reshape(-1, 96)
    dw_bound = dot_error_bound(dy64.reshape(-1, 64).t(), E5M2, x64.reshape(-1, 96), E4M3)
    dw_err = (linear.weight.grad.double() - dw_ref).abs()
    assert (dw_err <= dw_bound + 1e-5 * (dy64.reshape(-1, 64).abs().t() @ x64.reshape(-1, 96).abs())).all()
    # bias gradient is an exact (fp32) sum of dy, not quantized
    torch.testing.assert_close(linear.bias.grad.double(), dy64.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_matches_exact_fp8_emulation():
    """Same quantized operands => the same GEMM result up to fp32 summation order."""
    linear = make_layer(bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = heavy_tailed(50, 96).requires_grad_()
    dy = heavy_tailed(50, 64)
    y = fp8(x)
    y.backward(dy)
    xq = fake_quantize(x.detach().double(), E4M3, "tensor")
    wq = fake_quantize(linear.weight.detach().double(), E4M3, "tensor")
    gq = fake_quantize(dy.double(), E5M2, "tensor")
    torch.testing.assert_close(y.double(), xq @ wq.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad.double(), gq.t() @ xq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 37, 64])
def test_scaled_mm_layouts_match_reference(tokens):
    """The torch._scaled_mm call (operand layouts, padding of odd dims, scales) computes the reference GEMM.

    torch 2.13 has a CPU _scaled_mm, so the layout logic used on the GPU is checked here too.
    """
    torch.manual_seed(tokens)
    x, w, g = heavy_tailed(tokens, 96), heavy_tailed(64, 96), heavy_tailed(tokens, 64)
    xq, wq, gq = (_quantize(t, f, PER_TENSOR).q for t, f in ((x, E4M3), (w, E4M3), (g, E5M2)))
    cases = {
        "forward": (xq.data, xq.scale, wq.data.t(), wq.scale),   # x W^T: W^T is column-major already
        "dgrad": (gq.data, gq.scale, wq.data, wq.scale),          # dY W: W is row-major -> transposed copy
        "wgrad": (gq.data.t(), gq.scale, xq.data, xq.scale),      # dY^T X: K = tokens, padded to 16
    }
    for name, (a, sa, b, sb) in cases.items():
        expected = (a.double() @ b.double()) * (sa.double() * sb.double())
        out = _scaled_mm_tensorwise(a, sa, b, sb, torch.float32, False)
        assert out.shape == expected.shape, name
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4, msg=name)


def test_autocast_bf16_output_and_fp32_grads():
    linear = make_layer()
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(2, 16, 96, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fp8(x)
        y_ref = linear(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and linear.weight.grad.dtype == torch.float32
    rel = (y.float() - y_ref.float()).norm() / y_ref.float().norm()
    assert rel < 2 * 2.0 ** -4  # two E4M3 roundings (bf16 output rounding is 2^-9, negligible)


def test_shared_input_is_quantized_and_saved_once():
    torch.manual_seed(0)
    q, k, v = (FP8Linear.from_linear(nn.Linear(64, 64, bias=False)) for _ in range(3))
    x = torch.randn(4, 32, 64, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outs = [q(x), k(x), v(x)]
    fp8_saved = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float8_e4m3fn}
    assert len(fp8_saved) == 1, "q/k/v must share one FP8 copy of their input"
    sum(o.sum() for o in outs).backward()
    assert x.grad is not None


def test_in_place_change_invalidates_the_shared_copy():
    torch.manual_seed(0)
    a, b = (FP8Linear.from_linear(nn.Linear(32, 32, bias=False)) for _ in range(2))
    x = torch.randn(8, 32)
    with torch.no_grad():
        a(x)
        x.mul_(3.0)  # a stale FP8 copy would give b the old values
        y = b(x)
        expected = fake_quantize(x, E4M3, "tensor") @ fake_quantize(b.weight, E4M3, "tensor").t()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_attachments_die_with_their_tensor():
    x = torch.randn(4, 16)
    handoff.attach(x, "k", 1)
    assert handoff.attached(x, "k") == 1
    n = len(handoff._table.entries)
    del x
    assert len(handoff._table.entries) == n - 1


def test_saved_input_is_fp8_and_weight_is_not_copied():
    linear = make_layer(bias=False)
    fp8 = FP8Linear.from_linear(linear)
    x = torch.randn(64, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fp8(x * 1.0)
    big = [t for t in saved if t.numel() > 1 and t is not linear.weight]
    assert [t.dtype for t in big] == [torch.float8_e4m3fn]
    assert any(t is linear.weight for t in saved)  # the parameter itself, not an FP8 copy of it


def test_from_linear_shares_parameters_and_state_dict():
    linear = make_layer()
    fp8 = FP8Linear.from_linear(linear)
    assert isinstance(fp8, nn.Linear)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias
    assert fp8.state_dict().keys() == linear.state_dict().keys()
    assert fp8.to_linear().weight is linear.weight
    no_bias = FP8Linear.from_linear(make_layer(bias=False))
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_plain_functions_roundtrip():
    """fp8_linear_forward / fp8_linear_backward (the fast path's building blocks) match the module."""
    linear = make_layer()
    x = torch.randn(10, 96, requires_grad=True)
    dy = torch.randn(10, 64)
    y_mod = fp8_linear(x, linear.weight, linear.bias)
    y_mod.backward(dy)
    y, saved = fp8_linear_forward(x.detach(), linear.weight.detach(), linear.bias.detach())
    dx, dw, db = fp8_linear_backward(dy, saved, linear.weight.detach(), has_bias=True)
    torch.testing.assert_close(y, y_mod.detach())
    torch.testing.assert_close(dx, x.grad)
    torch.testing.assert_close(dw, linear.weight.grad)
    torch.testing.assert_close(db, linear.bias.grad)


def test_blockwise_recipe_matches_its_emulation():
    recipe = Recipe.named("fp8-block")
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    fp8 = FP8Linear.from_linear(linear, recipe=recipe)
    x = heavy_tailed(40, 256).requires_grad_()
    dy = heavy_tailed(40, 128)
    y = fp8(x)
    y.backward(dy)
    xq = fake_quantize(x.detach().double(), E4M3, "1x128")
    wq = fake_quantize(linear.weight.detach().double(), E4M3, "128x128")
    gq = fake_quantize(dy.double(), E4M3, "1x128")
    torch.testing.assert_close(y.double(), xq @ wq.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), gq @ wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad.double(), gq.t() @ xq, rtol=1e-5, atol=1e-5)
    # finer scales are more accurate than per-tensor on heavy-tailed inputs
    per_tensor = FP8Linear.from_linear(linear, recipe="fp8")(x.detach())
    exact = x.detach() @ linear.weight.detach().t()
    assert (y.detach() - exact).norm() < (per_tensor - exact).norm()


def test_nonfinite_input_propagates_instead_of_crashing():
    fp8 = FP8Linear.from_linear(make_layer())
    x = torch.randn(4, 96)
    x[1, 3] = float("nan")
    y = fp8(x)
    assert torch.isnan(y).any()


def test_empty_batch_and_1d_input():
    fp8 = FP8Linear.from_linear(make_layer())
    assert fp8(torch.randn(0, 96)).shape == (0, 64)
    assert fp8(torch.randn(96)).shape == (64,)


def test_shape_mismatch_raises_clear_error():
    fp8 = FP8Linear.from_linear(make_layer())
    with pytest.raises(ValueError, match="does not match weight"):
        fp8(torch.randn(4, 95))


def test_recipe_validation():
    with pytest.raises(ValueError, match="E5M2"):
        Recipe(input_format="e5m2", weight_format="e5m2")
    with pytest.raises(ValueError, match="8-bit float"):
        Recipe(grad_format="int8")
    with pytest.raises(ValueError, match="unknown recipe"):
        Recipe.named("fp4")
    assert Recipe.named("COAT").compress_activations and not Recipe.named("fp8").compress_activations
    assert Recipe.named("fp8").per_tensor and not Recipe.named("fp8-block").per_tensor


def test_scaled_mm_path_matches_reference_path(monkeypatch):
    """Run the GPU code path (transposed FP8 copies, torch._scaled_mm) on CPU and compare with the reference.

    torch >= 2.9 has a CPU torch._scaled_mm, so pretending the device has FP8 tensor cores exercises exactly
    the operand layouts, transposed copies and padding the H100 path uses.
    """
    import fp8train.nn.linear as linear_mod

    linear = make_layer(96, 64)
    x = heavy_tailed(3, 13, 96)  # 39 tokens: the weight-gradient GEMM pads its inner dim to 48
    dy = heavy_tailed(3, 13, 64)
    results = []
    for gpu_path in (False, True):
        monkeypatch.setattr(linear_mod, "fp8_gemm_supported", lambda device, gpu_path=gpu_path: gpu_path)
        linear.weight.grad = linear.bias.grad = None
        xr = x.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = FP8Linear.from_linear(linear)(xr)
        y.backward(dy)
        fp8 = [t for t in saved if t.dtype == torch.float8_e4m3fn]
        assert len(fp8) == 1  # one FP8 copy of x either way (row-major, or the transposed one on the GPU path)
        results.append((y.detach(), xr.grad, linear.weight.grad.clone(), linear.bias.grad.clone()))
    for ref, gpu in zip(*results):
        torch.testing.assert_close(gpu, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("forward, grad_input", [(False, False), (True, False), (True, True), (False, True)])
def test_fast_accumulation_reaches_exactly_the_gemms_it_names(monkeypatch, forward, grad_input):
    """Recipe.fast_accumulation: the forward GEMM; fast_accumulation_grad_input: dX = dY W; the weight gradient
    (contracting over all tokens) always promotes to fp32.  Checked on the _scaled_mm path (CPU torch has one)."""
    import fp8train.nn.linear as linear_mod

    monkeypatch.setattr(linear_mod, "fp8_gemm_supported", lambda device: True)
    calls = []
    real = torch._scaled_mm

    def spy(a, b, **kwargs):
        calls.append((tuple(a.shape), tuple(b.shape), kwargs["use_fast_accum"]))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", spy)
    recipe = Recipe.named("fp8").replace(fast_accumulation=forward, fast_accumulation_grad_input=grad_input)
    layer = FP8Linear.from_linear(make_layer(96, 64), recipe=recipe)
    x = torch.randn(48, 96, requires_grad=True)
    layer(x).backward(torch.randn(48, 64))
    # forward (48x96 @ 96x64), input gradient (48x64 @ 64x96), weight gradient (64x48 @ 48x96)
    assert calls == [((48, 96), (96, 64), forward), ((48, 64), (64, 96), grad_input), ((64, 48), (48, 96), False)]
    with pytest.raises(TypeError, match="fast_accumulation_grad_input"):
        Recipe(fast_accumulation_grad_input=1)


def test_attention_output_is_saved_by_reference_with_identical_gradients():
    """o_proj after SDPA: the input is a view of SDPA's (saved) output -> keep a reference, not an FP8 copy."""
    from fp8train.nn.linear import kept_by_attention

    torch.manual_seed(0)
    qkv = torch.randn(2, 16, 4, 32).transpose(1, 2).requires_grad_()  # (B, H, S, D) view of (B, S, H, D)
    attn = torch.nn.functional.scaled_dot_product_attention(qkv, qkv, qkv, is_causal=True)
    viewed = attn.transpose(1, 2).reshape(2, 16, 128)
    copied = attn.transpose(1, 2).contiguous().mul(1.0).reshape(2, 16, 128)
    assert kept_by_attention(viewed) and not kept_by_attention(copied)
    assert not kept_by_attention(torch.randn(4, 8, requires_grad=True) * 2)

    o_proj = make_layer(128, 64)
    grads, fp8_saved = {}, {}
    # "auto_kept": Recipe.requantize_attention_output off -- auto keeps the FP8 copy forward made
    for mode in ("fp8", "reference", "auto", "auto_kept"):
        recipe = Recipe.named("fp8").replace(requantize_attention_output=mode != "auto_kept")
        fp8 = FP8Linear.from_linear(o_proj, recipe=recipe)
        fp8.save_input = mode.removesuffix("_kept")
        o_proj.weight.grad = None
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fp8(viewed)
        fp8_saved[mode] = sum(t.dtype == torch.float8_e4m3fn for t in saved)
        (dx,) = torch.autograd.grad(y, viewed, torch.ones_like(y), retain_graph=True)
        y.backward(torch.ones_like(y), retain_graph=True)
        grads[mode] = (dx, o_proj.weight.grad.clone())
    assert fp8_saved == {"fp8": 1, "reference": 0, "auto": 0, "auto_kept": 1}
    for mode in ("reference", "auto", "auto_kept"):
        for a, b in zip(grads[mode], grads["fp8"]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_saved_reference_does_not_keep_the_inputs_fp8_copies_alive():
    """In "reference" mode backward keeps x's memory (the attention kernel keeps it anyway), but not x's Python
    object: that would keep the FP8 copies forward attached to it (nn.handoff) alive until backward."""
    import gc
    import weakref

    from fp8train.nn.linear import linear_input_key

    qkv = torch.randn(2, 4, 16, 32).requires_grad_()
    attn = torch.nn.functional.scaled_dot_product_attention(qkv, qkv, qkv, is_causal=True)
    viewed = attn.transpose(1, 2).reshape(2, 16, 128)
    fp8 = FP8Linear.from_linear(make_layer(128, 64))
    fp8.save_input = "reference"
    y = fp8(viewed)
    copies = handoff.attached(viewed, linear_input_key(fp8.recipe))
    assert copies is not None
    copy_ref, viewed_ref = weakref.ref(copies.q.data), weakref.ref(viewed)
    del viewed, copies
    gc.collect()
    assert viewed_ref() is None and copy_ref() is None
    y.sum().backward()  # and backward still finds its input
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


def test_backward_uses_a_gradient_amax_published_by_its_producer():
    """A kernel that wrote dy may publish max|dy| (fp8train.nn.grad_amax): the backward then quantizes dy with it
    instead of running its own amax pass -- found through views of dy, never for a part of it or after a change."""
    from fp8train.nn import grad_amax

    linear = make_layer()
    x = torch.randn(12, 96)
    dy = torch.randn(2, 6, 64) * 3
    weight = linear.weight.detach()
    _, saved = fp8_linear_forward(x, weight, None)
    plain = fp8_linear_backward(dy, saved, weight)[:2]

    def published(amax_value, grad):
        slot = grad_amax.new_slot(grad.device)
        slot.view(torch.float32).fill_(amax_value)
        grad_amax.publish(dy, slot)
        try:
            return fp8_linear_backward(grad, saved, weight)[:2]
        finally:
            grad_amax.set_enabled(False)  # clears the table
            grad_amax.set_enabled(True)

    exact = published(float(dy.abs().max()), dy.reshape(12, 64))  # a view of the published tensor
    for a, b in zip(exact, plain):
        assert torch.equal(a, b)  # the true amax: the same bits as the amax pass
    wrong = published(float(dy.abs().max()) * 3.7, dy.reshape(12, 64))  # not a power of two: another grid
    assert not torch.equal(wrong[1], plain[1])  # a (deliberately) different amax is really what gets used
    # a part of the tensor, or a tensor changed after publishing, does not match
    assert grad_amax.lookup(dy[:1]) is None
    slot = grad_amax.new_slot(dy.device)
    grad_amax.publish(dy, slot)
    assert grad_amax.lookup(dy.view(12, 64)) is not None
    dy.mul_(2)
    assert grad_amax.lookup(dy) is None
