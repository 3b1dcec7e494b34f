"""Recipe.flash_attention: the FlashAttention-4 hook into Hugging Face's attention registry.

FlashAttention-4 runs only on sm90/sm100 GPUs (benchmarks/debug/fa4_attention.py checks it there against cuDNN
and fp32); here a stand-in with its signature and layout -- (batch, sequence, heads, dim) in and out -- computes
SDPA, so the hook's transposes, arguments, fallbacks and installation are checked against HF's own SDPA path."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fp8train
from fp8train.causal_masks import plain_causal_batches
from fp8train.nn import flash_attention

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=97,
                                      max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).to(torch.bfloat16)  # FlashAttention takes bf16 / fp16


@pytest.fixture
def stand_in(monkeypatch):
    """FlashAttention-4 'installed' on this CPU: a flash_attn_func computing SDPA, recording its calls."""
    calls = []

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
        assert q.dim() == 4 and q.stride(-1) == 1 and causal
        calls.append((q.shape, k.shape, softmax_scale))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, scale=softmax_scale, enable_gqa=True)
        return out.transpose(1, 2), None

    monkeypatch.setattr(flash_attention, "_flash_attn_func", lambda: flash_attn_func)
    monkeypatch.setattr(flash_attention, "available", lambda device=None: True)
    monkeypatch.setattr(flash_attention, "_runs_on", lambda device: True)
    return calls


def loss_and_grads(model, ids, **kwargs):
    with plain_causal_batches():
        loss = model(input_ids=ids, labels=ids, **kwargs).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_same_loss_and_gradients_as_hf_sdpa(stand_in):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(tiny_llama(), ids)
    model = fp8train.convert(tiny_llama(), fp8train.Recipe.named("bf16").replace(flash_attention=True))
    report = model._fp8train_report["flash_attention"]
    assert report["installed"] == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert all(flash_attention.uses_flash_attention(layer.self_attn) for layer in model.model.layers)
    loss, grads = loss_and_grads(model, ids)
    # 2 layers, forward only: backward is the stand-in's autograd; GQA k/v keep their 2 heads
    assert [c[0] for c in stand_in] == [(2, 12, 4, 16)] * 2 and stand_in[0][1] == (2, 12, 2, 16)
    assert stand_in[0][2] == pytest.approx(16 ** -0.5)
    # the stand-in runs the very SDPA call HF's function makes, on the same memory: the same bits
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    assert flash_attention.remove_flash_attention(model) == 2
    assert model.config._attn_implementation == "sdpa"


def test_masks_and_unmarked_modules_run_hf_sdpa_and_warn_only_when_asked(stand_in):
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(2))
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    quiet = fp8train.convert(tiny_llama(), fp8train.Recipe(name="loss", fp8_linears=False, chunked_loss=True))
    assert quiet._fp8train_report["flash_attention"]["installed"]  # None: installed where available, quietly
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with plain_causal_batches():
            quiet(input_ids=ids, attention_mask=padding)
    assert not stand_in  # a padding mask: HF's SDPA ran
    loud = fp8train.convert(tiny_llama(), fp8train.Recipe.named("bf16").replace(flash_attention=True))
    with pytest.warns(UserWarning, match="attention mask"):
        with plain_causal_batches():
            loud(input_ids=ids, attention_mask=padding)
    assert not stand_in
    unmarked = tiny_llama()
    unmarked.config._attn_implementation = flash_attention.ATTENTION_NAME  # the name without the module mark
    flash_attention.register_attention_function()
    with plain_causal_batches():
        unmarked(input_ids=ids)
    assert not stand_in


def test_not_installed_leaves_sdpa_and_false_turns_it_off(monkeypatch):
    monkeypatch.setattr(flash_attention, "available", lambda device=None: False)
    model = fp8train.convert(tiny_llama(), fp8train.Recipe.named("bf16").replace(flash_attention=True))
    report = model._fp8train_report["flash_attention"]
    assert report["installed"] == [] and len(report["skipped"]) == 2
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.setattr(flash_attention, "available", lambda device=None: True)
    off = fp8train.convert(tiny_llama(), fp8train.Recipe.named("fp8").replace(flash_attention=False))
    assert "flash_attention" not in off._fp8train_report and off.config._attn_implementation == "sdpa"
    assert fp8train.Recipe.named("bf16").is_noop  # None does not make the bf16 recipe convert anything
    for wrong in ("yes", 1):
        with pytest.raises(TypeError, match="flash_attention"):
            fp8train.Recipe(flash_attention=wrong)
