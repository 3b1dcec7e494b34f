"""The command line: bad input gives a clear message and a non-zero exit; compare; one real stdlib run."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fp8train.cli import main

from train_fixtures import write_corpus

ROOT = pathlib.Path(__file__).resolve().parent.parent
MICRO = ["--model", "micro", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "2",
         "--tokenizer-train-bytes", "20000", "--device", "cpu", "--no-progress"]


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus")


def _run(capsys, *args):
    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_unknown_recipe(tmp_path, capsys, corpus):
    code, err = _run(capsys, "--recipe", "fp4", "--data", str(corpus), "--out", str(tmp_path / "r"), *MICRO)
    assert code == 1 and "unknown recipe 'fp4'" in err and "bf16, fp8, coat" in err
    assert not (tmp_path / "r").exists()


def test_sequence_longer_than_the_model_allows(tmp_path, capsys, corpus):
    code, err = _run(capsys, "--data", str(corpus), "--out", str(tmp_path / "r"), *MICRO, "--seq-len", "4096")
    assert code == 1 and "max_position_embeddings=256" in err and "lower --seq-len" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kind", ["missing", "empty-dir", "empty-file", "binary-only"])
def test_unusable_data(tmp_path, capsys, kind):
    data = tmp_path / "data"
    if kind == "empty-dir":
        data.mkdir()
    elif kind == "empty-file":
        data.write_text("")
    elif kind == "binary-only":
        data.mkdir()
        (data / "x.bin").write_bytes(b"\x00\x01\x02" * 100)
        (data / "y.txt").write_bytes("\u00e9t\u00e9".encode("utf-16"))
    code, err = _run(capsys, "--data", str(data), "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                     *MICRO)
    expected = {"missing": "does not exist", "empty-dir": "is empty", "empty-file": "is empty",
                "binary-only": "no usable text"}[kind]
    assert code == 1 and expected in err, err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_process_exit_status_and_resume_without_checkpoint(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "fp8train", "train", "--out", str(tmp_path / "r"), "--resume"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "has no checkpoints/" in done.stderr and "Traceback" not in done.stderr


def test_compare_writes_report_and_plots(tmp_path, corpus):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "cmp"
    done = subprocess.run([sys.executable, "-m", "fp8train", "compare", "--recipes", "bf16,fp8,coat", "--steps", "4",
                           "--eval-every", "2", "--data", str(corpus), "--cache-dir", str(tmp_path / "c"),
                           "--out", str(out), *MICRO], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    results = json.loads((out / "results.json").read_text())
    summaries = results["summaries"]
    assert list(summaries) == ["bf16", "fp8", "coat"] and not results["failures"]
    assert {s["optimizer"] for s in summaries.values()} == {"adamw", "fp8adamw"}
    # same seed, data and steps: identical first-step loss (same init and first batch, before any update)
    first = [json.loads((out / r / "metrics.jsonl").read_text().splitlines()[0])["loss"] for r in summaries]
    assert max(first) - min(first) < 0.05
    bf16 = summaries["bf16"]["final_eval_loss"]
    for recipe, s in summaries.items():
        assert results["gap_to_bf16_percent"][recipe] == pytest.approx(100 * (s["final_eval_loss"] - bf16) / bf16)
    # FP8 AdamW states are smaller than torch AdamW's fp32 moments; weights are the same parameters
    mem = {r: s["memory_breakdown"] for r, s in summaries.items()}
    assert mem["coat"]["optimizer_state_bytes"] < 0.5 * mem["bf16"]["optimizer_state_bytes"]
    assert mem["coat"]["weights_bytes"] == mem["bf16"]["weights_bytes"]
    assert mem["coat"]["activations_bytes"] < mem["bf16"]["activations_bytes"]
    report = (out / "report.md").read_text()
    assert "| coat |" in report and "gap to bf16" in report and "loss_curves.png" in report
    for png in ("loss_curves.png", "memory.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_compare_refuses_unknown_recipes_before_training(tmp_path, capsys):
    assert main(["compare", "--recipes", "bf16,int3", "--out", str(tmp_path / "cmp")]) == 1
    assert "unknown recipe(s) 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_default_corpus_end_to_end(tmp_path):
    """The one test on the real corpus: this Python's standard library, the default tiny model, a few steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FP8TRAIN_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "fp8train", "train", "--steps", "3", "--batch-size", "2",
                           "--seq-len", "64", "--eval-batches", "1", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert summary["model"] == "tiny" and summary["recipe"] == "bf16" and summary["steps"] == 3
    assert "standard library" in config["corpus"]["source"] and config["corpus"]["documents"] > 500
    assert config["corpus"]["tokenizer_vocab_size"] == 4096
    assert list(pathlib.Path(env["FP8TRAIN_CACHE"]).glob("corpus-*/tokenizer.json"))
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tmp_path, corpus):
    import signal
    import time

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "fp8train", "train", "--steps", "100000", "--checkpoint-every", "0",
                             "--data", str(corpus), "--cache-dir", str(tmp_path / "c"), "--out", str(out), *MICRO],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else ""
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "--resume" in err, err
    failure = json.loads((out / "failure.json").read_text())
    stopped_at = failure["step"]
    assert failure["status"] == "interrupted" and stopped_at >= 2
    assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step_{stopped_at:08d}"]
    assert not (out / "summary.json").exists()
    with pytest.warns(UserWarning, match="steps 100000 -> "):
        assert main(["train", "--out", str(out), "--resume", "--steps", str(stopped_at + 2), "--no-progress"]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == stopped_at + 2
    assert not (out / "failure.json").exists()


def test_fp8_weight_cache_flag_has_three_states():
    import argparse

    from fp8train.train.config import add_train_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    states = [config_from_args(parser.parse_args(argv)).fp8_weight_cache
              for argv in ([], ["--fp8-weight-cache"], ["--no-fp8-weight-cache"])]
    assert states == [None, True, False]
    states = [config_from_args(parser.parse_args(argv)).fused_residual
              for argv in ([], ["--fused-residual"], ["--no-fused-residual"])]
    assert states == [None, True, False]
    states = [config_from_args(parser.parse_args(argv)).flash_attention
              for argv in ([], ["--flash-attention"], ["--no-flash-attention"])]
    assert states == [None, True, False]


def test_resume_on_fewer_processes_drops_an_inherited_cuda_graph(tmp_path):
    """A 2-process --cuda-graph run resumed on 1 process needs 2 micro-batches per step, which a graph cannot
    replay: the resumed run goes eager (warned), keeping the same micro-batches; a typed --cuda-graph still fails."""
    import argparse
    import dataclasses

    from fp8train.train.config import TrainConfig, TrainError, add_train_arguments, config_from_args, resolve

    saved = TrainConfig(out=str(tmp_path), nproc=2, cuda_graph=True, batch_size=4)
    (tmp_path / "config.json").write_text(json.dumps({"train": saved.to_json()}))
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    with pytest.warns(UserWarning, match="--cuda-graph is off"):
        resumed = config_from_args(parser.parse_args(["--out", str(tmp_path), "--resume", "--nproc", "1"]))
    assert (resumed.nproc, resumed.grad_accum, resumed.cuda_graph) == (1, 2, False)
    typed = config_from_args(parser.parse_args(["--out", str(tmp_path), "--resume", "--nproc", "1", "--cuda-graph"]))
    assert (typed.grad_accum, typed.cuda_graph) == (2, True)
    with pytest.raises(TrainError, match="--grad-accum > 1"):
        resolve(dataclasses.replace(typed, device="auto"))
