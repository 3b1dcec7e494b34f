"""Delayed scaling with overflow repair (fp8train.delayed_scaling): the rule, the reference gated product against
float64 math, the flow MLP's prediction buffer, and bit-identical resume of a trainer run."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fp8train import delayed_scaling as ds
from fp8train.formats import E4M3, E5M2
from fp8train.nn import gated_mlp
from fp8train.recipes import Recipe

from train_fixtures import tiny_config


def _encode(seen, predicted):
    prediction = torch.tensor([predicted], dtype=torch.float32)
    amax = ds.encode_amax(torch.tensor(seen), prediction[0])
    return float(amax), float(prediction[0])


@pytest.mark.parametrize("seen, predicted, amax, following", [
    (3.0, 0.0, 3.0, 6.0),              # first call: nothing predicted -> just in time
    (3.0, 4.0, 4.0, 6.0),              # prediction covers the tensor -> kept
    (3.0, 3.0, 3.0, 6.0),              # exactly the amax -> kept
    (3.0, 24.0, 24.0, 6.0),            # 8x headroom -> still kept
    (3.0, 24.5, 3.0, 6.0),             # more than 8x: an amax collapse -> just in time
    (5.0, 4.0, 5.0, 10.0),             # overflow -> just in time, never saturated
    (float("nan"), 4.0, float("nan"), 0.0),  # NaN is published; the next call starts over
    (3.0, float("nan"), 3.0, 6.0),     # a garbage buffer (to_empty) is repaired
    (3.0, float("inf"), 3.0, 6.0),
    (float("inf"), 4.0, float("inf"), 0.0),
    (2e38, 4.0, 2e38, 0.0),            # 2 x seen overflows float32 -> 0, not inf
    (0.0, 0.0, 0.0, 0.0),              # all zeros encode zeros
    (0.0, 1.0, 0.0, 0.0),
])
def test_rule(seen, predicted, amax, following):
    got_amax, got_following = _encode(seen, predicted)
    assert (math.isnan(got_amax) and math.isnan(amax)) or got_amax == pytest.approx(amax, rel=1e-7)
    assert got_following == pytest.approx(following, rel=1e-7)


def _exact_e4m3(x64, amax):
    """float64 math: the E4M3 code of x * (448 / amax), as values on the FP8 grid (the oracle)."""
    return E4M3.round((x64 * (E4M3.max / amax)).clamp(-E4M3.max, E4M3.max))


def test_reference_forward_matches_float64_math_on_every_branch():
    torch.manual_seed(0)
    gate, up = torch.randn(2, 2, 40, 96, dtype=torch.float64).unbind(0)
    gate, up = gate.to(torch.bfloat16), up.to(torch.bfloat16)
    prediction = ds.new_prediction(3)
    for call, factor in enumerate((1.0, 1.0, 4.0, 1 / 64)):
        g, u = (gate.double() * factor).to(torch.bfloat16), (up.double() * factor).to(torch.bfloat16)
        h64 = (torch.nn.functional.silu(g.double()) * u.double()).to(torch.bfloat16).double()
        seen = float(h64.abs().max())
        predicted = float(prediction[0])
        keep = seen <= predicted <= 8 * seen
        (q, data_t), saved = gated_mlp.gated_product_forward(g, u, "silu", quantize_output=True,
                                                             output_transpose=True, prediction=prediction[0:1])
        amax = predicted if keep else seen
        assert call not in (0, 2, 3) or not keep  # first call, overflow, collapse are repaired ...
        assert call != 1 or keep  # ... and a repeated tensor keeps its prediction
        assert float(q.amax) == pytest.approx(amax, rel=1e-7)
        assert torch.equal(q.data.double(), _exact_e4m3(h64, amax))  # never saturated, exact encoding
        assert torch.equal(data_t.double(), q.data.double().reshape(-1, 96).t())
        assert float(prediction[0]) == pytest.approx(2 * seen, rel=1e-7)
        assert float(q.data.double().abs().max()) <= E4M3.max


def test_reference_backward_predicts_both_gradients():
    torch.manual_seed(1)
    g, u, dh = (torch.randn(33, 64).to(torch.bfloat16) for _ in range(3))
    _, saved = gated_mlp.gated_product_forward(g, u, "silu")
    prediction = ds.new_prediction(3)
    first = gated_mlp.gated_product_backward(dh, saved, quantize_output=True, prediction=prediction[1:3])
    jit = gated_mlp.gated_product_backward(dh, saved, quantize_output=True)
    for a, b in zip(first, jit):  # first call: exactly the just-in-time encoding
        assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8)) and torch.equal(a.amax, b.amax)
    assert torch.allclose(prediction[1:], 2 * torch.stack([b.amax for b in jit]))
    second = gated_mlp.gated_product_backward(dh, saved, quantize_output=True, prediction=prediction[1:3])
    for a, b in zip(second, jit):  # kept prediction: twice the amax, same values to E5M2 precision
        assert float(a.amax) == pytest.approx(2 * float(b.amax))
        x = b.dequantize(torch.float64)
        err = (a.dequantize(torch.float64) - x).abs()
        assert bool((err <= x.abs() * 2.0**-2 + 2 * float(a.amax) / E5M2.max * 2.0**-16).all())
    assert prediction[0] == 0  # the forward's slot is untouched


def _flow_block(delayed: bool, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    import fp8train

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    # act(gate) * up kept for backward (coat-lean's choice): the forward's product is predicted too
    recipe = Recipe.named("coat").replace(delayed_scaling=delayed, recompute_gated_product=False)
    return fp8train.convert(model, recipe=recipe)


def test_flow_mlp_owns_predictions_outside_the_state_dict():
    from fp8train.nn.precision_flow import FlowMLP

    plain, delayed = _flow_block(False), _flow_block(True)
    assert list(plain.state_dict()) == list(delayed.state_dict())  # HF's keys, nothing added
    mlps = [m for m in delayed.modules() if isinstance(m, FlowMLP)]
    assert len(mlps) == 2 and all("predicted scales" in repr(m) for m in mlps)
    assert not any(hasattr(m, ds.BUFFER_NAME) for m in plain.modules())
    ids = torch.randint(0, 128, (2, 16))
    losses = []
    for model in (plain, delayed):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # first call: just in time, same forward
    state = ds.prediction_state(delayed)
    mlps = ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert [name for name in sorted(state) if name.endswith(".mlp")] == mlps
    assert all(bool((state[name] > 0).all()) for name in mlps)  # h, dgate, dup all predicted now
    # every FP8 linear keeps 2 floats (input, output gradient); predicted where no producer hands an amax over:
    # o_proj's input (attention's output) and v_proj's gradient; the norm hands q/k/v their input, the norm
    # backward publishes o_proj's gradient amax
    linears = {name: v for name, v in state.items() if name not in mlps}
    assert len(linears) == 14 and all(v.shape == (2,) for v in linears.values())
    for i in range(2):
        attention = f"model.layers.{i}.self_attn"
        assert float(linears[f"{attention}.o_proj"][0]) > 0 and float(linears[f"{attention}.o_proj"][1]) == 0
        assert float(linears[f"{attention}.v_proj"][1]) > 0 and float(linears[f"{attention}.q_proj"][0]) == 0
    for p, q in zip(plain.parameters(), delayed.parameters()):  # first backward: just in time too
        assert torch.equal(p.grad, q.grad)
    # second call: predicted scales; close to just-in-time, not identical
    for model in (plain, delayed):
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
    rel = [float((q.grad - p.grad).norm() / p.grad.norm()) for p, q in zip(plain.parameters(), delayed.parameters())]
    assert max(rel) < 0.05 and max(rel) > 0
    fresh = _flow_block(True)
    ds.load_prediction_state(fresh, state)
    assert all(torch.equal(a, b) for a, b in zip(ds.prediction_state(fresh).values(), state.values()))
    with pytest.raises(ValueError, match="prediction state"):
        ds.load_prediction_state(fresh, {"model.layers.0.mlp": torch.zeros(5)})
    with ds.predictions_unchanged(fresh):
        fresh(input_ids=ids[:, :8] * 0, labels=ids[:, :8] * 0).loss.backward()
    assert all(torch.equal(a, b) for a, b in zip(ds.prediction_state(fresh).values(), state.values()))


def test_delayed_scaling_needs_a_flow_recipe(tmp_path):
    from fp8train.train import TrainError
    from fp8train.train.config import resolve

    with pytest.raises(TrainError, match="--delayed-scaling"):
        resolve(tiny_config(tmp_path, recipe="fp8", delayed_scaling=True))


@pytest.mark.parametrize("restore", [True, False])
def test_resume_is_bit_identical_with_predicted_scales(tmp_path, monkeypatch, restore):
    from fp8train.train import loop
    from fp8train.train.checkpoint import latest_checkpoint, load_tree
    from fp8train.train.metrics import MetricsLog

    straight = tiny_config(tmp_path / "a", steps=6, checkpoint_every=2, eval_every=2, recipe="coat-lean",
                           master_weights="bf16", delayed_scaling=True)
    loop.train(straight, log=lambda s: None)
    interrupted = dataclasses.replace(straight, out=str(tmp_path / "b" / "run"))
    loop.train(dataclasses.replace(interrupted, stop_after=3), log=lambda s: None)
    saved = load_tree(latest_checkpoint(tmp_path / "b" / "run" / "checkpoints"), "trainer")["scale_predictions"]
    mlps = [v for name, v in saved.items() if name.endswith(".mlp")]
    assert mlps and all(bool((v > 0).all()) for v in mlps)
    assert all(float(v[0]) > 0 for name, v in saved.items() if name.endswith(".o_proj"))  # o_proj's input
    if not restore:  # the control: without the saved predictions the continuation is not the same run
        monkeypatch.setattr(loop, "load_prediction_state", lambda model, state, rank=0: None)
    loop.train(dataclasses.replace(interrupted, resume=True), log=lambda s: None)
    a = MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read()
    b = MetricsLog(tmp_path / "b" / "run" / "metrics.jsonl").read()
    same = [(r["loss"], r.get("eval_loss")) for r in a] == [(r["loss"], r.get("eval_loss")) for r in b]
    assert same == restore


def test_per_rank_rows_go_to_their_rank():
    model = _flow_block(True)
    names = sorted(ds.prediction_state(model))
    sizes = {name: v.numel() for name, v in ds.prediction_state(model).items()}  # FlowMLP 3, FP8Linear 2
    rows = {name: torch.arange(2 * sizes[name], dtype=torch.float32).reshape(2, -1) + 10 * i
            for i, name in enumerate(names)}
    for rank, row in ((0, 0), (1, 1), (3, 0)):  # a rank the saved run did not have takes rank 0's
        ds.load_prediction_state(model, rows, rank=rank)
        state = ds.prediction_state(model)
        assert all(torch.equal(state[name], rows[name][row]) for name in names)


def test_casting_the_model_keeps_float32_predictions():
    model = _flow_block(True).to(torch.bfloat16)  # casts the buffers as well as the weights
    ids = torch.randint(0, 128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids).loss.backward()
    buffers = {name: b for name, _, b in ds._buffers(model)}
    assert buffers and all(b.dtype == torch.float32 for b in buffers.values())
    assert all(bool((b > 0).all()) for name, b in buffers.items() if name.endswith(".mlp"))
    assert all(float(b[0]) > 0 for name, b in buffers.items() if name.endswith(".o_proj"))


def test_every_branch_takes_each_branch_of_the_rule():
    """The call sequence the kernel checks use: repaired (first call), kept, repaired (overflow), repaired
    (collapse), repaired (NaN prediction)."""
    prediction = ds.new_prediction(1)
    x = torch.tensor([3.0, -1.0])
    kept = []
    for _, factor in ds.every_branch(prediction):
        predicted = prediction.clone()
        amax = ds.encode_amax((x * factor).abs().max(), prediction[0])
        kept.append(bool(amax == predicted[0]))
    assert kept == [False, True, False, False, False]
