"""fp8train.AdamW.step_in_backward: the update runs inside backward, parameter by parameter, gradients freed at
once -- the same parameters and FP8 moments as step() after backward, and the trainer flag's refusals."""

import pytest
import torch

from fp8train.optim import AdamW
from fp8train.train.config import TrainConfig, TrainError, resolve


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64),
                               torch.nn.LayerNorm(64), torch.nn.Linear(64, 32, bias=False)).to(dtype)


def _batches(n, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 64, generator=g).to(dtype), torch.randn(16, 32, generator=g).to(dtype))
            for _ in range(n)]


def _train(model, opt, batches, scheduler=None, in_backward=False, seen=None):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        if seen is not None:
            seen.append([p.grad is not None for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("states", ["dre", "plain", "fp32"])
def test_same_parameters_and_moments_as_step_after_backward(states):
    batches = _batches(6)
    results = []
    for in_backward in (False, True):
        model = _model()
        groups = [{"params": [p for p in model.parameters() if p.ndim == 2], "weight_decay": 0.1},
                  {"params": [p for p in model.parameters() if p.ndim < 2], "weight_decay": 0.0}]
        opt = AdamW(groups, lr=3e-3, states=states)
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))  # the schedule reaches hooks
        if in_backward:
            opt.step_in_backward()
        seen = []
        _train(model, opt, batches, scheduler, seen=seen)
        if in_backward:  # backward left no gradient behind: each was used and freed by its hook
            assert not any(any(step) for step in seen)
        else:
            assert all(all(step) for step in seen)
        results.append((model, opt))
    (ref_model, ref_opt), (model, opt) = results
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)
        for key, value in ref_opt.state[p_ref].items():
            other = opt.state[p][key]
            assert torch.equal(value.view(torch.uint8) if value.dtype.itemsize == 1 and value.is_floating_point()
                               else value, other.view(torch.uint8) if other.dtype.itemsize == 1 and
                               other.is_floating_point() else other), key
    assert int(opt.state[next(model.parameters())]["step"]) == 6


def test_bf16_stochastic_rounding_updates_and_is_deterministic():
    batches = _batches(4, torch.bfloat16)
    finals = []
    for _ in range(2):
        model = _model(torch.bfloat16)
        before = [p.detach().clone() for p in model.parameters()]
        opt = AdamW(model.parameters(), lr=1e-2, master_weights="bf16_stochastic").step_in_backward()
        _train(model, opt, batches)
        after = [p.detach().clone() for p in model.parameters()]
        assert all(not torch.equal(a, b) for a, b in zip(before, after))
        finals.append(after)
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_nonfinite_gradients_are_skipped_and_counted():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2).step_in_backward()
    weight = model[0].weight
    before = weight.detach().clone()
    weight.register_hook(lambda g: torch.full_like(g, float("nan")))
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert torch.equal(weight, before) and opt.nonfinite_skipped() == weight.numel()
    assert not torch.equal(model[2].weight, _model()[2].weight)  # the finite ones were updated


def test_stop_restores_ordinary_gradients():
    model = _model()
    opt = AdamW(model.parameters(), lr=1e-2).step_in_backward()
    assert opt.step_in_backward() is opt  # a second call adds no second set of hooks
    assert len(opt._backward_hooks) == len(list(model.parameters()))
    opt.stop_step_in_backward()
    x, y = _batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("flags, blocker", [
    (dict(grad_clip=1.0), "--grad-clip"),
    (dict(grad_clip=0.0, grad_accum=2), "--grad-accum"),
    (dict(grad_clip=0.0, optimizer="adamw"), "--optimizer adamw"),
    (dict(grad_clip=0.0, nproc=2), "--nproc"),
])
def test_trainer_refuses_what_cannot_combine(flags, blocker):
    with pytest.raises(TrainError, match=blocker.replace("-", r"\-")):
        resolve(TrainConfig(recipe="coat", step_in_backward=True, **flags))
