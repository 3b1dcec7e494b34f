"""Recipe.fused_qkv: q/k/v as one FP8 GEMM (fp8train.nn.fused_projections), on the CPU reference GEMM."""

import copy
import pickle

import pytest
import torch
from torch import nn

import fp8train
from fp8train.nn.fused_projections import fuse_projections, fused_group
from fp8train.nn import weight_cache
from fp8train.nn.linear import FP8Linear


def _attention_projections(bias=False, kv_out=32, seed=0):
    torch.manual_seed(seed)
    parent = nn.Module()
    parent.q_proj = FP8Linear(64, 64, bias=bias, recipe="fp8")
    parent.k_proj = FP8Linear(64, kv_out, bias=bias, recipe="fp8")
    parent.v_proj = FP8Linear(64, kv_out, bias=bias, recipe="fp8")
    return parent


def _run(parent, x, order=("q_proj", "k_proj", "v_proj")):
    """Each projection's output, after a backward whose output gradients are fixed (a linear loss)."""
    outs = {name: getattr(parent, name)(x) for name in order}
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for _, o in sorted(outs.items()))
    loss.backward()
    return outs


def _rel(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("bias", [False, True])
def test_fused_matches_separate_layers_within_fp8_noise(bias):
    separate = _attention_projections(bias)
    fused = copy.deepcopy(separate)
    assert fuse_projections(fused, ("q_proj", "k_proj", "v_proj")) is not None
    x = torch.randn(3, 7, 64)
    xs, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want, got = _run(separate, xs), _run(fused, xf)
    exact = {name: nn.functional.linear(x, getattr(separate, name).weight, getattr(separate, name).bias)
             for name in want}
    for name in want:
        assert got[name].shape == want[name].shape
        # one E4M3 scale for the stack instead of one per weight: FP8-sized differences, nothing more
        assert _rel(got[name], exact[name]) < 0.1 and _rel(want[name], exact[name]) < 0.1
        assert _rel(got[name], want[name]) < 0.1
        assert _rel(getattr(fused, name).weight.grad, getattr(separate, name).weight.grad) < 0.15
        if bias:
            assert _rel(getattr(fused, name).bias.grad, getattr(separate, name).bias.grad) < 1e-5
    assert _rel(xf.grad, xs.grad) < 0.15


def test_one_gemm_serves_the_three_calls_in_any_order():
    parent = _attention_projections()
    group = fuse_projections(parent, ("q_proj", "k_proj", "v_proj"))
    assert group is not None
    calls = []
    x = torch.randn(2, 5, 64)
    import fp8train.nn.fused_projections as fp

    real_apply = fp._FusedProjectionFunction.apply

    def counting_apply(*args):
        calls.append(1)
        return real_apply(*args)

    fp._FusedProjectionFunction.apply = counting_apply
    try:
        first = _run(parent, x, order=("v_proj", "q_proj", "k_proj"))
        assert len(calls) == 1 and group._pending is None
        again = {n: getattr(parent, n)(x) for n in ("q_proj", "k_proj", "v_proj")}
        assert len(calls) == 2
        for n in first:
            assert torch.equal(first[n], again[n])
        # another input: the pending slices of the first call do not leak into it
        parent.q_proj(x)
        y = torch.randn(2, 5, 64)
        out_k = parent.k_proj(y)
        assert len(calls) == 4
        assert torch.equal(out_k, parent.k_proj(y))  # k's slice was taken: a second k call computes again
        assert len(calls) == 5
        # an in-place change of x invalidates the pending slices
        parent.q_proj(x)
        x.add_(1.0)
        parent.k_proj(x)
        assert len(calls) == 7
    finally:
        fp._FusedProjectionFunction.apply = real_apply


def test_unfusable_groups_are_refused():
    parent = _attention_projections()
    parent.v_proj = nn.Linear(64, 32)
    assert fuse_projections(parent, ("q_proj", "k_proj", "v_proj")) is None
    parent = _attention_projections(bias=False)
    parent.k_proj = FP8Linear(64, 32, bias=True, recipe="fp8")
    assert fuse_projections(parent, ("q_proj", "k_proj", "v_proj")) is None
    parent = _attention_projections()
    parent.k_proj = FP8Linear(64, 32, bias=False, recipe=fp8train.Recipe.named("fp8").replace(fast_accumulation=True))
    assert fuse_projections(parent, ("q_proj", "k_proj", "v_proj")) is None  # recipes differ
    parent = _attention_projections()
    assert fuse_projections(parent, ("q_proj", "k_proj", "v_proj")) is not None
    assert fuse_projections(parent, ("q_proj", "k_proj", "v_proj")) is None  # already grouped


def test_group_survives_deepcopy_and_pickle_and_keeps_state_dict_keys():
    parent = _attention_projections()
    keys = set(parent.state_dict())
    fuse_projections(parent, ("q_proj", "k_proj", "v_proj"))
    assert set(parent.state_dict()) == keys
    x = torch.randn(2, 3, 64)
    parent.q_proj(x)  # leaves pending slices behind
    for clone in (copy.deepcopy(parent), pickle.loads(pickle.dumps(parent))):
        group = fused_group(clone.q_proj)
        assert group is not None and group._pending is None
        assert group.members == [clone.q_proj, clone.k_proj, clone.v_proj]


def test_converted_llama_with_fused_qkv_trains_close_to_separate_projections():
    transformers = pytest.importorskip("transformers")

    def model():
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=64, tie_word_embeddings=False)
        config._attn_implementation = "sdpa"
        return transformers.LlamaForCausalLM(config)

    losses = {}
    for fused in (False, True):
        m = fp8train.convert(model(), fp8train.Recipe.named("coat").replace(fused_qkv=fused, cache_fp8_weights=True))
        attn = m.model.layers[0].self_attn
        assert (fused_group(attn.q_proj) is not None) == fused
        # the weight cache covers the weights the layers quantize themselves, not the members of a fused stack
        assert (attn.q_proj.weight in weight_cache._groups) == (not fused)
        assert attn.o_proj.weight in weight_cache._groups
        assert m._fp8train_report.get("fused_qkv", 0) == (2 if fused else 0)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(1)
        run = []
        for _ in range(6):
            ids = torch.randint(0, 128, (2, 32), generator=gen)
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses[fused] = run
    assert losses[False][0] != losses[True][0]  # the fused GEMM ran (its stacked scale moves the last bits)
    assert all(abs(a - b) < 0.02 * a for a, b in zip(losses[False], losses[True])), losses
