"""``fp8train compare``: the same run once per recipe, then one report.

Each recipe trains in its own subprocess (``python -m fp8train.train.compare --child CONFIG``) so that peak
memory is measured per recipe and a crash in one recipe does not take the others down.  Seed, data, data
order, initialisation and steps are identical; only ``recipe`` (and with ``--optimizer auto`` the optimizer)
differs.  Output: ``<out>/<recipe>/`` run directories, ``report.md``, ``loss_curves.png``, ``memory.png``
and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Callable

from .checkpoint import write_json_atomic
from .config import RECIPES, TrainConfig, TrainError, resolve
from .metrics import MetricsLog, format_bytes
from .report import compare_markdown, gap_percent, plot_compare_losses, plot_memory


def parse_recipes(text: str) -> list[str]:
    recipes = [r.strip() for r in text.split(",") if r.strip()]
    if not recipes:
        raise TrainError("--recipes is empty; e.g. --recipes bf16,fp8,coat")
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise TrainError(f"unknown recipe(s) {', '.join(map(repr, unknown))}; choose from {', '.join(RECIPES)}")
    if len(set(recipes)) != len(recipes):
        raise TrainError(f"--recipes lists a recipe twice: {text}")
    return recipes


def compare(recipes: list[str], base: TrainConfig, out: str | None = None, overwrite: bool = False,
            log: Callable[[str], None] = print) -> dict:
    """Run every recipe with ``base``'s settings; returns {"summaries", "failures", "report"}."""
    from .data import prepare_corpus

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    root = pathlib.Path(out or os.path.join("runs", f"compare-{stamp}"))
    configs = {r: resolve(dataclasses.replace(base, recipe=r, out=str(root / r), resume=False, stop_after=None,
                                              overwrite=True)) for r in recipes}
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise TrainError(f"{root} is not empty; pass --overwrite or choose another --out")
    if root.exists() and overwrite:
        for name in [*recipes, "report.md", "results.json", "loss_curves.png", "memory.png"]:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    first = next(iter(configs.values()))
    # tokenize once in this process so that the recipe runs only read the cache
    prepare_corpus(first.data, first.text_field, first.vocab_size, first.eval_fraction,
                   first.tokenizer_train_bytes, first.cache_dir, log=log)
    root.mkdir(parents=True, exist_ok=True)

    summaries, failures, curves = {}, {}, {}
    for recipe, config in configs.items():
        log(f"--- recipe {recipe} ---")
        run_dir = pathlib.Path(config.out)
        run_dir.mkdir(parents=True, exist_ok=True)
        config_path = root / f".config-{recipe}.json"
        config_path.write_text(json.dumps(config.to_json()))
        result = subprocess.run([sys.executable, "-m", "fp8train.train.compare", "--child", str(config_path)])
        config_path.unlink(missing_ok=True)
        summary_path = run_dir / "summary.json"
        if result.returncode == 0 and summary_path.is_file():
            summaries[recipe] = json.loads(summary_path.read_text())
        else:
            failure = run_dir / "failure.json"
            failures[recipe] = (json.loads(failure.read_text())["error"] if failure.is_file()
                                else f"exit status {result.returncode}")
            log(f"recipe {recipe} failed: {failures[recipe]}")
        curves[recipe] = MetricsLog(run_dir / "metrics.jsonl").read()

    settings = {"model": first.model, "steps": first.steps, "batch": first.batch_size, "seq_len": first.seq_len,
                "grad_accum": first.grad_accum, "lr": first.lr, "seed": first.seed,
                "data": first.data or "python stdlib", "device": next(iter(summaries.values()))["device"]
                if summaries else first.device}
    title = f"{first.model}, {first.steps} steps, seed {first.seed}"
    if any(curves.values()):
        plot_compare_losses({r: c for r, c in curves.items() if c}, root / "loss_curves.png", title)
    if summaries:
        plot_memory(summaries, root / "memory.png", f"memory breakdown, one micro-batch ({first.model})")
    report = compare_markdown(summaries, failures, settings)
    (root / "report.md").write_text(report)
    baseline = summaries.get("bf16", {}).get("final_eval_loss")
    results = {"settings": settings, "summaries": summaries, "failures": failures,
               "gap_to_bf16_percent": {r: gap_percent(s["final_eval_loss"], baseline)
                                       for r, s in summaries.items()} if baseline else {}}
    write_json_atomic(root / "results.json", results)
    for recipe, s in summaries.items():
        log(f"{recipe:5} eval loss {s['final_eval_loss']:.4f}  {s['tokens_per_s'] or 0:,.0f} tok/s  "
            f"peak {format_bytes(s['peak_memory_bytes'])}")
    log(f"report: {root / 'report.md'}")
    return {"summaries": summaries, "failures": failures, "report": root / "report.md"}


def _child(config_path: str) -> int:
    from .cli import run_train

    return run_train(TrainConfig.from_json(json.loads(pathlib.Path(config_path).read_text())))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(_child(sys.argv[2]))
    sys.exit("usage: python -m fp8train.train.compare --child CONFIG.json (use `fp8train compare` instead)")
