import pytest
import torch
import torch.nn.functional as F

from fp8train.nn.chunked_cross_entropy import chunked_linear_cross_entropy, enable_chunked_loss


def reference(hidden, weight, labels, bias=None):
    logits = F.linear(hidden, weight, bias)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels, ignore_index=-100)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_unfused_loss_and_grads_float64(chunk_rows, with_bias):
    torch.manual_seed(0)
    hidden = torch.randn(53, 24, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(97, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(97, dtype=torch.float64, requires_grad=True) if with_bias else None
    labels = torch.randint(0, 97, (53,))
    labels[::5] = -100
    loss = chunked_linear_cross_entropy(hidden, weight, labels, bias, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(loss * 3.0, [hidden, weight] + ([bias] if with_bias else []))
    ref = reference(hidden, weight, labels, bias)
    ref_grads = torch.autograd.grad(ref * 3.0, [hidden, weight] + ([bias] if with_bias else []))
    torch.testing.assert_close(loss, ref.to(loss.dtype), rtol=1e-6, atol=1e-9)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9)


def test_bf16_autocast_close_to_reference():
    torch.manual_seed(1)
    hidden = torch.randn(4, 40, 64, requires_grad=True)
    weight = torch.randn(300, 64, requires_grad=True)
    labels = torch.randint(0, 300, (4, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_linear_cross_entropy(hidden, weight, labels, chunk_rows=33)
        ref = F.cross_entropy(F.linear(hidden, weight).float().reshape(-1, 300), labels.reshape(-1))
    loss.backward()
    gw = weight.grad.clone()
    weight.grad = None
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    assert (gw - weight.grad).norm() / weight.grad.norm() < 3e-2
    assert weight.grad.dtype == gw.dtype == torch.float32


def test_num_items_in_batch_and_all_ignored():
    hidden = torch.randn(10, 8, dtype=torch.float64)
    weight = torch.randn(12, 8, dtype=torch.float64)
    labels = torch.randint(0, 12, (10,))
    summed = F.cross_entropy(F.linear(hidden, weight), labels, reduction="sum")
    out = chunked_linear_cross_entropy(hidden, weight, labels, num_items_in_batch=25)
    torch.testing.assert_close(out, summed / 25)
    assert chunked_linear_cross_entropy(hidden, weight, torch.full((10,), -100)).item() == 0.0
    with pytest.raises(ValueError, match="rows"):
        chunked_linear_cross_entropy(hidden, weight, labels[:5])


def test_enable_chunked_loss_on_llama_matches_hf_loss():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=211, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 211, (2, 17))
    labels = ids.clone()
    labels[0, :3] = -100
    ref = model(input_ids=ids, labels=labels).loss
    ref.backward()
    ref_grad = model.lm_head.weight.grad.clone()
    emb_grad = model.model.embed_tokens.weight.grad.clone()
    model.zero_grad()
    enable_chunked_loss(model, chunk_rows=5)
    out = model(input_ids=ids, labels=labels)
    assert out.logits is None
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.model.embed_tokens.weight.grad, emb_grad, rtol=1e-4, atol=1e-6)
    assert model(input_ids=ids).logits.shape == (2, 17, 211)  # no labels: the model's own forward


def test_recipe_option_enables_chunked_loss():
    import fp8train
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 9))
    ref = model(input_ids=ids, labels=ids).loss
    fp8train.convert(model, recipe=fp8train.Recipe(name="loss-only", fp8_linears=False, chunked_loss=True))
    out = model(input_ids=ids, labels=ids)
    assert out.logits is None
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    assert fp8train.recipes.resolve_recipe("coat-lean").chunked_loss


def test_accumulate_product_adds_the_product_into_fp32():
    """The fused loss accumulates the head's weight gradient chunk by chunk; off CUDA the product is rounded to
    the operands' dtype and added (on CUDA the GEMM adds its fp32 result itself: benchmarks/gpu/ops.py)."""
    from fp8train.nn.chunked_cross_entropy import _accumulate_product

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 5, generator=gen).to(torch.bfloat16)
    b = torch.randn(5, 4, generator=gen).to(torch.bfloat16)
    acc = torch.randn(6, 4, generator=gen)
    expected = acc + (a @ b).float()
    _accumulate_product(acc, a, b)
    assert torch.equal(acc, expected)


def test_recipe_chunk_rows_reach_the_loss(monkeypatch):
    """Recipe.loss_chunk_rows sets the chunk size (checked, and the same loss whatever the chunking)."""
    import fp8train
    from fp8train.nn import chunked_cross_entropy as chunked
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="loss_chunk_rows"):
        fp8train.Recipe(chunked_loss=True, loss_chunk_rows=0)
    assert fp8train.Recipe().loss_chunk_rows is None  # scaled with the batch
    assert [chunked.auto_chunk_rows(n) for n in (1, 8192, 16384, 32768, 65536, 90112)] == \
        [2048, 2048, 2048, 4096, 8192, 8192]
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=97, max_position_embeddings=64)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    seen, losses = [], []
    original = chunked.chunked_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs["chunk_rows"])
        return original(*args, **kwargs)

    monkeypatch.setattr(chunked, "chunked_linear_cross_entropy", spy)
    for rows in (None, 2048, 5):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        fp8train.convert(model, recipe=fp8train.Recipe(name="loss", fp8_linears=False, chunked_loss=True,
                                                       loss_chunk_rows=rows))
        losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert seen == [None, 2048, 5]
    assert max(losses) - min(losses) < 1e-5
