"""fp8train.convert on tiny Hugging Face models: what is converted, what is kept, training, memory, checkpoints."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn as nn
import transformers

import fp8train
from fp8train.nn.conv1d import FP8Conv1D
from fp8train.nn.linear import FP8Linear
from fp8train.nn.precision_flow import FlowMLP, FlowRMSNorm
from fp8train.nn.rmsnorm import FP8RMSNorm
from fp8train.nn.saved_memory import SavedTensorCounter

torch.set_num_threads(1)

VOCAB = 256


def tiny(family: str, **overrides) -> nn.Module:
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**common, **overrides})
        cls = transformers.LlamaForCausalLM
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": None, **overrides})
        cls = transformers.MistralForCausalLM
    elif family == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, **overrides})  # q/k/v with bias
        cls = transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**{**common, "head_dim": 32, **overrides})  # q_norm / k_norm
        cls = transformers.Qwen3ForCausalLM
    elif family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=4, n_positions=128,
                                      **overrides)
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    return cls(cfg)


def batch(seed=1, rows=4, length=64):
    """Sequences that repeat a random 17-token motif: a tiny model learns them within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (rows, 17), generator=g)
    return motif.repeat(1, length // 17 + 1)[:, :length]


LLAMA_STYLE = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("family", LLAMA_STYLE)
def test_llama_style_fast_path_structure(family):
    model = tiny(family)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unknown, nothing to fall back
        out = fp8train.convert(model, "coat")
    assert out is model
    assert list(model.state_dict()) == keys  # identical state_dict keys ...
    assert all(p is params[n] for n, p in model.named_parameters())  # ... and the same Parameter objects
    layer = model.model.layers[0]
    assert isinstance(layer.input_layernorm, FlowRMSNorm) and isinstance(layer.post_attention_layernorm, FlowRMSNorm)
    assert isinstance(layer.mlp, FlowMLP) and type(layer.mlp.down_proj) is FP8Linear
    assert all(type(getattr(layer.self_attn, n)) is FP8Linear for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    ids = batch(length=32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(ids, labels=ids)
    fp8_copies = [t for t in saved if t.dtype == torch.float8_e4m3fn and t.numel() == 4 * 32 * 128]
    # per layer: input norm (1x16), q/k/v input, post-attention norm, gate/up input -- none for o_proj,
    # whose input (a view of SDPA's output) SDPA keeps anyway; plus the final norm (and Qwen3's q_norm input)
    expected = 4 * 2 + 1 + (2 if family == "qwen3" else 0)
    assert len({t.untyped_storage().data_ptr() for t in fp8_copies}) == expected
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert isinstance(model.model.norm, FP8RMSNorm)
    if family == "qwen3":
        assert isinstance(layer.self_attn.q_norm, FP8RMSNorm) and isinstance(layer.self_attn.k_norm, FP8RMSNorm)
    if family == "qwen2":
        assert layer.self_attn.q_proj.bias is not None
    assert model._fp8train_report["fast_path_blocks"] == 2


@pytest.mark.parametrize("family", LLAMA_STYLE + ["gpt2"])
def test_training_tracks_bf16(family):
    """A few dozen AdamW steps under bf16 autocast: fp8 and coat losses follow the bf16 curve."""
    ids = batch()
    curves = {}
    for recipe in ("bf16", "fp8", "coat"):
        model = fp8train.convert(tiny(family), recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(24):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[recipe] = losses
    ref = torch.tensor(curves["bf16"])
    assert ref[-1] < 0.5 * ref[0]  # it learned something, so "tracks" means something
    for recipe in ("fp8", "coat"):
        curve = torch.tensor(curves[recipe])
        gap = (curve - ref).abs()
        assert (gap <= 0.1 * ref + 0.05).all(), f"{recipe}: {curves[recipe]} vs bf16 {curves['bf16']}"


def test_generic_path_gpt2():
    from fp8train.nn.activation import FP8Activation
    from fp8train.nn.layernorm import FP8LayerNorm

    model = tiny("gpt2")
    keys = list(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8train.convert(model, "coat")
    block = model.transformer.h[0]
    assert type(block.attn.c_attn) is FP8Conv1D and type(block.mlp.c_fc) is FP8Conv1D
    assert isinstance(block.ln_1, FP8LayerNorm) and isinstance(block.mlp.act, FP8Activation)
    assert type(model.lm_head) is nn.Linear  # tied to the embedding and named lm_head: stays bf16
    assert list(model.state_dict()) == keys
    ids = batch(length=32)
    model(ids, labels=ids).loss.backward()
    assert model.transformer.h[0].attn.c_attn.weight.grad.shape == (128, 384)


def test_conv1d_matches_fp8_linear_on_the_transposed_weight():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(48, 32)
    fp8 = FP8Conv1D.from_conv1d(conv)
    linear = FP8Linear(32, 48)
    linear.weight = nn.Parameter(conv.weight.detach().t().clone())
    linear.bias = nn.Parameter(conv.bias.detach().clone())
    x = torch.randn(5, 32)
    torch.testing.assert_close(fp8(x), linear(x))


def test_exclusions_glob_regex_predicate():
    model = fp8train.convert(tiny("llama"), "fp8", exclude=["*.down_proj", re.compile(r"layers\.1\.self_attn\.q_"),
                                                          lambda name, m: name.endswith("layers.0.self_attn.v_proj")])
    l0, l1 = model.model.layers
    assert type(l0.mlp.down_proj) is nn.Linear and type(l1.mlp.down_proj) is nn.Linear
    assert type(l1.self_attn.q_proj) is nn.Linear and type(l0.self_attn.q_proj) is FP8Linear
    assert type(l0.self_attn.v_proj) is nn.Linear and type(l1.self_attn.v_proj) is FP8Linear
    assert "model.layers.0.mlp.down_proj" in model._fp8train_report["excluded"]
    ids = batch(length=32)
    model(ids, labels=ids).loss.backward()


def test_excluding_a_block_keeps_its_whole_subtree():
    model = fp8train.convert(tiny("llama"), "coat", exclude="model.layers.0")
    assert type(model.model.layers[0].mlp.gate_proj) is nn.Linear
    assert not isinstance(model.model.layers[0].input_layernorm, FP8RMSNorm)
    assert isinstance(model.model.layers[1].mlp, FlowMLP)


def test_unsupported_shapes_fall_back_with_a_warning_naming_the_layer():
    model = tiny("llama", intermediate_size=100)  # not a multiple of 16
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.gate_proj \(128->100\)"):
        fp8train.convert(model, "coat")
    layer = model.model.layers[0]
    assert type(layer.mlp.gate_proj) is nn.Linear and type(layer.self_attn.q_proj) is FP8Linear
    ids = batch(length=32)
    model(ids, labels=ids).loss.backward()  # the MLP falls back to its submodules
    assert layer.mlp.gate_proj.weight.grad is not None


def test_unknown_module_types_get_one_summary_warning():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(16))

        def forward(self, x):
            return x * self.scale

    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), Custom(), nn.Conv1d(4, 4, 3)) for _ in range(50)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fp8train.convert(model, "fp8")
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "Custom x50" in messages[0] and "Conv1d x50" in messages[0]
    assert type(model[0][0]) is FP8Linear


def test_convert_twice_is_a_noop_and_recipe_objects_work():
    model = tiny("llama")
    recipe = fp8train.Recipe.named("coat").replace(recompute_gated_product=False)
    fp8train.convert(model, recipe)
    modules = list(model.modules())
    assert fp8train.convert(model, recipe) is model
    assert list(model.modules()) == modules
    with pytest.raises(ValueError, match="already converted"):
        fp8train.convert(model, "fp8")
    assert fp8train.convert(tiny("llama"), "bf16").model.layers[0].mlp.__class__.__name__ == "LlamaMLP"
    with pytest.raises(ValueError, match="unknown recipe"):
        fp8train.convert(tiny("llama"), "fp4")


def test_eval_no_grad_and_generate():
    ids = batch(rows=2, length=16)
    ref = tiny("llama").eval()
    model = fp8train.convert(tiny("llama"), "coat").eval()
    with torch.no_grad():
        logits_ref, logits = ref(ids).logits, model(ids).logits
        generated = model.generate(ids[:, :8], max_new_tokens=6, do_sample=False)
    assert generated.shape == (2, 14)
    rel = (logits - logits_ref).norm() / logits_ref.norm()
    assert rel < 2 * 2.0**-4  # each GEMM rounds both operands to E4M3 (relative error <= 2^-4 each)


def test_checkpoint_loads_into_the_unconverted_model(tmp_path):
    model = fp8train.convert(tiny("qwen2"), "coat")
    ids = batch(length=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)  # safetensors
    fresh = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    # and back into a converted model
    again = fp8train.convert(transformers.Qwen2ForCausalLM.from_pretrained(tmp_path), "coat")
    torch.testing.assert_close(again(ids).logits, model(ids).logits)


def test_saved_activation_bytes_vs_bf16():
    """Saved-for-backward bytes (parameters excluded, storages counted once) under bf16 autocast.

    Llama shapes with realistic ratios: hidden 256, ffn 688 (= 2.6875 x hidden, as Llama-2-7B), 4 heads,
    sequence 256, SDPA attention.
    """
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))
    saved = {}
    for recipe in ("bf16", "fp8", "coat"):
        torch.manual_seed(0)
        model = fp8train.convert(transformers.LlamaForCausalLM(cfg), recipe)
        with SavedTensorCounter(model) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        saved[recipe] = counter.total_bytes
    assert saved["coat"] <= 0.65 * saved["bf16"], saved
    assert saved["fp8"] <= 0.85 * saved["bf16"], saved


