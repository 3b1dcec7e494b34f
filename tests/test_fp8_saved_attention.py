"""FP8-saved attention inputs (fp8train.nn.fp8_saved_attention, Recipe.fp8_attention_saves) on the CPU flash kernel:
same forward bits, bounded gradient error, FP8 saves, the Hugging Face wiring and its fallbacks."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import transformers

import fp8train
from fp8train.mixed_granularity import quantization_disabled
from fp8train.nn import fp8_saved_attention as fsa
from fp8train.nn.linear import kept_by_attention
from fp8train.nn.saved_memory import SavedTensorCounter

torch.set_num_threads(2)


def qkv(batch=2, heads=4, kv_heads=4, seq=128, head_dim=64, dtype=torch.bfloat16, layout="hf", sigma=1.0, seed=0):
    """q, k, v as Hugging Face hands them to attention: (batch, heads, seq, head_dim) views of (batch, seq, heads,
    head_dim) memory (``layout="hf"``), or contiguous."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h in (heads, kv_heads, kv_heads):
        if layout == "hf":
            t = (torch.randn(batch, seq, h, head_dim, generator=g) * sigma).to(dtype).transpose(1, 2)
        else:
            t = (torch.randn(batch, h, seq, head_dim, generator=g) * sigma).to(dtype)
        out.append(t.requires_grad_(True))
    return out


def sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          **({"enable_gqa": True} if k.shape[1] != q.shape[1] else {}))


def run(fn, tensors, grad_out):
    out = fn(*tensors)
    return out, torch.autograd.grad(out, tensors, grad_out)


def grad_out_like(q, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(q.shape, generator=g).to(q.dtype)


SHAPES = [dict(heads=4, kv_heads=4, head_dim=64), dict(heads=4, kv_heads=2, head_dim=128),
          dict(heads=8, kv_heads=1, head_dim=32, seq=96)]


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["hf", "contiguous"])
@pytest.mark.parametrize("mode", fsa.MODES)
def test_forward_is_sdpa_bit_for_bit(shape, dtype, layout, mode):
    q, k, v = qkv(dtype=dtype, layout=layout, **shape)
    expected = sdpa(q, k, v, scale=0.11)
    out = fsa.fp8_saved_attention(q, k, v, scale=0.11, mode=mode)
    assert out.dtype == expected.dtype and out.stride() == expected.stride()
    assert torch.equal(out, expected)
    assert type(out.grad_fn).__name__ == "FP8SavedAttentionFunctionBackward"


@pytest.mark.parametrize("shape", SHAPES, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mode", fsa.MODES)
def test_exact_copies_give_sdpa_gradients_bit_for_bit(shape, mode):
    """With quantization switched off the saved copies are q/k/v themselves: then every gradient is SDPA's, bit for
    bit -- the ops, their arguments and the memory layouts are wired exactly as SDPA's own backward."""
    q, k, v = qkv(**shape)
    g = grad_out_like(q)
    _, expected = run(sdpa, (q, k, v), g)
    with quantization_disabled():
        _, got = run(lambda *t: fsa.fp8_saved_attention(*t, mode=mode), (q, k, v), g)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _errors(got, exact):
    """(relative error of the norm, cosine, max error / max |exact|) per gradient, against float64."""
    rows = []
    for a, r in zip(got, exact):
        a = a.double()
        rows.append((((a - r).norm() / r.norm()).item(),
                     F.cosine_similarity(a.flatten(), r.flatten(), dim=0).item(),
                     ((a - r).abs().max() / r.abs().max()).item()))
    return rows


# relative-error bound per (mode, format), unit-variance q/k/v; measured (head_dim 64 / 128): e4m3 recompute
# 0.048 / 0.048, saved_lse 0.059 / 0.056, int8 recompute 0.012; bf16 SDPA itself 0.003-0.004
BOUNDS = {("recompute", "e4m3"): 0.06, ("saved_lse", "e4m3"): 0.075, ("recompute", "int8"): 0.02,
          ("saved_lse", "int8"): 0.03}


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["mha", "gqa"])
@pytest.mark.parametrize("mode,saved_format", list(BOUNDS))
def test_gradients_close_to_float64(shape, mode, saved_format):
    q, k, v = qkv(seq=256, **shape)
    g = grad_out_like(q)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    _, reference = run(sdpa, exact, g.double())
    _, plain = run(sdpa, (q, k, v), g)
    _, got = run(lambda *t: fsa.fp8_saved_attention(*t, mode=mode, saved_format=saved_format), (q, k, v), g)
    bound = BOUNDS[mode, saved_format]
    for (rel, cos, worst), (plain_rel, _, _) in zip(_errors(got, reference), _errors(plain, reference)):
        assert plain_rel < 0.01  # bf16 SDPA itself
        assert rel < bound, (rel, bound)
        assert cos > 1 - bound ** 2 / 2 * 1.2, cos  # cos = 1 - rel^2 / 2 for errors orthogonal to the gradient
        assert worst < 3 * bound, worst


