"""Recipe(cache_fp8_weights=True): each weight is quantized once per optimizer step (not twice per micro-batch),
the results stay bit for bit those of the uncached path, and any change of the weight makes a fresh copy."""

import pytest
import torch

import fp8train
from fp8train.nn import linear as linear_mod
from fp8train.recipes import Recipe


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 48),
                               torch.nn.GELU(), torch.nn.Linear(48, 16))


def _convert(model, cache):
    return fp8train.convert(model, recipe=Recipe.named("fp8").replace(cache_fp8_weights=cache))


@pytest.fixture
def weight_quantizations(monkeypatch):
    """Counts calls of the linear quantizer whose input is a weight (a Parameter)."""
    calls = []
    original = linear_mod._quantize

    def counting(x, *args, **kwargs):
        if isinstance(x, torch.nn.Parameter):
            calls.append(x)
        return original(x, *args, **kwargs)

    monkeypatch.setattr(linear_mod, "_quantize", counting)
    return calls


def _micro_batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 32, generator=g), torch.randn(8, 16, generator=g)) for _ in range(n)]


def _accumulate(model, batches):
    losses = []
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.detach())
    return losses


def test_once_per_step_and_the_same_bits(weight_quantizations):
    batches = _micro_batches(6)
    runs = {}
    for cache in (False, True):
        model = _convert(_model(), cache)
        opt = fp8train.AdamW(model.parameters(), lr=1e-2)
        weight_quantizations.clear()
        losses = []
        for step in range(2):  # 2 steps x 3 micro-batches
            losses += _accumulate(model, batches[3 * step: 3 * step + 3])
            if step == 0:
                first_step_calls = len(weight_quantizations)
                grads = [p.grad.clone() for p in model.parameters()]
            opt.step()
            opt.zero_grad()
        runs[cache] = (losses, grads, [p.detach().clone() for p in model.parameters()], first_step_calls)
    linears = 3
    # forward + backward per micro-batch per weight (the first layer's input needs no gradient: no backward copy)
    assert runs[False][3] == 3 * (2 * linears - 1)
    assert runs[True][3] == linears  # once per weight per step
    assert len(weight_quantizations) == 2 * linears
    for uncached, cached in zip(runs[False][:3], runs[True][:3]):
        assert all(torch.equal(a, b) for a, b in zip(uncached, cached))


def test_any_change_of_the_weight_makes_a_fresh_copy(weight_quantizations):
    model = _convert(_model(), cache=True)
    x, y = _micro_batches(1)[0]
    first = model[0]
    weight_quantizations.clear()
    _accumulate(model, [(x, y)])
    _accumulate(model, [(x, y)])
    assert len(weight_quantizations) == 3
    with torch.no_grad():
        first.weight.mul_(0.5)  # in place: version counter
    out_after = model(x)
    assert sum(w is first.weight for w in weight_quantizations) == 2
    reference = _convert(_model(), cache=False)
    with torch.no_grad():
        reference[0].weight.mul_(0.5)
    assert torch.equal(out_after, reference(x))
    weight_quantizations.clear()
    first.weight.data = first.weight.data.clone()  # new storage
    model(x)
    assert len(weight_quantizations) == 1 and weight_quantizations[0] is first.weight
    linear_mod.drop_cached_weights()
    model(x)
    assert len(weight_quantizations) == 1 + 3


def test_an_optimizer_step_refreshes_even_without_a_version_bump(weight_quantizations):
    class DataOptimizer(torch.optim.Optimizer):  # writes through .data: no version-counter change
        def __init__(self, params):
            super().__init__(params, {})

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    p.data.add_(p.grad, alpha=-0.1)

    model = _convert(_model(), cache=True)
    opt = DataOptimizer(model.parameters())
    x, y = _micro_batches(1)[0]
    _accumulate(model, [(x, y)])
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions
    weight_quantizations.clear()
    out = model(x)
    assert len(weight_quantizations) == 3
    reference = _convert(_model(), cache=False)
    reference.load_state_dict(model.state_dict())
    assert torch.equal(out, reference(x))


def test_llama_precision_flow_same_bits_with_the_cache():
    from _export_models import tiny_llama

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    results = []
    for cache in (False, True):
        model = fp8train.convert(tiny_llama(outliers=False).train(),
                                 recipe=Recipe.named("coat").replace(cache_fp8_weights=cache))
        losses = [model(input_ids=ids, labels=ids, use_cache=False).loss for _ in range(2)]
        for loss in losses:
            loss.backward()
        results.append(([l.detach() for l in losses], [p.grad.clone() for p in model.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
