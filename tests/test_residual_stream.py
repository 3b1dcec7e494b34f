"""The owned residual stream of Llama-style layers (fp8train.nn.residual_stream): recognised only for HF's plain
listing, same forward values, gradients equal to autograd's sums up to their rounding, the summed gradients'
amax handed to the next FP8 linear."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

import fp8train
from fp8train.nn import grad_amax, residual_stream
from fp8train.recipes import Recipe


def _model(recipe, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=160, vocab_size=300, max_position_embeddings=128)
    config._attn_implementation = "sdpa"
    return fp8train.convert(LlamaForCausalLM(config), recipe)


def _step(model, tokens):
    loss = model(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_hf_plain_listing_is_recognised(family):
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    cls = next(getattr(module, n) for n in dir(module) if n.endswith("DecoderLayer") and n[0] != "_")
    plan = residual_stream.layer_plan(cls)
    assert plan is not None and "attention_mask" in plan.passed and "position_embeddings" in plan.passed


def test_other_listings_keep_their_forward():
    class Scaled(LlamaDecoderLayer):  # a residual multiplier (Granite-like): not the plain listing
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
            hidden_states = residual + hidden_states * 0.5
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states

    class Computed(LlamaDecoderLayer):  # the attention call computes an argument
        def forward(self, hidden_states, attention_mask=None, **kwargs):
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
            hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=None, **kwargs)
            hidden_states = residual + hidden_states
            residual = hidden_states
            hidden_states = self.post_attention_layernorm(hidden_states)
            hidden_states = self.mlp(hidden_states)
            hidden_states = residual + hidden_states
            return hidden_states

    assert residual_stream.layer_plan(Scaled) is None
    assert residual_stream.layer_plan(Computed) is None
    layer = nn.Module()
    assert not residual_stream.install(layer)  # not converted / not a decoder layer: untouched
    assert "forward" not in layer.__dict__


def test_installed_by_convert_and_removable():
    model = _model("coat")
    assert all(residual_stream.is_installed(layer) for layer in model.model.layers)
    assert model._fp8train_report["fused_residual"] == 3
    off = _model(Recipe.named("coat").replace(fused_residual=False))
    assert not any(residual_stream.is_installed(layer) for layer in off.model.layers)
    layer = model.model.layers[0]
    residual_stream.uninstall(layer)
    assert not residual_stream.is_installed(layer) and "forward" not in layer.__dict__


@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16])
def test_same_forward_and_gradients_as_autograd_sums(master):
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    fused, plain = _model("coat").to(master), _model(Recipe.named("coat").replace(fused_residual=False)).to(master)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=master == torch.float32):
        loss_a, grads_a = _step(fused, tokens)
        loss_b, grads_b = _step(plain, tokens)
    assert torch.equal(loss_a, loss_b)  # the same adds in the same dtypes
    assert grads_a.keys() == grads_b.keys()
    if master == torch.float32:  # fp32 stream: the sums' rounding is all that differs
        for name in grads_a:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7, msg=name)
    else:
        # bf16 stream: one rounding of each sum instead of two, amplified by the E5M2 gradients, so the two runs
        # differ by ~5-9 %; both are that far from an fp32-master run too. The fused sums must be no further.
        truth = _model(Recipe.named("coat").replace(fused_residual=False))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, grads_t = _step(truth, tokens)
        for name in grads_a:
            a, b, t = grads_a[name].float(), grads_b[name].float(), grads_t[name].float()
            assert (a - t).norm() <= 1.1 * (b - t).norm() + 1e-3 * t.norm(), name


def test_summed_gradients_hand_their_amax_to_the_linears(monkeypatch):
    """o_proj's and down_proj's output gradients are the norms' summed outputs: their quantizers find the amax
    the norm published (bf16 stream), and the result is bit-identical to the amax pass."""
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    hits = []
    lookup = grad_amax.lookup
    monkeypatch.setattr(grad_amax, "lookup", lambda g: hits.append(lookup(g) is not None) or lookup(g))
    model = _model("coat").to(torch.bfloat16)
    loss_a, grads_a = _step(model, tokens)
    # 3 layers: o_proj x 3 and down_proj x 2 (the last layer's gradient comes from the final norm, unfused)
    assert sum(hits) == 5, hits
    grad_amax.set_enabled(False)
    try:
        model.zero_grad(set_to_none=True)
        loss_b, grads_b = _step(model, tokens)
    finally:
        grad_amax.set_enabled(True)
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_a_training_step_leaves_no_attachments_alive():
    """Nothing fp8train hands between ops (norm outputs' FP8 copies and spare aliases, published gradient amaxes)
    outlives the step: steps do not accumulate memory."""
    import gc

    from fp8train.nn import handoff

    model = _model("coat").to(torch.bfloat16)
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    gc.collect()
    before = set(handoff._table.entries), set(grad_amax._entries)  # other tests' tensors may still be alive
    for _ in range(2):
        _step(model, tokens)
        model.zero_grad(set_to_none=True)
    gc.collect()
    assert not set(handoff._table.entries) - before[0]
    assert not set(grad_amax._entries) - before[1]


def test_torch_compile_runs_the_owned_forward_and_unusual_calls_fall_back():
    """torch.compile (fp8train train --compile) traces the owned forward to the same loss; a call with positional
    arguments (Hugging Face passes keywords) runs the class's own forward."""
    import warnings

    model = _model("coat")
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(4))
    eager = model(input_ids=tokens, labels=tokens, use_cache=False).loss.detach()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="aot_eager")(input_ids=tokens, labels=tokens, use_cache=False).loss
    torch._dynamo.reset()
    assert torch.equal(eager, compiled.detach())
    # no per-call source parsing or cache wrapper for dynamo to trace through
    assert not [w for w in caught if "residual_stream" in str(w.message) or "lru_cache" in str(w.message)]

    layer = model.model.layers[0]
    hidden = torch.randn(2, 16, 64)
    position = model.model.rotary_emb(hidden, torch.arange(16)[None])
    calls = []
    original = LlamaDecoderLayer.forward
    try:
        LlamaDecoderLayer.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
        layer(hidden, None, position_embeddings=position)  # attention_mask positionally
    finally:
        LlamaDecoderLayer.forward = original
    assert calls == [1]
