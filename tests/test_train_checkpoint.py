"""Checkpoints: exact round trips without pickle, rotation, damaged-checkpoint fallback, and a SIGKILL mid-save."""

from __future__ import annotations

import json
import math
import os
import pathlib
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from fp8train.train import checkpoint as ckpt
from fp8train.train.loop import train
from fp8train.train.metrics import MetricsLog

from train_fixtures import tiny_config

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_tree_round_trip_is_exact(tmp_path):
    tree = {
        "state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4, 5).to(torch.float8_e4m3fn),
                      "v": torch.randn(7, dtype=torch.bfloat16), "scale": 0.125},
                  1: {"q": torch.randint(-128, 127, (3,), dtype=torch.int8)}},
        "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "params": [0, 1], "foreach": None, "amsgrad": False}],
        "nan": float("nan"), "numpy": np.arange(5, dtype=np.uint32), "text": "x",
    }
    ckpt.save_tree(tree, tmp_path, "opt")
    back = ckpt.load_tree(tmp_path, "opt")
    assert set(back["state"]) == {0, 1}
    for k, v in tree["state"][0].items():
        if isinstance(v, torch.Tensor):
            assert back["state"][0][k].dtype == v.dtype
            assert torch.equal(back["state"][0][k].view(torch.uint8) if v.dtype == torch.float8_e4m3fn
                               else back["state"][0][k], v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
    assert back["param_groups"][0]["betas"] == (0.9, 0.95) and back["param_groups"][0]["foreach"] is None
    assert math.isnan(back["nan"]) and back["numpy"].dtype == np.uint32 and back["numpy"].tolist() == list(range(5))
    assert back["state"][0]["scale"] == 0.125 and back["text"] == "x"


def test_tree_refuses_objects_that_would_need_pickle(tmp_path):
    with pytest.raises(TypeError, match="no pickling"):
        ckpt.save_tree({"fn": object()}, tmp_path, "bad")


def test_aliased_tensors_are_stored(tmp_path):
    t = torch.arange(6.0)
    ckpt.save_tree({"a": t, "b": t, "c": t[2:]}, tmp_path, "alias")
    back = ckpt.load_tree(tmp_path, "alias")
    assert torch.equal(back["a"], t) and torch.equal(back["b"], t) and torch.equal(back["c"], t[2:])


def _model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_checkpoint_restores_everything_without_unpickling(tmp_path, monkeypatch):
    model, opt, sched = _model_and_optimizer()
    torch.manual_seed(123)
    path = ckpt.save_checkpoint(tmp_path, 3, model, opt, sched, {"sampler": {"epoch": 1, "index": 7}})
    expected_next = torch.rand(3)

    def no_unpickling(*args, **kwargs):
        raise AssertionError("checkpoint loading must not unpickle")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    model2, opt2, sched2 = _model_and_optimizer(seed=1)
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)
    ckpt.restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), expected_next)
    assert state["step"] == 3 and state["sampler"] == {"epoch": 1, "index": 7}
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), model2.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], opt2.state[q][key])
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_rotation_and_damaged_newest_checkpoint(tmp_path):
    model, opt, sched = _model_and_optimizer()
    for step in (2, 4, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2)
    assert [s for s, _ in ckpt.step_dirs(tmp_path)] == [4, 6]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000006"
    with open(tmp_path / "step_00000006" / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.warns(UserWarning, match="damaged checkpoint"):
        assert ckpt.latest_checkpoint(tmp_path).name == "step_00000004"
    with pytest.raises(ValueError, match="not loadable"):
        ckpt.load_checkpoint(tmp_path / "step_00000006", model, opt, sched)


def _wait_for(path: pathlib.Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before pausing:\n{proc.stderr.read()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the save never paused")
        time.sleep(0.05)


def test_sigkill_during_save_keeps_the_previous_checkpoint(tmp_path):
    config = tiny_config(tmp_path, steps=6, checkpoint_every=2)
    flag = tmp_path / "paused"
    args = [sys.executable, "-m", "fp8train", "train", "--model", "micro", "--vocab-size", "300", "--steps", "6",
            "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2", "--eval-every", "3",
            "--checkpoint-every", "2", "--data", config.data, "--cache-dir", config.cache_dir,
            "--tokenizer-train-bytes", "20000", "--device", "cpu", "--out", config.out, "--no-progress"]
    env = {**os.environ, "FP8TRAIN_TEST_PAUSE_IN_SAVE": f"4:{flag}", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(flag, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    checkpoints = pathlib.Path(config.out) / "checkpoints"
    assert any(p.name.startswith(".tmp-step_00000004") for p in checkpoints.iterdir())  # the half-written save
    assert ckpt.latest_checkpoint(checkpoints).name == "step_00000002"
    assert not (pathlib.Path(config.out) / "summary.json").exists()

    # the previous checkpoint loads, and --resume finishes with the losses of an uninterrupted run
    env.pop("FP8TRAIN_TEST_PAUSE_IN_SAVE")
    done = subprocess.run([sys.executable, "-m", "fp8train", "train", "--out", config.out, "--resume",
                           "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout and "step 2" in done.stdout
    assert [p.name for p in checkpoints.iterdir()] and not any(p.name.startswith(".tmp") for p in checkpoints.iterdir())
    straight = tiny_config(tmp_path / "straight", steps=6, checkpoint_every=2, data=config.data,
                           cache_dir=config.cache_dir)
    train(straight, log=lambda s: None)
    resumed = [(r["step"], r["loss"]) for r in MetricsLog(pathlib.Path(config.out) / "metrics.jsonl").read()]
    expected = [(r["step"], r["loss"]) for r in MetricsLog(pathlib.Path(straight.out) / "metrics.jsonl").read()]
    assert resumed == expected
    assert json.loads((pathlib.Path(config.out) / "summary.json").read_text())["resumed_from_step"] == 2
