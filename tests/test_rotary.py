"""The fused rotary embedding against Hugging Face's apply_rotary_pos_emb (bit for bit, forward and backward) and
its installation by fp8train.convert.  The Triton kernel itself is checked by tests/triton_interpreter.py
(``check_rotary``) on CPU and by benchmarks/gpu/rotary.py on the GPU."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as hf_apply_rotary_pos_emb

import fp8train
from fp8train.nn import rotary

torch.set_num_threads(1)

DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, dtypes, shapes and sign bits (torch.equal treats -0 and +0 as equal)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def hf_inputs(q_dtype, cos_dtype, unsqueeze_dim=1, dim=64, heads=4, kv_heads=2, batch=2, seq=5, seed=0,
              cos_batch=None):
    """q/k as Hugging Face makes them: projections viewed as heads and, for unsqueeze_dim=1, transposed (not
    contiguous); leaves x/xk to take the gradients.  cos halves differ and some entries are zero."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, heads * dim, generator=gen).to(q_dtype).requires_grad_(True)
    xk = torch.randn(batch, seq, kv_heads * dim, generator=gen).to(q_dtype).requires_grad_(True)
    q, k = x.view(batch, seq, heads, dim), xk.view(batch, seq, kv_heads, dim)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos = torch.randn(cos_batch or batch, seq, dim, generator=gen).to(cos_dtype)
    sin = torch.randn(cos_batch or batch, seq, dim, generator=gen).to(cos_dtype)
    sin[:, 0] = 0  # position 0 of a real rotary table
    return x, xk, q, k, cos, sin


def grads_of(fn, q_dtype, cos_dtype, unsqueeze_dim, dim, seed=0, **kw):
    x, xk, q, k, cos, sin = hf_inputs(q_dtype, cos_dtype, unsqueeze_dim, dim, seed=seed, **kw)
    layouts = []  # the gradients' strides as they reach q and k (later reductions sum in this order)
    q.register_hook(lambda g: layouts.append(g.stride()))
    k.register_hook(lambda g: layouts.append(g.stride()))
    out_q, out_k = fn(q, k, cos, sin, unsqueeze_dim)
    gen = torch.Generator().manual_seed(seed + 100)
    dq = torch.randn(out_q.shape, generator=gen).to(out_q.dtype)
    dk = torch.randn(out_k.shape, generator=gen).to(out_k.dtype)
    dq[..., :3] = 0  # zero gradients: the sums must come out +0 as autograd's do
    grads = torch.autograd.grad((out_q, out_k), (x, xk), (dq, dk))
    return (out_q, out_k, *grads), (dq, dk, cos, sin, sorted(layouts))


@pytest.mark.parametrize("q_dtype,cos_dtype", DTYPES)
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
@pytest.mark.parametrize("dim", [64, 128])
def test_reference_and_function_match_hugging_face_bit_for_bit(q_dtype, cos_dtype, unsqueeze_dim, dim):
    hf, (dq, dk, cos, sin, hf_layouts) = grads_of(hf_apply_rotary_pos_emb, q_dtype, cos_dtype, unsqueeze_dim, dim)
    assert hf[0].dtype == torch.promote_types(q_dtype, cos_dtype)  # autocast: bf16 q, fp32 cos -> fp32 out
    for fn in (rotary.rotary_embedding_reference, rotary.fused_rotary_embedding):
        got, (*_, layouts) = grads_of(fn, q_dtype, cos_dtype, unsqueeze_dim, dim)
        for name, a, b in zip(("q_embed", "k_embed", "grad q", "grad k"), got, hf):
            assert same_bits(a, b), (fn.__name__, name)
        assert got[0].stride() == hf[0].stride() and got[1].stride() == hf[1].stride()  # q's layout
        assert layouts == hf_layouts
    # the explicit backward formula is autograd's, bit for bit
    for grad_out, expected in ((dq, hf[2]), (dk, hf[3])):
        got = rotary.rotary_embedding_backward_reference(grad_out, cos, sin, q_dtype, unsqueeze_dim)
        assert got.is_contiguous()
        if unsqueeze_dim == 1:
            got = got.transpose(1, 2)
        assert same_bits(got.reshape(expected.shape), expected)


def test_function_is_used_and_cos_broadcast_over_batch():
    hf, _ = grads_of(hf_apply_rotary_pos_emb, torch.bfloat16, torch.float32, 1, 64, cos_batch=1)
    got, _ = grads_of(rotary.fused_rotary_embedding, torch.bfloat16, torch.float32, 1, 64, cos_batch=1)
    assert type(got[0].grad_fn).__name__ == "RotaryEmbeddingFunctionBackward"
    assert all(same_bits(a, b) for a, b in zip(got, hf))


def test_fallbacks_cos_with_gradient_odd_head_dim_and_no_kernel_on_cpu():
    x, xk, q, k, cos, sin = hf_inputs(torch.float32, torch.float32, dim=64)
    assert not rotary.kernel_supports(q, k, cos, sin, 1)  # CPU tensors: the reference path
    cos = cos.clone().requires_grad_(True)
    out_q, out_k = rotary.fused_rotary_embedding(q, k, cos, sin)
    assert type(out_q.grad_fn).__name__ != "RotaryEmbeddingFunctionBackward"
    (out_q.sum() + out_k.sum()).backward()
    hf_cos = cos.detach().clone().requires_grad_(True)
    ref_q, ref_k = hf_apply_rotary_pos_emb(q, k, hf_cos, sin)
    (ref_q.sum() + ref_k.sum()).backward()
    assert same_bits(cos.grad, hf_cos.grad)
    _, _, q, k, cos, sin = hf_inputs(torch.float32, torch.float32, dim=6)
    cos, sin, q, k = cos[..., :5], sin[..., :5], q[..., :5], k[..., :5]  # odd head_dim: halves of 2 and 3
    got = rotary.fused_rotary_embedding(q, k, cos, sin)
    assert all(same_bits(a, b) for a, b in zip(got, hf_apply_rotary_pos_emb(q, k, cos, sin)))


