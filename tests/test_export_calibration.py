"""Calibration-based methods: GPTQ, SmoothQuant, LoRC and the block-by-block replay."""

from __future__ import annotations

import warnings

import pytest
import torch

from _export_models import tiny_llama, token_batch
from fp8train.export.calibration import BlockReplay, decoder_blocks
from fp8train.export.gptq import HessianAccumulator, gptq_quantize
from fp8train.export.lorc import low_rank_compensation
from fp8train.export.schemes import get_scheme
from fp8train.export.smoothquant import collect_input_amax, find_smoothing_groups, smooth
from fp8train.export.weights import quantize_weight


def _correlated_inputs(n=2048, dim=256, seed=0):
    """Inputs with correlated channels and a few large ones, like a transformer layer's."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=gen) / dim**0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=gen) @ mix
    x[:, :4] *= 6.0
    return x


def _output_error(x, w, q):
    return float((x @ (w - q.dequantize()).T).norm() / (x @ w.T).norm())


@pytest.mark.parametrize("name,kwargs", [("w4a16", {}), ("w4a16", {"act_order": True}), ("w4a8-fp", {}),
                                         ("w8a8-int8", {}), ("fp8-dynamic", {})])
def test_gptq_beats_round_to_nearest_on_the_layer_output(name, kwargs):
    scheme = get_scheme(name)
    x = _correlated_inputs()
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 256, generator=gen) * 0.05
    acc = HessianAccumulator(256)
    for chunk in x.split(512):
        acc.add(chunk)
    assert torch.allclose(acc.hessian, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    gptq = gptq_quantize(w, acc.hessian, scheme, **kwargs)
    rtn = quantize_weight(w, scheme)
    assert gptq.codes.dtype == rtn.codes.dtype and gptq.scale.shape == rtn.scale.shape
    assert _output_error(x, w, gptq) < 0.9 * _output_error(x, w, rtn)


@pytest.mark.parametrize("name", ["w4a16", "w4a8-fp", "fp8-dynamic"])
def test_gptq_with_an_identity_hessian_is_round_to_nearest(name):
    """With uncorrelated unit inputs no column can compensate another: GPTQ must reduce to RTN exactly."""
    scheme = get_scheme(name)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=gen)
    gptq = gptq_quantize(w, torch.eye(256), scheme)
    rtn = quantize_weight(w, scheme)
    assert torch.equal(gptq.scale, rtn.scale)
    assert torch.equal(gptq.codes.float(), rtn.codes.float())


def test_gptq_handles_dead_inputs_and_checks_shapes():
    scheme = get_scheme("w4a16")
    x = _correlated_inputs(dim=128)
    x[:, 5] = 0.0  # an input that is always zero
    h = 2 * x.T @ x / x.shape[0]
    w = torch.randn(16, 128)
    q = gptq_quantize(w, h, scheme)
    assert torch.isfinite(q.dequantize()).all()
    assert bool((q.codes[:, 5] == 0).all())
    with pytest.raises(ValueError, match="do not match"):
        gptq_quantize(w, torch.eye(64), scheme)
    with pytest.raises(ValueError, match="group size"):
        gptq_quantize(torch.randn(4, 96), torch.eye(96), scheme)


def test_block_replay_reproduces_the_model_hidden_states():
    model = tiny_llama(layers=3)
    tokens = token_batch(4, 16)
    name, blocks = decoder_blocks(model)
    assert name == "model.layers" and len(blocks) == 3
    replay = BlockReplay(model, blocks, [tokens[:2], tokens[2:]])
    with torch.no_grad():
        expected = model(input_ids=tokens[:2], output_hidden_states=True).hidden_states
    assert torch.equal(replay.inputs[0][0][0], expected[0])
    for i in range(2):
        replay.advance(i)
        assert torch.allclose(replay.inputs[0][0][0], expected[i + 1], atol=1e-6)


def test_smoothquant_keeps_the_model_function_and_shrinks_activation_outliers():
    model = tiny_llama()
    tokens = token_batch(4, 32)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    groups = find_smoothing_groups(model, tokens, linears)
    kinds = {(g.kind, tuple(c.rsplit(".", 1)[-1] for c in g.consumers)) for g in groups}
    assert kinds == {("norm", ("q_proj", "k_proj", "v_proj")), ("norm", ("gate_proj", "up_proj")),
                     ("up_proj", ("down_proj",))}
    assert len(groups) == 6  # 3 per layer, 2 layers
    with torch.no_grad():
        before = model(input_ids=tokens).logits
    amax = collect_input_amax(model, [tokens], linears)
    smooth(model, groups, amax, alpha=0.8)
    with torch.no_grad():
        after = model(input_ids=tokens).logits
    assert torch.allclose(before, after, atol=1e-4, rtol=1e-4)
    smoothed = collect_input_amax(model, [tokens], linears)
    q = "model.layers.0.self_attn.q_proj"
    # the activation range across channels is flatter after smoothing
    assert float(smoothed[q].max() / smoothed[q].median()) < float(amax[q].max() / amax[q].median())


def test_smoothquant_leaves_groups_that_feed_unquantized_layers_alone():
    model = tiny_llama()
    tokens = token_batch(2, 16)
    only_attention = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj"))}
    groups = find_smoothing_groups(model, tokens, only_attention)
    assert groups == []  # input_layernorm also feeds v_proj, which is not a target


def test_lorc_error_falls_with_rank():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(128, 256, generator=gen) @ torch.diag(torch.linspace(0.1, 2.0, 256))
    q = quantize_weight(w, get_scheme("w4a8-fp"))
    errors = [float((q.dequantize() - w).norm())]
    for rank in (4, 16, 64):
        u, v = low_rank_compensation(w, q.dequantize(), rank)
        assert u.shape == (128, rank) and v.shape == (rank, 256) and u.dtype == torch.bfloat16
        errors.append(float((q.dequantize() + u.float() @ v.float() - w).norm()))
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.9 * errors[0]
    with pytest.raises(ValueError):
        low_rank_compensation(w, q.dequantize(), 0)


def test_gptq_model_export_is_better_than_rtn_on_model_output():
    """End to end on a tiny model: GPTQ's logits are closer to the float model's than round-to-nearest's."""
    from fp8train.export import quantize_model
    from fp8train.export.simulate import build_model

    model = tiny_llama(hidden=256, intermediate=512)
    calibration = token_batch(16, 64, seed=1)
    x = token_batch(4, 64, seed=2)
    with torch.no_grad():
        reference = model(input_ids=x).logits
    errors = {}
    for method in ("rtn", "gptq"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = quantize_model(model, "w4a16", calibration=calibration, method=method)
        sim = build_model(qm.config, qm.tensors, qm.weights, qm.activation_formats())
        with torch.no_grad():
            errors[method] = float((sim(input_ids=x).logits - reference).norm() / reference.norm())
    assert errors["gptq"] < errors["rtn"]
