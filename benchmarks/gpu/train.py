"""GPU checks and end-to-end numbers for ``fp8train train`` (run by benchmarks/gpu_suite.py, ~60-90 s on an H100).

Checks:
  * train/run-<recipe>: the 953M Llama ("1b" preset, vocab 32000) trains 30 steps at batch 4 x 2048 on the
    stdlib corpus with bf16 autocast for bf16, fp8 and coat; the final eval loss is finite and the FP8 recipes
    end within 3 % of bf16's eval loss;
  * train/resume-cuda: a micro model on CUDA, 6 steps straight vs 3 + --resume: losses agree to 1e-3
    (relative; bit-identical is reported but not required -- CUDA backward kernels use atomics);
  * train/oom-message: "7b" at batch 8 x 4096 (fp32 weights + activations) cannot fit one 80 GB card; the run must end
    in TrainError naming --batch-size, write failure.json and no summary.json.
Benchmark rows (one per recipe): tokens/s (first step excluded), torch.cuda.max_memory_allocated, and the
weights / gradients / optimizer-state / activation bytes of one micro-batch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import pathlib
import tempfile

import torch

from fp8train.train.config import TrainConfig, TrainError
from fp8train.train.loop import train
from fp8train.train.metrics import MetricsLog

RECIPES = ("bf16", "fp8", "coat")


def _free():
    gc.collect()
    torch.cuda.empty_cache()


def _quiet(_msg):
    pass


def run(report) -> None:
    work = pathlib.Path(tempfile.mkdtemp(prefix="fp8train-train-bench-"))
    cache = str(work / "cache")
    base = TrainConfig(model="1b", steps=30, batch_size=4, seq_len=2048, eval_batches=2, eval_every=30,
                       checkpoint_every=-1, cache_dir=cache, progress=False, device="cuda", warmup_steps=5)
    losses = {}
    for recipe in RECIPES:
        name = f"train/run-{recipe}"
        try:
            s = train(dataclasses.replace(base, recipe=recipe, out=str(work / recipe)), log=_quiet)
            losses[recipe] = s["final_eval_loss"]
            report.add_bench(f"train/1b-{recipe}-b4x2048", tokens_per_s=round(s["tokens_per_s"]),
                             peak_gib=round(s["peak_memory_bytes"] / 2**30, 2),
                             **{k.replace("_bytes", "_gib"): round(v / 2**30, 3)
                                for k, v in s["memory_breakdown"].items()},
                             optimizer=s["optimizer"], eval_loss=round(s["final_eval_loss"], 4))
            ok = math.isfinite(s["final_eval_loss"])
            if recipe != "bf16" and "bf16" in losses:
                gap = 100 * (s["final_eval_loss"] - losses["bf16"]) / losses["bf16"]
                report.check(name, ok and gap < 3.0, eval_loss=s["final_eval_loss"], gap_to_bf16_percent=gap)
            else:
                report.check(name, ok, eval_loss=s["final_eval_loss"])
        except Exception as exc:  # noqa: BLE001 - record and go on with the next recipe
            report.check(name, False, error=repr(exc)[:500])
        _free()
    if len(losses) > 1 and "bf16" in losses:
        report.add_bench("train/1b-eval-gap-vs-bf16", **{
            f"{r}_eval_gap_percent": round(100 * (losses[r] - losses["bf16"]) / losses["bf16"], 3) for r in losses})

    # exact-ish resume on CUDA (micro model, the default corpus already tokenized above at another vocab)
    try:
        micro = TrainConfig(model="micro", steps=6, batch_size=8, seq_len=128, eval_batches=2, eval_every=3,
                            checkpoint_every=3, cache_dir=cache, progress=False, device="cuda", recipe="coat")
        train(dataclasses.replace(micro, out=str(work / "straight")), log=_quiet)
        train(dataclasses.replace(micro, out=str(work / "resumed"), stop_after=3), log=_quiet)
        train(dataclasses.replace(micro, out=str(work / "resumed"), resume=True), log=_quiet)
        a = [r["loss"] for r in MetricsLog(work / "straight" / "metrics.jsonl").read()]
        b = [r["loss"] for r in MetricsLog(work / "resumed" / "metrics.jsonl").read()]
        worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
        report.check("train/resume-cuda", len(a) == len(b) == 6 and worst < 1e-3, max_rel_diff=worst,
                     bit_identical=a == b)
    except Exception as exc:  # noqa: BLE001
        report.check("train/resume-cuda", False, error=repr(exc)[:500])
    _free()

    # a batch that cannot fit: clear message, failure.json, no summary.json
    out = work / "oom"
    try:
        train(TrainConfig(model="7b", recipe="bf16", steps=2, batch_size=8, seq_len=4096, eval_batches=1,
                          checkpoint_every=-1, cache_dir=cache, progress=False, device="cuda", out=str(out)),
              log=_quiet)
        report.check("train/oom-message", False, error="7b at batch 8x4096 unexpectedly fit")
    except TrainError as exc:
        failure = json.loads((out / "failure.json").read_text()) if (out / "failure.json").exists() else {}
        report.check("train/oom-message", "--batch-size" in str(exc) and not (out / "summary.json").exists()
                     and failure.get("status") == "failed", message=str(exc)[:300])
    except Exception as exc:  # noqa: BLE001
        report.check("train/oom-message", False, error=repr(exc)[:500])
    _free()
