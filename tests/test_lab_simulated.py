"""Simulated formats in linear layers: the rounding op, the layer's GEMMs, the recipe option, bit-exact bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import transformers

import fp8train
from fp8train import formats
from fp8train.lab.simulated_linear import (SimulatedFormats, SimulatedLinear, parse_simulated_format,
                                           saturating_round, simulate_quantize)
from fp8train.quant import fake_quantize

torch.set_num_threads(1)


def micro_llama(seed: int = 0, vocab: int = 128) -> nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def train_losses(model: nn.Module, steps: int = 6, autocast: bool = False, vocab: int = 128) -> list[float]:
    """AdamW on fixed random batches; returns the loss of every step (as Python floats, compared with ==)."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(7)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (4, 33), generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


# -- the rounding op -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["e4m3", "e3m4", "e5m2", "e2m1", "e8m3", "e5m7"])
def test_unscaled_rounding_is_the_format_grid_with_saturation(spec):
    fmt = parse_simulated_format(spec)
    x = torch.randn(4096, dtype=torch.float64) * torch.exp2(torch.randint(-12, 12, (4096,)).double())
    y = simulate_quantize(x, fmt, "none")
    grid = fmt.values()
    grid = torch.cat([-grid.flip(0), grid])
    # every output is a value of the format, the nearest one (ties aside) to the saturated input
    assert torch.isin(y, grid).all()
    nearest = grid[(x.clamp(-fmt.max, fmt.max)[:, None] - grid[None, :]).abs().argmin(1)]
    dist_y = (y - x.clamp(-fmt.max, fmt.max)).abs()
    dist_best = (nearest - x.clamp(-fmt.max, fmt.max)).abs()
    assert torch.equal(dist_y, dist_best)
    assert (y.abs() <= fmt.max).all() and (y[x > 2 * fmt.max] == fmt.max).all()


@pytest.mark.parametrize("fmt", [formats.E3M4, formats.E2M1, formats.BF16, formats.FP16, formats.E5M2,
                                 formats.E4M3FNUZ, formats.E8M3, formats.Minifloat(5, 7),
                                 parse_simulated_format("e7m7b127"), parse_simulated_format("e8m0"),
                                 parse_simulated_format("e8m3b140")])  # emin -139: takes the float64 path
def test_float32_rounding_path_equals_the_reference(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-150, 128, (200_000,), generator=g).float())
    x = torch.cat([x, torch.tensor([0.0, -0.0, fmt.max, -fmt.max, fmt.min_subnormal / 2, -fmt.min_subnormal * 1.5,
                                    float("nan")])])
    got = saturating_round(x, fmt)
    want = fmt.round(fmt.saturate(x.double())).float()
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert same.all() and torch.equal(torch.signbit(got[~torch.isnan(got)]), torch.signbit(want[~torch.isnan(want)]))


def test_nonfinite_values_pass_through():
    x = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), 1e9])
    for scaling in ("none", "tensor"):
        y = simulate_quantize(x, formats.E4M3, scaling)
        assert y[1] == float("inf") and y[2] == -float("inf") and torch.isnan(y[3])
    y = simulate_quantize(x, formats.E4M3, "none")
    assert y[0] == 1.0 and y[4] == 448.0  # finite values saturate


@pytest.mark.parametrize("scaling", ["tensor", "1x16", "row"])
def test_scaled_rounding_is_quant_fake_quantize(scaling):
    x = torch.randn(33, 48) * 5
    for fmt in (formats.E3M4, formats.E2M1, formats.E4M3, formats.E5M2, formats.E8M3, formats.INT8):
        assert torch.equal(simulate_quantize(x, fmt, scaling), fake_quantize(x, fmt, scaling))
        assert torch.equal(simulate_quantize(x.bfloat16(), fmt, scaling), fake_quantize(x.bfloat16(), fmt, scaling))


def test_bf16_without_scaling_is_the_identity_on_bf16_tensors():
    x = (torch.randn(5000) * torch.exp2(torch.randint(-130, 120, (5000,)).float())).bfloat16()
    assert torch.equal(simulate_quantize(x, formats.BF16, "none"), x)
    assert torch.equal(simulate_quantize(x, "e8m7", "none"), x)
    assert not torch.equal(simulate_quantize(x, "e8m6", "none"), x)


def test_bias_suffix_moves_the_range():
    symmetric, bf16_bias = parse_simulated_format("e7m7"), parse_simulated_format("e7m7b127")
    assert symmetric.bias == 63 and bf16_bias.bias == 127
    assert bf16_bias.max < 1.0 < symmetric.max  # keeping bf16's bias cuts the top of the range
    assert simulate_quantize(torch.tensor([3.0]), "e7m7b127", "none").item() == bf16_bias.max