def test_recompute_is_closer_than_saved_lse_for_sharp_attention():
    """Sharper attention (q/k of standard deviation 2: logits of std 4) is where the exact log-sum-exp with rounded
    q/k hurts: the default mode keeps the error well below the other's."""
    q, k, v = qkv(seq=256, sigma=2.0)
    g = grad_out_like(q)
    exact = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    _, reference = run(sdpa, exact, g.double())
    errors = {}
    for mode in fsa.MODES:
        _, got = run(lambda *t: fsa.fp8_saved_attention(*t, mode=mode), (q, k, v), g)
        errors[mode] = max(rel for rel, _, _ in _errors(got, reference))
    assert errors["recompute"] < 0.75 * errors["saved_lse"], errors


def _saved(fn, tensors):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn(*tensors)
    return out, saved


def _bytes(tensors):
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("shape", SHAPES[:2], ids=["mha", "gqa"])
def test_saved_tensors_are_fp8_and_the_bytes_follow_the_formula(shape):
    batch, seq = 2, 128
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    q, k, v = qkv(batch=batch, seq=seq, **shape)
    _, plain = _saved(sdpa, (q, k, v))
    assert {t.dtype for t in plain} == {torch.bfloat16, torch.float32}  # q, k, v, out + fp32 log-sum-exp
    assert _bytes(plain) == fsa.attention_saved_bytes(batch, seq, heads, kv_heads, head_dim, mode=None)
    sizes = {q.numel(), k.numel()}
    for mode in fsa.MODES:
        out, saved = _saved(lambda *t: fsa.fp8_saved_attention(*t, mode=mode), (q, k, v))
        big = [t for t in saved if t.numel() in sizes]
        fp8 = [t for t in big if t.dtype == torch.float8_e4m3fn]
        assert len(fp8) == 3 and sorted(t.numel() for t in fp8) == sorted([q.numel(), k.numel(), v.numel()])
        others = [t for t in big if t.dtype != torch.float8_e4m3fn]
        if mode == "recompute":
            assert others == []  # no bf16 q/k/v, no output
        else:
            assert len(others) == 1 and others[0] is out  # the output, shared with o_proj
        assert _bytes(saved) == fsa.attention_saved_bytes(batch, seq, heads, kv_heads, head_dim, mode=mode)
    # about half of bf16's bytes once the output is counted where o_proj keeps it (an FP8 copy under coat)
    ratio = (fsa.attention_saved_bytes(batch, seq, heads, kv_heads, head_dim, mode="recompute")
             + batch * seq * heads * head_dim) / _bytes(plain)
    assert 0.45 < ratio < 0.56, ratio


def test_int8_copies_have_the_same_bytes():
    q, k, v = qkv()
    _, e4m3 = _saved(lambda *t: fsa.fp8_saved_attention(*t), (q, k, v))
    _, int8 = _saved(lambda *t: fsa.fp8_saved_attention(*t, saved_format="int8"), (q, k, v))
    assert _bytes(e4m3) == _bytes(int8)
    assert sum(t.dtype == torch.int8 for t in int8) == 3