def test_converting_a_single_decoder_layer():
    """convert() also takes one block (what the per-layer GPU benchmark does)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    layer = tiny("llama").model.layers[0]
    assert isinstance(layer, LlamaDecoderLayer)
    fp8train.convert(layer, "coat")
    assert isinstance(layer.mlp, FlowMLP) and isinstance(layer.input_layernorm, FlowRMSNorm)
    with pytest.raises(TypeError, match="root module"):
        fp8train.convert(nn.Linear(16, 16), "fp8")


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch(length=32)
    grads = []
    for checkpointing in (False, True):
        model = fp8train.convert(tiny("llama"), "coat")
        if checkpointing:  # renamed in transformers 5.2x; 5.17 has only the old name
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_convert_module_is_callable_after_a_direct_import():
    import subprocess
    import sys

    code = ("import torch, fp8train.convert, fp8train; "
            "m = fp8train.convert(torch.nn.Sequential(torch.nn.Linear(16, 16)), 'fp8'); print(type(m[0]).__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "FP8Linear"


def test_other_families_convert_and_run():
    """Gemma (Llama-style, zero-centred norm), Gemma-2 (sandwich norms: generic path), Phi-3 (fused gate_up)."""
    from fp8train.nn.gated_mlp import FP8GatedMLP

    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ids = batch(length=32)
    for config, cls, check in [
        (transformers.GemmaConfig(**common, head_dim=32), transformers.GemmaForCausalLM,
         lambda m: isinstance(m.model.layers[0].mlp, FlowMLP)),
        (transformers.Gemma2Config(**common, head_dim=32), transformers.Gemma2ForCausalLM,
         lambda m: m._fp8train_report["fast_path_blocks"] == 0 and isinstance(m.model.layers[0].mlp, FlowMLP)),
        (transformers.Phi3Config(**common, pad_token_id=0, eos_token_id=1, bos_token_id=1), transformers.Phi3ForCausalLM,
         lambda m: isinstance(m.model.layers[0].mlp, FP8GatedMLP)),
    ]:
        torch.manual_seed(0)
        model = cls(config)
        reference = model(ids, labels=ids).loss
        fp8train.convert(model, "coat")
        loss = model(ids, labels=ids).loss
        loss.backward()
        assert check(model), type(model).__name__
        assert abs(loss.item() - reference.item()) < 0.02 * reference.item()