# -- SimulatedFormats ------------------------------------------------------------------------------------------

def test_formats_spec_parsing_and_errors():
    f = SimulatedFormats.parse("a=E3M4, w=e3m4, g=e5m2, scaling=1x16")
    assert (f.activations, f.weights, f.gradients, f.scaling) == ("e3m4", "e3m4", "e5m2", "1x16")
    assert SimulatedFormats.parse(f.describe()) == f
    assert SimulatedFormats.parse("e2m1", scaling="none") == SimulatedFormats("e2m1", "e2m1", "e2m1", "none")
    assert SimulatedFormats.parse("a=e4m3").gradients is None
    with pytest.raises(ValueError, match="unknown number format"):
        SimulatedFormats.parse("e4m3x")
    with pytest.raises(ValueError, match="keys a"):
        SimulatedFormats.parse("act=e4m3,q=e5m2")
    with pytest.raises(ValueError, match="unknown scaling"):
        SimulatedFormats("e4m3", scaling="per-banana")
    with pytest.raises(ValueError, match="integer formats need a scale"):
        SimulatedFormats.uniform("int8", scaling="none")


def test_recipe_option_validation():
    r = fp8train.Recipe(simulate="e3m4")
    assert isinstance(r.simulate, SimulatedFormats) and r.name.startswith("simulate[") and not r.is_noop
    assert fp8train.Recipe(name="x", fp8_linears=False, simulate="e3m4").is_noop is False
    with pytest.raises(ValueError, match="compress_activations=False"):
        fp8train.Recipe(compress_activations=True, simulate="e3m4")
    with pytest.raises(TypeError, match="SimulatedFormats"):
        fp8train.Recipe(simulate=3)


# -- the layer -------------------------------------------------------------------------------------------------

def test_layer_gemms_use_the_rounded_operands():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32, bias=True)
    sim = SimulatedLinear.from_linear(lin, SimulatedFormats("e3m4", "e2m1", "e5m2", scaling="tensor"))
    assert sim.weight is lin.weight and sim.bias is lin.bias
    x = (torch.randn(2, 5, 48) * 3).requires_grad_()
    dy = torch.randn(2, 5, 32) * 1e-3
    sim(x).backward(dy)
    qx = fake_quantize(x.detach(), formats.E3M4, "tensor").double()
    qw = fake_quantize(lin.weight.detach(), formats.E2M1, "tensor").double()
    qg = fake_quantize(dy, formats.E5M2, "tensor").double()
    y_ref = qx @ qw.T + lin.bias.detach().double()
    torch.testing.assert_close(sim(x).double(), y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), qg @ qw, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lin.weight.grad.double(), qg.reshape(-1, 32).T @ qx.reshape(-1, 48), rtol=1e-6,
                               atol=1e-9)
    torch.testing.assert_close(lin.bias.grad.double(), qg.reshape(-1, 32).sum(0), rtol=1e-6, atol=1e-9)
    # the rounding really happened: the plain layer gives other gradients
    assert not torch.allclose(x.grad, dy @ lin.weight.detach())


def test_convert_routes_every_linear_but_the_head():
    model = micro_llama()
    keys = list(model.state_dict())
    fp8train.convert(model, recipe=fp8train.Recipe(simulate=SimulatedFormats("e3m4", "e3m4", "e5m2")))
    sims = [n for n, m in model.named_modules() if isinstance(m, SimulatedLinear)]
    assert len(sims) == 14 and not isinstance(model.lm_head, SimulatedLinear)
    assert list(model.state_dict()) == keys
    assert fp8train.convert(model, recipe=model._fp8train_recipe) is model  # converting twice: no-op
    assert sum(isinstance(m, SimulatedLinear) for m in model.modules()) == 14
    # keep_bf16=() puts the LM head in the simulated format too
    head = fp8train.convert(micro_llama(), recipe=fp8train.Recipe(simulate="e4m3", keep_bf16=()))
    assert isinstance(head.lm_head, SimulatedLinear)


@pytest.mark.parametrize("autocast", [False, True], ids=["bf16-weights", "fp32-weights-bf16-autocast"])
def test_bf16_format_reproduces_the_bf16_run_exactly(autocast):
    def run(recipe):
        model = micro_llama()
        if not autocast:
            model = model.bfloat16()
        fp8train.convert(model, recipe=recipe)
        return train_losses(model, autocast=autocast)

    baseline = run("bf16")
    simulated = run(fp8train.Recipe(simulate=SimulatedFormats.uniform(formats.BF16, scaling="none")))
    assert simulated == baseline  # bit for bit, every step
    # and the rounding is live: one mantissa bit less changes the run
    assert run(fp8train.Recipe(simulate=SimulatedFormats.uniform("e8m6", scaling="none"))) != baseline