# -- installation --------------------------------------------------------------------------------------------

def tiny(family: str, **overrides):
    common = dict(vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**common, **overrides}))


@pytest.fixture
def restore_rotary():
    """Put the families' original apply_rotary_pos_emb back after a test (installation is process-wide)."""
    from transformers.models.qwen3 import modeling_qwen3

    modules = (modeling_llama, modeling_qwen3)
    originals = {m: m.apply_rotary_pos_emb for m in modules}
    for m, fn in originals.items():  # start from HF's function even if an earlier test in this process converted
        if rotary.is_fused_rotary(fn):
            m.apply_rotary_pos_emb = fn.__wrapped__
    yield
    for m, fn in originals.items():
        m.apply_rotary_pos_emb = fn


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_convert_installs_the_wrapper_once_and_outputs_are_unchanged(family, restore_rotary):
    module = sys.modules[type(tiny(family).model.layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    assert not rotary.is_fused_rotary(original)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    def loss_and_grads(model):
        loss = model(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters()]

    plain = fp8train.convert(tiny(family), fp8train.Recipe(fused_rotary=False))
    assert module.apply_rotary_pos_emb is original  # fused_rotary=False installs nothing
    assert plain._fp8train_report["fused_rotary"] == []
    expected = loss_and_grads(plain)

    model = fp8train.convert(tiny(family), "fp8")
    wrapper = module.apply_rotary_pos_emb
    assert rotary.is_fused_rotary(wrapper) and wrapper.__wrapped__ is original
    assert model._fp8train_report["fused_rotary"] == [module.__name__]
    fp8train.convert(tiny(family), "coat")  # a second model of the family: still wrapped once
    assert module.apply_rotary_pos_emb is wrapper
    assert rotary.install_fused_rotary(model.model.layers[1].self_attn) == module.__name__
    assert module.apply_rotary_pos_emb is wrapper

    # the attention forward looks the name up at call time; make the wrapper take the fused path on CPU (the
    # autograd Function with the torch reference) and count: same loss and gradients, bit for bit
    calls = []
    use_fused = rotary._use_fused
    rotary._use_fused = lambda *args: calls.append(args[0].shape) or True
    try:
        got = loss_and_grads(model)
    finally:
        rotary._use_fused = use_fused
    assert len(calls) == 2  # one call per layer
    assert all(same_bits(a, b) for a, b in zip(got, expected))
    assert rotary.remove_fused_rotary(model.model.layers[0].self_attn)
    assert module.apply_rotary_pos_emb is original


def test_bf16_recipe_installs_nothing(restore_rotary):
    fp8train.convert(tiny("llama"), "bf16")
    assert not rotary.is_fused_rotary(modeling_llama.apply_rotary_pos_emb)
    with pytest.raises(TypeError, match="fused_rotary"):
        fp8train.Recipe(fused_rotary="yes")


def test_a_different_rotary_function_is_left_alone():
    """An interleaved-pairs variant (as some families use) has the same signature but other results."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        def rotate_pairs(x):
            return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

        cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
        return q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin

    family = types.ModuleType("fake_family_modeling")
    family.apply_rotary_pos_emb = apply_rotary_pos_emb
    attention_cls = type("FakeAttention", (torch.nn.Module,), {"__module__": family.__name__})
    sys.modules[family.__name__] = family
    try:
        assert rotary.install_fused_rotary(attention_cls()) is None
        assert family.apply_rotary_pos_emb is apply_rotary_pos_emb
        family.apply_rotary_pos_emb = modeling_llama.apply_rotary_pos_emb  # a standard one is accepted
        assert rotary.install_fused_rotary(attention_cls()) == family.__name__
        assert rotary.is_fused_rotary(family.apply_rotary_pos_emb)
    finally:
        del sys.modules[family.__name__]


def test_kernel_gradients_take_the_inputs_layout_when_it_is_dense():
    """The kernel path's backward writes q/k gradients in q/k's own layout (HF's transposed projection views:
    the transpose + view backward then copies nothing); gapped layouts get dense strides in the same order,
    overlapping ones contiguous strides."""
    x = torch.empty(2, 5, 4 * 8)
    q = x.view(2, 5, 4, 8).transpose(1, 2)  # HF's layout: (batch, heads, seq, dim) over (batch, seq, heads, dim)
    grad = rotary._empty_like_layout(q.shape, q.stride(), torch.float32, "cpu")
    assert grad.stride() == q.stride()
    assert grad.transpose(1, 2).is_contiguous()  # viewable as the projection's (batch, seq, heads * dim)
    # a slice of a fused q/k/v projection: dense strides in the same (projection) order
    fused = torch.empty(2, 5, 3 * 32)[..., :32].view(2, 5, 4, 8).transpose(1, 2)
    grad = rotary._empty_like_layout(fused.shape, fused.stride(), torch.float32, "cpu")
    assert grad.transpose(1, 2).is_contiguous()
    overlapping = torch.empty(2, 1, 5, 8).expand(2, 4, 5, 8)
    assert rotary._empty_like_layout(overlapping.shape, overlapping.stride(), torch.float32, "cpu").is_contiguous()
