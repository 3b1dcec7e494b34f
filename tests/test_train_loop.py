"""The training loop: outputs, exact resume, schedules, memory accounting and failures (tiny model, CPU)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from fp8train.train import TrainError
from fp8train.train.loop import lr_lambda, train
from fp8train.train.config import resolve
from fp8train.train.metrics import MetricsLog, memory_breakdown

from train_fixtures import tiny_config


def test_run_writes_every_output(tmp_path):
    summary = train(tiny_config(tmp_path), log=lambda s: None)
    run = tmp_path / "run"
    records = MetricsLog(run / "metrics.jsonl").read()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("final_eval_loss", "eval_perplexity", "tokens_per_s", "peak_memory_bytes", "recipe"):
        assert saved[key] is not None
    assert saved["final_eval_loss"] == records[-1]["eval_loss"]
    assert saved["eval_perplexity"] == pytest.approx(math.exp(saved["final_eval_loss"]))
    assert saved["recipe"] == "bf16" and saved["status"] == "complete"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["steps"] == 6 and config["model"]["hidden_size"] == 64
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert tok.decode(tok.encode("def value(self): return 1").ids) == "def value(self): return 1"
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    # the loss goes down from the initial ~ln(vocab)
    assert records[-1]["eval_loss"] < records[0]["loss"] - 0.3


@pytest.mark.parametrize("recipe", ["bf16", "coat"])  # coat: FP8 layers and FP8 AdamW states in the checkpoint
def test_resume_is_bit_identical(tmp_path, recipe):
    straight = tiny_config(tmp_path / "a", steps=8, checkpoint_every=3, eval_every=2, grad_accum=2, recipe=recipe)
    train(straight, log=lambda s: None)
    interrupted = dataclasses.replace(straight, out=str(tmp_path / "b" / "run"))
    assert train(dataclasses.replace(interrupted, stop_after=5), log=lambda s: None)["status"] == "stopped"
    assert not (tmp_path / "b" / "run" / "summary.json").exists()
    train(dataclasses.replace(interrupted, resume=True), log=lambda s: None)
    a = MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read()
    b = MetricsLog(tmp_path / "b" / "run" / "metrics.jsonl").read()
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [(r["loss"], r["grad_norm"], r["lr"], r.get("eval_loss")) for r in a] == \
           [(r["loss"], r["grad_norm"], r["lr"], r.get("eval_loss")) for r in b]
    sa = json.loads((tmp_path / "a" / "run" / "summary.json").read_text())
    sb = json.loads((tmp_path / "b" / "run" / "summary.json").read_text())
    assert sa["final_eval_loss"] == sb["final_eval_loss"] and sb["resumed_from_step"] == 5
    if recipe == "coat":  # the checkpoint holds the FP8 moments as FP8, not widened
        from fp8train.train.checkpoint import latest_checkpoint, load_tree

        state = load_tree(latest_checkpoint(tmp_path / "b" / "run" / "checkpoints"), "optimizer")["state"]
        assert torch.float8_e4m3fn in {t.dtype for s in state.values() for t in s.values()}


def test_resume_drops_lines_logged_after_the_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=6, checkpoint_every=2)
    train(dataclasses.replace(config, stop_after=4), log=lambda s: None)
    log = MetricsLog(tmp_path / "run" / "metrics.jsonl")
    log.append({"step": 5, "loss": 123.0})  # as if the process died after logging step 5
    train(dataclasses.replace(config, resume=True), log=lambda s: None)
    records = log.read()
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6] and records[4]["loss"] != 123.0


def test_out_dir_with_a_run_needs_resume_or_overwrite(tmp_path):
    config = tiny_config(tmp_path, steps=2)
    train(config, log=lambda s: None)
    with pytest.raises(TrainError, match="--resume"):
        train(config, log=lambda s: None)
    train(dataclasses.replace(config, overwrite=True), log=lambda s: None)
    with pytest.raises(TrainError, match="no checkpoints"):
        train(dataclasses.replace(config, out=str(tmp_path / "new"), resume=True), log=lambda s: None)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedules(schedule):
    c = resolve(dataclasses.replace(tiny_config(__import__("pathlib").Path("/nonexistent")), steps=100,
                                    warmup_steps=10, schedule=schedule, min_lr_ratio=0.1))
    f = lr_lambda(c)
    assert [f(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    expected_end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[schedule]
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(expected_end)
    mid = {"cosine": 0.1 + 0.9 * 0.5, "linear": 0.1 + 0.9 * 0.5, "constant": 1.0}[schedule]
    assert f(55) == pytest.approx(mid)


def test_memory_breakdown_counts_saved_tensors_once():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(5, 8)
    model(x).sum().backward()
    opt.step()
    parts = memory_breakdown(model, opt, lambda: model(x).sum())
    n_params = sum(p.numel() for p in model.parameters())
    assert parts["weights_bytes"] == n_params * 4
    assert parts["gradients_bytes"] == n_params * 4
    # AdamW: exp_avg + exp_avg_sq per parameter (fp32) + a 4-byte step per tensor
    assert parts["optimizer_state_bytes"] == 2 * n_params * 4 + 4 * 4
    # saved for backward: the input x (for W1's grad) and the ReLU output (ReLU's and Linear 2's, one storage);
    # the weights themselves are parameters and excluded
    assert parts["activations_bytes"] == x.numel() * 4 + 5 * 16 * 4
    assert all(p.grad is None for p in model.parameters())


def test_nan_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(TrainError, match="lower --lr"):
        train(tiny_config(tmp_path, lr=1e6, grad_clip=0.0, steps=30, warmup_steps=0), log=lambda s: None)
    run = tmp_path / "run"
    assert not (run / "summary.json").exists()
    assert json.loads((run / "failure.json").read_text())["status"] == "failed"


def test_out_of_memory_is_reported_with_what_to_lower(tmp_path, monkeypatch):
    import fp8train.train.loop as loop

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop, "causal_lm_loss", boom)
    with pytest.raises(TrainError, match="lower --batch-size"):
        train(tiny_config(tmp_path), log=lambda s: None)
    assert not (tmp_path / "run" / "summary.json").exists()
    assert "--grad-accum" in json.loads((tmp_path / "run" / "failure.json").read_text())["error"]


def test_fp8_recipe_run_keeps_fp8train_convert_callable(tmp_path):
    import types

    import fp8train

    summary = train(tiny_config(tmp_path, recipe="fp8", steps=2), log=lambda s: None)
    assert summary["recipe"] == "fp8" and summary["optimizer"] == "adamw"
    assert callable(fp8train.convert) and not isinstance(fp8train.convert, types.ModuleType)


def test_lean_setup_bf16_parameters_chunked_loss_and_exact_resume(tmp_path):
    """--recipe coat-lean --master-weights bf16: bf16 parameters updated with stochastic rounding, the loss from the
    chunked head (the same loss as the logits path), and a resume that continues bit for bit (the rounding
    stream is part of the optimizer state)."""
    lean = tiny_config(tmp_path / "a", steps=6, checkpoint_every=2, eval_every=3, recipe="coat-lean",
                       master_weights="bf16")
    train(lean, log=lambda s: None)
    interrupted = dataclasses.replace(lean, out=str(tmp_path / "b" / "run"))
    train(dataclasses.replace(interrupted, stop_after=3), log=lambda s: None)
    train(dataclasses.replace(interrupted, resume=True), log=lambda s: None)
    a = MetricsLog(tmp_path / "a" / "run" / "metrics.jsonl").read()
    b = MetricsLog(tmp_path / "b" / "run" / "metrics.jsonl").read()
    assert [(r["loss"], r.get("eval_loss")) for r in a] == [(r["loss"], r.get("eval_loss")) for r in b]
    from safetensors.torch import load_file

    from fp8train.train.checkpoint import latest_checkpoint

    weights = load_file(str(latest_checkpoint(tmp_path / "a" / "run" / "checkpoints") / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    # the first step's loss is the same quantity as with the logits path (coat, bf16 parameters)
    logits_path = tiny_config(tmp_path / "c", steps=1, recipe="coat", master_weights="bf16")
    train(logits_path, log=lambda s: None)
    first = MetricsLog(tmp_path / "c" / "run" / "metrics.jsonl").read()[0]["loss"]
    assert first == pytest.approx(a[0]["loss"], rel=1e-2)


def test_bf16_master_weights_need_the_fp8_optimizer(tmp_path):
    with pytest.raises(TrainError, match="fp8adamw"):
        resolve(tiny_config(tmp_path, master_weights="bf16", optimizer="adamw"))


@pytest.mark.parametrize("flags, blocker", [(dict(grad_accum=2), "--grad-accum > 1"), (dict(compile=True), "--compile"),
                                           (dict(device="cpu"), "--device cpu")])
def test_cuda_graph_refuses_what_it_cannot_replay(tmp_path, flags, blocker):
    with pytest.raises(TrainError, match="--cuda-graph cannot be combined with") as error:
        resolve(tiny_config(tmp_path, cuda_graph=True, **{"device": "auto", **flags}))
    assert str(error.value).split("with ")[1].split(":")[0] == blocker


def test_cuda_graph_goes_with_several_processes(tmp_path):
    """FSDP2 steps replay as CUDA graphs too (their collectives are captured): --nproc is no blocker."""
    config = resolve(tiny_config(tmp_path, cuda_graph=True, device="auto", nproc=2))
    assert config.cuda_graph and config.nproc == 2


def test_step_in_backward_trains_like_step_after_backward(tmp_path):
    """--step-in-backward (fp32 parameters, no clipping): the same losses bit for bit as updating after backward;
    the log says grad_norm null (the gradients were freed inside backward)."""
    runs = {}
    for name, flag in (("after", False), ("inside", True)):
        config = tiny_config(tmp_path / name, steps=5, recipe="coat", grad_clip=0.0, step_in_backward=flag)
        train(config, log=lambda s: None)
        runs[name] = MetricsLog(tmp_path / name / "run" / "metrics.jsonl").read()
    assert [r["loss"] for r in runs["after"]] == [r["loss"] for r in runs["inside"]]
    assert all(r["grad_norm"] is None for r in runs["inside"])
    assert all(r["grad_norm"] > 0 for r in runs["after"])


def test_fp8_weight_cache_gives_the_same_losses(tmp_path):
    """--fp8-weight-cache with --grad-accum 2: one FP8 copy per weight per step, the same losses bit for bit."""
    runs = {}
    for name, flag in (("plain", False), ("cached", True)):
        config = tiny_config(tmp_path / name, steps=4, recipe="coat", grad_accum=2, fp8_weight_cache=flag)
        train(config, log=lambda s: None)
        runs[name] = [r["loss"] for r in MetricsLog(tmp_path / name / "run" / "metrics.jsonl").read()]
    assert runs["plain"] == runs["cached"]
    with pytest.raises(TrainError, match="fp8-weight-cache"):
        resolve(tiny_config(tmp_path / "bf16", recipe="bf16", fp8_weight_cache=True))


def test_fp8_attention_saves_flag(tmp_path):
    """--fp8-attention-saves: the forward (first loss) is unchanged, later losses move (the backward sees the FP8
    copies of q/k/v) but stay close; the saved-bytes lever itself is tested in tests/test_fp8_saved_attention.py."""
    runs = {}
    for name, flag in (("plain", False), ("fp8_saves", True)):
        config = tiny_config(tmp_path / name, steps=4, recipe="coat", fp8_attention_saves=flag)
        train(config, log=lambda s: None)
        runs[name] = [r["loss"] for r in MetricsLog(tmp_path / name / "run" / "metrics.jsonl").read()]
    plain, saves = runs["plain"], runs["fp8_saves"]
    assert plain[0] == saves[0]
    assert plain != saves
    assert all(abs(a - b) <= 0.05 * a for a, b in zip(plain, saves))


def test_fused_qkv_flag(tmp_path):
    """--fused-qkv: one FP8 GEMM for q/k/v (one scale for the stacked weights): close to separate projections,
    not bit-identical; refused without an FP8 recipe."""
    runs = {}
    for name, flag in (("separate", False), ("fused", True)):
        config = tiny_config(tmp_path / name, steps=4, recipe="coat", fused_qkv=flag)
        train(config, log=lambda s: None)
        runs[name] = [r["loss"] for r in MetricsLog(tmp_path / name / "run" / "metrics.jsonl").read()]
    assert runs["separate"] != runs["fused"]
    assert all(abs(a - b) <= 0.03 * a for a, b in zip(runs["separate"], runs["fused"]))
    with pytest.raises(TrainError, match="fused-qkv"):
        resolve(tiny_config(tmp_path / "bf16", recipe="bf16", fused_qkv=True))


def spy_on_recipes(monkeypatch, look) -> list:
    """``look(recipe, converted model)`` for every model the training loop converts, in order."""
    import fp8train.train.loop as loop_mod
    from fp8train.recipes import resolve_recipe

    seen = []
    original = loop_mod.apply_recipe

    def spy(model, recipe):
        out = original(model, recipe)
        seen.append(look(resolve_recipe(recipe), out))
        return out

    monkeypatch.setattr(loop_mod, "apply_recipe", spy)
    return seen


def test_coat_lean_caches_its_fp8_weights_unless_told_not_to(tmp_path, monkeypatch):
    seen = spy_on_recipes(monkeypatch, lambda recipe, model: recipe.cache_fp8_weights)
    for name, flag in (("default", None), ("off", False)):
        train(resolve(tiny_config(tmp_path / name, steps=1, recipe="coat-lean", fp8_weight_cache=flag)))
    assert seen == [True, False]


def test_fast_accumulation_flag_reaches_the_recipe(tmp_path, monkeypatch):
    """--[no-]fast-accumulation sets Recipe.fast_accumulation (forward GEMMs without fp32 promotion),
    --[no-]fast-accumulation-grad-input Recipe.fast_accumulation_grad_input; without them the recipe's (coat-lean:
    both on, coat: off); refused without FP8 linear layers."""
    from fp8train.nn.linear import FP8Linear

    seen = spy_on_recipes(monkeypatch, lambda recipe, model: {(m.recipe.fast_accumulation,
                                                               m.recipe.fast_accumulation_grad_input)
                                                              for m in model.modules() if isinstance(m, FP8Linear)})
    runs = (("coat-lean", None, None), ("coat-lean", False, None), ("coat-lean", False, False),
            ("coat", None, None), ("coat", True, None), ("coat", True, True))
    for i, (recipe, forward, grad_input) in enumerate(runs):
        train(resolve(tiny_config(tmp_path / str(i), steps=1, recipe=recipe, fast_accumulation=forward,
                                  fast_accumulation_grad_input=grad_input)))
    assert seen == [{(True, True)}, {(False, True)}, {(False, False)},
                    {(False, False)}, {(True, False)}, {(True, True)}]
    with pytest.raises(TrainError, match="fast-accumulation"):
        resolve(tiny_config(tmp_path / "bf16", recipe="bf16", fast_accumulation=True))
    with pytest.raises(TrainError, match="fast-accumulation-grad-input"):
        resolve(tiny_config(tmp_path / "bf16", recipe="bf16", fast_accumulation_grad_input=True))


def test_a_run_saved_before_fast_accumulation_grad_input_resumes_with_it_off():
    """config.json of a run from before the field existed (its input-gradient GEMMs promoted to fp32) resumes that
    way, not with coat-lean's new default; a run saved with the field keeps its value (None: the recipe's).  The
    same for a run from before fast_accumulation itself."""
    from fp8train.train.config import TrainConfig

    old = {"recipe": "coat-lean", "fast_accumulation": False}
    assert TrainConfig.from_json(old).fast_accumulation_grad_input is False
    assert TrainConfig.from_json({**old, "fast_accumulation_grad_input": None}).fast_accumulation_grad_input is None
    assert TrainConfig.from_json({"recipe": "coat-lean"}).fast_accumulation is False


def test_flash_attention_flag_reaches_the_recipe(tmp_path, monkeypatch):
    """--[no-]flash-attention sets Recipe.flash_attention; without it the recipe's default (None: where installed)."""
    seen = spy_on_recipes(monkeypatch, lambda recipe, model: recipe.flash_attention)
    for name, flag in (("default", None), ("off", False), ("on", True)):
        train(resolve(tiny_config(tmp_path / name, steps=1, recipe="bf16", flash_attention=flag)))
    assert seen == [None, False, True]


def test_fused_residual_is_on_unless_told_not_to(tmp_path, monkeypatch):
    """--no-fused-residual reaches the recipe; by default the fast path owns the residual stream."""
    from fp8train.nn import residual_stream

    seen = spy_on_recipes(monkeypatch, lambda recipe, model: any(residual_stream.is_installed(m)
                                                                 for m in model.modules()))
    for name, flag in (("default", None), ("off", False)):
        train(resolve(tiny_config(tmp_path / name, steps=1, recipe="coat", fused_residual=flag)))
    assert seen == [True, False]
