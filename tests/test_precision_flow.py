"""The Llama-style fast path: FlowRMSNorm hands FP8 to its consumers, FlowMLP is one FP8-saving Function.

The fast path must compute the same thing as the generic module-by-module path (same quantized operands) while
saving fewer bytes, stay correct when its assumptions break (other consumers of the norm output, in-place
edits, projections swapped after conversion), and run the GPU code path (transposed FP8 copies) the same way.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fp8train.nn.linear as linear_mod
from fp8train import mixed_granularity as mg
from fp8train.nn.gated_mlp import gated_product
from fp8train.nn.linear import FP8Linear
from fp8train.nn.precision_flow import FlowMLP, FlowRMSNorm
from fp8train.nn.rmsnorm import FP8RMSNorm
from fp8train.nn.saved_memory import SavedTensorCounter
from fp8train.quant import fake_quantize
from fp8train.recipes import Recipe

HIDDEN, FFN = 64, 176


class TinyRMSNorm(nn.Module):
    """HF LlamaRMSNorm's forward (what the adapters see in real models)."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.up_proj = nn.Linear(HIDDEN, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, HIDDEN, bias=False)
        self.act_fn = nn.SiLU()


def build(recipe: Recipe, fused_norm: bool, seed: int = 0):
    """(norm, mlp) converted either the fast-path way or the generic way, with identical weights."""
    torch.manual_seed(seed)
    norm, mlp = TinyRMSNorm(HIDDEN), TinyMLP()
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(mlp, name, FP8Linear.from_linear(getattr(mlp, name), recipe=recipe))
    norm = FlowRMSNorm.from_module(norm, recipe=recipe) if fused_norm else FP8RMSNorm.from_module(norm)
    return norm, FlowMLP.from_module(mlp, recipe=recipe)