def test_fast_dequantize_agrees_with_the_reference():
    """The CUDA dequantization (E4M3 -> bf16, one in-place multiply by the fp32 scale) against the plain-torch
    reference (QuantizedTensor.dequantize), both run here on CPU: the same layout, the same values but for rare
    one-ulp ties (d * (amax / 448) vs d / 448 * amax in fp32, then rounded to bf16)."""
    q, k, v = qkv(seq=256, head_dim=128, sigma=3.0)
    for t in (q, k, v):
        for fmt in fsa.SAVED_FORMATS.values():
            data, amax, mean, meta = fsa._save_copy(t, fmt, fsa.saved_group_size(t.shape[-1]), exact=False)
            ref, fast = (fsa._dequantize_copy(data, amax, mean, meta, reference=r) for r in (True, False))
            assert ref.stride() == fast.stride() == t.stride()
            assert (ref != fast).float().mean().item() < 1e-3
            zero = torch.zeros_like(mean)  # before the mean is added (an exact bf16 add in both paths)
            ref, fast = (fsa._dequantize_copy(data, amax, zero, meta, reference=r) for r in (True, False))
            torch.testing.assert_close(fast, ref, rtol=2 ** -7, atol=0)


def test_group_size():
    assert [fsa.saved_group_size(d) for d in (128, 256, 64, 96, 80, 72)] == [128, 128, 64, 32, 16, 8]


