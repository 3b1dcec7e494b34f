"""``fp8train train --nproc 2`` on CPU (gloo): FSDP2-sharded coat training with distributed checkpoints that
resume in a single process, against a single-process run over the same micro-batches."""

from __future__ import annotations

import json
import pathlib

import pytest

from fp8train.cli import main
from fp8train.train.loop import train

from train_fixtures import tiny_config

pytestmark = pytest.mark.slow


def _losses(run: pathlib.Path) -> list:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _flags(c) -> list:
    return ["--model", c.model, "--vocab-size", str(c.vocab_size), "--steps", str(c.steps), "--batch-size",
            str(c.batch_size), "--seq-len", str(c.seq_len), "--eval-batches", "2", "--eval-every", "2",
            "--checkpoint-every", "2", "--data", c.data, "--cache-dir", c.cache_dir, "--tokenizer-train-bytes",
            str(c.tokenizer_train_bytes), "--no-progress", "--device", "cpu", "--recipe", "coat"]


def test_nproc_two_then_resume_in_one_process(tmp_path):
    base = tiny_config(tmp_path, steps=4, recipe="coat", optimizer="fp8adamw")
    # the reference: one process, two micro-batches per step = the same micro-batches as 2 processes x 1
    reference = train(tiny_config(tmp_path, steps=4, recipe="coat", optimizer="fp8adamw", grad_accum=2,
                                  out=str(tmp_path / "reference")))
    assert reference["processes"] == 1

    run = tmp_path / "sharded"
    # two decoder layers per FSDP unit: the same sums as one unit per layer (tests/test_distributed.py)
    assert main(["train", *_flags(base), "--out", str(run), "--nproc", "2", "--stop-after", "2",
                 "--fsdp-layers-per-unit", "2"]) == 0
    step2 = run / "checkpoints" / "step_00000002"
    info = json.loads((step2 / "fp8train.json").read_text())
    assert info["world_size"] == 2 and info["extra"]["step"] == 2
    assert sorted(p.name for p in step2.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["nproc"] == 2 and config["environment"]["processes"] == 2
    assert config["train"]["fsdp_layers_per_unit"] == 2
    sharded = _losses(run)
    # FP8 linears on all-gathered weights: the first step is the single-process one exactly
    assert sharded[0] == _losses(tmp_path / "reference")[0]

    # resume on ONE process (no FSDP): grad_accum becomes 2 so that a step keeps its micro-batches
    assert main(["train", "--out", str(run), "--resume", "--nproc", "1"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_from_step"] == 2 and summary["processes"] == 1
    assert json.loads((run / "config.json").read_text())["train"]["grad_accum"] == 2
    losses = _losses(run)
    assert len(losses) == 4 and losses[:2] == sharded[:2]
    # the same micro-batches per step; only the norm weights' moments differ (float32 when sharded)
    for got, want in zip(losses, _losses(tmp_path / "reference")):
        assert got == pytest.approx(want, rel=1e-3)
    # the run's last checkpoint is a single-process one again
    assert (run / "checkpoints" / "step_00000004" / "manifest.json").is_file()


def test_nproc_must_match_the_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    c = tiny_config(tmp_path, nproc=3)
    from fp8train.train.config import TrainError

    with pytest.raises(TrainError, match="launcher started 2 processes"):
        train(c)


def test_nproc_two_resumes_its_scale_predictions_rank_by_rank(tmp_path):
    """Delayed scaling under FSDP2: ranks see different data, so their predicted scales differ; the distributed
    checkpoint keeps every rank's and a resume on 2 processes continues the uninterrupted run bit for bit."""

    base = tiny_config(tmp_path, steps=4)
    flags = [*_flags(base), "--delayed-scaling", "--nproc", "2"]
    assert main(["train", *flags, "--out", str(tmp_path / "straight")]) == 0
    run = tmp_path / "resumed"
    assert main(["train", *flags, "--out", str(run), "--stop-after", "2"]) == 0
    info = json.loads((run / "checkpoints" / "step_00000002" / "fp8train.json").read_text())
    saved = info["extra"]["scale_predictions"]
    # the MLPs' predictions (3 floats) and every FP8 linear's (2: input, output gradient), one row per rank
    assert {"model.layers.0.mlp", "model.layers.1.mlp", "model.layers.1.self_attn.o_proj"} <= set(saved)
    assert main(["train", "--out", str(run), "--resume", "--nproc", "2"]) == 0
    assert _losses(run) == _losses(tmp_path / "straight")


def test_launcher_outcome_from_the_ranks_result_files():
    from fp8train.train.config import TrainError
    from fp8train.train.distributed import _outcome
    from fp8train.train.loop import Interrupted

    done = {"summary": {"status": "stopped", "step": 2}}
    assert _outcome({0: done, 1: done}, 2, None) == done["summary"]
    # a process that died after every rank wrote its result lost nothing (gloo's teardown at exit can abort)
    late = RuntimeError("process 1 terminated with signal SIGABRT")
    with pytest.warns(RuntimeWarning, match="every rank finished"):
        assert _outcome({0: done, 1: done}, 2, late) == done["summary"]
    # ... but one that died before writing its result is a failed run, even when rank 0 finished
    with pytest.raises(RuntimeError, match="stopped without a result"):
        _outcome({0: done}, 2, late)
    with pytest.raises(RuntimeError, match="rank 1 of 2 failed:\nTraceback"):
        _outcome({0: done, 1: {"error": "crash", "message": "Traceback ..."}}, 2, late)
    with pytest.raises(Interrupted, match="stopped at step 3"):
        _outcome({0: {"error": "interrupted", "message": "stopped at step 3"}, 1: done}, 2, None)
    with pytest.raises(TrainError, match="no data"):
        _outcome({0: {"error": "train", "message": "no data"}, 1: {"error": "train", "message": "no data"}}, 2, None)
