"""Last-token epsilon-sharpness: hand-computed cases, the ascent solver, the closed-form corner, a model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import transformers

from fp8train.lab.sharpness import epsilon_sharpness, last_token_sharpness, model_sharpness

torch.set_num_threads(1)


def ce_rows(y):
    return lambda z: torch.logsumexp(z, 1) - z.gather(1, y.reshape(-1, 1)).squeeze(1)


def test_quadratic_by_hand():
    # f(z) = 1/2 |z - c|^2 with c = 0, z = (1, -2), eps = 0.1: r = eps(|z| + 1) = (0.2, 0.3).
    # f is maximised over the box at the corner farther from c: |z_i| + r_i = (1.2, 2.3).
    # f(z) = 2.5, max = (1.44 + 5.29) / 2 = 3.365, S = 100 * 0.865 / 3.5 = 24.7142857...
    z = torch.tensor([[1.0, -2.0]])
    s = epsilon_sharpness(lambda v: 0.5 * (v ** 2).sum(1), z, eps=0.1)
    assert s.item() == pytest.approx(100 * 0.865 / 3.5, rel=1e-12)


def test_diagonal_quadratic_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randn(16, 12, generator=g, dtype=torch.float64)
    a = torch.rand(12, generator=g, dtype=torch.float64) + 0.1
    f = lambda v: 0.5 * (a * (v - c) ** 2).sum(1)  # noqa: E731
    eps = 0.05
    r = eps * (z.abs() + 1)
    worst = 0.5 * (a * ((z - c).abs() + r) ** 2).sum(1)
    expected = 100 * (worst - f(z)) / (1 + f(z))
    torch.testing.assert_close(epsilon_sharpness(f, z, eps), expected, rtol=1e-12, atol=0)


def test_cross_entropy_by_hand():
    # z = (2, 1, 0), target 0, eps = 0.1: r = (0.3, 0.2, 0.1); the worst corner lowers the target logit and raises
    # the others: z + delta* = (1.7, 1.2, 0.1).
    f0 = math.log(math.exp(2) + math.exp(1) + 1) - 2
    f1 = math.log(math.exp(1.7) + math.exp(1.2) + math.exp(0.1)) - 1.7
    expected = 100 * (f1 - f0) / (1 + f0)
    assert expected == pytest.approx(13.1324, abs=1e-4)
    s = last_token_sharpness(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), eps=0.1)
    assert s.item() == pytest.approx(expected, rel=1e-12)


def test_closed_form_is_the_ascent_maximum():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 50, generator=g) * 4
    y = torch.randint(0, 50, (32,), generator=g)
    closed = last_token_sharpness(z, y, eps=1e-2, reduction="none")
    ascent = epsilon_sharpness(ce_rows(y), z, eps=1e-2)
    torch.testing.assert_close(closed, ascent, rtol=1e-10, atol=0)
    # and no random point of the box does better
    r = 1e-2 * (z.double().abs() + 1)
    for _ in range(20):
        delta = (torch.rand(z.shape, generator=g, dtype=torch.float64) * 2 - 1) * r
        s = 100 * (ce_rows(y)(z.double() + delta) - ce_rows(y)(z.double())) / (1 + ce_rows(y)(z.double()))
        assert (s <= closed + 1e-9).all()


def test_sharpness_grows_with_logit_scale_and_batch_mean():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 1000, generator=g)
    y = torch.randint(0, 1000, (64,), generator=g)
    values = [last_token_sharpness(base * scale, y).item() for scale in (1, 3, 10, 30)]
    assert values == sorted(values) and values[0] > 0
    per_row = last_token_sharpness(base, y, reduction="none")
    assert per_row.shape == (64,) and last_token_sharpness(base, y).item() == pytest.approx(per_row.mean().item())
    with pytest.raises(ValueError, match="last position"):
        last_token_sharpness(base[None], y)


def test_model_sharpness_uses_the_last_position():
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).train()
    batch = torch.randint(0, 96, (5, 17))
    s = model_sharpness(model, batch, eps=1e-3)
    assert model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(input_ids=batch[:, :-1]).logits[:, -1]
    assert s == pytest.approx(last_token_sharpness(logits, batch[:, -1], 1e-3).item(), rel=1e-5)
    assert F.cross_entropy(logits, batch[:, -1]).item() > 0