def test_op_plans_on_this_torch():
    """The cuDNN and flash schemas are in every torch build: the name mapping is checked here, and the calls run on
    meta tensors (shapes and strides of the CUDA path, no GPU)."""
    plans = {name: fsa._plan(name) for name in ("cudnn", "flash", "cpu_flash")}
    assert all(p is not None for p in plans.values())
    flash = dict(plans["flash"].backward_args)
    returns = plans["flash"].forward_returns
    assert returns[int(flash["philox_seed"][4:])] in ("rng_state", "philox_seed")
    for backend in ("flash", "cudnn"):
        for mode in fsa.MODES:
            q, k, v = (torch.empty(2, 64, h, 128, dtype=torch.bfloat16, device="meta").transpose(1, 2)
                       .requires_grad_(True) for h in (4, 2, 2))
            out = fsa.FP8SavedAttentionFunction.apply(q, k, v, 0.1, backend, mode, "e4m3", None)
            grads = torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
            assert out.shape == q.shape and [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_autocast_casts_like_sdpa():
    q, k, v = qkv(dtype=torch.float32)
    v2 = v.detach().bfloat16().requires_grad_(True)
    g = grad_out_like(q).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = run(sdpa, (q, k, v2), g)
        with quantization_disabled():
            out, grads = run(fsa.fp8_saved_attention, (q, k, v2), g)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    for a, b in zip(grads, expected_grads):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_without_gradients_plain_sdpa_runs():
    q, k, v = qkv()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fsa.fp8_saved_attention(q, k, v)
    assert out.grad_fn is None and torch.equal(out, sdpa(q, k, v))


def test_unsupported_backend_falls_back_with_one_warning():
    fp8train.kernels._warned.clear()  # the shared warn-once registry
    q, k, v = qkv(dtype=torch.float64)  # float64: SDPA's math backend
    backend, why = fsa.choose_backend(q, k, v)
    assert backend is None and "dtypes" in why
    with pytest.warns(UserWarning, match="plain SDPA"):
        out = fsa.fp8_saved_attention(q, k, v)
    assert torch.equal(out, sdpa(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        fsa.fp8_saved_attention(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # what a CUDA run without cuDNN/flash looks like
        backend, why = fsa.choose_backend(*qkv())
    assert backend is None and "MATH" in why


# -- the Hugging Face wiring ----------------------------------------------------------------------------------------

VOCAB = 256


def tiny_llama(kv_heads=2, seed=0, **overrides):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=128,
                                   **overrides)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


def batch(seed=1, rows=4, length=64):
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (rows, 17), generator=g)
    return motif.repeat(1, length // 17 + 1)[:, :length]


def with_flag(recipe="coat", **changes):
    return fp8train.Recipe.named(recipe).replace(fp8_attention_saves=True, **changes)


def attentions(model):
    return [layer.self_attn for layer in model.model.layers]


def test_flag_off_leaves_attention_untouched():
    assert fp8train.Recipe().fp8_attention_saves is False
    model = fp8train.convert(tiny_llama(), "coat")
    assert model.config._attn_implementation == "sdpa"
    assert not any(fsa.uses_fp8_saved_attention(a) for a in attentions(model))
    ids = batch(length=32)
    _, saved = _saved(lambda x: model(x, labels=x).loss, (ids,))
    assert "fp8_attention_saves" not in model._fp8train_report
    assert not any(type(t.grad_fn).__name__.startswith("FP8SavedAttention") for t in saved if t.grad_fn is not None)


@pytest.mark.parametrize("recipe", ["bf16", "fp8", "coat"])
def test_converted_llama_trains_like_without(recipe):
    ids = batch()
    losses = {}
    for flag in (False, True):
        model = tiny_llama()
        fp8train.convert(model, with_flag(recipe) if flag else recipe)
        if flag:
            assert model.config._attn_implementation == fsa.ATTENTION_NAME
            assert all(fsa.uses_fp8_saved_attention(a) for a in attentions(model))
            assert model._fp8train_report["fp8_attention_saves"]["installed"] == [
                f"model.layers.{i}.self_attn" for i in range(2)]
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses[flag] = []
        for _ in range(8):
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no fallback on the way
                loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[flag].append(loss.item())
    assert losses[True][0] == losses[False][0]  # the forward is unchanged
    assert losses[True][-1] < 0.8 * losses[True][0]  # it learns
    for a, b in zip(losses[True], losses[False]):
        assert abs(a - b) < 0.02 * b, (losses[True], losses[False])


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_other_llama_style_families(family):
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    config, cls = {
        "mistral": (lambda: transformers.MistralConfig(**common, sliding_window=None), transformers.MistralForCausalLM),
        "qwen2": (lambda: transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM),
        "qwen3": (lambda: transformers.Qwen3Config(**common, head_dim=32), transformers.Qwen3ForCausalLM),
    }[family]
    ids = batch(length=32)
    losses = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = fp8train.convert(cls(config()), with_flag() if flag else "coat")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    assert len(model._fp8train_report["fp8_attention_saves"]["installed"]) == 2
    assert torch.equal(losses[0], losses[1])


def test_bf16_autocast_model_gradients_close():
    """Whole-model gradients under CPU bf16 autocast (RoPE hands SDPA fp32 q/k, autocast casts them): the switch
    changes only the attention backward, so parameter gradients stay close to the plain model's."""
    ids = batch(length=64)
    grads = []
    for flag in (False, True):
        model = fp8train.convert(tiny_llama(), with_flag("bf16") if flag else "bf16")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, labels=ids).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    cos = F.cosine_similarity(grads[0].double(), grads[1].double(), dim=0).item()
    assert cos > 0.995, cos


def test_saved_bytes_of_a_converted_llama():
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    ids = torch.randint(0, 512, (2, 256), generator=torch.Generator().manual_seed(0))
    saved = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = fp8train.convert(transformers.LlamaForCausalLM(cfg), with_flag("coat") if flag else "coat")
        with SavedTensorCounter(model) as counter, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        saved[flag] = counter.total_bytes
    per_layer_plain = fsa.attention_saved_bytes(2, 256, 4, 4, 64, mode=None)
    per_layer_fp8 = fsa.attention_saved_bytes(2, 256, 4, 4, 64, mode="recompute") + 2 * 256 * 256  # + o_proj's copy
    assert saved[False] - saved[True] == 2 * (per_layer_plain - per_layer_fp8), saved
    assert saved[True] < 0.86 * saved[False]


def test_saved_lse_mode_lets_o_proj_keep_a_reference():
    model = fp8train.convert(tiny_llama(), "coat")
    for attn in attentions(model):
        assert fsa.install_fp8_saved_attention(attn, mode="saved_lse") is None
    q, k, v = qkv(heads=4, kv_heads=2, head_dim=32, seq=32)
    out, _ = fsa.fp8_saved_sdpa_attention_forward(attentions(model)[0], q, k, v, None, scaling=32 ** -0.5)
    assert kept_by_attention(out.reshape(2, 32, -1))
    with quantization_disabled():
        ids = batch(length=32)
        model(ids, labels=ids).loss.backward()
    out = fsa.fp8_saved_attention(q, k, v, mode="recompute")
    assert not kept_by_attention(out.transpose(1, 2).reshape(2, 32, -1))


def test_padding_mask_falls_back_with_a_warning():
    fp8train.kernels._warned.clear()  # the shared warn-once registry
    ids = batch(length=32)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    plain = tiny_llama()
    model = fp8train.convert(tiny_llama(), with_flag())
    reference = fp8train.convert(tiny_llama(), "coat")
    with pytest.warns(UserWarning, match="attention mask"):
        loss = model(ids, attention_mask=mask, labels=ids).loss
    expected = reference(ids, attention_mask=mask, labels=ids).loss
    assert torch.equal(loss, expected)
    assert torch.isfinite(plain(ids, attention_mask=mask).logits).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per reason
        model(ids, attention_mask=mask, labels=ids)
        model(ids, attention_mask=torch.ones_like(ids), labels=ids)  # all ones: transformers drops the mask


def test_dropout_falls_back_with_a_warning():
    fp8train.kernels._warned.clear()  # the shared warn-once registry
    model = fp8train.convert(tiny_llama(attention_dropout=0.1), with_flag())
    model.train()
    ids = batch(length=32)
    with pytest.warns(UserWarning, match="dropout"):
        model(ids, labels=ids).loss.backward()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eval: no dropout, FP8 saves
        model(ids, labels=ids).loss.backward()


def test_eval_and_generate_run_hf_sdpa():
    model = fp8train.convert(tiny_llama(), with_flag())
    reference = tiny_llama()
    ids = batch(length=16)[:1]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0.05, atol=0.05)
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 20)