def run(norm, mlp, x, dy, extra=None):
    x = x.clone().requires_grad_()
    y = norm(x)
    out = mlp(y)
    loss = (out * dy).sum() + (0 if extra is None else (y * extra).sum())
    loss.backward()
    grads = [x.grad] + [p.grad for p in (norm.weight, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    return out.detach(), grads


def heavy(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(0.5 * torch.randn(*shape, generator=g))


@pytest.mark.parametrize("recompute", [False, True])
def test_fused_norm_mlp_equals_generic_path(recompute):
    """Norm fused into the MLP Function == FP8RMSNorm followed by the MLP quantizing its own input."""
    recipe = Recipe.named("coat").replace(recompute_gated_product=recompute)
    x, dy = heavy(3, 20, HIDDEN), heavy(3, 20, HIDDEN, seed=2)
    out_a, grads_a = run(*build(recipe, fused_norm=True), x, dy)
    out_b, grads_b = run(*build(recipe, fused_norm=False), x, dy)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_mlp_without_recompute_equals_module_composition():
    """FlowMLP(recompute=False) == FP8Linear gate/up -> ops' gated_product -> FP8Linear down, op by op."""
    recipe = Recipe.named("coat").replace(recompute_gated_product=False)
    _, mlp = build(recipe, fused_norm=False)
    x, dy = heavy(40, HIDDEN), heavy(40, HIDDEN, seed=2)
    xa = x.clone().requires_grad_()
    out_a = mlp(xa)
    out_a.backward(dy)
    grads_a = [xa.grad] + [p.grad.clone() for p in mlp.parameters()]
    mlp.zero_grad()
    xb = x.clone().requires_grad_()
    out_b = mlp.down_proj(gated_product(mlp.gate_proj(xb), mlp.up_proj(xb), "silu"))
    out_b.backward(dy)
    grads_b = [xb.grad] + [p.grad for p in mlp.parameters()]
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recomputed_product_is_coat_flow_and_saves_less():
    """With recomputation act and mul read the FP8 1x16 gate/up (COAT's flow); backward saves I bytes less."""
    x = heavy(2, 32, HIDDEN)
    outs, saved = {}, {}
    for recompute in (False, True):
        norm, mlp = build(Recipe.named("coat").replace(recompute_gated_product=recompute), fused_norm=True)
        with SavedTensorCounter([*norm.parameters(), *mlp.parameters()]) as counter:
            outs[recompute] = mlp(norm(x.clone().requires_grad_()))
        saved[recompute] = counter.total_bytes
    tokens = 64
    assert saved[False] - saved[True] == tokens * FFN + 4  # one E4M3 (tokens, FFN) tensor and its fp32 scale

    # independent emulation of the forward from the quantizers
    norm, mlp = build(Recipe.named("coat"), fused_norm=True)
    with torch.no_grad():
        y = fake_quantize(FP8RMSNorm.from_module(norm, style=norm.style)(x), "e4m3", "tensor")
        w = {n: fake_quantize(getattr(mlp, n).weight, "e4m3", "tensor") for n in ("gate_proj", "up_proj", "down_proj")}
        g16 = fake_quantize(y @ w["gate_proj"].t(), "e4m3", "1x16", scale_dtype=torch.bfloat16)
        u16 = fake_quantize(y @ w["up_proj"].t(), "e4m3", "1x16", scale_dtype=torch.bfloat16)
        h = fake_quantize(torch.nn.functional.silu(g16) * u16, "e4m3", "tensor")
        expected = h @ w["down_proj"].t()
    torch.testing.assert_close(outs[True].detach(), expected, rtol=1e-4, atol=1e-5)


def test_other_consumers_of_the_norm_output_get_correct_gradients():
    """If the norm output also feeds something else, its own autograd node carries that gradient."""
    recipe = Recipe.named("coat")
    x, dy, c = heavy(2, 16, HIDDEN), heavy(2, 16, HIDDEN, seed=2), heavy(2, 16, HIDDEN, seed=3)
    _, grads_a = run(*build(recipe, fused_norm=True), x, dy, extra=c)
    _, grads_b = run(*build(recipe, fused_norm=False), x, dy, extra=c)
    for a, b in zip(grads_a[:2], grads_b[:2]):  # input and norm weight: both paths contribute
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # y itself is FP8-rounded in the flow path


def test_in_place_edit_of_norm_output_invalidates_the_handoff():
    recipe = Recipe.named("coat")
    norm, mlp = build(recipe, fused_norm=True)
    x = heavy(2, 16, HIDDEN)
    with torch.no_grad():
        y = norm(x)
        y.mul_(2.0)
        out = mlp(y)
        _, mlp_ref = build(recipe, fused_norm=False)
        expected = mlp_ref(y.clone())
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_mlp_falls_back_when_a_projection_is_replaced():
    """A projection swapped after conversion (PEFT, exclusion) -> call the submodules, still correct."""
    recipe = Recipe.named("coat")
    _, mlp = build(recipe, fused_norm=False)
    plain = nn.Linear(HIDDEN, FFN, bias=False)
    plain.weight = mlp.up_proj.weight
    mlp.up_proj = plain
    x = heavy(8, HIDDEN).requires_grad_()
    out = mlp(x)
    out.sum().backward()
    expected = mlp.down_proj(gated_product(mlp.gate_proj(x), plain(x), "silu"))
    torch.testing.assert_close(out, expected)
    assert mlp.up_proj.weight.grad is not None


def test_gpu_code_path_matches_cpu_path(monkeypatch):
    """Transposed FP8 copies + torch._scaled_mm (run on CPU) == the reference path, through the fused Function."""
    x, dy = heavy(3, 13, HIDDEN), heavy(3, 13, HIDDEN, seed=2)
    results = []
    for gpu in (False, True):
        monkeypatch.setattr(linear_mod, "fp8_gemm_supported", lambda device, gpu=gpu: gpu)
        results.append(run(*build(Recipe.named("coat"), fused_norm=True), x, dy))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_flow_saves_only_fp8_and_small_metadata():
    norm, mlp = build(Recipe.named("coat"), fused_norm=True)
    x = heavy(2, 32, HIDDEN).requires_grad_()
    with SavedTensorCounter([*norm.parameters(), *mlp.parameters()]) as counter:
        mlp(norm(x))
    by = counter.by_dtype
    tokens = 64
    # x (1x16) + normed x (per tensor) + gate + up (1x16), all E4M3
    assert by["float8_e4m3fn"] == tokens * (2 * HIDDEN + 2 * FFN)
    assert by.get("bfloat16", 0) == tokens * (HIDDEN + 2 * FFN) // 16 * 2  # bf16 group maxima
    assert set(by) <= {"float8_e4m3fn", "bfloat16", "float32"}
    assert by["float32"] < 0.05 * by["float8_e4m3fn"]  # rstd and scalar scales


def test_quantization_disabled_mode_keeps_exact_nonlinear_copies():
    """mixed_granularity's test switch reaches through the fused Function (gate/up saved exactly)."""
    norm, mlp = build(Recipe.named("coat"), fused_norm=True)
    x = heavy(2, 8, HIDDEN).requires_grad_()
    with mg.quantization_disabled():
        out = mlp(norm(x))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def _qkv(recipe, seed=0):
    torch.manual_seed(seed)
    norm = FlowRMSNorm.from_module(TinyRMSNorm(HIDDEN), recipe=recipe)
    projections = [FP8Linear.from_linear(nn.Linear(HIDDEN, HIDDEN, bias=False), recipe=recipe) for _ in range(3)]
    return norm, projections


def _qkv_grads(norm, projections, x, dys, extra=None):
    x = x.clone().requires_grad_()
    y = norm(x)
    outs = [p(y) for p in projections]
    loss = sum((o * d).sum() for o, d in zip(outs, dys)) + (0 if extra is None else (y * extra).sum())
    loss.backward()
    return outs, [x.grad, norm.weight.grad] + [p.weight.grad for p in projections]


@pytest.mark.parametrize("extra_consumer", [False, True])
def test_qkv_gradients_reach_the_norm_separately_and_sum_like_autograd(monkeypatch, extra_consumer):
    """q/k/v each hand autograd their own alias of the norm output: the norm's backward gets three gradients
    (summed in its kernel, no bf16 adds of full activations) and the results equal autograd's own sum."""
    import fp8train.nn.precision_flow as flow

    recipe = Recipe.named("coat")
    x, extra = heavy(2, 16, HIDDEN), (heavy(2, 16, HIDDEN, seed=9) if extra_consumer else None)
    dys = [heavy(2, 16, HIDDEN, seed=s) for s in (2, 3, 4)]
    norm, projections = _qkv(recipe)
    y = norm(x.clone().requires_grad_())
    nodes = [p(y).grad_fn.next_functions[0] for p in projections]
    assert len({id(n) for n, _ in nodes}) == 1 and type(nodes[0][0]).__name__ == "_FlowNormFunctionBackward"
    assert sorted(i for _, i in nodes) == [0, 1, 2]  # three separate outputs of the one norm node

    outs, grads = _qkv_grads(*_qkv(recipe), x, dys, extra)
    monkeypatch.setattr(flow, "SPARE_OUTPUTS", 0)  # every consumer reads y: autograd sums the gradients
    ref_outs, ref_grads = _qkv_grads(*_qkv(recipe), x, dys, extra)
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # same values in forward
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_norm_outputs_die_when_dropped_even_with_unused_spares():
    """The spare aliases wait in the norm output's handoff entry; they must not keep the output (and the norm's
    saved FP8 tensors) alive once the model drops it -- as for the post-attention norm, whose spares the fused MLP
    never takes."""
    import gc
    import weakref

    from fp8train.nn import handoff

    recipe = Recipe.named("coat")
    norm, mlp = build(recipe, fused_norm=True)
    x = heavy(2, 16, HIDDEN).requires_grad_()
    gc.collect()
    before = set(handoff._table.entries)  # other tests' tensors may still be alive
    y = norm(x)
    out = mlp(y)  # takes the norm attachment, not the spares
    ref = weakref.ref(y)
    out.sum().backward()
    del y, out
    gc.collect()
    assert ref() is None
    assert not set(handoff._table.entries) - before
