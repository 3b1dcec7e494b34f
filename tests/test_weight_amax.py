"""FP8-linear weight amaxes published by fp8train.AdamW (fp8train/nn/weight_amax.py): the published value is
exactly max |w| of the stored weights, the forward that uses it gives the same bits as one computing the amax
itself, any change of a weight outside the optimizer falls back, sharded parameters never publish, and the fused
kernel's amax (Triton interpreter) is that of the values it wrote.

Run as a script (``python tests/test_weight_amax.py`` with TRITON_INTERPRET=1) it runs the kernel check."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fp8train
from fp8train.nn import linear as linear_mod
from fp8train.nn import weight_amax
from fp8train.nn.linear import FP8Linear


def _llama(dtype=torch.float32, seed=0, recipe="coat"):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return fp8train.convert(transformers.LlamaForCausalLM(cfg).to(dtype), recipe=recipe)


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 128, (2, 17), generator=g)


def _fp8_weights(model):
    return [m.weight for m in model.modules() if isinstance(m, FP8Linear)]


def _assert_published(weights):
    for w in weights:
        amax = weight_amax.published_amax(w)
        assert amax is not None
        assert amax.dtype == torch.float32 and amax.dim() == 0
        assert torch.equal(amax, w.detach().abs().amax().float())


@pytest.fixture
def weight_quantizations(monkeypatch):
    """(weight, amax given?) for every call of the linear quantizer on a weight (a Parameter)."""
    calls = []
    original = linear_mod._quantize

    def spying(x, fmt, granularity, amax=None, transpose=False, **options):
        if isinstance(x, torch.nn.Parameter):
            calls.append((x, amax is not None))
        return original(x, fmt, granularity, amax=amax, transpose=transpose, **options)

    monkeypatch.setattr(linear_mod, "_quantize", spying)
    return calls


def _train(model, opt, steps, autocast=True, log=None):
    """``steps`` optimizer steps; returns the losses and the gradients of each step (copies)."""
    losses, grads = [], []
    for step in range(steps):
        ids = _batch(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach().clone())
        grads.append([p.grad.clone() if p.grad is not None else None for p in model.parameters()])
        if log is not None:
            log(step)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads


@pytest.mark.parametrize("dtype,master", [(torch.float32, None), (torch.bfloat16, "bf16_stochastic"),
                                          (torch.bfloat16, None)])
def test_published_amax_is_max_abs_of_the_stored_weights(dtype, master):
    model = _llama(dtype)
    weights = _fp8_weights(model)
    assert len(weights) == 14 and all(weight_amax.wants(w) for w in weights)
    others = [p for p in model.parameters() if not any(p is w for w in weights)]
    assert not any(weight_amax.wants(p) for p in others)  # embeddings, norms, lm_head compute nothing extra
    opt = fp8train.AdamW(model.parameters(), lr=1e-2, master_weights=master)
    _assert_published(weights)  # at construction, before any step (what a CUDA graph captured then reads)
    slots = [weight_amax.published_amax(w).data_ptr() for w in weights]
    for step in range(3):
        _train(model, opt, 1)
        _assert_published(weights)
        # the same memory every step (a captured graph keeps reading it)
        assert [weight_amax.published_amax(w).data_ptr() for w in weights] == slots
    assert all(weight_amax.published_amax(p) is None for p in others)


@pytest.mark.parametrize("dtype,master", [(torch.float32, None), (torch.bfloat16, "bf16_stochastic")])
def test_same_losses_and_grads_with_and_without_published_amax(dtype, master, weight_quantizations):
    runs = {}
    for enabled in (False, True):
        previous = weight_amax.set_enabled(enabled)
        try:
            model = _llama(dtype)
            opt = fp8train.AdamW(model.parameters(), lr=1e-2, master_weights=master)
            weight_quantizations.clear()
            losses, grads = _train(model, opt, 3)
            given = [g for w, g in weight_quantizations]
            runs[enabled] = (losses, grads, [p.detach().clone() for p in model.parameters()], given)
        finally:
            weight_amax.set_enabled(previous)
    (losses0, grads0, params0, given0), (losses1, grads1, params1, given1) = runs[False], runs[True]
    assert all(torch.equal(a, b) for a, b in zip(losses0, losses1))
    assert all(torch.equal(a, b) for ga, gb in zip(grads0, grads1) for a, b in zip(ga, gb))
    assert all(torch.equal(a, b) for a, b in zip(params0, params1))
    # without publishing, forwards compute the amax; with it, every forward's weight quantization got one
    # (backward re-quantizes with the forward's saved amax in both runs)
    forward_calls = 3 * 14
    assert given0.count(False) == forward_calls
    assert given1.count(False) == 0 and len(given1) == len(given0)


def test_a_weight_changed_outside_the_optimizer_falls_back(weight_quantizations):
    model = _llama()
    reference = _llama()
    opt = fp8train.AdamW(model.parameters(), lr=1e-2)
    ref_opt = fp8train.AdamW(reference.parameters(), lr=1e-2)
    _train(model, opt, 1)
    _train(reference, ref_opt, 1)
    w, w_ref = _fp8_weights(model)[0], _fp8_weights(reference)[0]
    stale = weight_amax.published_amax(w).clone()
    with torch.no_grad():
        w.mul_(2)
        w_ref.mul_(2)
    assert weight_amax.published_amax(w) is None  # the version counter moved
    ids = _batch(9)
    weight_quantizations.clear()
    loss = model(input_ids=ids, labels=ids).loss
    assert [g for x, g in weight_quantizations if x is w] == [False]  # computed in the forward, as without
    with weight_amax.disabled():
        loss_ref = reference(input_ids=ids, labels=ids).loss
    assert torch.equal(loss, loss_ref)
    # a new storage (load_state_dict into a replaced tensor, .data swaps) is caught by the data pointer
    w2 = _fp8_weights(model)[1]
    assert weight_amax.published_amax(w2) is not None
    w2.data = w2.data.clone()
    assert weight_amax.published_amax(w2) is None
    # the next step publishes again, and publish_weight_amax() does it at once
    loss.backward()
    opt.step()
    opt.zero_grad()
    _assert_published(_fp8_weights(model))
    assert not torch.equal(weight_amax.published_amax(w), stale)
    reference.load_state_dict(model.state_dict())
    assert all(weight_amax.published_amax(x) is None for x in _fp8_weights(reference))
    ref_opt.publish_weight_amax()
    _assert_published(_fp8_weights(reference))


def test_parameters_without_gradients_keep_their_published_amax():
    layers = [FP8Linear(32, 48, recipe="fp8"), FP8Linear(48, 16, recipe="fp8")]
    opt = fp8train.AdamW([p for layer in layers for p in layer.parameters()], lr=1e-2)
    x = torch.randn(4, 32)
    layers[1](layers[0](x)).sum().backward()
    layers[0].weight.grad = None  # only the second layer is updated this step
    before = weight_amax.published_amax(layers[0].weight).clone()
    opt.step()
    _assert_published([layer.weight for layer in layers])
    assert torch.equal(weight_amax.published_amax(layers[0].weight), before)


def test_step_in_backward_publishes():
    model = _llama()
    opt = fp8train.AdamW(model.parameters(), lr=1e-2).step_in_backward()
    _train(model, opt, 2)
    _assert_published(_fp8_weights(model))


def test_weights_assigned_later_are_picked_up():
    linear = torch.nn.Linear(32, 16)
    opt = fp8train.AdamW(linear.parameters(), lr=1e-2)  # built before the conversion
    layer = FP8Linear.from_linear(linear, recipe="fp8")
    assert weight_amax.published_amax(layer.weight) is None
    layer(torch.randn(4, 32)).sum().backward()
    opt.step()
    _assert_published([layer.weight])
    layer.weight = torch.nn.Parameter(torch.randn(16, 32))  # reassigned: marked, published by its own optimizer
    assert weight_amax.wants(layer.weight) and weight_amax.published_amax(layer.weight) is None


def test_switched_off_publishes_nothing():
    layer = FP8Linear(32, 16, recipe="fp8")
    with weight_amax.disabled():
        opt = fp8train.AdamW(layer.parameters(), lr=1e-2)
        layer(torch.randn(4, 32)).sum().backward()
        opt.step()
        assert weight_amax.published_amax(layer.weight) is None
        assert not opt._amax_slots
    assert weight_amax.published_amax(layer.weight) is None  # nothing recorded while off


def test_block_scaled_weights_do_not_use_it(weight_quantizations):
    recipe = fp8train.Recipe.named("fp8").replace(weight_granularity="128x128", input_granularity="1x128",
                                                 grad_granularity="1x128")
    layer = FP8Linear(128, 128, recipe=recipe)
    opt = fp8train.AdamW(layer.parameters(), lr=1e-2)
    layer(torch.randn(4, 128)).sum().backward()
    opt.step()
    layer(torch.randn(4, 128))
    assert not any(given for _, given in weight_quantizations)  # per-block amaxes: nothing to take


DTENSOR_SCRIPT = textwrap.dedent(r"""
    import sys, torch, torch.distributed as dist
    import fp8train, fp8train.distributed as fd
    from fp8train.nn import weight_amax
    from fp8train.optim.adamw import is_dtensor
    from test_weight_amax import _llama, _train

    def groups(model):  # FSDP2 shards 1-D parameters along their last dim: float32 moments (storage_mode)
        params = list(model.parameters())
        return [{"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "states": "fp32"}]

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    sharded = fd.shard_model(_llama())
    params = list(sharded.parameters())
    assert all(is_dtensor(p) for p in params)
    for p in params:  # even when marked, a sharded parameter gets no slot and publishes nothing
        weight_amax.want(p)
    opt = fp8train.AdamW(groups(sharded), lr=1e-2)
    losses, _ = _train(sharded, opt, 3, autocast=False)
    assert not opt._amax_slots
    assert all(weight_amax.published_amax(p) is None for p in params)
    plain = _llama()
    plain_opt = fp8train.AdamW(groups(plain), lr=1e-2)
    plain_losses, _ = _train(plain, plain_opt, 3, autocast=False)
    assert len(plain_opt._amax_slots) == 14
    # one rank: the sharded run (amax computed in each forward) and the plain one (published) agree exactly
    assert all(torch.equal(a, b) for a, b in zip(losses, plain_losses)), (losses, plain_losses)
    dist.destroy_process_group()
    print("dtensor: ok")
""")


def test_sharded_parameters_do_not_publish(tmp_path):
    script = tmp_path / "dtensor.py"
    script.write_text(DTENSOR_SCRIPT)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "store")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "dtensor: ok" in proc.stdout


# -- the fused kernel (Triton interpreter) ----------------------------------------------------------------------

def interpreter_check():
    """fp8train.AdamW(fused=True) in the interpreter: each slot holds max |p| of the values the kernel wrote (exact;
    no FP8 cast is involved), tagged with the step's epoch; unmarked parameters in the same launch publish
    nothing; a parameter without a gradient keeps its slot."""
    shapes = [(3, 200), (300,), (2, 3, 130), (4, 256), (1, 16), (5, 2048)]
    for dtype, master in ((torch.float32, None), (torch.bfloat16, "bf16_stochastic"), (torch.bfloat16, None)):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)).to(dtype))
                  for i, s in enumerate(shapes)]
        wanted = params[::2] + [params[3]]
        for p in wanted:
            weight_amax.want(p)
        opt = fp8train.AdamW(params, lr=0.5, fused=True, master_weights=master)  # large steps: amaxes move
        for step in range(3):
            gen = torch.Generator().manual_seed(7 + step)
            for p in params:
                p.grad = (torch.randn(p.shape, generator=gen) * 10.0 ** torch.randint(-3, 2, p.shape, generator=gen)
                          ).to(dtype)
            if step == 2:
                params[0].grad = None
            before = {id(p): p.detach().clone() for p in params}
            opt.step()
            if step == 2:
                assert torch.equal(params[0], before[id(params[0])])
            for p in params:
                if any(p is w for w in wanted):
                    amax = weight_amax.published_amax(p)
                    assert amax is not None, (dtype, p.shape)
                    assert torch.equal(amax, p.detach().abs().amax().float()), (dtype, p.shape, amax)
                    assert not torch.equal(p, before[id(p)]) or p is params[0]
                    slot = opt._amax_slots[p]
                    tag = int(slot.word.view(torch.int32)[1])
                    assert tag == (opt._amax_epoch if p.grad is not None else opt._amax_epoch - 1)
                else:
                    assert p not in opt._amax_slots and weight_amax.published_amax(p) is None
    print("weight amax: ok")


def test_fused_kernel_publishes_the_amax_of_what_it_wrote():
    pytest.importorskip("triton")
    from triton_interpreter import run_under_interpreter

    run_under_interpreter(__file__, marker="weight amax: ok", timeout=600)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    from triton_interpreter import patch_interpreter

    patch_interpreter()
    interpreter_check()