def test_models_sharing_the_config_keep_sdpa():
    """The switch lives in the (shared) config, the FP8 path only in marked modules: a second model built from
    the same config object, and excluded layers, run HF's SDPA bit for bit."""
    converted = tiny_llama()
    other = transformers.LlamaForCausalLM(converted.config)
    fresh = tiny_llama()
    fresh.load_state_dict(other.state_dict())
    fp8train.convert(converted, with_flag(), exclude=["model.layers.0.*"])
    assert other.config._attn_implementation == fsa.ATTENTION_NAME
    assert [fsa.uses_fp8_saved_attention(a) for a in attentions(converted)] == [False, True]
    ids = batch(length=32)
    grads = []
    for model in (other, fresh):
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch(length=32)
    grads = []
    for checkpointing in (False, True):
        model = fp8train.convert(tiny_llama(), with_flag())
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_remove_and_non_sdpa_models():
    model = fp8train.convert(tiny_llama(), with_flag())
    assert fsa.remove_fp8_saved_attention(model) == 2
    assert model.config._attn_implementation == "sdpa"
    assert not any(fsa.uses_fp8_saved_attention(a) for a in attentions(model))
    eager = tiny_llama()
    eager.config._attn_implementation = "eager"
    with pytest.warns(UserWarning, match="attn_implementation='eager'"):
        fp8train.convert(eager, with_flag())
    assert eager.config._attn_implementation == "eager"
    assert eager._fp8train_report["fp8_attention_saves"]["installed"] == []


def test_recipe_field():
    assert fp8train.Recipe.named("bf16").replace(fp8_attention_saves=True).is_noop is False
    with pytest.raises(TypeError, match="fp8_attention_saves"):
        fp8train.Recipe(fp8_attention_saves="yes")
    with pytest.raises(ValueError, match="mode"):
        fsa.fp8_saved_attention(*qkv(), mode="lse")
