"""fp8train train with the stability-lab flags: simulated formats, sharpness in metrics.jsonl, NaN divergence."""

from __future__ import annotations

import json
import math

import pytest

from fp8train.train import TrainError, train
from fp8train.train import loop

from train_fixtures import tiny_config


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_simulated_run_logs_sharpness_and_differs_from_plain(tmp_path):
    plain = train(tiny_config(tmp_path, steps=4, out=str(tmp_path / "plain")), log=lambda m: None)
    sim = train(tiny_config(tmp_path, steps=4, out=str(tmp_path / "sim"), simulate_format="e2m1",
                            sharpness_every=2), log=lambda m: None)
    assert plain["status"] == sim["status"] == "complete"
    rows = _metrics(tmp_path / "sim")
    assert [r["step"] for r in rows if "sharpness" in r] == [2, 4]
    assert all(0 < r["sharpness"] < 100 for r in rows if "sharpness" in r)
    assert not any("sharpness" in r for r in _metrics(tmp_path / "plain"))
    # same init and first batch: the first loss differs only through the E2M1-rounded GEMM inputs
    assert rows[0]["loss"] != _metrics(tmp_path / "plain")[0]["loss"]
    saved = json.loads((tmp_path / "sim" / "config.json").read_text())["train"]
    assert saved["simulate_format"] == "e2m1" and saved["simulate_scaling"] == "tensor"


def test_lab_flags_are_checked_up_front(tmp_path):
    with pytest.raises(TrainError, match="use it with --recipe bf16"):
        train(tiny_config(tmp_path, recipe="fp8", simulate_format="e3m4"), log=lambda m: None)
    with pytest.raises(TrainError, match="unknown number format"):
        train(tiny_config(tmp_path, simulate_format="e3m4q"), log=lambda m: None)
    with pytest.raises(TrainError, match="unknown scaling"):
        train(tiny_config(tmp_path, simulate_format="e3m4", simulate_scaling="per-row-ish"), log=lambda m: None)
    with pytest.raises(TrainError, match="--simulate-lm-head needs --simulate-format"):
        train(tiny_config(tmp_path, simulate_lm_head=True), log=lambda m: None)
    with pytest.raises(TrainError, match="--sharpness-every"):
        train(tiny_config(tmp_path, sharpness_every=-1), log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_nan_loss_is_recorded_as_divergence(tmp_path, monkeypatch):
    real = loop.causal_lm_loss
    calls = {"n": 0}

    def loss_that_breaks(*args, **kwargs):
        calls["n"] += 1
        value = real(*args, **kwargs)
        return value * math.nan if calls["n"] == 3 else value

    monkeypatch.setattr(loop, "causal_lm_loss", loss_that_breaks)
    with pytest.raises(loop.Diverged, match="the loss became nan at step 3"):
        train(tiny_config(tmp_path, steps=6, eval_every=100), log=lambda m: None)
    failure = json.loads((tmp_path / "run" / "failure.json").read_text())
    assert failure["diverged"] is True and failure["diverged_at_step"] == 3 and failure["status"] == "failed"


def test_simulated_recipe_keeps_or_includes_the_head(tmp_path):
    from fp8train.lab.simulated_linear import SimulatedLinear
    from fp8train.train.config import simulated_recipe
    from fp8train.train.models import build_model

    import fp8train
    import torch

    for include in (False, True):
        c = tiny_config(tmp_path, simulate_format="a=e4m3,w=e4m3,g=e5m2", simulate_lm_head=include)
        model = fp8train.convert(build_model("micro", 300, torch.device("cpu")), recipe=simulated_recipe(c))
        assert isinstance(model.lm_head, SimulatedLinear) is include
        assert sum(isinstance(m, SimulatedLinear) for m in model.modules()) == 14 + include
        assert model.lm_head.weight.shape == (300, 64)
